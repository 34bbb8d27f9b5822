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

# Header dtypes that hold real numbers; anything else (I8, U8, BOOL, ...) is not a weight
# this analysis can measure (quantised or mislabelled data would give a silent wrong picture).
SAFETENSORS_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

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
        self._dtypes: dict[str, str] = {}  # stored dtype as written in the header
        self._floating: dict[str, bool] = {}
        self._open()

    def _open(self) -> None:
        if not self.path.is_file():
            raise WdaError(self.path, _not_a_file(self.path), "re-save or remove this checkpoint")
        if self.path.suffix == ".safetensors":
            self._open_safetensors()
        else:
            self._open_bin()
        self._size = _size_now(self.path)

    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        try:
            # safe_open checks the header against the file size: a truncated or padded file
            # fails here ("file not fully covered"), before any tensor is read.
            handle = safe_open(str(self.path), framework="pt", device="cpu")
            slices = {k: handle.get_slice(k) for k in handle.keys()}
            shapes = {k: tuple(sl.get_shape()) for k, sl in slices.items()}
            dtypes = {k: str(sl.get_dtype()) for k, sl in slices.items()}
        except Exception as exc:  # SafetensorError, OSError, ... : one clean line
            raise WdaError(self.path, f"not a readable safetensors file ({_short(exc)})",
                           "re-save or remove this checkpoint") from None
        self._st, self._shapes = handle, shapes
        self._floating = {k: d in SAFETENSORS_FLOAT_DTYPES for k, d in dtypes.items()}
        self._dtypes = dtypes

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
            raise WdaError(self.path, "does not hold a flat dict of tensors (a state dict)",
                           "save model.state_dict(), not the model or a training state")
        self._sd = sd
        self._shapes = {k: tuple(v.shape) for k, v in sd.items()}
        self._dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in sd.items()}
        self._floating = {k: v.dtype.is_floating_point for k, v in sd.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def dtype(self, name: str) -> str:
        """The stored dtype of ``name`` as the file names it (``F32``, ``bfloat16``, ...)."""
        return self._dtypes[name]

    def is_floating(self, name: str) -> bool:
        return self._floating[name]

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` on the CPU, in its stored dtype."""
        # Tensors are views of the memory-mapped file: touching pages past the end of a file
        # cut short after it was opened kills the process (SIGBUS), it raises nothing. A file
        # rewritten in place (a training job still saving) shows as a new size: stop here.
        size = _size_now(self.path)
        if size is not None and size != self._size:
            raise WdaError(self.path, f"changed on disk while being analysed ({self._size} -> {size} bytes)",
                           "is a training job still writing it? rerun once it is complete")
        try:
            if self._st is not None:
                return self._st.get_tensor(name)
            return self._sd[name]
        except KeyError:
            raise WdaError(self.path, f"tensor {name!r} is missing", "the file changed while it was read?") from None
        except Exception as exc:
            raise WdaError(self.path, f"cannot read tensor {name!r} ({_short(exc)})",
                           "the file may be truncated or corrupt") from None


def _size_now(path: Path) -> int | None:
    """The file's size now; None once it is deleted (a mapped, unlinked file stays readable)."""
    try:
        return path.stat().st_size
    except OSError:
        return None


def _present(path: Path) -> bool:
    """Something is there under this name (a file, a directory, even a broken link)."""
    return path.exists() or path.is_symlink()


def _not_a_file(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return f"is a broken link (to {_short_text(str(path.readlink()))})"
    if path.is_dir():
        return "is a directory, not a weights file"
    if path.exists():
        return "is not a regular file"
    return "file is missing"


def _short_text(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


def _repr(value: Any) -> str:
    return _short_text(repr(value))


def _short(exc: BaseException) -> str:
    return _short_text(str(exc)) or type(exc).__name__


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WdaError(path, "file is missing", "restore it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:  # IsADirectoryError is an OSError
        raise WdaError(path, f"not valid JSON ({_short(exc)})", "restore or re-save this file") from None
    except RecursionError:
        raise WdaError(path, "not valid JSON (nested too deeply)", "restore or re-save this file") from None
    if not isinstance(data, dict):
        raise WdaError(path, f"expected a JSON object, found {type(data).__name__}", "restore or re-save this file")
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
            raise WdaError(path, f"peft_type {peft_type!r} is not supported (only LORA, with or without use_dora)",
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
        raise WdaError(path, f"invalid adapter config: {key} must be a positive integer, not {_repr(value)}",
                       _CONFIG_HINT)
    return int(value)


def _config_number(path: Path, key: str, value: Any) -> float:
    if not _is_number(value):
        raise WdaError(path, f"invalid adapter config: {key} must be a finite number, not {_repr(value)}",
                       _CONFIG_HINT)
    return float(value)


def _config_bool(path: Path, key: str, value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise WdaError(path, f"invalid adapter config: {key} must be true or false, not {_repr(value)}",
                       _CONFIG_HINT)
    return value


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
        # the file to name when something is wrong with the weights as a whole:
        # the shard index of a sharded checkpoint, else its one weights file
        self.source: Path = path
        self._detect()

    # -- detection --
    def _detect(self) -> None:
        p = self.path
        if not p.is_dir():
            raise WdaError(p, "is not a directory", "a checkpoint is a folder of weights files")
        # _present, not is_file: a directory or broken link under a weights name is reported
        # as such by TensorFile, not as "no weights found".
        if _present(p / ADAPTER_CONFIG):
            self.adapter = AdapterConfig.from_file(p / ADAPTER_CONFIG)
            for name in (ADAPTER_SAFETENSORS, ADAPTER_BIN):
                if _present(p / name):
                    self._add_file(p / name)
                    break
            else:
                raise WdaError(p, f"{ADAPTER_CONFIG} found but no {ADAPTER_SAFETENSORS} or {ADAPTER_BIN}",
                               "restore the adapter weights or remove this checkpoint")
            self._index_adapter()
        elif _present(p / FULL_SAFETENSORS_INDEX):
            self._add_sharded(p / FULL_SAFETENSORS_INDEX)
        elif _present(p / FULL_SAFETENSORS):
            self._add_file(p / FULL_SAFETENSORS)
        elif _present(p / FULL_BIN_INDEX):
            self._add_sharded(p / FULL_BIN_INDEX)
        elif _present(p / FULL_BIN):
            self._add_file(p / FULL_BIN)
        else:
            raise WdaError(p, "no weights found", f"expected {FULL_SAFETENSORS}, a sharded "
                           f"{FULL_SAFETENSORS_INDEX}, {FULL_BIN}, or {ADAPTER_CONFIG} + {ADAPTER_SAFETENSORS}")

    def _add_file(self, path: Path, names: set[str] | None = None) -> None:
        tf = self._files.get(path) or TensorFile(path)
        self._files[path] = tf
        if names is None:  # a single weights file, not a shard
            self.source = path
        for name in (names if names is not None else tf.shapes):
            if name not in tf.shapes:
                raise WdaError(path, f"tensor {name!r} listed in the index is missing from this shard",
                               "the shards and the index do not belong together")
            self._tensors[name] = tf

    def _add_sharded(self, index_path: Path) -> None:
        self.source = index_path
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WdaError(index_path, "no 'weight_map' in the shard index", "restore or re-save this file")
        by_file: dict[str, set[str]] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or not fname:
                raise WdaError(index_path, f"weight_map entry {name!r} is not a file name: {_repr(fname)}",
                               "restore or re-save this file")
            by_file.setdefault(fname, set()).add(name)
        for fname in sorted(by_file):
            shard = self.path / fname
            if not _present(shard):
                raise WdaError(shard, f"shard listed in {index_path.name} is missing",
                               "copy the missing shard or remove this checkpoint")
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
            raise WdaError(self.adapter_file, "adapter file holds no lora_A / lora_B / lora_magnitude_vector tensors",
                           "is this a LoRA/DoRA adapter? re-save it with PEFT or remove this checkpoint")

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
        return tf.path if tf is not None else self.source

    def dtype_of(self, name: str) -> str:
        return self._tensors[name].dtype(name)

    def is_floating(self, name: str) -> bool:
        return self._tensors[name].is_floating(name)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def read(self, name: str) -> torch.Tensor:
        tf = self._tensors.get(name)
        if tf is None:
            raise WdaError(self.source, f"tensor {name!r} is missing", "the file changed while it was read?")
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
