"""Regression and correlation of ΔM on ΔD per group (paper Sec. 3.2, 4.1, Fig. 2).

Each row of the tidy metrics table is one point (ΔD, ΔM) of one (run, step, module).
Per group (by default one run and one matrix kind, pooled over layers and steps, as in
the paper's Figure 2) we report two different things in separate columns:

- the least-squares line ΔM = slope · ΔD + intercept (a slope has units of ΔM/ΔD);
- the correlation: Pearson r, Spearman ρ.

Inference respects that each layer is measured at several steps (repeated measures): the CIs
of r and of the slope resample layers with all their steps, and the p-value permutes layers'
ΔM trajectories between layers (``wda.report.resample``). The textbook numbers that treat the points
as independent are kept in columns suffixed ``_naive``.

A group whose correlation is undefined (fewer than 3 points, or ΔD or ΔM constant) gets
NaN in every numeric column and a ``note`` saying why: never r = 0.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from wda.report.resample import cluster_bootstrap, cluster_permutation_p

METHOD_ORDER: tuple[str, ...] = ("FT", "LoRA", "DoRA")

# Inferential columns come in two kinds. Structured (the default reading): the layer is the
# sampling unit, since each layer is measured at several steps -- a bootstrap over layers for
# the CIs of r and of the slope, a permutation of layers' ΔM trajectories for p
# (wda.report.resample). Naive (points independent): the textbook numbers, suffixed "_naive".
NUMERIC_COLUMNS: tuple[str, ...] = (
    "slope", "slope_ci_low", "slope_ci_high", "intercept", "r_squared",
    "pearson_r", "r_ci_low", "r_ci_high", "p_perm", "spearman_rho",
    "p_naive", "r_ci_low_naive", "r_ci_high_naive", "slope_stderr_naive",
    "intercept_stderr_naive", "spearman_p_naive",
)
# Columns after the group keys, in output order.
FIT_COLUMNS: tuple[str, ...] = ("n", "n_layers", *NUMERIC_COLUMNS, "ci_level", "n_boot", "n_perm",
                                "n_dropped", "note")
# The resampling unit: one module is one layer of one stack (encoder/decoder layers differ).
CLUSTER_COLUMNS: tuple[str, ...] = ("module", "layer")
# Fewest layers for which a cross-layer r at one step is reported: with n points the exact
# permutation test of r has n! equally likely pairings, so even |r| = 1 has a two-sided
# p of at least 2/n!: 0.083 for n = 4 (never significant at 5 %), 0.017 for n = 5.
MIN_LAYERS_PER_STEP = 5

_REQUIRED = ("delta_d", "delta_m")


def method_rank(method: object) -> int:
    """Sort key of a method: FT, LoRA, DoRA first (paper order), anything else after."""
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def natural_key(value: object) -> tuple:
    """Sort key that orders "lora-r8" before "lora-r64" and 9 before 10."""
    if isinstance(value, (int, np.integer)):
        return ((0, int(value)),)
    return tuple((0, int(t)) if t.isdigit() else (1, t)
                 for t in re.split(r"(\d+)", str(value)) if t)


def ordered_runs(metrics: pd.DataFrame) -> list[str]:
    """Run names ordered by method (FT, LoRA, DoRA, others), then by name (natural order)."""
    if "method" not in metrics.columns:
        return sorted(metrics["run"].astype(str).unique(), key=natural_key)
    pairs = metrics[["run", "method"]].drop_duplicates()
    keyed = sorted(
        (method_rank(m), str(m), natural_key(r), str(r))
        for r, m in zip(pairs["run"], pairs["method"])
    )
    seen: dict[str, None] = {}
    for *_, run in keyed:
        seen.setdefault(run, None)
    return list(seen)


def _is_constant(v: np.ndarray) -> bool:
    # Equal up to float64 rounding: r of such data would be rounding noise, not signal.
    return bool(np.ptp(v) <= 4 * np.finfo(np.float64).eps * np.max(np.abs(v)))


def undefined_reason(x: np.ndarray, y: np.ndarray) -> str | None:
    """Why r(x, y) is undefined ("n < 3", "ΔD constant", "unchanged from base", ...), or
    None if it is defined."""
    if len(x) < 3:
        return "n < 3"
    const_x, const_y = _is_constant(x), _is_constant(y)
    if const_x and const_y:
        if not np.any(x) and not np.any(y):
            return "unchanged from base"  # ΔD = ΔM = 0 at every point
        return "ΔD and ΔM constant"
    if const_x:
        return "ΔD constant"
    if const_y:
        return "ΔM constant"
    return None


def bootstrap_r_ci(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0,
                   ci: float = 0.95, clusters: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap CI of Pearson r: over points (``clusters`` None), or over
    clusters (all points of a drawn cluster kept). Deterministic for a seed: a fresh
    generator per call, so a group's interval does not depend on which other groups were
    fitted. Resamples whose x or y is constant have no r and are left out; if more than
    half are, the CI is (NaN, NaN).
    """
    if n_boot <= 0 or len(x) < 3:
        return float("nan"), float("nan")
    out = cluster_bootstrap(np.asarray(x, float), np.asarray(y, float), clusters, n_boot, seed, ci)
    return out["r_low"], out["r_high"]


def fit_xy(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0,
           ci: float = 0.95, clusters: np.ndarray | None = None, steps: np.ndarray | None = None,
           n_perm: int = 9999, min_n: int = 3) -> dict[str, object]:
    """Fit one group: ΔM = slope·ΔD + intercept, Pearson r, Spearman ρ, and their inference.

    ``clusters`` labels each point's layer (module): the bootstrap resamples layers with all
    their steps, and the permutation p permutes layers' y-trajectories, step aligned by
    ``steps`` (``wda.report.resample``). None: every point is its own cluster, and the structured
    numbers are the ordinary bootstrap and permutation test over points. The ``_naive``
    columns always treat the points as independent. Non-finite points are dropped first
    (counted in ``n_dropped``); with fewer than ``min_n`` points nothing is reported.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    if clusters is not None:
        clusters = np.asarray(clusters)[finite]
    if steps is not None:
        steps = np.asarray(steps)[finite]
    n_layers = len(np.unique(clusters)) if clusters is not None else len(x)
    row: dict[str, object] = {"n": int(len(x)), "n_layers": int(n_layers)}
    row.update({c: float("nan") for c in NUMERIC_COLUMNS})
    row.update(ci_level=float(ci), n_boot=int(n_boot), n_perm=0, n_dropped=int((~finite).sum()))
    reason = undefined_reason(x, y) if len(x) >= min_n or min_n <= 3 else None
    if len(x) < min_n and min_n > 3:
        reason = (f"n = {len(x)} < {min_n}: not reported (a two-sided permutation p of r from "
                  f"{len(x)} points is at least 2/{len(x)}! = {2 / math.factorial(len(x)):.2g})")
    row["note"] = reason or ""
    if reason is not None:
        return row
    # Degenerate inputs are ruled out above; silence scipy's near-constant warnings
    # so a library call never spills them onto a user's console.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        line = stats.linregress(x, y)
        pearson = stats.pearsonr(x, y)
        spearman = stats.spearmanr(x, y)
        p_perm, used = cluster_permutation_p(x, y, clusters, steps, n_perm=n_perm, seed=seed)
    boot = cluster_bootstrap(x, y, clusters, n_boot=n_boot, seed=seed, ci=ci)
    naive = cluster_bootstrap(x, y, None, n_boot=n_boot, seed=seed, ci=ci)
    row.update(
        slope=float(line.slope), slope_ci_low=boot["slope_low"], slope_ci_high=boot["slope_high"],
        intercept=float(line.intercept), r_squared=float(line.rvalue) ** 2,
        pearson_r=float(pearson.statistic), r_ci_low=boot["r_low"], r_ci_high=boot["r_high"],
        p_perm=p_perm, spearman_rho=float(spearman.statistic),
        p_naive=float(pearson.pvalue), r_ci_low_naive=naive["r_low"], r_ci_high_naive=naive["r_high"],
        slope_stderr_naive=float(line.stderr), intercept_stderr_naive=float(line.intercept_stderr),
        spearman_p_naive=float(spearman.pvalue), n_perm=int(used),
    )
    notes = []
    if n_boot > 0 and np.isnan(boot["r_low"]):
        notes.append("CI undefined (too few distinct layers)")
    if n_perm > 0 and np.isnan(p_perm):
        notes.append("no permutation p (layers measured at different steps)")
    row["note"] = "; ".join(notes)
    return row


def cluster_column(metrics: pd.DataFrame) -> str | None:
    """The column naming each point's layer (the resampling unit), if the table has one."""
    return next((c for c in CLUSTER_COLUMNS if c in metrics.columns), None)


def _group_sort_key(key: tuple, by: list[str]) -> tuple:
    rank = method_rank(key[by.index("method")]) if "method" in by else 0
    # methods outside FT/LoRA/DoRA by name first, as ordered_runs does: one run order
    other = str(key[by.index("method")]) if "method" in by and rank == len(METHOD_ORDER) else ""
    # Natural order on str() of each key, so that mixed or missing values still sort
    # deterministically; the raw str() breaks ties such as "r01" vs "r1".
    return (rank, other, *((natural_key(v), str(v)) for v in key))


def fit_groups(metrics: pd.DataFrame, by: Sequence[str] = ("run", "method", "matrix"),
               n_boot: int = 2000, seed: int = 0, ci: float = 0.95, n_perm: int = 9999,
               min_n: int = 3) -> pd.DataFrame:
    """One fit per group of the tidy metrics table (x = delta_d, y = delta_m).

    Columns: the ``by`` keys, then ``FIT_COLUMNS``. The resampling unit is the ``module``
    column (else ``layer``; else the point): see ``fit_xy``. Rows sorted by method (FT,
    LoRA, DoRA, others) then by the keys.
    """
    if n_boot < 0 or n_perm < 0:
        raise ValueError(f"n_boot and n_perm must be >= 0 (0: none), not {n_boot}, {n_perm}")
    by = list(by)
    missing = [c for c in (*by, *_REQUIRED) if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics table lacks column(s) {missing}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), not {ci}")
    columns = [*by, *FIT_COLUMNS]
    if metrics.empty:
        return pd.DataFrame(columns=columns)
    # Grouping by a list yields tuple keys, also for a single column.
    groups = dict(iter(metrics.groupby(by, sort=False, dropna=False)))
    cluster = cluster_column(metrics)
    rows = []
    for key in sorted(groups, key=lambda k: _group_sort_key(k, by)):
        group = groups[key]
        fit = fit_xy(group["delta_d"].to_numpy(), group["delta_m"].to_numpy(),
                     n_boot=n_boot, seed=seed, ci=ci,
                     clusters=group[cluster].to_numpy() if cluster else None,
                     steps=group["step"].to_numpy() if "step" in group else None,
                     n_perm=n_perm, min_n=min_n)
        rows.append({**dict(zip(by, key)), **fit})
    return pd.DataFrame(rows, columns=columns)


def fit_per_step(metrics: pd.DataFrame, by: Sequence[str] = ("run", "method", "matrix"),
                 n_boot: int = 2000, seed: int = 0, ci: float = 0.95, n_perm: int = 9999,
                 min_n: int = MIN_LAYERS_PER_STEP) -> pd.DataFrame:
    """Cross-layer fit at each training step: ``fit_groups`` with ``step`` added to ``by``.

    The within-step (cross-layer) correlation and the pooled one can differ in sign
    (Simpson's paradox: layers move together over training), so both are reported. Within
    one step every layer is one point, so the bootstrap and permutation are over layers.
    Steps with fewer than ``min_n`` layers (default ``MIN_LAYERS_PER_STEP``) are not
    reported: NaN with a note.
    """
    by = [c for c in by if c != "step"] + ["step"]
    return fit_groups(metrics, by=by, n_boot=n_boot, seed=seed, ci=ci, n_perm=n_perm, min_n=min_n)
