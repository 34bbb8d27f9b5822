"""Scale past one machine with PyTorch's own engine (``torch.distributed``), no scheduler.

Sharded analysis, launched by ``torchrun`` (the CLI delegates here when WORLD_SIZE > 1)::

    torchrun --nproc_per_node 8 -m wda.report CKPT_DIR --out OUT

Every rank reads the headers (``discover``), measures the modules ``i`` with
``i % world == rank`` through the ordinary ``run_analysis``, and rank 0 gathers the rows,
re-sorts them with the single-process sort and writes exactly the report one process writes.
All ranks agree on success or failure after each phase, so an error on one rank stops every
rank (no hang) and is printed once, by rank 0.

Adapters under DDP and FSDP2 (``fully_shard``): ``wrap_ddp``, ``shard_adapters``,
``broadcast_parameters_`` and ``save_adapter_distributed``, which gathers the full tensors
of a sharded model (``DTensor.full_tensor()``) and writes, on rank 0, the same PEFT adapter
``wda.train.adapt.save_adapter`` writes from a single process.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from wda.errors import WdaError

log = logging.getLogger(__name__)

# A collective that waits longer than this means a rank died outside our error handling
# (torchrun normally stops the others first); fail instead of hanging for the 30 min default.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


# ---- the process group ---------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank among ``world_size``, its device and the backend."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True under ``torchrun`` with more than one process (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(backend: str | None = None, device: str | torch.device | None = None,
                     timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> DistEnv:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Default device: ``cuda:LOCAL_RANK`` when CUDA is
    present, else CPU; default backend: NCCL for a CUDA device, else gloo. A group that is
    already initialised is reused as it is."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        # more ranks than GPUs share them round robin (fine for gloo; NCCL refuses it)
        cuda = torch.cuda.is_available()
        device = f"cuda:{local_rank % torch.cuda.device_count()}" if cuda else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL (object) collectives use the current device
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=timeout,
                                device_id=device if backend == "nccl" else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), device)


def shutdown(sync: bool = True) -> None:
    """Tear the process group down. ``sync``: wait for every rank first — destroying a gloo
    group while another rank is still inside it can abort that rank (std::terminate)."""
    if dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


# ---- agreeing on failure -------------------------------------------------------------------
class RankError(RuntimeError):
    """An unexpected (non-WdaError) failure on another rank, re-raised everywhere."""


def _describe(exc: BaseException, order: tuple = ()) -> tuple:
    """A picklable summary of an exception (exceptions with custom __init__ do not unpickle)."""
    if isinstance(exc, WdaError):
        return (order, "wda", exc.path, exc.problem, exc.hint)
    return (order, "other", type(exc).__name__, " ".join(str(exc).split()), "")


def agree(exc: BaseException | None, order: tuple = ()) -> None:
    """Collective: every rank reports whether its part went well. If any failed, every rank
    raises the same error: the failure that comes first by (``order``, rank), so the message
    does not depend on timing. The failing rank itself re-raises its original exception
    (tracebacks with --debug point at the real place)."""
    statuses: list = [None] * dist.get_world_size()
    mine = None if exc is None else _describe(exc, order)
    dist.all_gather_object(statuses, mine)
    failed = [(s[0], r, s) for r, s in enumerate(statuses) if s is not None]
    if not failed:
        return
    _, rank, (_, kind, a, b, c) = min(failed, key=lambda f: (f[0], f[1]))
    if rank == dist.get_rank() and exc is not None:
        raise exc
    if kind == "wda":
        raise WdaError(a, b, c)
    raise RankError(f"on rank {rank}: {a}: {b}")


# ---- sharded analysis ----------------------------------------------------------------------
def exact_pattern(name: str) -> str:
    """A ``--modules`` pattern matching exactly this module name: anchored so that it is
    neither equal to a name nor a dotted suffix of one (``lm_head`` would also match
    ``model.lm_head`` as a suffix), only a regular expression that fullmatches ``name``."""
    return "^" + re.escape(name) + "$"


def share(items: list, rank: int, world_size: int) -> list:
    """Items i with i % world_size == rank (round robin: every rank gets a similar mix of
    matrix kinds and layers, since the list is sorted by kind then layer)."""
    return items[rank::world_size]


def rank_device(option: str, env: DistEnv) -> str:
    """``auto``/``cuda`` mean this rank's own GPU (cuda:LOCAL_RANK); anything else is kept."""
    if option in ("auto", "cuda") and env.device.type == "cuda":
        return str(env.device)
    return option


@dataclass
class Part:
    """What one rank sends to rank 0."""

    rank: int
    modules: list[str]  # this rank's share, in layout order
    metrics: object | None  # pandas.DataFrame of its rows (None: empty share)
    broken: list[tuple[str, str]] = field(default_factory=list)  # read-time (path, reason)
    seconds: float = 0.0
    bytes_read: int = 0
    device: str = ""


def _module_rank(reason: str, modules: list[str], index: dict[str, int]) -> int:
    """Position in the layout of the module a reason names (``'name'``); the single process
    keeps the reason of the first module in that order that failed for a checkpoint."""
    hits = [index[m] for m in modules if f"'{m}'" in reason]
    return min(hits) if hits else len(index)


def merge_parts(parts: list[Part], layout, options, device: str):
    """Rank 0: the single-process ``AnalysisResult`` from the ranks' parts.

    Rows are kept only for checkpoints of the full layout (a rank's own ``discover`` checks
    only its modules, so it may keep a checkpoint that is broken for another rank's module)
    and not broken at read time on any rank (the single process drops every row of a
    checkpoint once one of its matrices fails). Then the single-process sort.
    """
    import pandas as pd

    from wda.analysis.engine import AnalysisResult, _drop_broken, _table  # as the single process does

    index = {m.name: i for i, m in enumerate(layout.modules)}
    already = {p for p, _ in layout.skipped}
    broken: dict[str, tuple[tuple[int, int], str]] = {}
    for part in parts:
        for path, reason in part.broken:
            if path in already:
                continue
            key = (_module_rank(reason, part.modules, index), part.rank)
            if path not in broken or key < broken[path][0]:
                broken[path] = (key, reason)
    valid = {(r.name, s): str(p) for r in layout.runs for s, p in r.steps.items()}
    frames = [p.metrics for p in parts if p.metrics is not None and len(p.metrics)]
    rows: list[dict] = []
    if frames:
        df = pd.concat(frames, ignore_index=True)
        df["_path"] = [valid.get((r, int(s))) for r, s in zip(df["run"], df["step"])]
        df = df[df["_path"].notna() & ~df["_path"].isin(list(broken))]
        rows = df.to_dict("records")
    reasons = {p: r for p, (_, r) in broken.items()}
    _drop_broken(layout, reasons)  # the layout describes the table, as in run_analysis
    skipped = list(layout.skipped) + sorted(reasons.items())
    return AnalysisResult(_table(rows), layout, device, options,
                          max(p.seconds for p in parts), sum(p.bytes_read for p in parts), skipped)


def _device_summary(parts: list[Part], env: DistEnv) -> str:
    devs = list(dict.fromkeys(p.device for p in parts if p.device))
    return f"{', '.join(devs) or 'cpu'} ({env.world_size} ranks, {env.backend})"


def sharded_analysis(ckpt_dir: str | Path, options, env: DistEnv):
    """Collective ``run_analysis``: the merged result on rank 0, None on the other ranks.

    Raises the same error on every rank if any rank fails.
    """
    from wda.analysis.engine import discover_selected, run_analysis

    t0 = time.perf_counter()
    layout, err = None, None
    try:  # headers only, on every rank: the same call run_analysis makes, all modules
        layout = discover_selected(ckpt_dir, options)
    except Exception as exc:
        err = exc
    agree(err)

    measured = {m.name for m, _ in layout.module_pairs()}
    mine = share([m.name for m in layout.modules if m.name in measured], env.rank, env.world_size)
    index = {m.name: i for i, m in enumerate(layout.modules)}
    part, err, order = Part(env.rank, mine, None), None, ()
    try:
        if mine:  # an empty share runs nothing: modules=() would mean "the default modules"
            opts = dataclasses.replace(options, modules=tuple(exact_pattern(n) for n in mine),
                                       device=rank_device(options.device, env),
                                       progress=options.progress if env.is_main else False)
            res = run_analysis(ckpt_dir, opts)
            if not set(res.metrics["module"]) <= set(mine):
                raise RuntimeError(f"rank {env.rank} measured modules outside its share")
            part.metrics, part.bytes_read, part.device = res.metrics, res.bytes_read, res.device
            known = set(res.layout.skipped)  # found by this rank's discover, a subset of layout's
            part.broken = [s for s in res.skipped if s not in known]
        part.seconds = time.perf_counter() - t0
    except Exception as exc:
        err = exc
        order = (_module_rank(str(exc), mine, index),)  # the error the single process meets first
    agree(err, order)

    parts: list | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(part, parts, dst=0)
    if not env.is_main:
        return None
    return merge_parts(parts, layout, options, _device_summary(parts, env))


def run_report(args) -> int:
    """``python -m wda.report`` under torchrun: every rank analyses its share, rank 0 writes.

    Errors: rank 0 raises the agreed error (``report.main`` prints its one line); the other
    ranks return the same exit status quietly (their error is logged at debug level).
    """
    owned = not dist.is_initialized()  # a group set up by the caller is left to the caller
    # gloo even on GPUs: only pickled rows travel, and NCCL would add GPU staging and its
    # one-GPU-per-rank rule for nothing; the measurements still run on cuda:LOCAL_RANK
    env = init_distributed(backend="gloo")
    if not env.is_main and not args.debug:
        logging.getLogger("wda").setLevel(logging.ERROR)  # one voice: rank 0's
    try:
        return _run_report(args, env)
    except (Exception, KeyboardInterrupt) as exc:
        if env.is_main or args.debug:
            raise
        log.debug("rank %d: %s", env.rank, exc)
        return 130 if isinstance(exc, KeyboardInterrupt) else 2 if isinstance(exc, WdaError) else 1
    finally:
        if owned:
            shutdown()


def _run_report(args, env: DistEnv) -> int:
    from wda.report import cli as report  # the report's own helpers, so both paths write the same files

    if args.dry_run:  # headers only: rank 0 alone
        return report._dry_run(args) if env.is_main else 0
    t_start = time.perf_counter()
    options, err, out = None, None, None
    try:
        out = report.out_dir(args)
        options = report._options(args)
        if env.is_main:  # only rank 0 touches OUT, which may live on rank 0's machine only
            report._clean_leftovers(out)  # a killed run's earlier report is put back first
            layout = options.discover(args.ckpt_dir)  # the input is checked before --out
            report.prepare_out(args, out, layout)
    except Exception as exc:
        err = exc
    agree(err)

    result = sharded_analysis(args.ckpt_dir, options, env)

    err = None
    if env.is_main:
        try:
            report.write_report(result, args, out, t_start)
        except Exception as exc:
            err = exc
    agree(err)  # the other ranks exit with rank 0's status
    if env.is_main:
        report.announce(result, out, t_start)
    return 0


# ---- adapters under DDP / FSDP2 --------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    FSDP2 does not wrap: ``fully_shard`` changes the module's class in place, names stay."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def wrap_ddp(model: nn.Module, env: DistEnv | None = None, **kwargs) -> nn.Module:
    """DDP over a model with adapters. DDP broadcasts rank 0's parameters at construction and
    averages gradients over ranks; frozen base weights take no part in the all-reduce."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    env = env or init_distributed()
    if env.device.type == "cuda":
        model = model.to(env.device)
        kwargs.setdefault("device_ids", [env.device.index])
    ddp = DDP(model, **kwargs)
    # DDP just overwrote W_0 with rank 0's copy; its broadcast bumps the version counter
    # (torch 2.13), a plain dist.broadcast does not (see broadcast_parameters_)
    _invalidate_caches(model)
    return ddp


def _invalidate_caches(model: nn.Module) -> None:
    """Forget DoRA's cached ||W_0||². Collectives write into tensors without bumping their
    autograd version counter, so ``DoRALinear``'s cache key does not see a broadcast W_0:
    a rank whose W_0 differed before the broadcast would keep its old norms."""
    from wda.train.adapt import adapter_modules

    for mod in adapter_modules(unwrap(model)).values():
        if hasattr(mod, "invalidate_cache"):
            mod.invalidate_cache()


@torch.no_grad()
def broadcast_parameters_(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank, before ``fully_shard``.

    FSDP2 does not synchronise at wrap time: each rank keeps its own slice of whatever it
    holds, so adapters initialised with different seeds would be stitched from different
    ranks' initialisations (``lora_A`` is random)."""
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=src)
    _invalidate_caches(model)


def shard_adapters(model: nn.Module, units: Iterable[nn.Module] | None = None, mesh=None,
                   **fsdp_kwargs) -> nn.Module:
    """FSDP2: ``fully_shard`` each unit (default: every LoRA/DoRA wrapper), then the root.

    Parameters (base weight, ``lora_A`` (r, in), ``lora_B`` (out, r), ``lora_magnitude_vector``
    (out,)) are sharded on dim 0 and all-gathered before the unit's forward, so DoRA's row
    norm ||W_0 + s·B·A|| (dim=1) is computed on full tensors. A unit must therefore contain
    whole adapter wrappers: sharding ``lora_A``/``lora_B``/``base_layer`` on their own fails,
    since ``DoRALinear`` reads their weights outside their own forward (for the norm).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from wda.train.adapt import adapter_modules

    wrappers = adapter_modules(model)
    units = list(wrappers.values()) if units is None else list(units)
    names = {id(m): n for n, m in model.named_modules()}
    for u in units:
        name = names.get(id(u))
        if name is None:
            raise ValueError(f"{type(u).__name__} is not a submodule of the model")
        inside = [w for w in wrappers if name.startswith(w + ".")]
        if inside:
            raise ValueError(f"cannot shard {name!r} on its own: it is inside the adapter {inside[0]!r}, "
                             "whose forward reads its weights directly; shard the adapter or a parent")
    if mesh is None:  # the group's own device type (fully_shard's default would be CUDA
        # whenever a GPU exists, even for a gloo group of CPU models)
        kind = "cuda" if "nccl" in dist.get_backend() else "cpu"
        mesh = init_device_mesh(kind, (dist.get_world_size(),))
    for u in units:
        if u is not model:
            fully_shard(u, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered from its shards if it is a DTensor (collective)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter parameters by full name (no DDP prefix), as whole CPU tensors on every rank.

    Collective for a sharded model: every rank must call it, in the same program order."""
    from wda.train.adapt import adapter_modules

    out = {}
    for name, mod in sorted(adapter_modules(unwrap(model)).items()):
        for pname, p in mod.named_parameters():
            if not pname.startswith("base_layer."):  # frozen W_0: never part of an adapter
                out[f"{name}.{pname}"] = _full(p.detach()).to("cpu").clone()
    return out


def _skeleton(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A stand-in holding only the adapters, with full tensors, under the same module names:
    what ``save_adapter`` reads (r, scaling, shapes, A, B, m). Base weights stay on the meta
    device, so this costs the adapter's memory, not the model's."""
    from wda.train.adapt import adapter_modules
    from wda.train.dora import DoRALinear, LoRALinear

    root = nn.Module()
    for name, mod in sorted(adapter_modules(unwrap(model)).items()):
        base = nn.Linear(mod.in_features, mod.out_features, bias=False, device="meta")
        if isinstance(mod, DoRALinear):
            clone = DoRALinear(base, mod.r, mod.alpha, use_rslora=mod.use_rslora,
                               detach_norm=mod.detach_norm, magnitude_only=mod.magnitude_only)
        else:
            clone = LoRALinear(base, mod.r, mod.alpha, use_rslora=mod.use_rslora)
        clone.scaling = mod.scaling
        for pname, _ in list(clone.named_parameters()):
            if not pname.startswith("base_layer."):
                owner, _, leaf = pname.rpartition(".")  # "lora_A.weight" or "lora_magnitude_vector"
                setattr(clone.get_submodule(owner), leaf,
                        nn.Parameter(state[f"{name}.{pname}"], requires_grad=False))
        parent = root
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name.rpartition(".")[2], clone)
    return root


def save_adapter_distributed(model: nn.Module, out_dir: str | Path, spec,
                             prefix: str = "base_model.model.") -> None:
    """Collective ``wda.train.adapt.save_adapter`` for a DDP- or FSDP2-wrapped model: every rank
    gathers the full adapter tensors, rank 0 writes the PEFT adapter a single process would
    write, and every rank raises if the write failed."""
    from wda.train.adapt import save_adapter

    state = full_adapter_state(model)
    err = None
    if dist.get_rank() == 0:
        try:
            save_adapter(_skeleton(model, state), out_dir, spec, prefix=prefix)
        except Exception as exc:
            err = exc
    agree(err)
