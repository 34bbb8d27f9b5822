"""Small helpers for sweeps of the embedded runs: train a list of configs, measure, correlate.

    from wda.train.sweep import train_many, measure, correlations
    dirs = train_many({"base/s0": TrainConfig(seed=0), ...}, root="/tmp/sci", workers=2)
    metrics = measure(dirs["base/s0"])                       # both axes, q and v, cached
    table = correlations(metrics, schemes={"late": LATE})     # tidy: one row per r

Nothing here re-implements the science: training is ``wda.train.cli.train_all``, ΔM/ΔD is
``wda.analysis.engine.analyze`` and every Pearson r comes from ``wda.report.fit`` (``fit_groups`` for the
pooled r, ``fit_per_step`` for the cross-layer r at each step). The one addition is
:func:`covariance_split`, which splits the pooled covariance of (ΔD, ΔM) over the
(layer, step) points into a between-step part (the shared time trend: every layer's ΔD and
ΔM grow with the step) and a within-step part (the cross-layer structure), so one can see
which of the two decides the sign of the pooled r.

Checkpoint schemes are applied at analysis time: a run that saved at every fraction of
interest can be analysed with any subset of its checkpoints (``select_steps``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from wda.report.fit import fit_groups, fit_per_step
from wda.train.cli import TrainConfig, checkpoint_steps, train_all

log = logging.getLogger(__name__)

# Checkpoint schemes, as fractions of the fine-tuning steps (the final step is always one).
LATE: tuple[float, ...] = (0.625, 0.75, 0.875, 1.0)
EVEN: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
SCHEMES: dict[str, tuple[float, ...]] = {"late": LATE, "even": EVEN}
ALL_FRACTIONS: tuple[float, ...] = tuple(sorted(set(LATE) | set(EVEN) | {0.125, 0.375}))
METHOD_NAMES = {"ft": "FT", "lora": "LoRA", "dora": "DoRA"}


def checkpoints_spec(fractions: Iterable[float] = ALL_FRACTIONS) -> str:
    """A ``TrainConfig.checkpoints`` string that saves at every fraction given."""
    return ",".join(f"{f:g}" if "." in f"{f:g}" else f"{f:.1f}" for f in sorted(set(fractions)))


def fraction_steps(fractions: Iterable[float], total: int) -> list[int]:
    """The steps ``wda.train`` saves for these fractions of ``total`` (same rounding)."""
    return checkpoint_steps(checkpoints_spec(fractions), total)


# ---- training ------------------------------------------------------------------------------
def _done(out: Path) -> bool:
    return (out / "train_log.json").is_file()


def _train_one(cfg: TrainConfig) -> str:
    logging.basicConfig(level=logging.WARNING)
    return str(train_all(cfg))


def train_many(configs: Mapping[str, TrainConfig], root: str | Path, workers: int = 1,
               redo: bool = False) -> dict[str, Path]:
    """Train every config into ``root/<name>`` (skipping finished ones unless ``redo``).

    ``workers`` > 1 trains that many configs at once in fresh processes (each with
    ``cfg.threads`` torch threads). Configs that share base options share the cached base;
    train one of them first (``workers=1``) when the cache is cold, or both will pretrain.
    Returns ``{name: output dir}`` in the order given.
    """
    root = Path(root)
    outs = {name: root / name for name in configs}
    todo = [dataclasses.replace(cfg, out=str(outs[name]), overwrite=True)
            for name, cfg in configs.items() if redo or not _done(outs[name])]
    if workers <= 1 or len(todo) <= 1:
        for cfg in todo:
            train_all(cfg)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(_train_one, todo))
    return outs


def train_seconds(run_dir: str | Path) -> dict[str, float]:
    """Wall seconds of a finished run (``train_log.json``): per method, pretraining, total."""
    t = json.loads((Path(run_dir) / "train_log.json").read_text())["timings_s"]
    return {k: float(v) for k, v in t.items()}


def run_config(run_dir: str | Path) -> dict:
    """The ``TrainConfig`` fields a finished run was trained with."""
    return json.loads((Path(run_dir) / "train_log.json").read_text())["config"]


# ---- measuring -----------------------------------------------------------------------------
def measure(run_dir: str | Path, axes: Sequence[str] = ("out", "in"),
            modules: Sequence[str] = ("q_proj", "v_proj"), cache: bool = True) -> pd.DataFrame:
    """``wda.analyze`` of one run directory for each axis, concatenated (column ``axis``).

    With ``cache`` the table is kept as ``run_dir/sweep_metrics.csv`` (tiny) and reused.
    The method column holds FT / LoRA / DoRA as read from the files.
    """
    from wda.analysis.engine import analyze

    run_dir = Path(run_dir)
    path = run_dir / "sweep_metrics.csv"
    if cache and path.is_file():
        table = pd.read_csv(path)
        if set(axes) <= set(table["axis"]):
            return table[table["axis"].isin(axes)].reset_index(drop=True)
    table = pd.concat([analyze(run_dir, modules=list(modules), axis=a, device="cpu",
                               progress=False) for a in axes], ignore_index=True)
    if cache:
        table.to_csv(path, index=False)
    return table


def select_steps(metrics: pd.DataFrame, fractions: Iterable[float], total: int) -> pd.DataFrame:
    """The rows of ``metrics`` at the checkpoints of ``fractions`` of ``total`` steps.

    Raises if one of those checkpoints was not saved (no silent substitution)."""
    steps = fraction_steps(fractions, total)
    missing = sorted(set(steps) - set(metrics["step"]))
    if missing:
        raise ValueError(f"checkpoints {missing} were not saved (have {sorted(set(metrics['step']))})")
    return metrics[metrics["step"].isin(steps)].reset_index(drop=True)


# ---- correlations --------------------------------------------------------------------------
def covariance_split(x: np.ndarray, y: np.ndarray, step: np.ndarray) -> dict[str, float]:
    """Split the pooled co-variation of (x, y) into between-step and within-step parts.

    Σ(x-x̄)(y-ȳ) = Σ_t n_t (x̄_t-x̄)(ȳ_t-ȳ)  [between: the time trend]
                 + Σ_t Σ_i (x_ti-x̄_t)(y_ti-ȳ_t)  [within: the cross-layer structure]
    and likewise for Σ(x-x̄)² and Σ(y-ȳ)². Returns the pooled r, the between-step r (of the
    step means, weighted by n_t), the pooled within-step r (all steps' cross-layer
    deviations together), and ``between_share`` = between co-variation / |between| + |within|.
    """
    df = pd.DataFrame({"x": np.asarray(x, float), "y": np.asarray(y, float), "t": np.asarray(step)})
    dx, dy = df["x"] - df["x"].mean(), df["y"] - df["y"].mean()
    g = df.groupby("t")
    mx, my = g["x"].transform("mean"), g["y"].transform("mean")
    bx, by_ = mx - df["x"].mean(), my - df["y"].mean()
    wx, wy = df["x"] - mx, df["y"] - my

    def r(a: pd.Series, b: pd.Series) -> float:
        den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
        return float((a * b).sum() / den) if den > 0 else float("nan")

    cb, cw = float((bx * by_).sum()), float((wx * wy).sum())
    tot = abs(cb) + abs(cw)
    return {"r_pooled": r(dx, dy), "r_between": r(bx, by_), "r_within": r(wx, wy),
            "between_share": cb / tot if tot > 0 else float("nan"),
            "within_share": cw / tot if tot > 0 else float("nan")}


def correlations(metrics: pd.DataFrame, schemes: Mapping[str, Sequence[float]] | None = None,
                 total: int | None = None, n_boot: int = 0) -> pd.DataFrame:
    """Tidy correlations of one run's metrics (as from :func:`measure`).

    One row per (scheme, method, matrix, axis, kind, step): ``kind`` is ``pooled`` (r over
    all (layer, step) points of the scheme, ``wda.report.fit.fit_groups``; step = -1),
    ``step`` (cross-layer r at that step, ``wda.report.fit.fit_per_step``), ``within`` and
    ``between`` (:func:`covariance_split`; step = -1, with ``share`` filled). ``schemes``
    default: all saved steps as one scheme ``"all"``; otherwise ``total`` (the number of
    fine-tuning steps) is needed to turn fractions into steps.
    """
    if schemes is None:
        parts = {"all": metrics}
    else:
        if total is None:
            raise ValueError("total (fine-tuning steps) is needed with schemes")
        parts = {name: select_steps(metrics, fr, total) for name, fr in schemes.items()}
    by = ["method", "matrix", "axis"]
    rows: list[dict] = []
    for scheme, m in parts.items():
        # r as a description of each run (no p-values): n_perm=0, and per-step r from 3
        # layers, as the recorded sweeps were computed
        for _, f in fit_groups(m, by=by, n_boot=n_boot, n_perm=0).iterrows():
            rows.append({"scheme": scheme, **{k: f[k] for k in by}, "kind": "pooled", "step": -1,
                         "r": f["pearson_r"], "n": f["n"], "share": float("nan")})
        for _, f in fit_per_step(m, by=by, n_boot=n_boot, n_perm=0, min_n=3).iterrows():
            rows.append({"scheme": scheme, **{k: f[k] for k in by}, "kind": "step",
                         "step": int(f["step"]), "r": f["pearson_r"], "n": f["n"],
                         "share": float("nan")})
        for key, g in m.groupby(by, sort=False):
            s = covariance_split(g["delta_d"].to_numpy(), g["delta_m"].to_numpy(), g["step"].to_numpy())
            for kind in ("between", "within"):
                rows.append({"scheme": scheme, **dict(zip(by, key)), "kind": kind, "step": -1,
                             "r": s[f"r_{kind}"], "n": len(g), "share": s[f"{kind}_share"]})
    return pd.DataFrame(rows, columns=["scheme", *by, "kind", "step", "r", "n", "share"])


def norm_elasticity(metrics: pd.DataFrame) -> pd.DataFrame:
    """How ΔD and ΔM scale with the pretrained norm across layers, per step.

    For each (method, matrix, axis, step): the least-squares slope of log ΔD and of log ΔM
    on log m0_mean (the mean pretrained vector norm of the layer's matrix) over the layers.
    Adam-like updates of equal element size in every layer predict ΔD ∝ m0^-2 (slope -2);
    a radial change proportional to the weight (weight decay) predicts ΔM ∝ m0 (slope +1).
    """
    rows = []
    for key, g in metrics.groupby(["method", "matrix", "axis", "step"], sort=False):
        g = g[(g["delta_d"] > 0) & (g["delta_m"] > 0)]
        if len(g) < 3 or np.ptp(np.log(g["m0_mean"])) == 0:
            continue
        lx = np.log(g["m0_mean"].to_numpy())
        rows.append(dict(zip(["method", "matrix", "axis", "step"], key),
                         d_slope=float(np.polyfit(lx, np.log(g["delta_d"]), 1)[0]),
                         m_slope=float(np.polyfit(lx, np.log(g["delta_m"]), 1)[0]),
                         m0_cv=float(g["m0_mean"].std() / g["m0_mean"].mean()), n=len(g)))
    return pd.DataFrame(rows)


def sweep_table(run_dirs: Mapping[str, str | Path], schemes: Mapping[str, Sequence[float]] = SCHEMES,
                axes: Sequence[str] = ("out", "in")) -> pd.DataFrame:
    """:func:`correlations` of many runs, with ``name``, ``seed`` and ``steps`` columns."""
    out = []
    for name, d in run_dirs.items():
        cfg = run_config(d)
        t = correlations(measure(d, axes=axes), schemes=schemes, total=cfg["steps"])
        t.insert(0, "name", name)
        t.insert(1, "seed", cfg["seed"])
        out.append(t)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


# ---- what drives r, run by run ---------------------------------------------------------------
DRIVER_SUMMARY_COLUMNS: tuple[str, ...] = (
    "name", "seed", "method", "matrix", "pearson_r", "r_size", "r_alignment", "r_base_norm",
    "r_radial", "r_tangential", "s_eff_median", "s_eff_cv", "a_eff_median", "a_eff_sd", "m0_cv",
    "s_mean_median", "s_mean_cv", "align_mean_sd", "align_abs_mean_sd", "r_dd_s", "r_dd_abs_a",
    "r_dd_m0", "within_r", "step_r_min", "step_r_max", "n")


def _r(x: pd.Series, y: pd.Series) -> float:
    return float(np.corrcoef(x.to_numpy(float), y.to_numpy(float))[0, 1]) if len(x) > 2 else float("nan")


def driver_summary(run_dirs: Mapping[str, str | Path], fractions: Sequence[float] = LATE,
                   axis: str = "out", matrices: Sequence[str] = ("q_proj", "v_proj")) -> pd.DataFrame:
    """Per (run, method, matrix): the pooled r over the checkpoints of ``fractions`` with its
    attribution (``wda.report.attribution.drivers``: size / alignment / base-norm parts,
    radial / tangential parts, spread of the effective size and alignment), the spread of the
    measured per-module diagnostics (cv of ``s_mean``, sd of ``align_mean`` and
    ``align_abs_mean`` across the points), what ΔD follows across the points
    (r(ΔD, s_mean), r(ΔD, align_abs_mean), r(ΔD, m0_mean)), the within-step r and the range
    of the cross-layer r of the single steps."""
    from wda.report.attribution import drivers

    rows = []
    for name, d in run_dirs.items():
        cfg = run_config(d)
        m = select_steps(measure(d, axes=(axis,)), fractions, cfg["steps"])
        m = m[m["axis"] == axis] if "axis" in m else m
        m = m[m["matrix"].isin(matrices)]
        drv = drivers(m, by=("method", "matrix"))
        per_step = fit_per_step(m, by=["method", "matrix"], n_boot=0, n_perm=0, min_n=3)
        for _, row in drv.iterrows():
            g = m[(m["method"] == row["method"]) & (m["matrix"] == row["matrix"])]
            st = per_step[(per_step["method"] == row["method"]) & (per_step["matrix"] == row["matrix"])]
            split = covariance_split(g["delta_d"].to_numpy(), g["delta_m"].to_numpy(), g["step"].to_numpy())
            s = g["s_mean"].astype(float)
            rows.append({"name": name, "seed": cfg["seed"], **{k: row[k] for k in row.index
                         if k in DRIVER_SUMMARY_COLUMNS},
                         "s_mean_median": float(s.median()), "s_mean_cv": float(s.std(ddof=0) / s.mean()),
                         "align_mean_sd": float(g["align_mean"].std(ddof=0)),
                         "align_abs_mean_sd": float(g["align_abs_mean"].std(ddof=0)),
                         "r_dd_s": _r(g["delta_d"], s), "r_dd_abs_a": _r(g["delta_d"], g["align_abs_mean"]),
                         "r_dd_m0": _r(g["delta_d"], g["m0_mean"]), "within_r": split["r_within"],
                         "step_r_min": float(st["pearson_r"].min()), "step_r_max": float(st["pearson_r"].max())})
    return pd.DataFrame(rows, columns=list(DRIVER_SUMMARY_COLUMNS))
