"""The DoRA paper's own checkpoints (NVlabs/DoRA's fork of PEFT): ``adapter_config.json`` with
``peft_type: "DORA"`` + ``adapter_model.bin`` (or ``.safetensors``), and the LLaVA pipeline's
``non_lora_trainables.bin`` beside it.

On disk (FORMATS.md §1):

- keys are the PeftModel's names without an adapter name: ``base_model.model.<module>.lora_A.weight``
  (r, in), ``….lora_B.weight`` (out, r), ``….weight_m_wdecomp.weight`` (out, 1) — the magnitude,
  an ``nn.Linear(1, out)``. The LLaVA fork keeps ``.default`` in ``non_lora_trainables.bin``
  (``….weight_m_wdecomp.default.weight``), where its magnitudes can end up; both files are read.
- ``target_modules`` get DoRA (A, B and a magnitude); ``Wdecompose_target_modules``
  (``wdecompose_target_modules`` in the LLaVA fork) that are not already targets get a magnitude
  only. A string is a regular expression the module name must fullmatch, a list a set of name
  endings (``str.endswith``, no dot boundary).
- merged weight (Eq. 5): W' = m · V / ‖V‖ per output row, V = W_0 + (lora_alpha / r)·B·A;
  magnitude only: W' = m · W_0 / ‖W_0‖.
- ``fan_in_fan_out: true`` (the commonsense fork, ``Linear.train(False)``): only the update is
  transposed, V = W_0 + s·(B·A)ᵀ, W_0 the ``nn.Linear`` weight as stored (out, in) (its
  ``_replace_module`` puts the original parameter back after ``__init__`` transposed a fresh
  one), and the norm is still taken over dim=1 of V, one per stored row, as the (out, 1)
  magnitude is. (B·A)ᵀ is (in, out): the merge exists only for square modules, anything else
  is an error. The fork wraps only ``nn.Linear`` modules (no ``Conv1D`` branch), and the LLaVA
  fork resets fan_in_fan_out to false for them, so nothing else is possible. It is read as
  factors a = Bᵀ, b = Aᵀ (b·a = (B·A)ᵀ), which the analysis merges as any others.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from wda.errors import WdaError
from wda.formats.base import DORA, AdapterInfo, Checkpoint, TensorInfo
from wda.formats.peft import (ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_SAFETENSORS, PEFT_PREFIX, adapter_config_of,
                              adapter_weights, check_run_config)
from wda.formats.tensors import present, read_json, short_repr

PEFT_TYPE = "DORA"
NON_LORA_TRAINABLES = "non_lora_trainables.bin"
# ``_orig_mod.``: a model saved after torch.compile (the commonsense script compiles it)
KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|weight_m_wdecomp)(?:\.default)?\.weight$")
_HINT = "fix or re-save adapter_config.json"
_INCOMPLETE = "the adapter files are incomplete; restore them"


def _target_rule(path: Path, key: str, value: Any) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise WdaError(path, f"invalid adapter config: {key} {value!r} is not a regular expression ({exc})",
                           _HINT) from None
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise WdaError(path, f"invalid adapter config: {key} must be a string or a list of strings, not "
                         f"{short_repr(value)}", _HINT)


def targets(rule: str | list[str] | None, module: str) -> bool:
    """The fork's rule: a string fullmatches the module name, a list's entries end it."""
    if rule is None:
        return False
    if isinstance(rule, str):
        return re.fullmatch(rule, module) is not None
    return any(module.endswith(t) for t in rule)


def _positive_int(path: Path, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise WdaError(path, f"invalid adapter config: {key} must be a positive integer, not {short_repr(value)}",
                       _HINT)
    return value


def _number(path: Path, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise WdaError(path, f"invalid adapter config: {key} must be a finite number, not {short_repr(value)}",
                       "the DoRA code scales B·A by lora_alpha / r; " + _HINT)
    return float(value)


def _module_name(key: str) -> tuple[str, str] | None:
    """(module, part) of a key, prefixes of the wrappers (PeftModel, torch.compile) removed."""
    key = key.replace("_orig_mod.", "")
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    m = KEY_RE.match(key)
    return (m["module"], m["part"]) if m else None


def module_names(keys) -> set[str]:
    """The modules the fork's adapter keys belong to."""
    return {hit[0] for hit in map(_module_name, keys) if hit is not None}


def is_nvlabs_config(path: Path) -> bool:
    """``adapter_config.json`` at ``path`` says ``peft_type: "DORA"`` (unreadable: not ours)."""
    try:
        raw = read_json(path)
    except WdaError:
        return False
    return str(raw.get("peft_type", "")).upper() == PEFT_TYPE


class NvlabsDora(Checkpoint):
    format = "DoRA reference code (NVlabs)"
    priority = 10  # before PEFT adapters: both have adapter_config.json
    expects = f"{ADAPTER_CONFIG} (peft_type DORA) + {ADAPTER_BIN}"
    adapter_format = True

    @classmethod
    def detect(cls, path: Path) -> bool:
        """Its own adapter_config.json says DORA; or a ``checkpoint-<step>/`` holding adapter
        weights (the commonsense script's Trainer checkpoints: ``pytorch_model.bin``) in a run
        folder whose adapter_config.json does."""
        if not path.is_dir():
            return False
        cfg = adapter_config_of(path)
        return (cfg is not None and is_nvlabs_config(cfg)
                and (cfg.parent == path or adapter_weights(path, cfg) is not None))

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        cfg_path = self.method_file = adapter_config_of(path) or path / ADAPTER_CONFIG
        raw = read_json(cfg_path)
        for key in ("r", "lora_alpha"):
            if key not in raw:
                raise WdaError(cfg_path, f"incomplete adapter config: {key!r} is missing", _HINT)
        self.r = _positive_int(cfg_path, "r", raw["r"])
        self.scaling = _number(cfg_path, "lora_alpha", raw["lora_alpha"]) / self.r
        fifo = raw.get("fan_in_fan_out")
        if fifo is not None and not isinstance(fifo, bool):
            raise WdaError(cfg_path, f"invalid adapter config: fan_in_fan_out must be true or false, not "
                                     f"{short_repr(fifo)}", _HINT)
        self.transpose_update = bool(fifo)  # V = W_0 + s·(B·A)ᵀ (not ``fan_in_fan_out``: W_0 stays (out, in))
        self.target = _target_rule(cfg_path, "target_modules", raw.get("target_modules"))
        wd_key = next((k for k in ("Wdecompose_target_modules", "wdecompose_target_modules") if k in raw),
                      "Wdecompose_target_modules")
        self.magnitude_only = _target_rule(cfg_path, wd_key, raw.get(wd_key))
        base = raw.get("base_model_name_or_path")
        self.base_model = base.strip() if isinstance(base, str) and base.strip() else None
        self.method = DORA

        extra = path / NON_LORA_TRAINABLES
        if present(extra):
            self._add_file(extra)
        weights = adapter_weights(path, cfg_path)
        if weights is None:
            raise WdaError(path, f"{ADAPTER_CONFIG} (peft_type DORA) found but no {ADAPTER_BIN} or "
                                 f"{ADAPTER_SAFETENSORS}", "restore the adapter weights or remove this checkpoint")
        self._add_file(weights)  # last: the file named in errors
        self.adapters = self._index(weights, extra if present(extra) else None)
        if cfg_path.parent != path:
            mine = module_names(k for k, tf in self._tensors.items() if tf.path == weights)
            check_run_config(weights, cfg_path, mine, module_names)

    def _index(self, weights: Path, extra: Path | None) -> dict[str, AdapterInfo]:
        parts: dict[str, dict[str, TensorInfo]] = {}
        for key, tf in self._tensors.items():
            hit = _module_name(key)
            if hit is None:
                continue
            module, part = hit
            have = parts.setdefault(module, {})
            # the adapter file's copy wins over non_lora_trainables.bin's (it is loaded last)
            if part not in have or tf.path == weights:
                have[part] = self.info(key)
        if not parts:
            where = f"{weights.name}" + (f" or {extra.name}" if extra else "")
            raise WdaError(weights, f"holds no lora_A / lora_B / weight_m_wdecomp tensors (looked in {where})",
                           "is this a DoRA checkpoint of the reference code?")
        out = {}
        for mod, d in sorted(parts.items()):
            a, b = d.get("lora_A"), d.get("lora_B")
            if self.transpose_update and a is not None and b is not None:
                # b·a = Aᵀ·Bᵀ = (B·A)ᵀ: the factors as the merge uses them (read_adapter transposes)
                a, b = (dataclasses.replace(b, shape=tuple(reversed(b.shape))),
                        dataclasses.replace(a, shape=tuple(reversed(a.shape))))
            out[mod] = AdapterInfo(a, b, d.get("weight_m_wdecomp"), self.r, self.scaling, weights)
        return out

    def read_adapter(self, module: str, alloc=None, files=None) -> dict[str, torch.Tensor]:
        """The factors as the merge uses them: with fan_in_fan_out, a = Bᵀ and b = Aᵀ."""
        got = super().read_adapter(module, alloc, files)
        if self.transpose_update and "a" in got:
            got["a"], got["b"] = got["a"].t().contiguous(), got["b"].t().contiguous()
        return got

    def check_module(self, module: str) -> None:
        info, where = self.adapters[module], self.source
        if info.m is None:
            looked = NON_LORA_TRAINABLES if present(self.path / NON_LORA_TRAINABLES) else f"no {NON_LORA_TRAINABLES}"
            raise WdaError(where, f"module {module!r} has no magnitude weight_m_wdecomp.weight (looked here and in "
                                  f"{looked})", _INCOMPLETE)
        if not (len(info.m.shape) == 1 or len(info.m.shape) == 2 and info.m.shape[1] == 1):
            raise WdaError(where, f"module {module!r}: weight_m_wdecomp.weight has shape {info.m.shape}, "
                                  f"expected (out, 1)", _INCOMPLETE)
        adapted = targets(self.target, module)
        if self.transpose_update and info.a is not None and info.a.shape[1] != info.b.shape[0]:
            out_f, in_f = info.a.shape[1], info.b.shape[0]  # B (out, r) and A (r, in), transposed here
            raise WdaError(where, f"module {module!r} is not square ((out, in) = ({out_f}, {in_f})) but "
                                  f"{ADAPTER_CONFIG} says fan_in_fan_out: the reference code's merge adds "
                                  f"(B·A)ᵀ, of shape ({in_f}, {out_f}), to it, which cannot be formed",
                           "fan_in_fan_out was set on nn.Linear modules by mistake; the adapter cannot be merged")
        if info.a is None and adapted:
            raise WdaError(where, f"module {module!r} is in target_modules but has no lora_A / lora_B", _INCOMPLETE)
        if info.a is None and not targets(self.magnitude_only, module):
            raise WdaError(where, f"module {module!r} has only a magnitude but Wdecompose_target_modules does not "
                                  f"name it", "the adapter files and adapter_config.json do not belong together")
        if info.a is not None and not adapted:
            raise WdaError(where, f"module {module!r} has lora_A / lora_B but target_modules does not name it",
                           "the adapter files and adapter_config.json do not belong together")


FORMAT = NvlabsDora
