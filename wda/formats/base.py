"""What every checkpoint format hands the rest of wda: a ``Checkpoint``.

A checkpoint holds either full weights (``weights``: module -> its ``.weight`` tensor) or an adapter
(``adapters``: module -> its factors and scaling). Opening one reads headers only; tensors are
read one at a time through ``read_weight`` / ``read_adapter``. Module names are those of the
model (``model.layers.0.self_attn.q_proj``), without ``.weight`` and without wrapper prefixes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Collection
from typing import Any, Iterator, Mapping

import torch

from wda.errors import WdaError
from wda.formats.tensors import Alloc, OpenFiles, StoredTensor, TensorFile, present, read_json, short_repr

log = logging.getLogger(__name__)

FT, LORA, DORA = "FT", "LoRA", "DoRA"
METHOD_ORDER = (FT, LORA, DORA)
WEIGHT_SUFFIX = ".weight"
# torch.nn.MultiheadAttention keeps its fused q/k/v projection as ``<attn>.in_proj_weight``
# (OpenCLIP: the text encoder of SD 2.x, SDXL's second one): the module ``<attn>.in_proj``
IN_PROJ_SUFFIX = ".in_proj_weight"
IN_PROJ = ".in_proj"
MODEL_CONFIG = "config.json"
# GPT-2 style Conv1D stores (in, out); these model types and module names use it.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_MODULE_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor, from the header: its key in the file, shape, dtype, and the file."""

    key: str
    shape: tuple[int, ...]
    dtype: str  # as the file names it (``F32``, ``bfloat16``, ...)
    floating: bool
    file: Path


@dataclass(frozen=True)
class AdapterInfo:
    """The factors of one adapted module: ``a`` (r, in), ``b`` (out, r), magnitude ``m``
    ((out,), (1, out) or (out, 1)); ``a``/``b`` absent for a magnitude-only module.
    ``rank`` is what the format's config says (checked against the shapes), ``scaling`` the
    factor of B·A in the merged weight."""

    a: TensorInfo | None
    b: TensorInfo | None
    m: TensorInfo | None
    rank: int
    scaling: float
    file: Path  # the file named when something about this module is wrong
    # "out": ``m`` holds one magnitude per output row (DoRA, PEFT, LyCORIS wd_on_out); "in":
    # one per input channel, the norm taken over the output rows (older LyCORIS files)
    magnitude_axis: str = "out"


class Checkpoint:
    """One checkpoint, opened lazily. A format subclasses this and, in ``__init__``, fills
    ``weights`` or ``adapters`` (and ``method``) from headers only.

    Class attributes a format sets: ``format`` (a short label), ``priority`` (detection
    order, lower first: a format whose folders another format would also accept comes
    first), ``expects`` (the files it looks for, named when no format fits a folder) and
    ``adapter_format`` (True for adapter files, False for a model's full weights).
    """

    format = "checkpoint"
    priority = 50
    expects = ""
    # an adapter format (what a fine-tuning run alone makes), not a model's full weights: a
    # folder of it beside the runs of CKPT_DIR is a run of one checkpoint itself
    adapter_format = False

    @classmethod
    def detect(cls, path: Path) -> bool:
        """Whether ``path`` (a folder, or a file) is in this format. Cheap: names, at most a
        small JSON; never a tensor. Errors are left to ``__init__``."""
        raise NotImplementedError

    def __init__(self, path: Path) -> None:
        self.path = path
        # the file to name when something is wrong with the weights as a whole
        self.source: Path = path
        self.method = FT
        self.weights: dict[str, TensorInfo] = {}
        self.adapters: dict[str, AdapterInfo] = {}
        self.fan_in_fan_out = False  # adapter factors for weights stored (in, out)
        self.base_model: str | None = None  # the base an adapter names (a hub id or a path)
        self.method_file: Path | None = None  # the file the method is read from, if not ``source``
        self._tensors: dict[str, TensorFile] = {}  # key -> file holding it
        self._files: dict[Path, TensorFile] = {}

    # ---- reading (what the analysis calls) ----
    @property
    def is_adapter(self) -> bool:
        return self.method != FT

    def read_weight(self, module: str, alloc: Alloc | None = None, mapped: bool = False) -> torch.Tensor:
        """The full weight of ``module``, stored layout and dtype, on the CPU. ``alloc``:
        where its bytes go, or ``mapped``: a view of the file's pages (``TensorFile.read_many``);
        default a new tensor."""
        info = self.weights.get(module)
        if info is None:
            raise WdaError(self.source, f"module {module!r} is missing", "the file changed while it was read?")
        return self.read_many([info.key], alloc, mapped)[info.key]

    def stored_weight(self, module: str, files: OpenFiles | None = None) -> StoredTensor | None:
        """The full weight of ``module`` left in its file (``TensorFile.stored``; ``files``: the
        descriptors kept open), for a kernel that reads it itself; None where it is not one
        stored tensor such a kernel can read (a .bin file, a format with its own storage, a
        small tensor)."""
        info = self.weights.get(module)
        tf = self._tensors.get(info.key) if info is not None else None
        return tf.stored(info.key, files) if tf is not None else None

    def read_adapter(self, module: str, alloc: Alloc | None = None,
                     files: OpenFiles | None = None) -> dict[str, torch.Tensor]:
        """The factors of ``module``: ``{"a", "b", "m"}``, those it has, stored dtype
        (``files``: the descriptors kept open, as for ``read_many``)."""
        info = self.adapters[module]
        parts = [(k, t.key) for k, t in (("a", info.a), ("b", info.b), ("m", info.m)) if t is not None]
        got = self.read_many([key for _, key in parts], alloc, files=files)
        return {k: got[key] for k, key in parts}

    def match_base(self, base_modules: Collection[str]) -> dict[str, str]:
        """For formats whose module names are not the model's own (kohya's
        ``lora_unet_down_blocks_0_...``): each adapted module's name in the base, found by
        applying the format's naming rule to ``base_modules``. Empty: the names are the model's."""
        return {}

    def check_module(self, module: str) -> None:
        """Format-specific checks of one adapted module against its own config (headers only),
        run for the modules analysed, after the generic shape checks against the base. Raise
        ``WdaError`` naming the file."""

    def read(self, key: str) -> torch.Tensor:
        """One stored tensor by its key in the file(s)."""
        tf = self._tensors.get(key)
        if tf is None:
            raise WdaError(self.source, f"tensor {key!r} is missing", "the file changed while it was read?")
        return tf.read(key)

    def read_many(self, keys: list[str], alloc: Alloc | None = None, mapped: bool = False,
                  files: OpenFiles | None = None) -> dict[str, torch.Tensor]:
        """Several stored tensors; those of one file are read with it opened once (or, with
        ``files``, through the descriptor kept there). Keys not in the indexed files (a format
        with its own storage) go through ``read``."""
        by_file: dict[TensorFile, list[str]] = {}
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            tf = self._tensors.get(key)
            if tf is None:
                out[key] = self.read(key)
            else:
                by_file.setdefault(tf, []).append(key)
        for tf, names in by_file.items():
            out.update(tf.read_many(names, alloc, mapped, files))
        return {k: out[k] for k in keys}

    @property
    def holds_data(self) -> bool:
        """Whether keeping this checkpoint open keeps file data in memory (a mapped or loaded
        .bin, a format with its own storage), not only its headers."""
        return not self._files or any(tf.holds_data for tf in self._files.values())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every stored tensor: key -> shape."""
        return {key: tf.shapes[key] for key, tf in self._tensors.items()}

    def config(self) -> dict[str, Any] | None:
        """``config.json`` beside the weights (a model's config), or None."""
        folder = self.path if self.path.is_dir() else self.path.parent
        cfg = folder / MODEL_CONFIG
        if not cfg.is_file():
            return None
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError):
            log.warning("%s: unreadable, ignored", cfg)
            return None
        return data if isinstance(data, dict) else None

    def model_type(self) -> str | None:
        return str((self.config() or {}).get("model_type") or "") or None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {self.method})"

    # ---- helpers for formats that keep named tensors in files ----
    def info(self, key: str) -> TensorInfo:
        tf = self._tensors[key]
        return TensorInfo(key, tf.shapes[key], tf.dtype(key), tf.is_floating(key), tf.path)

    def _add_file(self, path: Path, names: set[str] | None = None) -> None:
        """Index the tensors of one file (all, or ``names`` for a shard)."""
        tf = self._files.get(path) or TensorFile(path)
        self._files[path] = tf
        if names is None:  # a single weights file, not a shard
            self.source = path
            self._tensors.update(dict.fromkeys(tf.shapes, tf))
            return
        for name in names:
            if name not in tf.shapes:
                raise WdaError(path, f"tensor {name!r} listed in the index is missing from this shard",
                               "the shards and the index do not belong together")
            self._tensors[name] = tf

    def _add_sharded(self, index_path: Path) -> None:
        """Index the shards a ``weight_map`` index lists (files beside the index)."""
        self.source = index_path
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WdaError(index_path, "no 'weight_map' in the shard index", "restore or re-save this file")
        by_file: dict[str, set[str]] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or not fname:
                raise WdaError(index_path, f"weight_map entry {name!r} is not a file name: {short_repr(fname)}",
                               "restore or re-save this file")
            by_file.setdefault(fname, set()).add(name)
        for fname in sorted(by_file):
            shard = index_path.parent / fname
            if not present(shard):
                raise WdaError(shard, f"shard listed in {index_path.name} is missing",
                               "copy the missing shard or remove this checkpoint")
            self._add_file(shard, by_file[fname])

    def _weights_from_keys(self, prefix: str = "") -> Mapping[str, TensorInfo]:
        """Every ``<prefix><module>.weight`` tensor: module -> its info (made when looked up:
        a checkpoint of many modules is often opened for a few of them)."""
        return _LazyInfos(self, self._module_keys(prefix))

    def _module_keys(self, prefix: str) -> dict[str, str]:
        """module -> key of its weight. Checkpoints with the same header share one table."""
        files = list(self._files.values())
        table = files[0].shapes if len(files) == 1 else None
        if table is None or len(table) != len(self._tensors):  # several files, or part of one
            return _module_keys(self._tensors, prefix)
        hit = _MODULE_KEYS.get((id(table), prefix))
        if hit is None or hit[0] is not table:  # (the table is held: its id is not reused)
            if len(_MODULE_KEYS) >= _MODULE_KEYS_KEPT:
                _MODULE_KEYS.pop(next(iter(_MODULE_KEYS), None), None)
            hit = _MODULE_KEYS[(id(table), prefix)] = (table, _module_keys(table, prefix))
        return hit[1]

    def same_weights_key(self) -> tuple | None:
        """Equal for two full-weight checkpoints whose weights have the same names, shapes
        and dtypes (same headers, read the same way); None when that is not known. Lets
        header checks run once for all the checkpoints of a run that share their header."""
        if self.is_adapter or not isinstance(self.weights, _LazyInfos) or not self._files:
            return None
        return (type(self), id(self.weights.keys_table), *(id(tf.shapes) for tf in self._files.values()))


def _module_keys(keys, prefix: str) -> dict[str, str]:
    """module -> key: ``<module>.weight``, and ``<attn>.in_proj_weight`` as ``<attn>.in_proj``."""
    n, fused = len(WEIGHT_SUFFIX), len(IN_PROJ_SUFFIX)
    out = {key[len(prefix): -n]: key for key in keys if key.endswith(WEIGHT_SUFFIX) and key.startswith(prefix)}
    out.update({key[len(prefix): -fused] + IN_PROJ: key for key in keys
                if key.endswith(IN_PROJ_SUFFIX) and key.startswith(prefix)})
    return out


_MODULE_KEYS: dict[tuple[int, str], tuple[dict, dict[str, str]]] = {}
_MODULE_KEYS_KEPT = 64


class _LazyInfos(Mapping):
    """module -> ``TensorInfo`` of its weight, each made on first lookup."""

    def __init__(self, ck: Checkpoint, keys: dict[str, str]) -> None:
        self._ck, self.keys_table, self._made = ck, keys, {}

    def __getitem__(self, module: str) -> TensorInfo:
        info = self._made.get(module)
        if info is None:
            info = self._made[module] = self._ck.info(self.keys_table[module])
        return info

    def __contains__(self, module: object) -> bool:
        return module in self.keys_table

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_table)

    def __len__(self) -> int:
        return len(self.keys_table)
