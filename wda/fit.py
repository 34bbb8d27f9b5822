"""Regression and correlation of ΔM on ΔD per group (paper Sec. 3.2, 4.1, Fig. 2).

Each row of the tidy metrics table is one point (ΔD, ΔM) of one (run, step, module).
Per group (by default one run and one matrix kind, pooled over layers and steps, as in
the paper's Figure 2) we report two different things in separate columns:

- the least-squares line ΔM = slope · ΔD + intercept (a slope has units of ΔM/ΔD);
- the correlation: Pearson r with its p-value, a seeded bootstrap CI for r, Spearman ρ.

A group whose correlation is undefined (fewer than 3 points, or ΔD or ΔM constant) gets
NaN in every numeric column and a ``note`` saying why: never r = 0.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

METHOD_ORDER: tuple[str, ...] = ("FT", "LoRA", "DoRA")

NUMERIC_COLUMNS: tuple[str, ...] = (
    "slope", "slope_stderr", "intercept", "intercept_stderr", "r_squared",
    "pearson_r", "p_value", "r_ci_low", "r_ci_high", "spearman_rho", "spearman_p",
)
# Columns after the group keys, in output order.
FIT_COLUMNS: tuple[str, ...] = ("n", *NUMERIC_COLUMNS, "ci_level", "n_boot", "n_dropped", "note")

_REQUIRED = ("delta_d", "delta_m")
# Bootstrap resamples are drawn in blocks so that memory stays ~ 4M floats per array.
_BOOT_BLOCK_ELEMENTS = 4_000_000
# A CI from fewer valid (non-degenerate) resamples than this fraction is not reported.
_MIN_VALID_BOOT_FRACTION = 0.5


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
    """Why r(x, y) is undefined ("n < 3", "ΔD constant", ...), or None if it is defined."""
    if len(x) < 3:
        return "n < 3"
    const_x, const_y = _is_constant(x), _is_constant(y)
    if const_x and const_y:
        return "ΔD and ΔM constant"
    if const_x:
        return "ΔD constant"
    if const_y:
        return "ΔM constant"
    return None


def bootstrap_r_ci(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0,
                   ci: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of Pearson r, resampling (x, y) pairs with replacement.

    Deterministic for a seed: a fresh generator per call, so a group's interval does not
    depend on which other groups were fitted. Resamples whose x or y is constant have no
    r and are left out; if more than half are, the CI is (NaN, NaN).
    """
    n = len(x)
    if n_boot <= 0 or n < 3:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    rs = np.empty(n_boot)
    block = max(1, min(n_boot, _BOOT_BLOCK_ELEMENTS // n))
    for start in range(0, n_boot, block):
        idx = rng.integers(0, n, size=(min(block, n_boot - start), n))  # (b, n)
        xb, yb = x[idx], y[idx]
        dx = xb - xb.mean(axis=1, keepdims=True)
        dy = yb - yb.mean(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (dx * dy).sum(1) / np.sqrt((dx * dx).sum(1) * (dy * dy).sum(1))  # (b,)
        # A constant resample has a mean that may differ from its values by rounding,
        # so test constancy on the values themselves, not on dx == 0.
        degenerate = (np.ptp(xb, axis=1) == 0) | (np.ptp(yb, axis=1) == 0)
        rs[start:start + len(r)] = np.where(degenerate, np.nan, np.clip(r, -1.0, 1.0))
    valid = rs[np.isfinite(rs)]
    if len(valid) < _MIN_VALID_BOOT_FRACTION * n_boot:
        return float("nan"), float("nan")
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(valid, [alpha, 1.0 - alpha])
    return float(low), float(high)


def fit_xy(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0,
           ci: float = 0.95) -> dict[str, object]:
    """Fit one group: ΔM = slope·ΔD + intercept, Pearson r, p, bootstrap CI, Spearman ρ.

    Non-finite points are dropped first (counted in ``n_dropped``).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    row: dict[str, object] = {"n": int(len(x))}
    row.update({c: float("nan") for c in NUMERIC_COLUMNS})
    row.update(ci_level=float(ci), n_boot=int(n_boot), n_dropped=int((~finite).sum()))
    reason = undefined_reason(x, y)
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
    low, high = bootstrap_r_ci(x, y, n_boot=n_boot, seed=seed, ci=ci)
    row.update(
        slope=float(line.slope), slope_stderr=float(line.stderr),
        intercept=float(line.intercept), intercept_stderr=float(line.intercept_stderr),
        r_squared=float(line.rvalue) ** 2,
        pearson_r=float(pearson.statistic), p_value=float(pearson.pvalue),
        r_ci_low=low, r_ci_high=high,
        spearman_rho=float(spearman.statistic), spearman_p=float(spearman.pvalue),
    )
    if n_boot > 0 and np.isnan(low):
        row["note"] = "CI undefined (too few distinct points)"
    return row


def _group_sort_key(key: tuple, by: list[str]) -> tuple:
    rank = method_rank(key[by.index("method")]) if "method" in by else 0
    # Natural order on str() of each key, so that mixed or missing values still sort
    # deterministically; the raw str() breaks ties such as "r01" vs "r1".
    return (rank, *((natural_key(v), str(v)) for v in key))


def fit_groups(metrics: pd.DataFrame, by: Sequence[str] = ("run", "method", "matrix"),
               n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """One fit per group of the tidy metrics table (x = delta_d, y = delta_m).

    Columns: the ``by`` keys, then ``FIT_COLUMNS`` (n, slope, slope_stderr, intercept,
    intercept_stderr, r_squared, pearson_r, p_value, r_ci_low, r_ci_high, spearman_rho,
    spearman_p, ci_level, n_boot, n_dropped, note). Rows sorted by method (FT, LoRA,
    DoRA, others) then by the keys.
    """
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
    rows = []
    for key in sorted(groups, key=lambda k: _group_sort_key(k, by)):
        group = groups[key]
        fit = fit_xy(group["delta_d"].to_numpy(), group["delta_m"].to_numpy(),
                     n_boot=n_boot, seed=seed, ci=ci)
        rows.append({**dict(zip(by, key)), **fit})
    return pd.DataFrame(rows, columns=columns)


def fit_per_step(metrics: pd.DataFrame, by: Sequence[str] = ("run", "method", "matrix"),
                 n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Cross-layer fit at each training step: ``fit_groups`` with ``step`` added to ``by``.

    The within-step (cross-layer) correlation and the pooled one can differ in sign
    (Simpson's paradox: layers move together over training), so both are reported.
    """
    by = [c for c in by if c != "step"] + ["step"]
    return fit_groups(metrics, by=by, n_boot=n_boot, seed=seed, ci=ci)
