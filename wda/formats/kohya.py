"""Diffusion-model LoRA / DoRA files of kohya-ss sd-scripts and LyCORIS: one ``.safetensors``
file per checkpoint (in its ``checkpoint-<step>/`` folder, or given as the file).

On disk (FORMATS.md §3):

- module names are kohya's: a prefix (``lora_unet``, ``lora_te``, SDXL ``lora_te1``/``lora_te2``),
  "_", then the module's path with every "." replaced by "_"
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``). The rule cannot be
  inverted (module names hold "_" themselves), so it is applied to the base's tensor names
  (``match_base``): diffusers names (a U-Net or text-encoder file, or prefixed ``unet.`` /
  ``text_encoder.`` / ``text_encoder_2.``) or original Stable Diffusion names
  (``model.diffusion_model.``, ``cond_stage_model.transformer.``, SDXL
  ``conditioner.embedders.0.transformer.``). An SD 1.x / 2.x U-Net LoRA (diffusers names)
  matches an original checkpoint through diffusers' own renaming (``sd_unet_names``); a
  text-encoder LoRA of SD 2.x (``lora_te_``) or SDXL's second encoder (``lora_te2_``), named after
  transformers' CLIP, matches the OpenCLIP weights of an original checkpoint
  (``cond_stage_model.model.`` / ``conditioner.embedders.1.model.``) through
  ``open_clip_names``: its q/k/v modules are the q, k, v parts (``<attn>.in_proj.q``) of the
  fused ``in_proj_weight``, their adapters holding the part's rows only.
- ``<name>.lora_down.weight`` (r, in[, kh, kw]), ``<name>.lora_up.weight`` (out, r[, 1, 1]),
  ``<name>.alpha`` (a scalar; missing or 0 means alpha = r): ΔW = (alpha / r)·up·down, conv
  factors flattened to 2-D and multiplied (LoCon), the weight flattened the same way
  (out, in·kh·kw). LyCORIS stores ``lora_up`` already multiplied by its ``scalar`` and an
  ``alpha`` that gives the effective scale (rs-LoRA included).
- ``<name>.dora_scale``: DoRA's magnitude. Shape (out, 1[, 1, 1]): per output row (LyCORIS
  ``wd_on_out=True``, its default since April 2025); shape (1, in[, 1, 1]): per input channel
  (the older default), the norm then taken over the output rows (and the kernel). Told apart by
  shape; the merge is W' = dora_scale · W_c / ‖W_c‖ with W_c = W_0 + ΔW.
- LoHa (``hada_*``), LoKr (``lokr_*``), Tucker ``lora_mid`` and full ``diff`` modules are
  recognised and refused ("not supported yet").
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path

import torch

from wda.errors import WdaError
from wda.formats import open_clip_names, sd_unet_names
from wda.formats.base import DORA, LORA, AdapterInfo, Checkpoint, TensorInfo
from wda.formats.tensors import Alloc

PREFIXES = ("lora_unet", "lora_te1", "lora_te2", "lora_te")
# base tensor-name prefix -> the kohya prefixes its modules take
LDM_UNET = "model.diffusion_model."  # the U-Net of an original SD / SDXL checkpoint
BASE_PREFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (LDM_UNET, ("lora_unet",)),  # original SD / SDXL checkpoint: U-Net (SDXL LoRAs use these names)
    ("cond_stage_model.transformer.", ("lora_te",)),  # original SD 1.x: CLIP text encoder
    ("conditioner.embedders.0.transformer.", ("lora_te1",)),  # original SDXL: first text encoder
    ("unet.", ("lora_unet",)),
    ("text_encoder.", ("lora_te", "lora_te1")),
    ("text_encoder_2.", ("lora_te2",)),
    ("", ("lora_unet", "lora_te", "lora_te1", "lora_te2")),  # one diffusers component's own file
)
UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoRA with a Tucker core (lora_mid)",
               "diff": "a full-weight difference (diff)"}
_RESAVE = "the LoRA file is damaged or was not written by kohya-ss / LyCORIS"


def kohya_name(module: str, prefix: str) -> str:
    """kohya's name of a module: the prefix, "_", and the dotted path with "." -> "_"."""
    return f"{prefix}_{module.replace('.', '_')}"


def _is_kohya_key(key: str) -> bool:
    return key.startswith(tuple(p + "_" for p in PREFIXES)) and "." in key


def _kohya_keys(path: Path) -> list[str] | None:
    """The tensor names of a safetensors file if they are kohya's, else None (headers only)."""
    from safetensors import safe_open

    if not _may_be_kohya(path):  # the usual case, a model's own weights: no key list made
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # not ours to judge: another format (or the error) will speak
        return None
    return keys if keys and all(_is_kohya_key(k) for k in keys) else None


def _may_be_kohya(path: Path) -> bool:
    """Whether the raw header of a safetensors file names any key with a kohya prefix (a
    quick test before the keys are listed; unreadable headers pass, to be judged there)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            raw = f.read(min(n, 100_000_000))
    except OSError:
        return True
    return any(f'"{p}_'.encode() in raw for p in PREFIXES)


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file()) if path.is_dir() else []


class KohyaLora(Checkpoint):
    format = "kohya-ss / LyCORIS LoRA"
    priority = 30  # a named file in a folder: before full weights (which take any .safetensors file)
    expects = "a kohya-ss / LyCORIS LoRA .safetensors file (lora_unet_* / lora_te_* keys)"
    adapter_format = True

    @classmethod
    def detect(cls, path: Path) -> bool:
        if path.is_file():
            return path.suffix == ".safetensors" and _kohya_keys(path) is not None
        return any(_kohya_keys(p) is not None for p in _files(path))

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        files = [path] if path.is_file() else [p for p in _files(path) if _kohya_keys(p) is not None]
        if len(files) > 1:
            raise WdaError(path, f"holds {len(files)} kohya LoRA files ({', '.join(p.name for p in files[:3])})",
                           "keep one LoRA file per checkpoint-<step>/ folder")
        self.file = files[0]
        self._add_file(self.file)
        self.method_file = self.file
        self.adapters, self._magnitude_shapes = self._index()
        self.method = DORA if any(info.m is not None for info in self.adapters.values()) else LORA
        self._renames: dict[str, str] | None = None

    # ---- headers ----
    def _index(self) -> tuple[dict[str, AdapterInfo], dict[str, tuple[int, ...]]]:
        groups: dict[str, dict[str, str]] = {}
        for key in self._tensors:
            name, _, part = key.partition(".")
            groups.setdefault(name, {})[part] = key
        out, mags = {}, {}
        for name, parts in sorted(groups.items()):
            for marker, what in UNSUPPORTED.items():
                if any(p.startswith(marker) for p in parts):
                    raise WdaError(self.file, f"module {name!r} is {what}: not supported yet (LoRA / LoCon with or "
                                              f"without dora_scale are)", "analyse LoRA / DoRA runs only")
            down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
            if down is None or up is None:
                have = ", ".join(sorted(parts))
                raise WdaError(self.file, f"module {name!r} has {have} but not both lora_down.weight and "
                                          f"lora_up.weight", _RESAVE)
            a, b = self.info(down), self.info(up)
            if len(a.shape) not in (2, 4) or len(b.shape) != len(a.shape) or b.shape[1] != a.shape[0] \
                    or len(b.shape) == 4 and b.shape[2:] != (1, 1):
                raise WdaError(self.file, f"module {name!r}: lora_down {a.shape} and lora_up {b.shape} do not "
                                          f"make a low-rank update (up (out, r[, 1, 1]) @ down (r, in[, kh, kw]))",
                               _RESAVE)
            r = a.shape[0]
            alpha = self._alpha(name, parts.get("alpha"), r)
            m, axis = None, "out"
            if "dora_scale" in parts:
                m = self.info(parts["dora_scale"])
                axis = self._magnitude_axis(name, m, out=b.shape[0], in_channels=a.shape[1])
                mags[name] = m.shape
                m = _flat(m, (math.prod(m.shape),))
            out[name] = AdapterInfo(_flat(a, (r, math.prod(a.shape[1:]))), _flat(b, (b.shape[0], r)), m, r,
                                    alpha / r, self.file, magnitude_axis=axis)
        if not out:
            raise WdaError(self.file, "holds no lora_down / lora_up tensors", _RESAVE)
        return out, mags

    def _alpha(self, name: str, key: str | None, r: int) -> float:
        if key is None:
            return float(r)  # kohya: no alpha means alpha = r (scale 1)
        t = self.read(key)
        if t.numel() != 1 or not t.dtype.is_floating_point and t.dtype not in (torch.int32, torch.int64):
            raise WdaError(self.file, f"module {name!r}: alpha has shape {tuple(t.shape)} / dtype {t.dtype}, "
                                      f"expected one number", _RESAVE)
        alpha = float(t.reshape(()))
        if not math.isfinite(alpha):
            raise WdaError(self.file, f"module {name!r}: alpha is {alpha}", _RESAVE)
        return alpha if alpha != 0 else float(r)

    def _magnitude_axis(self, name: str, m: TensorInfo, out: int, in_channels: int) -> str:
        """dora_scale (out, 1[, 1, 1]): per output row; (1, in[, 1, 1]): per input channel."""
        s = m.shape
        if len(s) >= 2 and s[0] == out and all(d == 1 for d in s[1:]):
            return "out"
        if len(s) >= 2 and s[0] == 1 and s[1] == in_channels and all(d == 1 for d in s[2:]):
            return "in"
        raise WdaError(self.file, f"module {name!r}: dora_scale has shape {s}, which fits neither the output axis "
                                  f"({out}, 1) nor the input axis (1, {in_channels})", _RESAVE)

    def read_adapter(self, module: str, alloc: Alloc | None = None, files=None) -> dict[str, torch.Tensor]:
        """The factors flattened to 2-D, the magnitude to 1-D (their shapes in ``adapters``)."""
        info = self.adapters[module]
        parts = [(k, t) for k, t in (("a", info.a), ("b", info.b), ("m", info.m)) if t is not None]
        got = self.read_many([t.key for _, t in parts], alloc, files=files)
        return {k: got[t.key].reshape(t.shape) for k, t in parts}

    # ---- names ----
    def match_base(self, base_modules: Collection[str]) -> dict[str, str]:
        """kohya name -> base module, by applying kohya's rule to every base module name."""
        forward: dict[str, list[str]] = {}
        unet = [m[len(LDM_UNET):] for m in base_modules if m.startswith(LDM_UNET)]
        layers = sd_unet_names.layers_per_block(unet)
        for mod in base_modules:
            for base_prefix, prefixes in BASE_PREFIXES:
                if mod.startswith(base_prefix):
                    for p in prefixes:
                        forward.setdefault(kohya_name(mod[len(base_prefix):], p), []).append(mod)
            if mod.startswith(LDM_UNET) and layers is not None:
                # an SD 1.x / 2.x LoRA names the original U-Net's modules after diffusers
                alt = sd_unet_names.to_diffusers(mod[len(LDM_UNET):], layers)
                if alt is not None:
                    forward.setdefault(kohya_name(alt, "lora_unet"), []).append(mod)
            for base_prefix, prefix in open_clip_names.PREFIXES:
                # an OpenCLIP text encoder's modules (q/k/v: parts of in_proj) after transformers' CLIP
                if mod.startswith(base_prefix):
                    for hf, target in open_clip_names.to_hf(mod[len(base_prefix):]).items():
                        forward.setdefault(kohya_name(hf, prefix), []).append(base_prefix + target)
        out = {}
        for name in self.adapters:
            hits = sorted(set(forward.get(name, ())))
            if not hits:
                hint = ("kohya names SD 1.x / 2.x U-Net modules after diffusers (down_blocks_...; a diffusers or "
                        "an original base fits) and SDXL ones after the original checkpoint (input_blocks_...): "
                        "give the matching base with --base"
                        if name.startswith("lora_unet") else "give the base model this LoRA was trained on with --base")
                raise WdaError(self.file, f"LoRA module {name!r} names no weight of the base", hint)
            if len(hits) > 1:
                raise WdaError(self.file, f"LoRA module {name!r} fits several base weights ({', '.join(hits[:3])})",
                               "kohya's names are ambiguous for this base; analyse a base with one model in it")
            out[name] = hits[0]
        return out


def _flat(t: TensorInfo, shape: tuple[int, ...]) -> TensorInfo:
    """The tensor as the analysis sees it: conv factors flattened to 2-D, magnitudes to 1-D."""
    return TensorInfo(t.key, tuple(shape), t.dtype, t.floating, t.file)


FORMAT = KohyaLora
