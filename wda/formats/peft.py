"""PEFT LoRA / DoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (or
``.bin``), merged with PEFT's semantics: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``),
``rank_pattern`` / ``alpha_pattern``, ``fan_in_fan_out``, DoRA ``lora_magnitude_vector`` with
or without ``.weight``.

A Trainer ``checkpoint-<step>/`` saved without an adapter_config.json (training scripts that
save the adapter's state dict themselves, as the DoRA reference code's commonsense script does:
adapter keys in ``pytorch_model.bin``) takes the run folder's own adapter_config.json, the one
``save_pretrained`` wrote into output_dir at the end, when the modules it adapts are those of
the run folder's final adapter (``adapter_config_of``, ``check_run_config``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from wda.errors import WdaError
from wda.formats.base import DORA, LORA, AdapterInfo, Checkpoint
from wda.formats.tensors import TensorFile, present, read_json, short_repr

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
ADAPTER_FILES = (ADAPTER_SAFETENSORS, ADAPTER_BIN)
# a checkpoint read with its run folder's config may hold the adapter under these names too
# (a training script that overrides model.state_dict with the adapter's, then lets the
# Trainer save "the model")
CHECKPOINT_FILES = (*ADAPTER_FILES, "model.safetensors", "pytorch_model.bin")
CHECKPOINT_PREFIX = "checkpoint-"
PEFT_PREFIX = "base_model.model."
# PEFT writes the DoRA magnitude without ".weight"; other exporters add it.
ADAPTER_KEY_RE = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")
_RESAVE = "the adapter weights and adapter_config.json do not belong together; re-save it with PEFT"


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key k with ``(.*\\.)?(k)$`` matching the module."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT ``adapter_config.json`` that decide the merged weight."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None  # base_model_name_or_path: a hub id or a path

    @classmethod
    def from_file(cls, path: Path) -> "AdapterConfig":
        raw = read_json(path)
        peft_type = raw.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise WdaError(path, f"peft_type {peft_type!r} is not supported (only LORA, with or without use_dora, "
                                 f"and the DoRA reference code's DORA)",
                           "move this run out of CKPT_DIR")
        for key in ("r", "lora_alpha"):
            if key not in raw:
                raise WdaError(path, f"incomplete adapter config: {key!r} is missing",
                               "re-save the adapter with PEFT or restore the file")
        # Strict: a hand-edited config that int()/bool() would quietly coerce ("false" -> True,
        # 4.7 -> 4) gives a wrong merge, not an error.
        return cls(
            r=_config_rank(path, "r", raw["r"]),
            lora_alpha=_config_number(path, "lora_alpha", raw["lora_alpha"]),
            use_rslora=_config_bool(path, "use_rslora", raw.get("use_rslora")),
            use_dora=_config_bool(path, "use_dora", raw.get("use_dora")),
            fan_in_fan_out=_config_bool(path, "fan_in_fan_out", raw.get("fan_in_fan_out")),
            rank_pattern={k: _config_rank(path, f"rank_pattern[{k!r}]", v)
                          for k, v in _config_patterns(path, "rank_pattern", raw.get("rank_pattern")).items()},
            alpha_pattern={k: _config_number(path, f"alpha_pattern[{k!r}]", v)
                           for k, v in _config_patterns(path, "alpha_pattern", raw.get("alpha_pattern")).items()},
            base_model=_config_base(raw.get("base_model_name_or_path")),
        )

    def rank(self, module: str) -> int:
        key = _pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling(self, module: str) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA (per-module patterns)."""
        r = self.rank(module)
        return self.alpha(module) / (math.sqrt(r) if self.use_rslora else r)


_CONFIG_HINT = "fix or re-save adapter_config.json"


def _is_number(value: Any) -> bool:
    """A finite JSON number (bool is an int in Python, not here; 1e400 overflows float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _config_rank(path: Path, key: str, value: Any) -> int:
    if not _is_number(value) or value != int(value) or value <= 0:
        raise WdaError(path, f"invalid adapter config: {key} must be a positive integer, not {short_repr(value)}",
                       _CONFIG_HINT)
    return int(value)


def _config_number(path: Path, key: str, value: Any) -> float:
    if not _is_number(value):
        raise WdaError(path, f"invalid adapter config: {key} must be a finite number, not {short_repr(value)}",
                       _CONFIG_HINT)
    return float(value)


def _config_bool(path: Path, key: str, value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise WdaError(path, f"invalid adapter config: {key} must be true or false, not {short_repr(value)}",
                       _CONFIG_HINT)
    return value


def _config_base(value: Any) -> str | None:
    """base_model_name_or_path when it names something (PEFT writes null when unknown)."""
    return value.strip() if isinstance(value, str) and value.strip() else None


def _config_patterns(path: Path, key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WdaError(path, f"invalid adapter config: {key} must be an object of pattern: value, "
                             f"not {type(value).__name__}", _CONFIG_HINT)
    for pattern in value:
        try:
            re.compile(rf"(.*\.)?({pattern})$")  # as PEFT's get_pattern_key uses it
        except re.error as exc:
            raise WdaError(path, f"invalid adapter config: {key} key {pattern!r} is not a regular "
                                 f"expression ({exc})", _CONFIG_HINT) from None
    return dict(value)


def adapter_config_of(path: Path) -> Path | None:
    """The adapter_config.json describing the adapter in folder ``path``: its own, else, for a
    ``checkpoint-<step>/`` folder, the run folder's (``path.parent``); None when neither."""
    own = path / ADAPTER_CONFIG
    if present(own):
        return own
    run = path.parent / ADAPTER_CONFIG
    return run if path.name.startswith(CHECKPOINT_PREFIX) and present(run) else None


def adapter_weights(path: Path, config: Path | None) -> Path | None:
    """The file holding the adapter of checkpoint folder ``path`` read with ``config`` (its
    own, or None: adapter files only; the run folder's: also the names of full weights)."""
    own = config is None or config.parent == path
    return next((path / n for n in (ADAPTER_FILES if own else CHECKPOINT_FILES) if present(path / n)), None)


def check_run_config(weights: Path, config: Path, modules: Iterable[str],
                     names: Callable[[Iterable[str]], set[str]]) -> None:
    """A checkpoint read with its run folder's ``config`` must adapt the very modules the run
    folder's final adapter adapts (``names``: module names of a file's keys), when the run
    folder holds one: another adapter's config would give a wrong merge, not an error."""
    final = next((config.parent / n for n in ADAPTER_FILES if present(config.parent / n)), None)
    if final is None:
        return
    mine, theirs = set(modules), names(TensorFile(final).shapes)
    if mine != theirs:
        odd = sorted(mine ^ theirs)
        where = "only here" if odd[0] in mine else f"only in {final.name}"
        raise WdaError(weights, f"has no {ADAPTER_CONFIG} of its own, and the run folder's ({config}) belongs to an "
                                f"adapter of other modules ({odd[0]!r} {where}"
                                + (f", {len(odd) - 1} more differ)" if len(odd) > 1 else ")"),
                       f"copy the {ADAPTER_CONFIG} this checkpoint was trained with into {weights.parent}")


def missing_config(path: Path) -> WdaError:
    """The error for adapter weights that no adapter_config.json describes."""
    found = next(n for n in ADAPTER_FILES if present(path / n))
    run = (f", nor has the run folder {path.parent} one" if path.name.startswith(CHECKPOINT_PREFIX) else "")
    return WdaError(path, f"holds {found} but no {ADAPTER_CONFIG}{run}: r, lora_alpha and use_dora are unknown",
                    f"copy the {ADAPTER_CONFIG} the adapter was saved with into this folder")


def peft_module_names(keys: Iterable[str]) -> set[str]:
    """The modules PEFT adapter keys belong to."""
    out = set()
    for key in keys:
        m = ADAPTER_KEY_RE.match(key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key)
        if m:
            out.add(m["module"])
    return out


class PeftAdapter(Checkpoint):
    format = "PEFT adapter"
    priority = 20
    expects = f"{ADAPTER_CONFIG} + {ADAPTER_SAFETENSORS}"
    adapter_format = True

    @classmethod
    def detect(cls, path: Path) -> bool:
        """Its own adapter_config.json; or adapter weights and the run folder's config; or
        adapter weights alone (an error naming the missing config)."""
        if not path.is_dir():
            return False
        cfg = adapter_config_of(path)
        if cfg is not None and cfg.parent == path:
            return True
        return (cfg is not None and adapter_weights(path, cfg) is not None
                or any(present(path / n) for n in ADAPTER_FILES))

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        cfg_path = adapter_config_of(path)
        if cfg_path is None:
            raise missing_config(path)
        cfg = self.config_ = AdapterConfig.from_file(cfg_path)
        weights = adapter_weights(path, cfg_path)
        if weights is None:
            raise WdaError(path, f"{ADAPTER_CONFIG} found but no {ADAPTER_SAFETENSORS} or {ADAPTER_BIN}",
                           "restore the adapter weights or remove this checkpoint")
        self._add_file(weights)
        self.method = DORA if cfg.use_dora else LORA
        self.fan_in_fan_out = cfg.fan_in_fan_out
        self.base_model = cfg.base_model
        self.method_file = cfg_path
        self.adapters = self._index()
        if cfg_path.parent != path:
            check_run_config(weights, cfg_path, self.adapters, peft_module_names)

    def _index(self) -> dict[str, AdapterInfo]:
        where, cfg = self.source, self.config_
        parts: dict[str, dict[str, str]] = {}
        for key in self._tensors:
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            m = ADAPTER_KEY_RE.match(name)
            if m:
                part = m["part"].split(".")[0]  # lora_A | lora_B | lora_magnitude_vector
                parts.setdefault(m["module"], {})[part] = key
        if not parts:
            raise WdaError(where, "adapter file holds no lora_A / lora_B / lora_magnitude_vector tensors",
                           "is this a LoRA/DoRA adapter? re-save it with PEFT or remove this checkpoint")
        out = {}
        for mod, d in sorted(parts.items()):
            a, b, mag = (self.info(d[p]) if p in d else None
                         for p in ("lora_A", "lora_B", "lora_magnitude_vector"))
            out[mod] = AdapterInfo(a, b, mag, cfg.rank(mod), cfg.scaling(mod), where)
        return out

    def check_module(self, module: str) -> None:
        info, where = self.adapters[module], self.source
        if (info.a is None) != (info.b is None):
            raise WdaError(where, f"module {module!r} has {'lora_A' if info.a else 'lora_B'} but no "
                                  f"{'lora_B' if info.a else 'lora_A'}", "the adapter file is incomplete; re-save it")
        if self.config_.use_dora and info.m is None:
            raise WdaError(where, f"DoRA adapter (use_dora) without lora_magnitude_vector for module {module!r}",
                           "the adapter file is incomplete; re-save it")
        if info.m is not None and not self.config_.use_dora:
            raise WdaError(where, f"module {module!r} has a lora_magnitude_vector but use_dora is false in "
                                  f"{ADAPTER_CONFIG}", _RESAVE)


FORMAT = PeftAdapter
