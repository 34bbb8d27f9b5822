"""The streaming engine: checkpoints in, tidy ΔM / ΔD table out.

Module-major: each base matrix W_0 is read once and prepared (``BaseWeight``), then the same
matrix of every checkpoint is measured against it in one pass and freed; adapters are
measured from their factors (``BaseWeight.measure_lowrank``, float32 on the device) without
forming the merged matrix. A background thread reads ahead while the current matrices are
measured: each checkpoint's header is parsed once, at discovery. On a CPU a full weight whose
vectors are its stored rows stays in its file, for the row kernel to read (``pread`` of a
block of rows at a time): the reader opens each file once per analysis (``OpenFiles``) and
asks for the tensor's pages to be read ahead when they are not cached; other full weights are
views of their own mapping of their byte range, their pages faulted in by the reader, the
mapping gone once the matrix is measured; adapters' small factors are read with ``pread`` into
pooled buffers (``wda.analysis.buffers``). For CUDA every tensor is read into pinned memory
and copied to the device on a side stream. Peak memory is a few batches of matrices (by
bytes) whatever the number of layers or steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from collections.abc import Sequence
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from wda.analysis import gemm, kernels, scratch
from wda.analysis.buffers import BufferPool
from wda.analysis.decompose import AXES, MEASUREMENT_FIELDS, BaseWeight, NonFiniteWeights
from wda.train.dora import merge_dora_input_axis
from wda.errors import WdaError, pythonic_errors
from wda.formats import HandleCache, fused_qkv
from wda.analysis.layout import Layout, ModuleInfo, Run, discover
from wda.analysis.prefetch import prefetched, stage
from wda.formats.tensors import OpenFiles, StoredTensor
from wda.formats.trainer_state import LOG_COLUMNS

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["run", "method", "step", "module", "layer", "matrix", *MEASUREMENT_FIELDS,
                  "axis", "stack", *LOG_COLUMNS]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class AnalysisOptions:
    """What to analyse and how. ``modules``: name suffixes or regular expressions."""

    modules: tuple[str, ...] | None = None
    axis: str = "out"  # "out": one magnitude per output feature (norm over dim=1 of (out, in))
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # compute dtype, whatever the stored one
    base: str | None = None  # W_0: a folder, a file or a cached hub id; default CKPT_DIR/base
    runs: tuple[tuple[str, str], ...] = ()  # runs given one by one: (name, folder)
    fan_in_fan_out: bool | None = None  # force the (in, out) Conv1D layout on or off
    split_fused: bool = True  # fused attention projections measured as their q, k, v parts
    skip_broken: bool = False
    progress: bool | None = None  # None: a bar only when stderr is a terminal (tqdm's convention)
    prefetch: int = 2  # matrices read ahead of the one being measured
    only_runs: tuple[str, ...] | None = None  # of the runs found, only these (by name)
    only_steps: tuple[int, ...] | None = None  # only these steps

    def __post_init__(self) -> None:
        runs = self.runs.items() if isinstance(self.runs, dict) else self.runs
        object.__setattr__(self, "runs", tuple((str(n), str(p)) for n, p in runs))
        object.__setattr__(self, "modules", module_patterns(self.modules))
        if self.only_runs is not None:
            object.__setattr__(self, "only_runs", _names(self.only_runs, "runs"))
        if self.only_steps is not None:
            object.__setattr__(self, "only_steps", _steps(self.only_steps))
        if self.axis not in AXES:
            raise WdaError(None, f"--axis must be one of {', '.join(AXES)}, not {self.axis!r}")
        if self.dtype not in DTYPES:
            raise WdaError(None, f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")

    def discover(self, ckpt_dir: str | Path | None) -> Layout:
        """What these options analyse in ``ckpt_dir`` (headers only)."""
        return discover(ckpt_dir, base=self.base, modules=list(self.modules or []) or None,
                        fan_in_fan_out=self.fan_in_fan_out, skip_broken=self.skip_broken, runs=self.runs,
                        split_fused=self.split_fused)


def module_patterns(modules: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Module patterns as the CLI takes them: a string is a comma list ("q_proj,v_proj"), a
    list or tuple holds one pattern per item. None: the default modules."""
    if modules is None:
        return None
    items = modules.split(",") if isinstance(modules, str) else list(modules)
    if not all(isinstance(m, str) for m in items):
        raise WdaError(None, f"--modules must be name suffixes or regular expressions (strings), "
                             f"not {modules!r}")
    out = tuple(m.strip() for m in items if m.strip())
    if not out:  # "--modules ''" must not quietly mean "the default modules"
        raise WdaError(None, f"--modules {modules!r} names no module",
                       "give comma-separated name suffixes (q_proj) or regular expressions")
    return out


def _names(value: str | Sequence[str], what: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    out = tuple(str(v).strip() for v in items if str(v).strip())
    if not out:
        raise WdaError(None, f"{what} {value!r} names no run")
    return out


def _steps(value: int | str | Sequence[int]) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else list(value)
    try:
        out = tuple(sorted({int(str(v).strip()) for v in items if str(v).strip()}))
    except ValueError:
        raise WdaError(None, f"steps {value!r} is not a list of integer steps") from None
    if not out:
        raise WdaError(None, f"steps {value!r} names no step")
    return out


def select(layout: Layout, runs: Sequence[str] | None, steps: Sequence[int] | None) -> Layout:
    """Keep only the named runs and steps (in place; returns the layout). Names or steps
    that are not there are an error listing what is."""
    if runs is not None:
        have = [r.name for r in layout.runs]
        unknown = [r for r in runs if r not in have]
        if unknown:
            raise WdaError(layout.root, f"no run named {', '.join(map(repr, unknown))}",
                           f"runs here: {', '.join(have)}")
        layout.runs = [r for r in layout.runs if r.name in runs]
    if steps is not None:
        have = sorted({s for r in layout.runs for s in r.steps})
        unknown = [s for s in steps if s not in have]
        if unknown:
            raise WdaError(layout.root, f"no checkpoint at step {', '.join(map(str, unknown))}",
                           f"steps here: {', '.join(map(str, have))}")
        for run in layout.runs:
            run.steps = {s: p for s, p in run.steps.items() if s in steps}
        layout.runs = [r for r in layout.runs if r.steps]
    if not layout.module_pairs():
        raise WdaError(layout.root, "no selected run changes the selected modules",
                       "check --modules, --only-runs and --only-steps")
    return layout


def measurement_count(layout: Layout) -> int:
    """Checkpoint matrices to measure (each against its base matrix): the dry run's count
    and the progress bar's total."""
    return sum(len(r.steps) for _, r in layout.module_pairs())


def discover_selected(ckpt_dir: str | Path | None, options: AnalysisOptions) -> Layout:
    """``options.discover``, then ``select`` of the options' runs and steps."""
    return select(options.discover(ckpt_dir), options.only_runs, options.only_steps)


def _runs_argument(runs) -> tuple[object, object]:
    """``runs=`` of the Python API: a dict {name: folder} or (name, folder) pairs give the
    runs one by one; a name or a list of names selects among the runs found.
    Returns (runs given, names selected)."""
    if runs is None:
        return (), None
    if isinstance(runs, dict) or (not isinstance(runs, str) and all(
            isinstance(r, (tuple, list)) and len(r) == 2 for r in runs) and len(runs)):
        return runs, None
    return (), runs


@dataclass
class AnalysisResult:
    metrics: pd.DataFrame
    layout: Layout
    device: str
    options: AnalysisOptions
    seconds: float
    bytes_read: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise WdaError(None, f"--device {name!r} is not a device (use auto, cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WdaError(None, f"--device {name!r} was asked for but no CUDA device is available",
                       "use --device cpu (or auto) on a machine without a GPU")
    return dev


# ---- reading: one work item per matrix ---------------------------------------------------
@dataclass(frozen=True)
class _Item:
    module: ModuleInfo
    run: Run | None  # None: the base matrix W_0
    step: int | None
    path: Path

    @cached_property
    def key(self) -> str:
        """str(path): the checkpoint's name in ``broken`` and in the rows."""
        return str(self.path)


def _work_items(layout: Layout) -> Iterator[_Item]:
    for m in layout.modules:
        yield _Item(m, None, None, layout.base)
        for run in layout.runs:
            if run.method == "FT" or m.name in run.adapter_names:
                for step, path in run.steps.items():
                    yield _Item(m, run, step, path)


# Full-weight checkpoints of one matrix measured in one pass over W_0: as many as fit in
# _BATCH_BYTES, at least _BATCH_MIN, at most _BATCH_MAX (sixteen 768² bf16 matrices, four
# 4096² ones). The read-ahead holds as many again, so that reading the next batch overlaps
# measuring this one. Per batch, not per tensor: the Python around each kernel call.
_BATCH_BYTES = 32 << 20
_BATCH_MIN, _BATCH_MAX = 4, 16


def _full_batch(nbytes: int) -> int:
    return max(_BATCH_MIN, min(_BATCH_MAX, _BATCH_BYTES // max(nbytes, 1)))


# Adapters of one matrix measured together (one GEMM over W_0, one kernel call for their sums):
# their factors side by side, as many columns as keep the factors and W_0's products with them
# (float32, out + in rows per column, twice) within _BATCH_BYTES: 1024 (the most) at 768²,
# 512 at 4096², 256 at 8192²; at least 128.
_RANK_MIN, _RANK_MAX = 128, 1024


def _adapter_batch(m: ModuleInfo) -> int:
    return max(_RANK_MIN, min(_RANK_MAX, _BATCH_BYTES // (8 * (m.stored_shape[0] + m.in_features))))


@dataclass
class _Loaded:
    tensors: dict[str, torch.Tensor]  # stored dtype: "w", or "a", "b", "m" of an adapter
    scaling: float | None  # of B·A for an adapter; None for a full weight
    source: Path  # the file the tensors came from (named in errors)
    ready: object = None  # CUDA: event recorded after the copies to the device
    mapped: bool = False  # the tensors are views of a memory-mapped file (a .bin)

    nbytes: int = 0

    def __post_init__(self) -> None:
        self.nbytes = sum(v.nbytes for v in self.tensors.values())


def _read_item(item: _Item, cache: HandleCache, alloc, mapped: bool, in_file: bool = False,
               files: OpenFiles | None = None) -> _Loaded:
    """The stored tensors of one matrix, read into buffers from ``alloc``; with ``mapped`` a
    full weight is a view of the file's own pages instead (no copy: the kernels read the page
    cache); with ``in_file`` a full weight the row kernel can take as stored is left in its
    file (``Checkpoint.stored_weight``: the kernel reads it, a block of rows at a time), its
    descriptor from ``files`` where given."""
    ck = cache.get(item.path)
    name = item.module.tensor  # the fused module for q, k, v of a fused projection
    if not ck.is_adapter:
        w = ck.stored_weight(name, files) if in_file and item.run is not None and _as_stored(item.module) else None
        if w is None:
            w = ck.read_weight(name, alloc, mapped)
        return _Loaded({"w": w}, None, ck.weights[name].file, mapped=ck.holds_data)
    # an adapter's own module name: prefixes may differ from the base's by a wrapper
    info = ck.adapters[item.run.adapter_names[item.module.name]]
    tensors = ck.read_adapter(item.run.adapter_names[item.module.name], alloc, files)
    if info.magnitude_axis == "in" and "m" in tensors:
        tensors["m_in"] = tensors.pop("m")  # one magnitude per input channel
    return _Loaded(tensors, info.scaling, info.file, mapped=ck.holds_data)


def _as_stored(m: ModuleInfo) -> bool:
    """Whether the module's vectors (axis "out") are the rows of its weight as stored: no
    transpose (Conv1D), reshape (conv kernels) or selection of rows (a fused projection's part)."""
    return len(m.stored_shape) == 2 and not m.transposed and m.part is None


def _is_full(item: _Item) -> bool:
    """A full matrix (the base or a full-weight checkpoint), not a small adapter."""
    return item.run is None or item.run.method == "FT"


def _read_size(item: _Item) -> int:
    """What the read-ahead counts: the bytes of a full matrix (as 16-bit floats), 0 for an adapter."""
    return 2 * item.module.stored_shape[0] * item.module.in_features if _is_full(item) else 0


def _reader(cache: HandleCache, dev: torch.device, spent: list, axis: str = "out",
            files: OpenFiles | None = None):
    """read(item) for the prefetch thread: tensors read, pages resident or copied to ``dev``
    (on a CPU, full-weight checkpoints measured by rows are left in their files for the row
    kernel to read, through ``files``: default, descriptors opened tensor by tensor; unless
    a core is free for this thread to read on, ``_core_to_read_on``).
    ``spent``: data the measuring side is done with, let go here (unmapping a matrix costs as
    much as a third of measuring it: this thread has the time)."""
    stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    # CUDA: pinned memory from torch's caching host allocator (itself a pool: a block is
    # reused once its copy to the device is done); CPU: our pool.
    alloc = _pinned if dev.type == "cuda" else BufferPool().take
    mapped = dev.type == "cpu"  # CUDA: read straight into pinned memory, one copy
    in_file = mapped and axis == "out" and kernels.available() and not _core_to_read_on()

    def read(item: _Item) -> _Loaded:
        while spent:
            spent.pop()
        data = _read_item(item, cache, alloc, mapped, in_file, files)
        if not (data.mapped or stream is not None):  # in memory or in its file, for the CPU: ready
            return data
        try:
            data.tensors, data.ready = stage(data.tensors, dev, stream, data.mapped)
        except OSError as exc:
            raise WdaError(data.source, f"cannot read tensors of {item.module.name!r} ({exc.strerror})",
                           "the file may be truncated or on a failing disk") from None
        return data

    return read


def _core_to_read_on() -> bool:
    """One thread measuring and another core free: this thread then maps the next full weights
    and faults their pages in while the kernel measures the current ones (a fifth to a quarter
    less time at 768²-2048² than the kernel reading each checkpoint itself, one thread doing
    both). With every core measuring, each kernel thread reads its own rows: no page faults."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() == 1 and cores > 1


def _pinned(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


# ---- measuring ---------------------------------------------------------------------------
def _canonical(w: torch.Tensor, m: ModuleInfo) -> torch.Tensor:
    if w.dim() == 4:  # a conv kernel (out, in, kh, kw): one row per output channel
        w = w.reshape(w.shape[0], -1)
    w = w.t() if m.transposed else w  # Conv1D (in, out) -> (out, in)
    return _part_rows(w, m)


def _part_rows(t: torch.Tensor, m: ModuleInfo) -> torch.Tensor:
    """The rows of q, k or v of a fused projection (all rows of any other module)."""
    return fused_qkv.select_rows(t, m.part.rows) if m.part is not None else t


def _on_device(data: _Loaded, dev: torch.device) -> dict[str, torch.Tensor]:
    ready = getattr(data, "ready", None)
    if ready is None:
        if dev.type == "cpu":  # read for the CPU: already there (the mapping, or a buffer)
            return data.tensors
        return {k: v.to(dev) for k, v in data.tensors.items()}
    cur = torch.cuda.current_stream(dev)
    cur.wait_event(ready)
    for v in data.tensors.values():
        v.record_stream(cur)  # allocated on the reader's stream, used on this one
    return data.tensors


def _prepare_base(item: _Item, data: _Loaded, dev: torch.device, dtype: torch.dtype,
                  axis: str) -> BaseWeight:
    w0 = _canonical(_on_device(data, dev)["w"], item.module)
    try:
        return BaseWeight(w0, axis=axis, dtype=dtype)
    except NonFiniteWeights:
        raise WdaError(data.source, f"non-finite values (NaN/Inf) in base module {item.module.name!r}") from None


def _adapter_tensors(data: _Loaded, dev: torch.device, module: ModuleInfo,
                     whole: bool = True) -> dict[str, torch.Tensor]:
    """The adapter's tensors on ``dev``, in their stored dtype (the measuring code converts
    them, the factors of many adapters at once). ``whole``: an adapter of a fused module's part
    is on the whole fused module (its part's rows are selected); False: on the part alone (its
    B and magnitude hold those rows only)."""
    rows = _part_rows if whole else (lambda t, m: t)
    t = dict(_on_device(data, dev))
    if "m" in t:
        t["m"] = rows(t["m"].reshape(-1), module)  # (out,)
    if "m_in" in t:
        t["m_in"] = t["m_in"].reshape(-1)  # (in channels,)
    if "b" in t:
        # B's rows are the output rows of ΔW = s·B·A (and the DoRA norm is per output row):
        # the rows of a fused module's part are exactly its merged rows
        t["b"] = rows(t["b"], module)
    return t


class _Measurer:
    """The measuring side of the loop: one prepared W_0 at a time; adapters of a matrix are
    gathered and measured together (``BaseWeight.measure_lowrank_many``), one pass for all."""

    def __init__(self, options: AnalysisOptions, dev: torch.device, dtype: torch.dtype) -> None:
        self.options, self.dev, self.dtype = options, dev, dtype
        self.base: BaseWeight | None = None
        self.w0: torch.Tensor | None = None
        self.rows: list[dict] = []
        self.broken: dict[str, str] = {}  # checkpoint path -> reason (skip_broken)
        self.bytes_read = 0
        self._pending: list[tuple[_Item, _Loaded]] = []  # adapters of the current matrix
        self._rank = 0
        self._full: list[tuple[_Item, _Loaded]] = []  # full-weight checkpoints of it
        self.spent: list[_Loaded] = []  # measured: for the reader to let go

    def take(self, item: _Item, data: _Loaded | WdaError) -> None:
        if item.key in self.broken:
            return
        if isinstance(data, WdaError):
            return self._fail(item, data)
        self.bytes_read += data.nbytes
        if item.run is None:
            self.flush()
            self.base = self.w0 = None  # let the previous W_0 go first
            self.base = _prepare_base(item, data, self.dev, self.dtype, self.options.axis)
            self.w0 = _canonical(_on_device(data, self.dev)["w"], item.module)  # for dense merges
        elif data.scaling is not None:
            self._flush_full()
            self._pending.append((item, data))
            self._rank += sum(v.shape[0] for k, v in data.tensors.items() if k == "a")
            if self._rank >= _adapter_batch(item.module):
                self._flush_adapters()
        else:
            self._flush_adapters()
            self._full.append((item, data))
            if len(self._full) >= _full_batch(data.nbytes):
                self._flush_full()

    def flush(self) -> None:
        """Measure what is gathered for the current matrix."""
        self._flush_full()
        self._flush_adapters()

    def _flush_full(self) -> None:
        """Full-weight checkpoints of the current matrix, measured in one pass over W_0."""
        pending, self._full = [(it, d) for it, d in self._full if it.key not in self.broken], []
        if not pending:
            return
        ws = [d.tensors["w"] if isinstance(d.tensors["w"], StoredTensor)  # the kernel reads it
              else _canonical(_on_device(d, self.dev)["w"], it.module) for it, d in pending]
        try:
            found = self.base.measure_many(ws)
        except (NonFiniteWeights, WdaError):  # one of them is broken: one at a time, to name it
            found = [None] * len(ws)
        for (it, d), w, meas in zip(pending, ws, found):
            self._record(it, d, lambda m=meas, w=w: m if m is not None else self.base.measure(w))
        ws.clear()  # the last references are now in ``spent``
        self.spent.extend(d for _, d in pending)

    def _flush_adapters(self) -> None:
        """Measure the gathered adapters (Eq. 1, or Eq. 5 with a magnitude) of the current matrix."""
        pending, self._pending, self._rank = self._pending, [], 0
        pending = [(it, d) for it, d in pending if it.key not in self.broken]
        if not pending:
            return
        base = self.base
        tensors = [_adapter_tensors(d, self.dev, it.module, it.module.part is None
                                    or it.run.adapts_fused(it.module)) for it, d in pending]
        # the ones measured from their factors share one pass over W_0 and one kernel call
        low = [i for i, t in enumerate(tensors)
               if "a" in t and "m_in" not in t and not ("m" in t and base.dim == 0)]
        try:
            found = dict(zip(low, base.measure_lowrank_many(
                [(tensors[i]["a"], tensors[i]["b"], pending[i][1].scaling, tensors[i].get("m")) for i in low])))
        except NonFiniteWeights:  # one of them is broken: one at a time, to name it
            found = {}
        for i, ((item, data), t) in enumerate(zip(pending, tensors)):
            s = data.scaling  # this checkpoint's own, for this module
            if i in found:
                self._record(item, data, lambda m=found[i]: m)
            elif "a" not in t:  # magnitude only (paper Table 6): W' = m · W_0 / ||W_0||
                self._record(item, data, lambda t=t: base.measure_rescaled(t["m"]))
            elif "m_in" in t:  # magnitudes per input channel: merged densely (one matrix)
                self._record(item, data, lambda t=t, s=s: base.measure(self._merge_input_axis(t, s)))
            else:
                self._record(item, data, lambda t=t, s=s: base.measure_lowrank(t["a"], t["b"], s, t.get("m")))

    def _merge_input_axis(self, t: dict[str, torch.Tensor], s: float) -> torch.Tensor:
        c = self.dtype
        with gemm.exact(self.dev):  # a float32 GEMM whatever the process asked torch for
            return merge_dora_input_axis(self.w0.to(c), t["a"].to(c), t["b"].to(c), s, t["m_in"].to(c))

    def _record(self, item: _Item, data: _Loaded, fn) -> None:
        try:
            try:
                meas = fn()
            except NonFiniteWeights:
                raise WdaError(data.source, f"non-finite values (NaN/Inf) in module {item.module.name!r}",
                               "this checkpoint diverged or is corrupt") from None
            self.rows.append(_row(item, meas, self.options.axis))
        except WdaError as err:
            self._fail(item, err)

    def _fail(self, item: _Item, err: WdaError) -> None:
        if item.run is None:
            raise err
        if not self.options.skip_broken:
            raise err.with_hint("--skip-broken analyses the rest")
        self.broken[item.key] = str(err)


def run_analysis(ckpt_dir: str | Path | None, options: AnalysisOptions = AnalysisOptions(),
                 layout: Layout | None = None) -> AnalysisResult:
    """Discover, check and measure everything; the full result with its provenance.
    ``layout``: what ``options.discover(ckpt_dir)`` found, if already called."""
    t0 = time.perf_counter()
    layout = select(layout if layout is not None else options.discover(ckpt_dir),
                    options.only_runs, options.only_steps)
    dev = resolve_device(options.device)
    dtype = DTYPES[options.dtype]
    items = list(_work_items(layout))
    # Checkpoints of safetensors stay open (their headers: each full weight is read by the row
    # kernel from its own descriptor, or mapped on its own, and let go after its batch); a .bin
    # one is reopened for each matrix, since its mapping keeps every page it has served.
    cache = HandleCache(size=1, opened=layout.opened)
    work = _Measurer(options, dev, dtype)
    files = OpenFiles()  # the checkpoints' descriptors, for the full weights left in them
    read = _reader(cache, dev, work.spent, options.axis, files)
    from tqdm.auto import tqdm

    bar = tqdm(total=measurement_count(layout), desc="wda: measuring", unit="matrix",
               disable=None if options.progress is None else not options.progress)
    try:
        # closed (its thread joined) before the descriptors it duplicates are
        with contextlib.closing(prefetched(items, read, options.prefetch, _read_size, 2 * _BATCH_BYTES)) as ahead:
            for item, data in ahead:
                if item.run is not None:  # base matrices are read, not measured
                    bar.update(1)
                work.take(item, data)
                del data
        work.flush()
    finally:
        files.close()
        bar.close()
        scratch.release()
    broken = work.broken
    skipped = list(layout.skipped) + sorted(broken.items())
    rows = [r for r in work.rows if r["_path"] not in broken]
    _drop_broken(layout, broken)
    if not rows:
        raise WdaError(layout.root, "no valid checkpoint left to analyse", "every checkpoint was skipped")
    metrics = _table(rows)
    return AnalysisResult(metrics, layout, str(dev), options, time.perf_counter() - t0, work.bytes_read, skipped)


def _drop_broken(layout: Layout, broken: dict[str, str]) -> None:
    """Checkpoints skipped while measuring leave the layout too, so it describes the table."""
    for run in layout.runs:
        run.steps = {s: p for s, p in run.steps.items() if str(p) not in broken}
    layout.runs = [r for r in layout.runs if r.steps]


def _row(item: _Item, meas, axis: str) -> dict:
    m = item.module
    return {"run": item.run.name, "method": item.run.method, "step": item.step, "module": m.name,
            "layer": m.layer, "matrix": m.matrix, **vars(meas), "axis": axis, "stack": m.stack,
            **_logged(item), "_path": item.key}  # vars: the Measurement's fields (the table takes METRIC_COLUMNS)


def _logged(item: _Item) -> dict[str, float | None]:
    """What the Trainer logged nearest this checkpoint (empty when it logged nothing)."""
    return {c: item.run.train_log.get(item.step, {}).get(c) for c in LOG_COLUMNS}


_SORT_KEYS = ("run", "matrix", "stack", "layer", "module", "step")
_METHOD_ORDER = {m: i for i, m in enumerate(("FT", "LoRA", "DoRA"))}
_INT_COLUMNS = ("step", "layer", "n_vectors", "n_excluded")


def _table(rows: list[dict]) -> pd.DataFrame:
    """The tidy table of ``rows`` (dicts with the ``METRIC_COLUMNS`` and ``_path``): FT, LoRA,
    DoRA (then any other method), each by run, matrix, stack, layer, module and step, missing
    values last. Sorted and assembled column by column in Python: for the few hundred rows of
    a small model pandas' own construction and sort were a tenth of the whole analysis."""
    try:
        prefixes: dict[tuple, tuple] = {}  # the key's part shared by every step of a (run, module)
        rows = sorted(rows, key=lambda r: _sort_key(r, prefixes))
    except TypeError:  # keys of mixed kinds in one column (tracker rows read back): pandas sorts
        return _table_pandas(rows)
    cols = {c: [r[c] for r in rows] for c in METRIC_COLUMNS}
    for c in _INT_COLUMNS:
        cols[c] = np.asarray(cols[c], dtype=np.int64)
    return pd.DataFrame(cols, columns=METRIC_COLUMNS)


def _sort_key(row: dict, prefixes: dict[tuple, tuple]) -> tuple:
    at = (row["method"], row["run"], row["matrix"], row["stack"], row["layer"], row["module"])
    try:
        prefix = prefixes.get(at)
        if prefix is None:
            prefix = prefixes[at] = _key_prefix(at)
    except TypeError:  # a value that cannot be a dict key (none of ours): the key made in full
        prefix = _key_prefix(at)
    return (*prefix, _last(row["step"]))


def _key_prefix(at: tuple) -> tuple:
    """The sort key of (method, run, matrix, stack, layer, module)."""
    return (_METHOD_ORDER.get(at[0], len(_METHOD_ORDER)), *map(_last, at[1:]))


def _last(v) -> tuple:
    """A sort key that puts a missing value (None, NaN: a tracker's empty field read back) last."""
    return (1, 0) if v is None or v != v else (0, v)


def _table_pandas(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=METRIC_COLUMNS + ["_path"]).drop(columns="_path")
    df = df.astype({c: "int64" for c in _INT_COLUMNS})
    df["_m"] = df["method"].map(_METHOD_ORDER).fillna(len(_METHOD_ORDER))
    df = df.sort_values(["_m", *_SORT_KEYS], kind="stable")
    return df.drop(columns="_m").reset_index(drop=True)


def analyze(ckpt_dir: str | Path | None, modules: str | Sequence[str] | None = None,
            axis: str = "out", device: str = "auto", dtype: str = "float32",
            base: str | Path | None = None, runs=None, steps: int | Sequence[int] | None = None,
            return_result: bool = False, **kwargs) -> pd.DataFrame | AnalysisResult:
    """ΔM (Eq. 3) and ΔD (Eq. 4) per (run, step, module) of a checkpoint directory (a folder
    of runs or one Trainer output_dir; None with ``runs={name: folder}``).

    ``modules``: name suffixes (``"q_proj"``) or regular expressions matching whole names,
    as a comma list (``"q_proj,v_proj"``) or a list; default: the modules the adapters
    target, else the attention query/value projections. ``runs``: a name or list of names
    selects among the runs found; a dict {name: folder} gives the runs one by one.
    ``steps``: only these steps. ``axis="out"``: one magnitude per output feature, as in DoRA/PEFT.
    Other keywords: ``AnalysisOptions`` (``skip_broken``, ``fan_in_fan_out``, ``progress``).
    Returns the tidy table, or with ``return_result=True`` the ``AnalysisResult`` (table,
    layout, options, device, skipped checkpoints).
    """
    with pythonic_errors():
        given, only = _runs_argument(runs)
        opts = AnalysisOptions(modules=modules, axis=axis, device=device, dtype=dtype,
                               base=str(base) if base is not None else None, runs=given,
                               only_runs=only, only_steps=steps, **kwargs)
        result = run_analysis(ckpt_dir, opts)
    return result if return_result else result.metrics


def plan(ckpt_dir: str | Path | None, modules: str | Sequence[str] | None = None,
         base: str | Path | None = None, fan_in_fan_out: bool | None = None,
         skip_broken: bool = False, runs=None, steps: int | Sequence[int] | None = None,
         split_fused: bool = True) -> pd.DataFrame:
    """Dry run (headers only): one row per (run, step, module) that would be measured.
    ``runs`` and ``steps`` as in ``analyze``; ``split_fused=False``: fused q/k/v kept whole."""
    with pythonic_errors():
        given, only = _runs_argument(runs)
        opts = AnalysisOptions(modules=modules, base=str(base) if base is not None else None,
                               fan_in_fan_out=fan_in_fan_out, skip_broken=skip_broken,
                               runs=given, only_runs=only, only_steps=steps, split_fused=split_fused)
        layout = discover_selected(ckpt_dir, opts)
    cols = ("run", "method", "step", "module", "layer", "matrix", "out_features", "in_features",
            "transposed", "path")
    rows = [(r.name, r.method, s, m.name, m.layer, m.matrix, m.out_features, m.in_features, m.transposed, p)
            for m, r in layout.module_pairs() for s, p in r.steps.items()]
    df = pd.DataFrame.from_records(rows, columns=cols)  # tuples: a dict per row costs more than the rest
    df["path"] = df["path"].astype(str)
    return df
