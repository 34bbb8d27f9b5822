"""Read checkpoints: the one table of file and key names, lazy tensor access, adapter configs.

Only this module (and ``discover.py`` on top of it) touches checkpoint files. Everything is
lazy: opening a checkpoint parses headers only; tensors are read one at a time.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wda.errors import WdaError

log = logging.getLogger(__name__)

# ---- the one table of file and key names -------------------------------------------------
FULL_SAFETENSORS = "model.safetensors"
FULL_SAFETENSORS_INDEX = "model.safetensors.index.json"
FULL_BIN = "pytorch_model.bin"
FULL_BIN_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
MODEL_CONFIG = "config.json"
PEFT_PREFIX = "base_model.model."
WEIGHT_SUFFIX = ".weight"
# PEFT writes the DoRA magnitude without ".weight"; other exporters add it.
ADAPTER_KEY_RE = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")
# GPT-2 style Conv1D stores (in, out); these model types and module names use it.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_MODULE_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})

FT, LORA, DORA = "FT", "LoRA", "DoRA"
METHOD_ORDER = (FT, LORA, DORA)


# ---- tensor files ------------------------------------------------------------------------
class TensorFile:
    """One weights file (.safetensors or .bin): names and shapes from the header, tensors
    read one at a time. Safetensors are memory-mapped; .bin files are loaded with
    ``weights_only=True`` (and ``mmap=True`` where the format allows)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._st = None  # safetensors handle
        self._sd: dict[str, torch.Tensor] | None = None  # .bin state dict (mmap)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._open()

    def _open(self) -> None:
        if not self.path.is_file():
            raise WdaError(self.path, "file is missing")
        if self.path.suffix == ".safetensors":
            self._open_safetensors()
        else:
            self._open_bin()

    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        try:
            handle = safe_open(str(self.path), framework="pt", device="cpu")
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except Exception as exc:  # SafetensorError, OSError, ... : one clean line
            raise WdaError(self.path, f"not a readable safetensors file ({_short(exc)})",
                           "re-save or remove this checkpoint") from None
        self._st, self._shapes = handle, shapes

    def _open_bin(self) -> None:
        sd = None
        for mmap in (True, False):  # legacy (non-zip) .bin files cannot be memory-mapped
            try:
                sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
                break
            except Exception as exc:
                err = exc
        if sd is None:
            raise WdaError(self.path, f"not a readable PyTorch weights file ({_short(err)})",
                           "re-save or remove this checkpoint") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise WdaError(self.path, "does not hold a flat dict of tensors (a state dict)")
        self._sd = sd
        self._shapes = {k: tuple(v.shape) for k, v in sd.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` on the CPU, in its stored dtype."""
        try:
            if self._st is not None:
                return self._st.get_tensor(name)
            return self._sd[name]
        except KeyError:
            raise WdaError(self.path, f"tensor {name!r} is missing") from None
        except Exception as exc:
            raise WdaError(self.path, f"cannot read tensor {name!r} ({_short(exc)})",
                           "the file may be truncated or corrupt") from None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WdaError(path, "file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WdaError(path, f"not valid JSON ({_short(exc)})") from None
    if not isinstance(data, dict):
        raise WdaError(path, "expected a JSON object")
    return data


# ---- adapter configs ---------------------------------------------------------------------
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

    @classmethod
    def from_file(cls, path: Path) -> "AdapterConfig":
        raw = read_json(path)
        peft_type = raw.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise WdaError(path, f"peft_type {peft_type!r} is not supported (only LORA, with or without use_dora)")
        for key in ("r", "lora_alpha"):
            if key not in raw:
                raise WdaError(path, f"incomplete adapter config: {key!r} is missing")
        try:
            cfg = cls(
                r=int(raw["r"]),
                lora_alpha=float(raw["lora_alpha"]),
                use_rslora=bool(raw.get("use_rslora") or False),
                use_dora=bool(raw.get("use_dora") or False),
                fan_in_fan_out=bool(raw.get("fan_in_fan_out") or False),
                rank_pattern={str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
                alpha_pattern={str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise WdaError(path, f"invalid adapter config value ({_short(exc)})") from None
        if cfg.r <= 0 or any(v <= 0 for v in cfg.rank_pattern.values()):
            raise WdaError(path, "invalid adapter config: ranks must be positive")
        return cfg

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


@dataclass(frozen=True)
class AdapterKeys:
    """Tensor keys of one module in an adapter file."""

    a: str | None = None
    b: str | None = None
    magnitude: str | None = None


# ---- checkpoints -------------------------------------------------------------------------
class Checkpoint:
    """One checkpoint folder (or base/): full weights or a PEFT adapter, opened lazily."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.adapter: AdapterConfig | None = None
        self._tensors: dict[str, TensorFile] = {}  # tensor name -> file holding it
        self._files: dict[Path, TensorFile] = {}
        self.adapter_modules: dict[str, AdapterKeys] = {}
        self._detect()

    # -- detection --
    def _detect(self) -> None:
        p = self.path
        if not p.is_dir():
            raise WdaError(p, "is not a directory")
        if (p / ADAPTER_CONFIG).is_file():
            self.adapter = AdapterConfig.from_file(p / ADAPTER_CONFIG)
            for name in (ADAPTER_SAFETENSORS, ADAPTER_BIN):
                if (p / name).is_file():
                    self._add_file(p / name)
                    break
            else:
                raise WdaError(p, f"{ADAPTER_CONFIG} found but no {ADAPTER_SAFETENSORS} or {ADAPTER_BIN}")
            self._index_adapter()
        elif (p / FULL_SAFETENSORS_INDEX).is_file():
            self._add_sharded(p / FULL_SAFETENSORS_INDEX)
        elif (p / FULL_SAFETENSORS).is_file():
            self._add_file(p / FULL_SAFETENSORS)
        elif (p / FULL_BIN_INDEX).is_file():
            self._add_sharded(p / FULL_BIN_INDEX)
        elif (p / FULL_BIN).is_file():
            self._add_file(p / FULL_BIN)
        else:
            raise WdaError(p, "no weights found", f"expected {FULL_SAFETENSORS}, a sharded "
                           f"{FULL_SAFETENSORS_INDEX}, {FULL_BIN}, or {ADAPTER_CONFIG} + {ADAPTER_SAFETENSORS}")

    def _add_file(self, path: Path, names: set[str] | None = None) -> None:
        tf = self._files.get(path) or TensorFile(path)
        self._files[path] = tf
        for name in (names if names is not None else tf.shapes):
            if name not in tf.shapes:
                raise WdaError(path, f"tensor {name!r} listed in the index is missing from this shard")
            self._tensors[name] = tf

    def _add_sharded(self, index_path: Path) -> None:
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WdaError(index_path, "no 'weight_map' in the shard index")
        by_file: dict[str, set[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(str(fname), set()).add(name)
        for fname in sorted(by_file):
            shard = self.path / fname
            if not shard.is_file():
                raise WdaError(shard, f"shard listed in {index_path.name} is missing")
            self._add_file(shard, by_file[fname])

    def _index_adapter(self) -> None:
        parts: dict[str, dict[str, str]] = {}
        for key in self._tensors:
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            m = ADAPTER_KEY_RE.match(name)
            if m:
                part = m["part"].split(".")[0]  # lora_A | lora_B | lora_magnitude_vector
                parts.setdefault(m["module"], {})[part] = key
        self.adapter_modules = {
            mod: AdapterKeys(d.get("lora_A"), d.get("lora_B"), d.get("lora_magnitude_vector"))
            for mod, d in sorted(parts.items())}
        if not self.adapter_modules:
            raise WdaError(self.adapter_file, "adapter file holds no lora_A / lora_B / lora_magnitude_vector tensors")

    # -- properties --
    @property
    def is_adapter(self) -> bool:
        return self.adapter is not None

    @property
    def method(self) -> str:
        if self.adapter is None:
            return FT
        return DORA if self.adapter.use_dora else LORA

    @property
    def adapter_file(self) -> Path:
        return next(iter(self._files))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tf.shapes[name] for name, tf in self._tensors.items()}

    def file_of(self, name: str) -> Path:
        tf = self._tensors.get(name)
        return tf.path if tf is not None else self.path

    def has(self, name: str) -> bool:
        return name in self._tensors

    def read(self, name: str) -> torch.Tensor:
        tf = self._tensors.get(name)
        if tf is None:
            raise WdaError(self.path, f"tensor {name!r} is missing")
        return tf.read(name)

    def model_type(self) -> str | None:
        cfg = self.path / MODEL_CONFIG
        if not cfg.is_file():
            return None
        try:
            return str(json.loads(cfg.read_text()).get("model_type") or "") or None
        except (OSError, ValueError, AttributeError):
            log.warning("%s: unreadable, ignored", cfg)
            return None

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {self.method})"


class HandleCache:
    """Keeps at most ``size`` checkpoints open (their mmaps), least recently used first out."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._open: OrderedDict[Path, Checkpoint] = OrderedDict()

    def get(self, path: Path) -> Checkpoint:
        ck = self._open.pop(path, None) or Checkpoint(path)
        self._open[path] = ck
        while len(self._open) > self.size:
            self._open.popitem(last=False)
        return ck
