"""A controlled test of the DoRA paper's capability claim (Sec. 3.2, 4.1): distil a planted teacher.

    python -m wda.train.controlled --out runs/controlled [--seeds 0,1,2] [...]

The paper reads the sign of r(ΔD, ΔM) over the (layer, step) points of the query matrices as a
statement about *capacity*: FT and DoRA can make a large magnitude change with a small direction
change, or the reverse (negative r), LoRA cannot and moves both together (positive r). This
module builds a task whose solution is known to need exactly that, and checks what each method
does when it has to learn it. It is a controlled experiment, not a replication of the paper's
natural one (VL-BART fine-tuned on image-text tasks): the task is made so the claim can be
tested, so its outcome says what the three parametrisations can do, not what they do on a real
downstream task.

The task. The pretrained base of ``wda.train`` (cached there) is the student; the teacher is the
same base with its query projections changed in two planted ways (:func:`plant`), half of the
layers each (which half is drawn from the seed):

* **magnitude layers** — every output row rescaled, ``W_T = diag(c) W_0`` with
  ``c_n = exp(spread · z_n)``: a large magnitude change with *no* direction change. The update
  ``diag(c - 1) W_0`` has full rank: FT can make it, DoRA's magnitude vector can make it exactly,
  a rank-r LoRA update cannot (it can only rescale the rows within r directions, which rotates
  them as it rescales them);
* **direction layers** — the input space rotated by ``angle`` in ``planes`` planes spanned by
  the top right singular vectors of ``W_0``: ``W_T = W_0 R`` with ``R`` orthogonal, so every row
  keeps its norm exactly (ΔM = 0) and turns by a known angle. ``W_0 (R - I)`` has rank
  ``2 · planes`` ≤ r: all three methods can make it.

The student (the base) learns the teacher's query maps (``objective="isotropic"``, the default:
every query projection regresses the teacher's on inputs h ~ N(0, I), whose expected loss is the
weight-space distance, so the planted change is the unique solution; ``"activations"``: on the
teacher's own activations, ``"logits"``: KL on next-byte distributions — both leave directions the
loss cannot see, see :func:`query_distillation_loss`) with FT, LoRA or DoRA on the query
projections only (FT trains only those matrices too: a trained key projection could absorb a
query rescaling), through ``wda.train.cli.finetune`` — same optimizer, schedule and checkpointing as
the natural runs. The output directory is a plain wda checkpoint
directory (``base/``, ``ft/``, ``lora/``, ``dora/``), so ``wda.analyze``/``wda.report`` measure
it as they measure any run; ``teacher/`` holds the teacher's weights and the plan (which layer got
which change, and the planted ΔM/ΔD of each layer) as ``plan.json``.

Prediction (the paper's claim, made concrete): FT and DoRA put their magnitude change into the
magnitude layers and their direction change into the direction layers, so r < 0; LoRA's
magnitude change comes with a direction change of its own, and r > 0 when that rotation exceeds
the planted one (``spread`` large against ``angle``). :func:`predicted_r` computes both signs from
the plan before any training (exact change; best rank-r change). What it measured over seeds is in
notebooks/LEARNING_PATTERN.md; ``tests/test_learning_pattern.py`` is the regression test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Sequence

import numpy as np
import pandas as pd

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from wda.train.adapt import merge_adapters
from wda.analysis.decompose import measure
from wda.train.cli import (METHODS, TrainConfig, Transformer, _prepare_out, _write_json, finetune,
                       load_corpora, load_or_pretrain, save_base, state_dict_contiguous)

log = logging.getLogger(__name__)

ROLES = ("magnitude", "direction")
OBJECTIVES = ("isotropic", "activations", "logits")
DIAGNOSTICS = ("r_size", "r_alignment", "r_base_norm", "r_radial", "r_tangential",
               "s_eff_median", "s_eff_cv", "a_eff_median", "a_eff_sd")


@dataclass(frozen=True)
class ControlledConfig:
    """Every option of one controlled run (one seed)."""

    out: str = "runs/controlled"
    seed: int = 0  # which layers get which change, the planted factors, batches, adapter init
    methods: tuple[str, ...] = METHODS
    threads: int = 1
    # the base: wda.train's pretraining with its default options, so the base is the one the
    # README's demo run caches (and tests/test_learning_pattern.py trains once for both)
    n_layers: int = TrainConfig.n_layers
    d_model: int = TrainConfig.d_model
    n_heads: int = TrainConfig.n_heads
    seq_len: int = TrainConfig.seq_len
    pretrain_corpus: str = TrainConfig.pretrain_corpus
    pretrain_max_bytes: int | None = TrainConfig.pretrain_max_bytes
    pretrain_steps: int = TrainConfig.pretrain_steps
    pretrain_batch_size: int = TrainConfig.pretrain_batch_size
    pretrain_seed: int = 0  # one base for every seed: seeds vary the task and the training
    # the planted teacher
    spread: float = 0.5  # magnitude layers: c_n = exp(spread * z_n), z_n ~ N(0, 1)
    angle: float = 0.15  # direction layers: rotation angle (radians) in each plane
    planes: int = 2  # direction layers: rotation planes (update rank 2 * planes)
    # distillation
    objective: str = "isotropic"  # one of OBJECTIVES (see query_distillation_loss)
    corpus: str = "stdlib"  # the text the teacher's activations are taken on
    steps: int = 300
    batch_size: int = 8
    schedule: str = "linear"
    warmup: int = 0
    grad_clip: float = 1.0
    ft_lr: float = 1e-3
    lora_lr: float = 1e-2
    dora_lr: float = 1e-2
    rank: int = 8
    alpha: float = 16.0
    checkpoints: str = "0.625,0.75,0.875,1.0"
    cache_dir: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", (self.methods,) if isinstance(self.methods, str)
                           else tuple(self.methods))
        if self.n_layers < 2:
            raise ValueError(f"need at least 2 layers (one of each kind), got {self.n_layers}")
        if self.spread < 0 or self.angle < 0:
            raise ValueError("spread and angle must be >= 0")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, not {self.objective!r}")
        if 2 * self.planes > self.d_model // 2 or self.planes < 1:
            raise ValueError(f"planes must be in [1, d_model / 4], got {self.planes}")
        self.train_config()  # validates the rest

    def train_config(self) -> TrainConfig:
        """The ``wda.train`` options of this run: base shape and pretraining, then the
        fine-tuning recipe (query projections only, for all three methods)."""
        return TrainConfig(
            out=self.out, methods=self.methods, seed=self.seed, threads=self.threads,
            n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
            seq_len=self.seq_len, pretrain_corpus=self.pretrain_corpus,
            downstream_corpus=self.corpus, pretrain_max_bytes=self.pretrain_max_bytes,
            downstream_max_bytes=self.pretrain_max_bytes, pretrain_steps=self.pretrain_steps,
            pretrain_batch_size=self.pretrain_batch_size, pretrain_seed=self.pretrain_seed,
            steps=self.steps, batch_size=self.batch_size, schedule=self.schedule,
            warmup=self.warmup, grad_clip=self.grad_clip, ft_lr=self.ft_lr,
            lora_lr=self.lora_lr, dora_lr=self.dora_lr, rank=self.rank, alpha=self.alpha,
            targets=("q_proj",), ft_only_targets=True, checkpoints=self.checkpoints,
            eval_every=0, eval_windows=8, log_every=0, cache_dir=self.cache_dir,
            overwrite=self.overwrite)


# ---- the planted changes (pure math) -------------------------------------------------------
def rescale_rows(w0: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``diag(factors) · w0``: each output row keeps its direction, its norm times ``factors``."""
    return factors.to(w0.dtype).unsqueeze(1) * w0


def plane_rotation(basis: torch.Tensor, angle: float) -> torch.Tensor:
    """The orthogonal (d, d) matrix R that turns row vectors by ``angle`` in each plane spanned by the
    column pairs (e1, e2) = (0, 1), (2, 3), ... of the orthonormal ``basis`` (d, 2k), from e1
    towards e2 (``e1ᵀ R = cos·e1ᵀ + sin·e2ᵀ``); identity on the rest."""
    d, two_k = basis.shape
    if two_k % 2:
        raise ValueError(f"basis needs an even number of columns, got {two_k}")
    e1, e2 = basis[:, 0::2], basis[:, 1::2]
    c, s = math.cos(angle), math.sin(angle)
    eye = torch.eye(d, dtype=basis.dtype)
    return eye + (c - 1.0) * (e1 @ e1.T + e2 @ e2.T) + s * (e1 @ e2.T - e2 @ e1.T)


def rotate_inputs(w0: torch.Tensor, basis: torch.Tensor, angle: float) -> torch.Tensor:
    """``w0 · R`` (``R = plane_rotation(basis, angle)``): every row keeps its norm exactly."""
    r = plane_rotation(basis.to(torch.float64), angle)
    return (w0.to(torch.float64) @ r).to(w0.dtype)


def top_input_basis(w0: torch.Tensor, planes: int) -> torch.Tensor:
    """The top ``2 · planes`` right singular vectors of ``w0`` (float64, (in, 2k)): the input
    directions that carry most of the rows' energy, so a rotation there turns every row."""
    _, _, vh = torch.linalg.svd(w0.to(torch.float64), full_matrices=False)
    return vh[:2 * planes].T.contiguous()


def planted_changes(w0: torch.Tensor, role: str, factors: torch.Tensor | None = None,
                    basis: torch.Tensor | None = None, angle: float = 0.0) -> dict[str, float]:
    """The closed-form ΔM (Eq. 3) and ΔD (Eq. 4) of a planted change (out axis, float64):
    a rescaling has ΔD = 0 and ΔM = mean_n |c_n − 1|·‖u_n‖; a rotation has ΔM = 0 and
    ΔD = (1 − cos angle) · mean_n ‖P u_n‖² / ‖u_n‖² (P: projection onto the planes)."""
    w = w0.to(torch.float64)
    norms = torch.linalg.vector_norm(w, dim=1)
    if role == "magnitude":
        dm = ((factors.to(torch.float64) - 1.0).abs() * norms).mean().item()
        return {"delta_m": dm, "delta_d": 0.0}
    if role == "direction":
        share = (torch.linalg.vector_norm(w @ basis.to(torch.float64), dim=1) / norms) ** 2
        return {"delta_m": 0.0, "delta_d": (1.0 - math.cos(angle)) * share.mean().item()}
    raise ValueError(f"role must be one of {ROLES}, not {role!r}")


def best_lowrank_update(w0: torch.Tensor, wt: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-``rank`` update closest to ``wt - w0`` in Frobenius norm (truncated SVD, float64):
    the best a rank-r LoRA update can do in weight space (Eckart–Young)."""
    u, s, vh = torch.linalg.svd(wt.to(torch.float64) - w0.to(torch.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def layer_roles(n_layers: int, gen: torch.Generator) -> list[str]:
    """Half of the layers (rounded down) get the magnitude change, the rest the direction
    change; which ones is a seeded random draw."""
    perm = torch.randperm(n_layers, generator=gen).tolist()
    mag = set(perm[:n_layers // 2])
    return [ROLES[0] if i in mag else ROLES[1] for i in range(n_layers)]


@torch.no_grad()
def plant(base: Transformer, cfg: ControlledConfig) -> tuple[Transformer, list[dict[str, Any]]]:
    """The teacher: a copy of ``base`` with its query projections changed as the docstring of
    this module says. Returns it and the plan (one dict per layer: role, planted ΔM/ΔD)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    roles = layer_roles(len(base.layers), gen)
    teacher = Transformer(base.cfg)
    teacher.load_state_dict(base.state_dict())
    plan = []
    for i, (role, block) in enumerate(zip(roles, teacher.layers)):
        w0 = block.attn.q_proj.weight
        if role == "magnitude":
            factors = torch.exp(cfg.spread * torch.randn(w0.shape[0], generator=gen,
                                                         dtype=torch.float64))
            wt = rescale_rows(w0, factors)
            planted = planted_changes(w0, role, factors=factors)
        else:
            basis = top_input_basis(w0, cfg.planes)
            wt = rotate_inputs(w0, basis, cfg.angle)
            planted = planted_changes(w0, role, basis=basis, angle=cfg.angle)
        best = best_lowrank_update(w0, wt, cfg.rank)
        fit = measure(w0, w0.to(torch.float64) + best, dtype=torch.float64)
        planted_delta = wt.to(torch.float64) - w0.to(torch.float64)
        plan.append({"layer": i, "module": f"layers.{i}.attn.q_proj", "role": role, **planted,
                     # the best rank-r update (what LoRA can reach at most): its ΔM, ΔD and
                     # relative distance to the planted change (a floor for LoRA's rel_error)
                     "lowrank_fit_delta_m": fit.delta_m, "lowrank_fit_delta_d": fit.delta_d,
                     "lowrank_rel_error": ((planted_delta - best).norm()
                                           / planted_delta.norm()).item()})
        w0.copy_(wt)
    return teacher.eval(), plan


def logit_distillation_loss(teacher: Transformer):
    """``loss_fn`` for ``wda.train.cli.finetune``: mean over positions of
    KL(teacher ‖ student) between next-byte distributions (nats); zero iff they agree."""

    def loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(teacher(x), dim=-1)
        logp = F.log_softmax(model(x), dim=-1)
        return F.kl_div(logp.flatten(0, 1), target.flatten(0, 1), log_target=True,
                        reduction="batchmean")

    return loss


@torch.no_grad()
def teacher_queries(teacher: Transformer, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every layer's query projection in the teacher's forward pass on ``x``."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [block.attn.q_proj.register_forward_hook(
        lambda mod, inp, out: seen.append((inp[0], out))) for block in teacher.layers]
    try:
        teacher(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _relative_error(model: torch.nn.Module, teacher: Transformer,
                    inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    terms = []
    for block, t_block, h in zip(model.layers, teacher.layers, inputs):
        with torch.no_grad():
            q = t_block.attn.q_proj(h)
        terms.append(((block.attn.q_proj(h) - q) ** 2).sum() / (q * q).sum())
    return torch.stack(terms).mean()


def query_distillation_loss(teacher: Transformer, inputs: str = "isotropic", seed: int = 0):
    """``loss_fn`` for ``wda.train.cli.finetune``: every student query projection regresses the
    teacher's, mean over layers of the relative squared error ``‖q_S(h) − q_T(h)‖² / ‖q_T(h)‖²``.

    ``inputs="isotropic"``: h ~ N(0, I), as many vectors as the batch has positions, drawn from
    a generator seeded with ``seed``: the loss is then the weight-space distance in expectation,
    so the planted change itself is the unique solution. ``inputs="activations"``: h = the input
    of that query projection in the teacher's forward pass on the batch; directions the
    activations do not visit are then invisible to the loss.
    """
    gen = torch.Generator().manual_seed(seed)

    def loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if inputs == "isotropic":
            d = teacher.cfg.d_model
            hs = [torch.randn(x.numel(), d, generator=gen) for _ in teacher.layers]
        else:
            hs = [h for h, _ in teacher_queries(teacher, x)]
        return _relative_error(model, teacher, hs)

    return loss


def distillation_loss(teacher: Transformer, objective: str = "isotropic", seed: int = 0):
    """The training objective ``objective`` (one of ``OBJECTIVES``)."""
    if objective in ("isotropic", "activations"):
        return query_distillation_loss(teacher, objective, seed)
    if objective == "logits":
        return logit_distillation_loss(teacher)
    raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")


@torch.no_grad()
def teacher_fit(base: Transformer, teacher: Transformer, student: Transformer) -> list[dict[str, float]]:
    """How far each query projection of ``student`` got towards the planted change, per layer:
    ``rel_error = ‖W_S − W_T‖ / ‖W_T − W_0‖`` (1: no progress, 0: the teacher) and
    ``cosine = cos(W_S − W_0, W_T − W_0)`` (float64, whole matrices)."""
    rows = []
    for i, (b, t, s) in enumerate(zip(base.layers, teacher.layers, student.layers)):
        w0, wt, ws = (m.attn.q_proj.weight.to(torch.float64) for m in (b, t, s))
        planted, learned = wt - w0, ws - w0
        rows.append({"layer": i, "rel_error": ((ws - wt).norm() / planted.norm()).item(),
                     "cosine": (learned * planted).sum().item()
                     / max((learned.norm() * planted.norm()).item(), 1e-300)})
    return rows


# ---- one run -------------------------------------------------------------------------------
def run_controlled(cfg: ControlledConfig) -> Path:
    """Pretrain (or load the cached base), plant the teacher, distil it by every method.
    Sets torch's thread count to ``cfg.threads``. Returns the output directory."""
    out = Path(cfg.out)
    tcfg = cfg.train_config()
    _prepare_out(out, (*cfg.methods, "teacher"), cfg.overwrite)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    corpora = load_corpora(tcfg)
    base, pre_hist = load_or_pretrain(tcfg, corpora)
    save_base(base, out / "base")
    teacher, plan = plant(base, cfg)
    (out / "teacher").mkdir(parents=True, exist_ok=True)
    save_file(state_dict_contiguous(teacher), str(out / "teacher" / "model.safetensors"),
              metadata={"format": "pt"})
    _write_json(out / "teacher" / "plan.json", plan)
    loss_fn = distillation_loss(teacher, cfg.objective, cfg.seed)
    runs = {}
    for method in cfg.methods:
        model, hist = finetune(tcfg, method, base, corpora, out / method, loss_fn=loss_fn)
        runs[method] = {k: hist[k] for k in ("train_loss", "wall_s", "trainable_params",
                                             "checkpoint_steps", "peak_lr")}
        runs[method]["teacher_fit"] = teacher_fit(base, teacher, merge_adapters(model))
        log.info("%s: distillation loss %.4g -> %.4g (%.1f s)", method, hist["train_loss"][0],
                 hist["train_loss"][-1], hist["wall_s"])
    _write_json(out / "controlled_log.json", {
        "config": asdict(cfg), "train_config": asdict(tcfg), "plan": plan,
        "pretrain": {k: pre_hist.get(k) for k in ("cached", "cache_path", "wall_s")},
        "runs": runs, "wall_s": time.perf_counter() - t0})
    return out


def predicted_r(plan: Sequence[dict[str, Any]]) -> dict[str, float]:
    """r(ΔD, ΔM) across the layers of a plan, before any training: ``"exact"`` for a method
    that makes the planted change exactly, ``"lowrank"`` for one that makes the best rank-r
    update of it (Eckart–Young; what LoRA can reach at most)."""
    exact = [(p["delta_d"], p["delta_m"]) for p in plan]
    low = [(p["lowrank_fit_delta_d"], p["lowrank_fit_delta_m"]) for p in plan]
    return {k: float(np.corrcoef(np.array(v).T)[0, 1]) for k, v in (("exact", exact), ("lowrank", low))}


def _run_one(cfg: ControlledConfig) -> str:
    logging.basicConfig(level=logging.WARNING)
    return str(run_controlled(cfg))


def run_many(cfgs: Sequence[ControlledConfig], workers: int = 1) -> list[Path]:
    """``run_controlled`` for each config; ``workers`` > 1 runs that many at once in fresh
    processes (each with ``cfg.threads`` torch threads). Pretrain the shared base first (one
    run, or ``wda.train`` with the same base options) when the cache is cold, or every worker
    pretrains it. Returns the output directories in order."""
    if workers <= 1 or len(cfgs) <= 1:
        return [run_controlled(c) for c in cfgs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return [Path(p) for p in pool.map(_run_one, cfgs)]


# ---- measuring -----------------------------------------------------------------------------
def query_metrics(run_dir: str | Path) -> pd.DataFrame:
    """``wda.analyze`` of a controlled run: the query projections, out axis (the axis of the
    planted rescaling and of DoRA's magnitude vector), every saved checkpoint."""
    from wda.analysis.engine import analyze

    return analyze(run_dir, modules=["q_proj"], axis="out", device="cpu", progress=False)


def pooled_r(metrics: pd.DataFrame) -> dict[str, float]:
    """Pooled Pearson r(ΔD, ΔM) over the (layer, step) points of q, per method (``wda.report.fit``)."""
    from wda.report.fit import fit_groups

    fits = fit_groups(metrics[metrics["matrix"] == "q_proj"], by=("method",), n_boot=0)
    return dict(zip(fits["method"], fits["pearson_r"]))


def seed_table(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per (run, method): the seed, the pooled r on q, the r predicted from the plan
    alone (``predicted_r``: exact change / best rank-r change), how close the student got to the
    teacher (final step, mean over the layers of each kind: ``rel_error_mag``, ``cosine_dir``,
    ...), the floor no rank-r update can beat (``lowrank_floor_mag``: Eckart–Young) and what
    drives r (``wda.report.attribution``: its size / alignment / base-norm and radial / tangential
    parts, the spread of the update sizes ``s_eff_cv`` and of the alignments ``a_eff_sd``)."""
    from wda.report.attribution import drivers

    rows = []
    for d in run_dirs:
        d = Path(d)
        log_ = json.loads((d / "controlled_log.json").read_text())
        metrics = query_metrics(d)
        drive = drivers(metrics, by=("method",)).set_index("method")
        plan = pd.DataFrame(log_["plan"])
        roles = dict(zip(plan["layer"], plan["role"]))
        floor = plan.groupby("role")["lowrank_rel_error"].mean()
        pred = predicted_r(log_["plan"])
        r = pooled_r(metrics)
        for method, hist in log_["runs"].items():
            fit = pd.DataFrame(hist["teacher_fit"])
            fit["role"] = fit["layer"].map(roles)
            by = fit.groupby("role")[["rel_error", "cosine"]].mean()
            name = {"ft": "FT", "lora": "LoRA", "dora": "DoRA"}[method]
            rows.append({"run": str(d), "seed": log_["config"]["seed"], "method": name,
                         "pearson_r": r[name], "predicted_r_exact": pred["exact"],
                         "predicted_r_lowrank": pred["lowrank"],
                         **{f"{k}_{role[:3]}": by.loc[role, k] for role in ROLES
                            for k in ("rel_error", "cosine")},
                         **{f"lowrank_floor_{role[:3]}": floor[role] for role in ROLES},
                         **{k: drive.loc[name, k] for k in DIAGNOSTICS}})
    return pd.DataFrame(rows)


# ---- CLI -----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wda.train.controlled", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", default=None,
                   help="comma list of seeds: one run each under OUT/seed<N> (default: --seed into OUT)")
    p.add_argument("--workers", type=int, default=1, help="seeds run at once (processes)")
    defaults = ControlledConfig()
    for f in dataclasses.fields(ControlledConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            p.add_argument(flag, default=default, type=lambda s: tuple(x for x in s.split(",") if x))
        elif f.name in ("pretrain_max_bytes", "cache_dir"):
            p.add_argument(flag, default=default,
                           type=(lambda s: None if s.lower() == "none" else int(s))
                           if f.name == "pretrain_max_bytes" else str)
        else:
            p.add_argument(flag, default=default, type=type(default))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    seeds, workers = args.pop("seeds"), args.pop("workers")
    try:
        base_cfg = ControlledConfig(**args)
        if seeds is None:
            cfgs = [base_cfg]
        else:
            cfgs = [dataclasses.replace(base_cfg, seed=int(s), out=str(Path(base_cfg.out) / f"seed{s}"))
                    for s in seeds.split(",") if s.strip()]
        first = run_many(cfgs[:1])  # pretrains (or loads) the shared base once
        outs = first + run_many(cfgs[1:], workers)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = seed_table(outs)
    wide = table.pivot(index="seed", columns="method", values="pearson_r")[["FT", "LoRA", "DoRA"]]
    print("pooled r(ΔD, ΔM) on q, per seed (paper: FT -0.62, LoRA +0.83, DoRA -0.31):")
    print(wide.to_string(float_format=lambda v: f"{v:+.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
