"""Measure ΔM / ΔD while a model trains, without saving checkpoints.

    tracker = wda.Tracker(model, every=50, out="runs/mine/tracker")
    for step in range(1, steps + 1):
        ...                                  # forward, backward, optimizer step
        tracker.step(step)                   # every 50th step: one row per module

``Tracker`` remembers W_0 of the selected modules when it is created and, at each measured
step, measures the current weights against it with the analysis engine's own code
(``wda.analysis.decompose.BaseWeight``, one prepared per module, W_0's norms computed once):
``measure`` for full weights, ``measure_lowrank`` from the factors for LoRA / DoRA adapters
(wda's ``LoRALinear`` / ``DoRALinear`` and PEFT's LoRA / DoRA layers), ``measure_rescaled``
for magnitude-only DoRA modules. Rows go to ``OUT/metrics.csv`` in the schema
``python -m wda.report`` writes (``wda.analysis.engine.METRIC_COLUMNS``); ``OUT/tracker.json``
records the settings, and ``python -m wda.report OUT`` renders the report from them.

W_0 and its memory:
- adapter layers (wda's or PEFT's): the frozen base weight *is* W_0, so nothing is copied
  (the tracker keeps a reference; if the model moves to another device the W_0 of each
  module is prepared again there, once);
- full fine-tuning: a copy of just the selected matrices, in their stored dtype, on
  ``w0_device`` (the CPU by default): ``sum(out * in * bytes per element)`` over them, plus
  4 bytes per vector for the norms; e.g. the 64 q/v projections of a LLaMA-7B in bf16 take
  64 · 4096² · 2 B = 2.1 GiB (``Tracker.w0_bytes`` says what a tracker holds);
- FSDP2 (DTensor weights): W_0 is gathered once at creation, one module at a time
  (``full_tensor()``), and kept on rank 0 only, on ``w0_device``, as for full fine-tuning.

Distributed runs: create the tracker and call ``step`` on every rank (FSDP2 gathers each
module's current weights with a collective, one module at a time: memory one matrix, never
the whole model); only rank 0 (``write``) measures and writes.

Writing is atomic per measured step: the step's rows are formatted first, then appended in
one ``write`` followed by ``fsync``; a failed write (disk full) is cut back to the previous
end of the file, so metrics.csv always holds whole steps. Measuring runs under
``torch.no_grad()`` with autocast off; it reads weights and never changes RNG state,
gradients, module modes or weights.
"""

from __future__ import annotations

import errno
import io
import json
import operator
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from wda.analysis.decompose import AXES, MEASUREMENT_FIELDS, BaseWeight, NonFiniteWeights
from wda.errors import WdaError
from wda.analysis.layout import DEFAULT_TARGETS, GPT2_DEFAULT_TARGETS, ModuleInfo, parse_name
from wda.names import matches

METRICS_NAME = "metrics.csv"
SETTINGS_NAME = "tracker.json"
FORMAT = "wda-tracker/1"
# PeftModel wraps the model twice; the inner names are the base checkpoint's tensor names.
PEFT_PREFIX = "base_model.model."
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_KINDS = ("full", "lora", "dora", "magnitude")  # how a module's current weight is measured


def metric_columns() -> list[str]:
    """``wda.analysis.engine.METRIC_COLUMNS``, then any ``Measurement`` field it does not list yet."""
    from wda.analysis.engine import METRIC_COLUMNS

    extra = [f for f in MEASUREMENT_FIELDS if f not in METRIC_COLUMNS]
    return list(METRIC_COLUMNS) + extra


# ---- finding the modules ---------------------------------------------------------------------
def _is_peft_layer(m: nn.Module) -> bool:
    """PEFT's LoRA/DoRA layers (duck-typed: wda does not import peft)."""
    return (isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(m, "base_layer", None), nn.Module)
            and isinstance(getattr(m, "scaling", None), dict))


def _is_wda_layer(m: nn.Module) -> bool:
    from wda.train.dora import DoRALinear, LoRALinear

    return isinstance(m, (LoRALinear, DoRALinear))


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: weight stored (in, out)."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def _own_weight(m: nn.Module) -> torch.Tensor | None:
    w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
    return w if isinstance(w, torch.Tensor) else None


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor; a DTensor (FSDP2) is all-gathered (a collective on every rank)."""
    from wda.analysis.distributed import _full as full

    return full(t.detach())


@dataclass
class _Module:
    """One tracked module: how to read its current weights, and (writer) its prepared W_0."""

    info: ModuleInfo
    kind: str  # one of _KINDS
    module: nn.Module
    adapter: str | None = None  # PEFT adapter name
    base: BaseWeight | None = None
    base_src: torch.Tensor | None = None  # the live tensor W_0 was taken from (adapters)


def _unwrap(model: nn.Module) -> nn.Module:
    from wda.analysis.distributed import unwrap

    return unwrap(model)


def _names(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) with PeftModel's wrapper prefix taken off, so names are the base
    checkpoint's tensor names without ``.weight`` (what the report's rows carry)."""
    peft = type(model).__module__.startswith("peft")
    out = []
    for name, m in model.named_modules():
        if peft and name.startswith(PEFT_PREFIX):
            name = name[len(PEFT_PREFIX):]
        out.append((name, m))
    return out


def _candidates(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(adapter layers, plain modules with a weight of their own), by name; modules inside an
    adapter layer (base_layer, lora_A, ...) are neither."""
    adapters: dict[str, nn.Module] = {}
    plain: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, m in _names(model):
        if any(name.startswith(a + ".") for a in inside):
            continue
        if _is_wda_layer(m) or _is_peft_layer(m):
            adapters[name] = m
            inside.append(name)
        elif _own_weight(m) is not None:
            plain[name] = m
    return adapters, plain


def _example(names: Iterable[str]) -> str:
    names = sorted(names)
    if not names:
        return ""
    pick = min(names, key=lambda n: (parse_name(n)[1] not in DEFAULT_TARGETS, parse_name(n)[0] < 0, n))
    return f"give name suffixes such as {parse_name(pick)[1]!r} or regular expressions matching whole names such as {pick!r}"


def select_modules(model: nn.Module, modules: Sequence[str] | None) -> dict[str, nn.Module]:
    """The modules to track by name, following the analysis' rules: ``modules`` are name
    suffixes or regular expressions (``wda.names.matches``); by default the adapter layers
    when the model has any, else the attention query/value projections."""
    adapters, plain = _candidates(model)
    two_d = {n: m for n, m in plain.items() if _own_weight(m).dim() == 2}
    everything = {**adapters, **two_d}
    if modules is None:
        if adapters:
            return adapters
        targets = GPT2_DEFAULT_TARGETS if any(_is_conv1d(m) for m in two_d.values()) else DEFAULT_TARGETS
        picked = {n: m for n, m in two_d.items() if any(n == t or n.endswith("." + t) for t in targets)}
        if not picked:
            raise WdaError(None, f"the model has no adapter layers and no attention query/value "
                                 f"projection ({', '.join(targets)}) to track", _example(everything) and
                           "choose modules=[...]: " + _example(everything))
        return picked
    if isinstance(modules, str):
        modules = [modules]
    if not modules:
        raise WdaError(None, "modules=[] names no module", "give name suffixes (q_proj) or regular expressions")
    picked: dict[str, nn.Module] = {}
    for pat in modules:
        hit = [n for n in everything if matches(n, pat)]
        if not hit:
            flat = [n for n, m in plain.items() if matches(n, pat) and n not in two_d]
            if flat:
                shape = tuple(_own_weight(plain[flat[0]]).shape)
                raise WdaError(None, f"modules {pat!r} matches only weights that are not 2-D matrices "
                                     f"({flat[0]!r} has shape {shape})", "ΔM and ΔD are defined for 2-D weights")
            raise WdaError(None, f"modules {pat!r} matches no module of this model with a 2-D weight",
                           _example(everything) or "the model has no 2-D weights")
        picked.update((n, everything[n]) for n in hit)
    return picked


def _describe(name: str, m: nn.Module) -> tuple[str, str | None, torch.Tensor, bool]:
    """(kind, PEFT adapter name, the base/full weight as stored, stored transposed)."""
    if _is_wda_layer(m):
        from wda.train.dora import DoRALinear

        kind = "lora"
        if isinstance(m, DoRALinear):
            kind = "magnitude" if m.magnitude_only else "dora"
        return kind, None, m.base_layer.weight, False
    if _is_peft_layer(m):
        active = [a for a in _active(m) if a in m.lora_A]
        if len(active) != 1:
            raise WdaError(None, f"PEFT layer {name!r} has {len(active)} active LoRA adapters "
                                 f"({', '.join(active) or 'none'}); the tracker measures exactly one",
                           "set one active adapter (model.set_adapter)")
        a = active[0]
        w = _own_weight(m.base_layer)
        if w is None:
            raise WdaError(None, f"PEFT layer {name!r} wraps a {type(m.base_layer).__name__} without a "
                                 f"weight of its own (quantised?)", "track a model with plain weights")
        kind = "dora" if a in getattr(m, "lora_magnitude_vector", {}) else "lora"
        return kind, a, w, bool(getattr(m, "fan_in_fan_out", False))
    return "full", None, _own_weight(m), _is_conv1d(m)


def _active(m: nn.Module) -> list[str]:
    act = getattr(m, "active_adapters", None)
    if act is None:
        act = getattr(m, "active_adapter", [])
    return [act] if isinstance(act, str) else list(act)


# ---- the tracker -----------------------------------------------------------------------------
class Tracker:
    """Record ΔM / ΔD of ``model``'s modules at chosen training steps (see the module doc).

    ``modules``: name suffixes or regular expressions (default: the adapter layers, else the
    attention query/value projections); ``every=N`` measures steps N, 2N, ...; ``steps``
    measures exactly those; ``out``: the folder of metrics.csv and tracker.json (must not
    hold a metrics.csv yet); ``axis``: "out" (one magnitude per output feature, as DoRA /
    PEFT) or "in"; ``run``: the run's name in the rows (default: the folder's name, or its
    parent's when the folder is called ``tracker``, as in ``runs/<run>/tracker``);
    ``dtype``: compute dtype; ``w0_device``: where copies of W_0 live and full weights are
    measured (None: each weight's own device); ``write``: whether this process writes
    (default: rank 0 of torch.distributed, or the only process).
    """

    def __init__(self, model: nn.Module, modules: Sequence[str] | None = None, *,
                 every: int | None = None, steps: Iterable[int] | None = None,
                 out: str | os.PathLike, axis: str = "out", run: str | None = None,
                 dtype: str = "float32", w0_device: str | torch.device | None = "cpu",
                 write: bool | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise WdaError(None, f"Tracker needs a torch.nn.Module, not {type(model).__name__}")
        if axis not in AXES:
            raise WdaError(None, f"axis must be one of {', '.join(AXES)}, not {axis!r}")
        if dtype not in _DTYPES:
            raise WdaError(None, f"dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
        self.every, self.steps = _schedule(every, steps)
        self.out = Path(out)
        self.axis, self.dtype_name, self.dtype = axis, dtype, _DTYPES[dtype]
        self.run = run if run is not None else _default_run(self.out)
        self.w0_device = torch.device(w0_device) if w0_device is not None else None
        self.write = _is_writer() if write is None else bool(write)
        self.metrics_path = self.out / METRICS_NAME
        self.seconds = 0.0  # time spent measuring and writing
        self._last_step: int | None = None
        self._last_measured: int | None = None
        self._size = 0  # bytes of metrics.csv known to be complete

        selected = select_modules(_unwrap(model), modules)
        self._modules: list[_Module] = []
        for name in sorted(selected, key=lambda n: (parse_name(n)[1], parse_name(n)[2], parse_name(n)[0], n)):
            m = selected[name]
            kind, adapter, w, transposed = _describe(name, m)
            if w.dim() != 2:
                raise WdaError(None, f"module {name!r} has a weight of shape {tuple(w.shape)}, not a 2-D "
                                     f"matrix", "choose modules with 2-D weights")
            rows, cols = w.shape
            out_f, in_f = (cols, rows) if transposed else (rows, cols)
            layer, matrix, stack = parse_name(name)
            info = ModuleInfo(name, out_f, in_f, transposed, layer, matrix, stack)
            self._modules.append(_Module(info, kind, m, adapter))
        kinds = {t.kind for t in self._modules}
        if "full" in kinds and len(kinds) > 1:
            plain = next(t.info.name for t in self._modules if t.kind == "full")
            raise WdaError(None, f"the selection mixes adapter layers and plain modules ({plain!r}); a run "
                                 f"has one method", "select only the adapter layers, or only plain modules")
        self.method = "FT" if kinds == {"full"} else "DoRA" if kinds & {"dora", "magnitude"} else "LoRA"
        self.w0_bytes = 0
        if self.write:  # before copying W_0: a folder we must not use fails fast
            self._files(lambda: self._check_out())
        t0 = time.perf_counter()
        with torch.no_grad():
            for t in self._modules:  # every rank, in the same order: FSDP2 gathers are collective
                self._prepare(t)
        self.seconds += time.perf_counter() - t0
        if self.write:
            self._files(lambda: self._create_files())

    # -- public --
    @property
    def modules(self) -> list[str]:
        """The tracked module names, in the report's order."""
        return [t.info.name for t in self._modules]

    def due(self, step: int) -> bool:
        """Whether ``step`` is one this tracker measures."""
        if self.steps is not None:
            return step in self.steps
        return step > 0 and step % self.every == 0

    def step(self, global_step: int) -> bool:
        """Measure and append the rows of ``global_step`` if it is due; True if it was.

        Steps must not go backwards; calling again with the same step does nothing (e.g.
        once per micro-batch under gradient accumulation)."""
        step = _check_step(global_step)
        if self._last_step is not None and step < self._last_step:
            raise WdaError(self.metrics_path, f"step {step} comes after step {self._last_step}: steps must "
                                              f"not go backwards", "pass the global optimizer step")
        self._last_step = step
        if step == self._last_measured or not self.due(step):
            return False
        t0 = time.perf_counter()
        with torch.no_grad(), _no_autocast():
            rows = [self._measure(t, step) for t in self._modules]
        if self.write:
            self._append(rows)
        self._last_measured = step
        self.seconds += time.perf_counter() - t0
        return True

    def settings(self) -> dict:
        """What tracker.json records."""
        from wda import __version__

        return {
            "format": FORMAT, "run": self.run, "method": self.method, "axis": self.axis,
            "dtype": self.dtype_name, "every": self.every,
            "steps": sorted(self.steps) if self.steps is not None else None,
            "w0_device": str(self.w0_device) if self.w0_device is not None else None,
            "w0_bytes_copied": self.w0_bytes,
            "devices": sorted({str(t.base.vecs.device) for t in self._modules if t.base is not None}),
            "world_size": _world_size(),
            "modules": [{"name": t.info.name, "kind": t.kind, "out_features": t.info.out_features,
                         "in_features": t.info.in_features, "stored_transposed": t.info.transposed}
                        for t in self._modules],
            "versions": {"wda": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
        }

    # -- W_0 --
    def _prepare(self, t: _Module) -> None:
        """Prepare W_0 of one module (every rank: a sharded weight is gathered collectively)."""
        w = self._stored_base(t)
        sharded = _is_dtensor(w)
        full = _full(w)
        if not self.write:
            return
        copy = t.kind == "full" or sharded
        if copy:
            dev = self.w0_device or full.device
            src = full.to(dev, copy=True) if not sharded or full.device != dev else full
            self.w0_bytes += src.numel() * src.element_size()
        else:
            src = full
        t.base_src = None if copy else w
        t.base = self._base_weight(t, src)

    def _stored_base(self, t: _Module) -> torch.Tensor:
        m = t.module
        if t.kind == "full":
            return _own_weight(m)
        base = m.base_layer
        return _own_weight(base)

    def _base_weight(self, t: _Module, w: torch.Tensor) -> BaseWeight:
        w = w.detach()
        try:
            return BaseWeight(w.t() if t.info.transposed else w, axis=self.axis, dtype=self.dtype)
        except NonFiniteWeights:
            raise WdaError(None, f"non-finite values (NaN/Inf) in the weight of module {t.info.name!r} "
                                 f"when the tracker was created") from None

    # -- measuring --
    def _measure(self, t: _Module, step: int) -> dict | None:
        """The row of one module (writer), after the collective gathers (every rank)."""
        m = t.module
        _check_unmerged(t)
        try:
            if t.kind == "full":
                w = _full(_own_weight(m))
                if not self.write:
                    return None
                base = t.base
                w = w.to(base.vecs.device)
                meas = base.measure(w.t() if t.info.transposed else w)
            else:
                tensors = [None if x is None else _full(x) for x in _adapter_tensors(t)]  # a, b, m
                if not self.write:
                    return None
                base = self._adapter_base(t)
                a, b, mag = (None if x is None else x.to(base.vecs.device, self.dtype) for x in tensors)
                s = _scaling(t)
                if t.kind == "magnitude":
                    meas = base.measure_rescaled(mag.reshape(-1))
                else:
                    meas = base.measure_lowrank(a, b, s, None if mag is None else mag.reshape(-1))
        except NonFiniteWeights:
            raise WdaError(self.metrics_path, f"non-finite values (NaN/Inf) in module {t.info.name!r} at step "
                                              f"{step}", "training diverged; earlier steps are in the file") from None
        info = t.info
        return {"run": self.run, "method": self.method, "step": step, "module": info.name,
                "layer": info.layer, "matrix": info.matrix, **{f: getattr(meas, f) for f in MEASUREMENT_FIELDS},
                "axis": self.axis, "stack": info.stack}

    def _adapter_base(self, t: _Module) -> BaseWeight:
        """The prepared W_0; again on the new device (once) if the model was moved."""
        if t.base_src is not None:
            live = self._stored_base(t)
            if live.device != t.base.vecs.device:
                t.base = self._base_weight(t, live)
                t.base_src = live
        return t.base

    # -- files --
    def _files(self, fn) -> None:
        try:
            fn()
        except OSError as exc:
            raise WdaError(self.out, f"cannot write the tracker's files ({_reason(exc)})",
                           "check the path, free space and permissions") from None

    def _check_out(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise WdaError(self.out, "exists and is not a folder", "choose another out=")
        self.out.mkdir(parents=True, exist_ok=True)
        if self.metrics_path.exists() and self.metrics_path.stat().st_size > 0:
            raise WdaError(self.metrics_path, "already exists; refusing to mix the rows of two runs",
                           "choose another out= or remove the old folder")

    def _create_files(self) -> None:
        """tracker.json, then metrics.csv's header, each written whole."""
        _write_atomic(self.out / SETTINGS_NAME, json.dumps(self.settings(), indent=1) + "\n")
        header = ",".join(metric_columns()) + "\n"
        _write_atomic(self.metrics_path, header)
        self._size = len(header.encode())

    def _append(self, rows: list[dict]) -> None:
        """The step's rows in one write + fsync; on failure the file is cut back to its last
        complete step, so it never holds part of a step."""
        import pandas as pd

        buf = io.StringIO()
        pd.DataFrame(rows, columns=metric_columns()).to_csv(buf, header=False, index=False)
        data = buf.getvalue().encode()
        try:
            fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise WdaError(self.metrics_path, f"cannot append the rows of step {rows[0]['step']} "
                                              f"({_reason(exc)})", "was the folder removed?") from None
        try:
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            except OSError as exc:
                try:
                    os.ftruncate(fd, self._size)
                    os.fsync(fd)
                except OSError:
                    pass
                raise WdaError(self.metrics_path, f"cannot append the rows of step {rows[0]['step']} "
                                                  f"({_reason(exc)})",
                               "check free space; every earlier step is in the file") from None
        finally:
            os.close(fd)
        self._size += len(data)


# ---- helpers ---------------------------------------------------------------------------------
def _default_run(out: Path) -> str:
    """The folder's name, or its parent's for the ``<run>/tracker`` layout."""
    path = out.resolve()
    return (path.parent.name if path.name == "tracker" else path.name) or "run"


def _schedule(every, steps) -> tuple[int | None, frozenset[int] | None]:
    if (every is None) == (steps is None):
        raise WdaError(None, "give the tracker exactly one of every=N or steps=[...]")
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise WdaError(None, f"every must be a positive integer, not {every!r}")
        return every, None
    if isinstance(steps, (str, bytes)):
        raise WdaError(None, f"steps must be a list of integers, not {steps!r}")
    got = frozenset(_check_step(s) for s in steps)
    if not got:
        raise WdaError(None, "steps=[] names no step to measure")
    return None, got


def _check_step(step) -> int:
    """A step as an int: ints, numpy / torch integers; never a bool or a float."""
    if isinstance(step, (bool, float)) or not hasattr(step, "__index__"):
        raise WdaError(None, f"a step must be a non-negative integer, not {step!r}")
    try:
        value = operator.index(step)
    except TypeError:
        raise WdaError(None, f"a step must be a non-negative integer, not {step!r}") from None
    if value < 0:
        raise WdaError(None, f"a step must be a non-negative integer, not {value}")
    return value


def _adapter_tensors(t: _Module) -> tuple[torch.Tensor | None, ...]:
    m = t.module
    if t.adapter is None:  # wda's layers
        mag = getattr(m, "lora_magnitude_vector", None)
        if t.kind == "magnitude":
            return None, None, mag
        return m.lora_A.weight, m.lora_B.weight, mag if t.kind == "dora" else None
    a = t.adapter
    mag = m.lora_magnitude_vector[a].weight if t.kind == "dora" else None
    return m.lora_A[a].weight, m.lora_B[a].weight, mag


def _scaling(t: _Module) -> float:
    m = t.module
    return float(m.scaling if t.adapter is None else m.scaling[t.adapter])


def _check_unmerged(t: _Module) -> None:
    m = t.module
    merged = getattr(m, "merged", False) if t.kind != "full" else False
    if merged:
        raise WdaError(None, f"module {t.info.name!r} has its adapter merged into the base weight; "
                             f"the tracker measures unmerged adapters", "unmerge it before tracker.step")


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(t, DTensor)


def _is_writer() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _no_autocast:
    """Autocast off for the measurement (a GEMM in bf16 would not be the engine's float32),
    entered only where it is on, so nothing else about the caller's state is touched."""

    def __enter__(self):
        self._ctx = []
        for dev in ("cpu", "cuda"):
            if torch.is_autocast_enabled(dev):
                ctx = torch.autocast(dev, enabled=False)
                ctx.__enter__()
                self._ctx.append(ctx)
        return self

    def __exit__(self, *exc):
        for ctx in reversed(self._ctx):
            ctx.__exit__(*exc)
        return False


def _write_atomic(path: Path, text: str) -> None:
    """Write a small file whole: temporary sibling, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return " ".join(str(exc.strerror or exc).split())
