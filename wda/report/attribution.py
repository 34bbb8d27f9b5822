"""What drives the ΔD–ΔM correlation: an exact attribution of Pearson r (pure numpy).

Every point of Figure 2 is a (layer, step) of one run. Per vector, with u = W_0^n,
δ = W_t^n − u, relative update size s = ‖δ‖/‖u‖ and alignment a = cos(δ, u), exactly

    ‖W_t^n‖ / ‖u‖    = ρ(s, a) = √(1 + 2as + s²)
    1 − cos(W_t^n, u) = F(s, a) = s²(1 − a²) / (ρ (ρ + 1 + as))      (= 1 − (1 + as)/ρ)

so a layer whose vectors all had base norm m0, size s and alignment a would sit at
ΔD = F(s, a), ΔM = m0·|ρ(s, a) − 1|. Two attributions of r(ΔD, ΔM) across a group's points
are given, each summing exactly to r:

1. **Update size, alignment, base norm.** Each point is mapped to its *effective* layer: the
   (s, a) for which a layer of identical vectors of norm m0 = ``m0_mean`` whose norms grow by
   ΔM has exactly the point's (ΔD, ΔM) (closed form, ``effective_factors``; Figure 2 cannot
   tell growth from shrinkage, ΔM being a mean of |Δm|). For a layer whose vectors share one
   (s, a) the effective factors are those. The covariance of the points is then a function
   v(S) of which factors vary across points (the others held at their median over the
   group): v(∅) = 0 and v(all) = cov(ΔD, ΔM) exactly. Its Shapley values, divided by
   σ(ΔD)·σ(ΔM), split r into a size, an alignment and a base-norm part. A factor that does
   not vary gets exactly 0; if only one varies it gets all of r. Interactions are shared
   equally between the factors involved; ΔD does not depend on the base norm, so the
   base-norm part is what base norms add through their covariation with size and alignment
   (e.g. small-norm layers rotating more).
2. **Radial and tangential parts of ΔM.** ΔM = ``delta_m_radial`` + ``delta_m_tangential``
   (``wda.analysis.decompose.summarize``), so r = cov(ΔD, radial)/(σσ) + cov(ΔD, tangential)/(σσ).
   The tangential part is ≈ ‖δ_⊥‖²/(2‖u‖) ≈ ‖u‖·ΔD: it ties ΔM to ΔD positively by
   construction, and a negative r needs the radial part to fall as ΔD rises.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from math import factorial

import numpy as np
import pandas as pd

from wda.report.fit import undefined_reason

FACTORS: tuple[str, ...] = ("size", "alignment", "base_norm")
PARTS: tuple[str, ...] = ("radial", "tangential")
# Columns after the group keys, in output order.
DRIVER_COLUMNS: tuple[str, ...] = (
    "n", "pearson_r", *(f"r_{f}" for f in FACTORS), *(f"r_{p}" for p in PARTS),
    "s_eff_median", "s_eff_cv", "a_eff_median", "a_eff_sd", "m0_cv", "note",
)


def rho(s: np.ndarray, a: np.ndarray) -> np.ndarray:
    """‖W_t‖/‖W_0‖ of a vector with relative update size s and alignment a."""
    return np.sqrt(np.maximum(1.0 + 2.0 * a * s + s * s, 0.0))


def direction_change(s: np.ndarray, a: np.ndarray) -> np.ndarray:
    """1 − cos(W_t, W_0) of such a vector, without cancellation where 1 + as > 0."""
    s, a = np.asarray(s, dtype=np.float64), np.asarray(a, dtype=np.float64)
    p = rho(s, a)
    q = 1.0 + a * s
    with np.errstate(invalid="ignore", divide="ignore"):
        stable = s * s * (1.0 - a * a) / (p * (p + q))
        plain = 1.0 - q / p
    return np.where(p == 0, 1.0, np.where(q > 0, stable, plain))


def relative_magnitude_change(s: np.ndarray, a: np.ndarray) -> np.ndarray:
    """|‖W_t‖ − ‖W_0‖| / ‖W_0‖ of such a vector: |2as + s²| / (ρ + 1)."""
    s, a = np.asarray(s, dtype=np.float64), np.asarray(a, dtype=np.float64)
    return np.abs(2.0 * a * s + s * s) / (rho(s, a) + 1.0)


def effective_factors(delta_d: np.ndarray, delta_m: np.ndarray, m0: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(s, a) of the effective layer of each point: vectors of norm ``m0`` that grow to
    ρ = 1 + ΔM/m0 at 1 − cos = ΔD. Then s² = (ρ − 1)² + 2ρ·ΔD and a = (ρ − 1 − ρ·ΔD)/s
    (from ‖δ‖² = ‖v‖² − 2‖u‖‖v‖cos + ‖u‖² and u·δ = ‖u‖‖v‖cos − ‖u‖²)."""
    d = np.asarray(delta_d, dtype=np.float64)
    mu = np.asarray(delta_m, dtype=np.float64) / np.asarray(m0, dtype=np.float64)
    p = 1.0 + mu
    s = np.sqrt(mu * mu + 2.0 * p * d)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.where(s > 0, (mu - p * d) / np.where(s > 0, s, 1.0), 0.0)
    return s, np.clip(a, -1.0, 1.0)


def _cov(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x - x.mean()) * (y - y.mean())))


def shapley_r(s: np.ndarray, a: np.ndarray, m0: np.ndarray) -> dict[str, float]:
    """The size / alignment / base-norm parts of r(F(s, a), m0·|ρ − 1|) (module docstring):
    Shapley values of v(S) = cov(ΔD_S, ΔM_S), factors outside S held at their median."""
    values = {"size": np.asarray(s, float), "alignment": np.asarray(a, float),
              "base_norm": np.asarray(m0, float)}
    base = {k: np.full_like(v, np.median(v)) for k, v in values.items()}

    def point(free: frozenset) -> tuple[np.ndarray, np.ndarray]:
        x = {k: (values[k] if k in free else base[k]) for k in FACTORS}
        return (direction_change(x["size"], x["alignment"]),
                x["base_norm"] * relative_magnitude_change(x["size"], x["alignment"]))

    cache: dict[frozenset, float] = {}

    def v(free: frozenset) -> float:
        if free not in cache:
            cache[free] = _cov(*point(free)) if free else 0.0
        return cache[free]

    d, m = point(frozenset(FACTORS))
    scale = float(np.std(d) * np.std(m))
    n = len(FACTORS)
    out = {}
    for k in FACTORS:
        others = [f for f in FACTORS if f != k]
        phi = 0.0
        for size in range(n):
            w = factorial(size) * factorial(n - size - 1) / factorial(n)
            for sub in combinations(others, size):
                sub = frozenset(sub)
                phi += w * (v(sub | {k}) - v(sub))
        out[k] = phi / scale if scale > 0 else float("nan")
    return out


def attribute(points: pd.DataFrame) -> dict[str, object]:
    """Both attributions of r(ΔD, ΔM) over the rows of ``points`` (metrics.csv columns
    ``delta_d``, ``delta_m``, ``m0_mean``, ``delta_m_radial``, ``delta_m_tangential``)."""
    cols = ["delta_d", "delta_m", "m0_mean", "delta_m_radial", "delta_m_tangential"]
    p = points[cols].astype(float)
    p = p[np.isfinite(p.to_numpy()).all(axis=1) & (p["m0_mean"] > 0)]
    row: dict[str, object] = {c: float("nan") for c in DRIVER_COLUMNS}
    row["n"] = int(len(p))
    d, m = p["delta_d"].to_numpy(), p["delta_m"].to_numpy()
    reason = undefined_reason(d, m)
    row["note"] = reason or ""
    if reason is not None:
        return row
    sd = float(np.std(d) * np.std(m))
    row["pearson_r"] = _cov(d, m) / sd
    for part in PARTS:
        row[f"r_{part}"] = _cov(d, p[f"delta_m_{part}"].to_numpy()) / sd
    s, a = effective_factors(d, m, p["m0_mean"].to_numpy())
    for k, val in shapley_r(s, a, p["m0_mean"].to_numpy()).items():
        row[f"r_{k}"] = val
    m0 = p["m0_mean"].to_numpy()
    row.update(s_eff_median=float(np.median(s)), s_eff_cv=float(np.std(s) / np.mean(s)) if np.mean(s) > 0
               else float("nan"), a_eff_median=float(np.median(a)), a_eff_sd=float(np.std(a)),
               m0_cv=float(np.std(m0) / np.mean(m0)))
    return row


def drivers(metrics: pd.DataFrame, by: Sequence[str] = ("run", "method", "matrix")) -> pd.DataFrame:
    """One attribution per group of the tidy metrics table, groups in the order of
    ``wda.report.fit.fit_groups``. Add ``"step"`` to ``by`` for the cross-layer r at each step."""
    from wda.report.fit import _group_sort_key

    by = list(by)
    columns = [*by, *DRIVER_COLUMNS]
    needed = {"delta_m_radial", "delta_m_tangential", "m0_mean"}
    if metrics.empty or not needed <= set(metrics.columns):
        return pd.DataFrame(columns=columns)
    groups = dict(iter(metrics.groupby(by, sort=False, dropna=False)))
    rows = [{**dict(zip(by, key)), **attribute(groups[key])}
            for key in sorted(groups, key=lambda k: _group_sort_key(k, by))]
    return pd.DataFrame(rows, columns=columns)
