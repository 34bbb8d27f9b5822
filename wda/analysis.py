"""The streaming engine: checkpoints in, tidy ΔM / ΔD table out.

Module-major: each base matrix W_0 is read once, then the same matrix of every checkpoint
(merged on the fly for adapters), measured and freed. A background thread reads the next
tensors while the current ones are measured, so peak memory is a few matrices whatever the
number of layers or steps.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch

from wda.checkpoints import WEIGHT_SUFFIX, AdapterConfig, HandleCache
from wda.decompose import AXES, NonFiniteWeights, measure
from wda.dora import merge_dora, merge_lora
from wda.errors import WdaError
from wda.layout import Layout, ModuleInfo, Run, discover

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["run", "method", "step", "module", "layer", "matrix", "delta_m", "delta_d",
                  "n_vectors", "n_excluded", "m0_mean", "axis", "stack"]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class AnalysisOptions:
    """What to analyse and how. ``modules``: name suffixes or regular expressions."""

    modules: tuple[str, ...] | None = None
    axis: str = "out"  # "out": one magnitude per output feature (norm over dim=1 of (out, in))
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # compute dtype, whatever the stored one
    base: str | None = None  # W_0 folder, default CKPT_DIR/base
    fan_in_fan_out: bool | None = None  # force the (in, out) Conv1D layout on or off
    skip_broken: bool = False
    progress: bool = True
    prefetch: int = 2  # matrices read ahead of the one being measured

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise WdaError(None, f"--axis must be one of {', '.join(AXES)}, not {self.axis!r}")
        if self.dtype not in DTYPES:
            raise WdaError(None, f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")


@dataclass
class AnalysisResult:
    metrics: pd.DataFrame
    layout: Layout
    device: str
    options: AnalysisOptions
    seconds: float
    bytes_read: int
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def options_dict(self) -> dict:
        return asdict(self.options)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise WdaError(None, f"--device {name!r} is not a device (use auto, cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WdaError(None, "--device cuda was asked for but no CUDA device is available")
    return dev


# ---- reading: one work item per matrix ---------------------------------------------------
@dataclass(frozen=True)
class _Item:
    module: ModuleInfo
    run: Run | None  # None: the base matrix W_0
    step: int | None
    path: Path


def _work_items(layout: Layout) -> Iterator[_Item]:
    for m in layout.modules:
        yield _Item(m, None, None, layout.base)
        for run in layout.runs:
            if run.method == "FT" or m.name in run.adapter_names:
                for step, path in run.steps.items():
                    yield _Item(m, run, step, path)


@dataclass
class _Loaded:
    tensors: dict[str, torch.Tensor]  # CPU, stored dtype: "w", or "a", "b", "m" of an adapter
    adapter: AdapterConfig | None

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values())


def _read_item(item: _Item, cache: HandleCache) -> _Loaded:
    """The stored tensors of one matrix."""
    ck = cache.get(item.path)
    if ck.adapter is None:
        return _Loaded({"w": ck.read(item.module.name + WEIGHT_SUFFIX)}, None)
    keys = ck.adapter_modules[item.run.adapter_names[item.module.name]]
    out = {"m": ck.read(keys.magnitude)} if keys.magnitude else {}
    if keys.a is not None:
        out["a"], out["b"] = ck.read(keys.a), ck.read(keys.b)
    return _Loaded(out, ck.adapter)


def _prefetched(items: list[_Item], cache: HandleCache, depth: int, pin: bool):
    """Yield (item, tensors | WdaError) in order, read ``depth`` items ahead in a thread."""
    if depth <= 0:
        for it in items:
            try:
                yield it, _read_item(it, cache)
            except WdaError as err:
                yield it, err
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def reader() -> None:
        for it in items:
            if stop.is_set():
                return
            try:
                data = _read_item(it, cache)
                if pin:
                    data.tensors = {k: v.pin_memory() for k, v in data.tensors.items()}
            except WdaError as err:
                data = err
            except BaseException as exc:  # never leave the consumer waiting
                data = WdaError(it.path, f"cannot read ({exc})")
            q.put((it, data))

    t = threading.Thread(target=reader, daemon=True, name="wda-reader")
    t.start()
    try:
        for _ in items:
            yield q.get()
    finally:
        stop.set()
        while t.is_alive():  # unblock a reader waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)


# ---- measuring ---------------------------------------------------------------------------
def _canonical(w: torch.Tensor, m: ModuleInfo) -> torch.Tensor:
    return w.t() if m.transposed else w  # Conv1D (in, out) -> (out, in)


def _materialize(item: _Item, data: _Loaded, w0: torch.Tensor,
                 dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """W_t in (out, in): the stored weight, or W_0 merged with the adapter (in ``dtype``)."""
    if data.adapter is None:
        return _canonical(data.tensors["w"].to(dev, non_blocking=True), item.module)
    t = {k: v.to(dev, dtype=dtype, non_blocking=True) for k, v in data.tensors.items()}
    # scaling from this checkpoint's own config; PEFT patterns match the adapter's module name
    s = data.adapter.scaling(item.run.adapter_names[item.module.name])
    if "m" in t:
        mag = t["m"].reshape(-1)  # (out,)
        if "a" not in t:  # magnitude only (paper Table 6): W' = m · W_0 / ||W_0||
            return w0 * (mag / torch.linalg.vector_norm(w0, dim=1)).unsqueeze(1)
        return merge_dora(w0, t["a"], t["b"], s, mag)  # Eq. 5
    return merge_lora(w0, t["a"], t["b"], s)  # Eq. 1


def run_analysis(ckpt_dir: str | Path, options: AnalysisOptions = AnalysisOptions()) -> AnalysisResult:
    """Discover, check and measure everything; the full result with its provenance."""
    t0 = time.perf_counter()
    layout = discover(ckpt_dir, base=options.base, modules=list(options.modules or []) or None,
                      fan_in_fan_out=options.fan_in_fan_out, skip_broken=options.skip_broken)
    dev = resolve_device(options.device)
    dtype = DTYPES[options.dtype]
    items = list(_work_items(layout))
    n_ckpts = sum(len(r.steps) for r in layout.runs) + 1
    cache = HandleCache(size=max(8, min(n_ckpts, 256)))
    rows: list[dict] = []
    broken: dict[str, str] = {}  # checkpoint path -> reason (skip_broken)
    bytes_read = 0
    w0 = None
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc="wda: measuring", unit="matrix", disable=not options.progress)
    try:
        for item, data in _prefetched(items, cache, options.prefetch, pin=dev.type == "cuda"):
            bar.update(1)
            if str(item.path) in broken:
                continue
            try:
                if isinstance(data, WdaError):
                    raise data
                bytes_read += data.nbytes
                if item.run is None:
                    w0 = _canonical(data.tensors["w"].to(dev, non_blocking=True), item.module).to(dtype)
                    _check_finite(w0, item)
                    continue
                wt = _materialize(item, data, w0, dev, dtype)
                try:
                    meas = measure(w0, wt, axis=options.axis, dtype=dtype)
                except NonFiniteWeights:
                    raise WdaError(item.path, f"non-finite values (NaN/Inf) in module {item.module.name!r}",
                                   "this checkpoint diverged or is corrupt") from None
                rows.append(_row(item, meas, options.axis))
            except WdaError as err:
                if item.run is None or not options.skip_broken:
                    raise
                broken[str(item.path)] = str(err)
    finally:
        bar.close()
    skipped = list(layout.skipped) + sorted(broken.items())
    if broken:
        rows = [r for r in rows if r["_path"] not in broken]
    metrics = _table(rows)
    return AnalysisResult(metrics, layout, str(dev), options, time.perf_counter() - t0, bytes_read, skipped)


def _check_finite(w0: torch.Tensor, item: _Item) -> None:
    if not torch.isfinite(torch.linalg.vector_norm(w0)):
        raise WdaError(item.path, f"non-finite values (NaN/Inf) in base module {item.module.name!r}")


def _row(item: _Item, meas, axis: str) -> dict:
    m = item.module
    return {"run": item.run.name, "method": item.run.method, "step": item.step, "module": m.name,
            "layer": m.layer, "matrix": m.matrix, "delta_m": meas.delta_m, "delta_d": meas.delta_d,
            "n_vectors": meas.n_vectors, "n_excluded": meas.n_excluded, "m0_mean": meas.m0_mean,
            "axis": axis, "stack": m.stack, "_path": str(item.path)}


def _table(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=METRIC_COLUMNS + ["_path"]).drop(columns="_path")
    df = df.astype({"step": "int64", "layer": "int64", "n_vectors": "int64", "n_excluded": "int64"})
    order = {m: i for i, m in enumerate(("FT", "LoRA", "DoRA"))}
    df["_m"] = df["method"].map(order).fillna(len(order))
    df = df.sort_values(["_m", "run", "matrix", "stack", "layer", "module", "step"], kind="stable")
    return df.drop(columns="_m").reset_index(drop=True)


def analyze(ckpt_dir: str | Path, modules: list[str] | tuple[str, ...] | None = None,
            axis: str = "out", device: str = "auto", dtype: str = "float32",
            base: str | Path | None = None, **kwargs) -> pd.DataFrame:
    """ΔM (Eq. 3) and ΔD (Eq. 4) per (run, step, module) of a checkpoint directory.

    ``modules``: name suffixes (``q_proj``) or regular expressions; default: the modules
    the adapters target, else the attention query/value projections. ``axis="out"``: one
    magnitude per output feature, as in DoRA/PEFT. Other keywords: ``AnalysisOptions``.
    """
    opts = AnalysisOptions(modules=tuple(modules) if modules else None, axis=axis, device=device,
                           dtype=dtype, base=str(base) if base is not None else None, **kwargs)
    return run_analysis(ckpt_dir, opts).metrics


def plan(ckpt_dir: str | Path, modules: list[str] | tuple[str, ...] | None = None,
         base: str | Path | None = None, fan_in_fan_out: bool | None = None,
         skip_broken: bool = False) -> pd.DataFrame:
    """Dry run (headers only): one row per (run, step, module) that would be measured."""
    layout = discover(ckpt_dir, base=base, modules=list(modules) if modules else None,
                      fan_in_fan_out=fan_in_fan_out, skip_broken=skip_broken)
    rows = [{"run": r.name, "method": r.method, "step": s, "module": m.name, "layer": m.layer,
             "matrix": m.matrix, "out_features": m.out_features, "in_features": m.in_features,
             "transposed": m.transposed, "path": str(p)}
            for m, r in layout.module_pairs() for s, p in r.steps.items()]
    return pd.DataFrame(rows)
