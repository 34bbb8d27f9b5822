"""Model surgery for LoRA/DoRA (Eq. 1 / Eq. 5) and the PEFT on-disk adapter format.

Target rule: a pattern matches a module name (dotted, as in ``model.named_modules()``) if the
name equals the pattern, ends with ``"." + pattern``, or ``re.fullmatch(pattern, name)``
succeeds. Only modules of type exactly ``nn.Linear`` are adapted (subclasses such as
``NonDynamicallyQuantizableLinear`` may be used through their weight directly); modules inside
an adapter wrapper (``base_layer``, ``lora_A``, ...) are never matched. Wrapping renames the base
parameters as PEFT does: ``<module>.weight`` becomes ``<module>.base_layer.weight``.

PEFT format (what ``save_adapter`` writes and ``load_adapter`` reads):
``adapter_config.json`` (a ``LoraConfig`` with ``peft_type="LORA"``; ``target_modules`` is the
list of adapted module names, which PEFT matches exactly) and ``adapter_model.safetensors`` with
``<prefix><module>.lora_A.weight`` (r, in), ``.lora_B.weight`` (out, r) and, for DoRA,
``.lora_magnitude_vector`` (out,) (PEFT writes it without ``.weight``; both are read).

Magnitude-only DoRA modules (Table 6) have no PEFT counterpart of their own. They are written
as DoRA modules with ``lora_A = lora_B = 0`` (rank ``r``): then V' = W_0 and PEFT computes
exactly W' = m · W_0 / ||W_0||. Reading back, a DoRA module whose A and B are both all-zero is
made magnitude-only; that loses nothing, since with A = B = 0 neither factor ever gets a
gradient.

The wda spec itself (its patterns, and ``detach_norm``, which PEFT has no field for) goes to a
side file ``wda_spec.json`` that PEFT ignores: an extra key in ``adapter_config.json`` makes PEFT
warn on every load, and a second safetensors metadata key would make the file's bytes vary
between saves (safetensors writes metadata keys in hash order).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wda.train.dora import DoRALinear, LoRALinear, lora_scaling
from wda.names import matches

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SPEC_NAME = "wda_spec.json"
METHODS = ("lora", "dora")
_Wrapper = (LoRALinear, DoRALinear)


@dataclass(frozen=True)
class AdapterSpec:
    """Which adapter to put where. ``targets`` / ``magnitude_only`` follow the target rule above.

    A module matching ``magnitude_only`` (DoRA only) gets a trainable magnitude but no A/B,
    whether or not it also matches ``targets``.
    """

    method: str  # "lora" or "dora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    detach_norm: bool = True  # DoRA only (Sec. 4.3)
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # module-name suffixes or regexes
    magnitude_only: tuple[str, ...] = ()  # DoRA only: magnitude, no A/B (Table 6)

    def __post_init__(self) -> None:
        for name in ("targets", "magnitude_only"):  # accept lists, keep the spec hashable
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.r <= 0:
            raise ValueError(f"r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.magnitude_only and self.method != "dora":
            raise ValueError("magnitude_only targets need method='dora'")


def adapter_modules(model: nn.Module) -> dict[str, LoRALinear | DoRALinear]:
    """Every LoRA/DoRA wrapper in the model, by dotted module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _Wrapper)}


def _plain_linears(model: nn.Module) -> dict[str, nn.Linear]:
    wrappers = adapter_modules(model)
    return {n: m for n, m in model.named_modules()
            if type(m) is nn.Linear and not any(n.startswith(w + ".") for w in wrappers)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _freeze_all_but_adapters(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model, trainable_only=False).values():
        p.requires_grad_(True)


def _wrap(base: nn.Linear, spec: AdapterSpec, r: int, alpha: float,
          magnitude_only: bool) -> LoRALinear | DoRALinear:
    if spec.method == "lora":
        return LoRALinear(base, r, alpha, spec.dropout, spec.use_rslora)
    return DoRALinear(base, r, alpha, spec.dropout, spec.use_rslora, spec.detach_norm,
                      magnitude_only=magnitude_only)


def add_adapters(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """Wrap every ``nn.Linear`` matching the spec in place, freeze everything else.

    Returns the adapted module names. Raises if nothing matches.
    """
    linears = _plain_linears(model)
    names = []
    for name, module in linears.items():
        mag_only = any(matches(name, p) for p in spec.magnitude_only)
        if mag_only or any(matches(name, p) for p in spec.targets):
            _replace(model, name, _wrap(module, spec, spec.r, spec.alpha, mag_only))
            names.append(name)
    if not names:
        raise ValueError(f"no nn.Linear module matches targets={spec.targets} "
                         f"magnitude_only={spec.magnitude_only}")
    _freeze_all_but_adapters(model)
    return names


def adapter_parameters(model: nn.Module, trainable_only: bool = True) -> dict[str, nn.Parameter]:
    """Adapter parameters (lora_A/lora_B weights, DoRA magnitudes) by full parameter name."""
    out = {}
    for name, module in adapter_modules(model).items():
        for pname, p in module.named_parameters():
            if not pname.startswith("base_layer.") and (p.requires_grad or not trainable_only):
                out[f"{name}.{pname}"] = p
    return out


_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)
NORMS_BIASES_NAME = "norms_biases.safetensors"


def norm_bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every norm-layer parameter and every bias outside the adapters' A/B, by full name
    (PEFT ``bias="all"`` plus the norms: what the paper's VL-BART recipe also trains)."""
    wrappers = adapter_modules(model)
    out = {}
    for mname, module in model.named_modules():
        inside = any(mname.startswith(w + ".lora_") for w in wrappers)
        for pname, p in module.named_parameters(recurse=False):
            if not inside and (isinstance(module, _NORMS) or pname == "bias"):
                out[f"{mname}.{pname}" if mname else pname] = p
    return out


def save_norms_biases(model: nn.Module, out_dir: str | Path) -> Path:
    """Write :func:`norm_bias_parameters` to ``out_dir/norms_biases.safetensors``, under the
    names of the plain model (``.base_layer`` dropped). Adapter readers ignore the file: it
    completes the checkpoint of a run that trained them, it is not part of the PEFT adapter."""
    from safetensors.torch import save_file

    tensors = {k.replace(".base_layer.", "."): p.detach().to("cpu").contiguous()
               for k, p in norm_bias_parameters(model).items()}
    path = Path(out_dir) / NORMS_BIASES_NAME
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back."""
    for name, module in adapter_modules(model).items():
        module.merge()
        _replace(model, name, module.base_layer)
    return model


# ---------------------------------------------------------------- PEFT format

def _config_dict(spec: AdapterSpec, targets: list[str], rank_pattern: dict, alpha_pattern: dict) -> dict:
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "r": spec.r, "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout, "use_rslora": spec.use_rslora,
        "use_dora": spec.method == "dora", "target_modules": targets, "exclude_modules": None,
        "fan_in_fan_out": False, "bias": "none", "lora_bias": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "layer_replication": None,
        "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {},
    }


def save_adapter(model: nn.Module, out_dir: str | Path, spec: AdapterSpec,
                 prefix: str = "base_model.model.") -> None:
    """Write the model's adapters in PEFT format (loadable by ``PeftModel.from_pretrained``)."""
    from safetensors.torch import save_file

    wrappers = adapter_modules(model)
    if not wrappers:
        raise ValueError("the model has no LoRA/DoRA adapters to save")
    want = DoRALinear if spec.method == "dora" else LoRALinear
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern = {}, {}
    for name, mod in sorted(wrappers.items()):
        if not isinstance(mod, want):  # FSDP2 subclasses the wrapper (FSDPDoRALinear)
            raise ValueError(f"{name} is a {type(mod).__name__}, spec.method is {spec.method!r}")
        key = prefix + name
        if getattr(mod, "magnitude_only", False):
            # No A/B: zeros make V' = W_0, so PEFT computes W' = m · W_0 / ||W_0|| exactly.
            m = mod.lora_magnitude_vector
            a = torch.zeros(spec.r, mod.in_features, dtype=m.dtype)
            b = torch.zeros(mod.out_features, spec.r, dtype=m.dtype)
        else:
            a, b = mod.lora_A.weight, mod.lora_B.weight
            if mod.r != spec.r:
                rank_pattern[name] = mod.r
            # PEFT derives s from (r, alpha, use_rslora); pick the alpha giving this module's s.
            if lora_scaling(mod.r, spec.alpha, spec.use_rslora) != mod.scaling:
                alpha_pattern[name] = mod.scaling * (mod.r ** 0.5 if spec.use_rslora else mod.r)
        tensors[f"{key}.lora_A.weight"] = a
        tensors[f"{key}.lora_B.weight"] = b
        if isinstance(mod, DoRALinear):
            tensors[f"{key}.lora_magnitude_vector"] = mod.lora_magnitude_vector
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _config_dict(spec, sorted(wrappers), rank_pattern, alpha_pattern)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / SPEC_NAME).write_text(json.dumps(dataclasses.asdict(spec), indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})


_UNSUPPORTED = ("modules_to_save", "layer_replication", "lora_bias", "target_parameters",
                "trainable_token_indices", "use_qalora", "fan_in_fan_out")
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B",
             ".lora_magnitude_vector": "m", ".lora_magnitude_vector.weight": "m"}


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's ``get_pattern_key`` rule: first key with re.match(rf"(.*\\.)?({key})$", name)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    from safetensors import safe_open

    cfg = json.loads((adapter_dir / CONFIG_NAME).read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir / CONFIG_NAME}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise ValueError(f"{adapter_dir / CONFIG_NAME}: {key}={cfg[key]!r} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{adapter_dir / CONFIG_NAME}: bias={cfg['bias']!r} is not supported")
    with safe_open(str(adapter_dir / WEIGHTS_NAME), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    spec_path = adapter_dir / SPEC_NAME
    saved = json.loads(spec_path.read_text()) if spec_path.is_file() else None
    return cfg, tensors, saved


def _group(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"A", "B", "m"}} from checkpoint keys, with or without the PEFT prefix."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for suffix, part in _SUFFIXES.items():
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                name = name[len(prefix):] if name.startswith(prefix) else name
                groups.setdefault(name, {})[part] = t
                break
        else:
            raise ValueError(f"unsupported adapter tensor {key!r}")
    return groups


def load_adapter(model: nn.Module, adapter_dir: str | Path,
                 prefix: str = "base_model.model.") -> AdapterSpec:
    """Read a PEFT LoRA/DoRA adapter: wrap its modules (or reuse wrappers), load the tensors.

    Freezes everything but the adapter, like ``add_adapters``. Returns the spec: the one wda
    saved if present, else one rebuilt from the config with the loaded module names.
    """
    adapter_dir = Path(adapter_dir)
    cfg, tensors, saved = _read(adapter_dir)
    method = "dora" if cfg.get("use_dora") else "lora"
    spec = AdapterSpec(method=method, r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                       dropout=float(cfg.get("lora_dropout") or 0.0),
                       use_rslora=bool(cfg.get("use_rslora")), targets=())
    if saved is not None:
        spec = dataclasses.replace(spec, detach_norm=bool(saved.get("detach_norm", True)))
    groups = _group(tensors, prefix)
    modules = dict(model.named_modules())
    mag_only_names = []
    for name, g in sorted(groups.items()):
        if "A" not in g or "B" not in g or ("m" in g) != (method == "dora"):
            raise ValueError(f"{adapter_dir / WEIGHTS_NAME}: module {name!r} has tensors "
                             f"{sorted(g)}, expected A, B{' and m' if method == 'dora' else ''}")
        module = modules.get(name)
        if module is None:
            raise ValueError(f"{adapter_dir / WEIGHTS_NAME}: the model has no module {name!r}")
        a, b = g["A"], g["B"]
        mag_only = method == "dora" and not a.any() and not b.any()
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, name, spec.alpha))
        if isinstance(module, _Wrapper):  # already adapted (e.g. resuming): load into it
            ok = (isinstance(module, DoRALinear) == (method == "dora")
                  and getattr(module, "magnitude_only", False) == mag_only
                  and (mag_only or module.r == a.shape[0]))
            if not ok:
                raise ValueError(f"{name} already holds a different adapter")
        elif type(module) is nn.Linear:
            module = _wrap(module, spec, a.shape[0], alpha, mag_only)
            _replace(model, name, module)
        else:
            raise ValueError(f"{name} is a {type(module).__name__}, not nn.Linear")
        _load_tensors(module, name, g)
        if mag_only:
            mag_only_names.append(name)
    _freeze_all_but_adapters(model)
    if saved is not None:
        known = {f.name for f in dataclasses.fields(AdapterSpec)}
        return AdapterSpec(**{k: v for k, v in saved.items() if k in known})
    return dataclasses.replace(spec, targets=tuple(sorted(groups)),
                               magnitude_only=tuple(mag_only_names))


@torch.no_grad()
def _load_tensors(module: LoRALinear | DoRALinear, name: str, g: dict[str, torch.Tensor]) -> None:
    pairs = [] if getattr(module, "magnitude_only", False) else [
        (module.lora_A.weight, g["A"]), (module.lora_B.weight, g["B"])]
    if isinstance(module, DoRALinear):
        pairs.append((module.lora_magnitude_vector, g["m"]))
    for param, value in pairs:
        if param.shape != value.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} "
                             f"does not fit {tuple(param.shape)}")
        param.copy_(value.to(dtype=param.dtype, device=param.device))
