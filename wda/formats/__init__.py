"""Checkpoint formats: one module per on-disk format, all behind one small interface.

The rest of wda (``wda.analysis.layout``, ``wda.analysis.engine``) sees only ``open_checkpoint(path)`` and
the ``Checkpoint`` it returns (``wda/formats/base.py``):

    ck.method                 "FT" | "LoRA" | "DoRA"
    ck.weights                {module: TensorInfo}    full weights: key, stored shape, dtype, file
    ck.adapters               {module: AdapterInfo}   adapters: a (r, in), b (out, r), m, rank, scaling
    ck.read_weight(module)    the full weight, stored layout and dtype (lazily, one tensor)
    ck.read_adapter(module)   {"a", "b", "m"}: the factors it has
    (both take ``alloc``: where the bytes are read to, e.g. a pooled or pinned buffer)
    ck.fan_in_fan_out, ck.base_model, ck.source, ck.config(), ck.model_type()

Module names are the model's own (``model.layers.0.self_attn.q_proj``, no ``.weight``, no
wrapper prefix), so an adapter's modules are matched to the base's by name.

How to add a format (one new file, nothing else changes):

1. Write ``wda/formats/<name>.py`` with a subclass of ``Checkpoint`` that sets ``format``
   (a label), ``priority`` (detection order, lower first: put a format before any other
   whose ``detect`` would also accept its folders; full weights are 90, PEFT adapters 20)
   and ``expects`` (the files it looks for, for the "no weights found" line), and defines
   ``detect(path) -> bool`` (cheap: file names, a small JSON at most) and ``__init__(path)``
   that reads headers only and fills ``method`` and ``weights`` or ``adapters``. Files of
   named tensors (safetensors, .bin, sharded with an index) are read with the helpers of
   ``Checkpoint`` (``_add_file``, ``_add_sharded``, ``info``, ``_weights_from_keys``);
   other storage overrides ``read(key)``. Bad input raises ``wda.errors.WdaError`` naming the
   file: one line, what is wrong, what to do.
2. End the module with ``FORMAT = YourClass``. Every module of this package that defines
   ``FORMAT`` is a format (found when first needed); helpers (``base``, ``tensors``) do not.
3. Add a test that writes a real-format fixture and compares against a float64 reference,
   and a row to the README's table of supported formats.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections import OrderedDict
from pathlib import Path

from wda.errors import WdaError
from wda.formats.base import (DORA, FT, LORA, METHOD_ORDER, WEIGHT_SUFFIX, AdapterInfo, Checkpoint,
                              TensorInfo)

__all__ = ["DORA", "FT", "LORA", "METHOD_ORDER", "WEIGHT_SUFFIX", "AdapterInfo", "Checkpoint",
           "HandleCache", "TensorInfo", "formats", "open_checkpoint"]

_FORMATS: list[type[Checkpoint]] | None = None


def formats() -> list[type[Checkpoint]]:
    """Every format of this package, in detection order."""
    global _FORMATS
    if _FORMATS is None:
        found = []
        for mod in pkgutil.iter_modules(__path__):
            if not mod.name.startswith("_"):
                fmt = getattr(importlib.import_module(f"{__name__}.{mod.name}"), "FORMAT", None)
                if fmt is not None:
                    found.append(fmt)
        _FORMATS = sorted(found, key=lambda f: (f.priority, f.__name__))
    return _FORMATS


def open_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at ``path`` (a folder, or a single weights file), headers only."""
    path = Path(path)
    if not (path.is_dir() or path.is_file()):
        raise WdaError(path, "is not a directory", "a checkpoint is a folder of weights files")
    for fmt in formats():
        if fmt.detect(path):
            return fmt(path)
    if path.is_file():
        raise WdaError(path, "is not a weights file wda reads", "give the folder that holds it")
    raise WdaError(path, "no weights found", "expected " + ", ".join(f.expects for f in formats() if f.expects))


class HandleCache:
    """Opened checkpoints, for reading tensor after tensor. Those that keep only headers
    (safetensors: parsed once, each tensor read or mapped on its own) stay for the cache's
    lifetime; those that keep file data (a mapped .bin) are at most ``size``, least recently
    used first out."""

    def __init__(self, size: int = 32, opened: dict[Path, Checkpoint] | None = None) -> None:
        """``opened``: checkpoints already open (discovery's); those keeping only headers are used."""
        self.size = size
        self._light: dict[Path, Checkpoint] = {p: ck for p, ck in (opened or {}).items() if not ck.holds_data}
        self._open: OrderedDict[Path, Checkpoint] = OrderedDict()

    def get(self, path: Path) -> Checkpoint:
        ck = self._light.get(path)
        if ck is not None:
            return ck
        ck = self._open.pop(path, None) or open_checkpoint(path)
        if not ck.holds_data:
            self._light[path] = ck
            return ck
        self._open[path] = ck
        while len(self._open) > self.size:
            self._open.popitem(last=False)
        return ck
