"""Resampling inference for a correlation whose points come in clusters (pure numpy / scipy).

Each layer of a run is measured at several steps, so the (layer, step) points of a pooled
fit are repeated measures, not independent draws: the layer is the sampling unit. Two tools
respect that structure.

- ``cluster_bootstrap``: percentile bootstrap over clusters. A resample draws as many
  clusters as there are, with replacement, and keeps all points of each. The statistics of
  a resample are computed from per-cluster sums weighted by how often each cluster was
  drawn (a centred, cancellation-free form), so the cost is O(resamples × clusters). With
  one point per cluster it *is* the ordinary bootstrap over points, draw for draw.
- ``cluster_permutation_p``: the null that a cluster's y-trajectory is unrelated to which
  cluster's x-trajectory it is paired with. The y-blocks (all steps of one layer) are
  permuted between layers, step aligned with step, so every within-layer pattern of x and of
  y -- the shared growth with the training step included -- is kept in every permutation;
  only the pairing of layers is broken. Exact (all G! pairings) when G! is at most the
  number of permutations asked for, else a seeded Monte Carlo sample (p ≥ 1 / (n + 1)).
  With one point per cluster this is the ordinary permutation test of r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

# Resamples are drawn in blocks so that memory stays ~ 1M floats per array.
_BLOCK_ELEMENTS = 1_000_000
# A CI from fewer valid (non-degenerate) resamples than this fraction is not reported.
MIN_VALID_FRACTION = 0.5


@dataclass(frozen=True)
class Clusters:
    """Points grouped into clusters: per-cluster sizes, means, centred sums and ranges."""

    n: np.ndarray  # (G,) points per cluster
    mx: np.ndarray  # (G,) cluster means of x
    my: np.ndarray
    qxx: np.ndarray  # (G,) Σ (x - mx_g)² within each cluster
    qyy: np.ndarray
    qxy: np.ndarray
    lo_x: np.ndarray  # (G,) min / max of x and y within each cluster (degeneracy test)
    hi_x: np.ndarray
    lo_y: np.ndarray
    hi_y: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, labels: np.ndarray | None = None) -> "Clusters":
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if labels is None:  # every point its own cluster
            zero = np.zeros_like(x)
            return cls(np.ones(len(x)), x, y, zero, zero, zero, x, x, y, y)
        # clusters numbered in order of first appearance: with one point per cluster the
        # draws then fall on the same points as the ordinary bootstrap's
        _, first, inv = np.unique(np.asarray(labels), return_index=True, return_inverse=True)
        rank = np.empty(len(first), np.intp)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        inv = rank[inv.reshape(-1)]
        g = len(first)
        n = np.bincount(inv, minlength=g).astype(np.float64)
        mx = np.bincount(inv, x, g) / n
        my = np.bincount(inv, y, g) / n
        dx, dy = x - mx[inv], y - my[inv]
        lo_x, hi_x = np.full(g, np.inf), np.full(g, -np.inf)
        lo_y, hi_y = lo_x.copy(), hi_x.copy()
        np.minimum.at(lo_x, inv, x), np.maximum.at(hi_x, inv, x)
        np.minimum.at(lo_y, inv, y), np.maximum.at(hi_y, inv, y)
        return cls(n, mx, my, np.bincount(inv, dx * dx, g), np.bincount(inv, dy * dy, g),
                   np.bincount(inv, dx * dy, g), lo_x, hi_x, lo_y, hi_y)

    @property
    def size(self) -> int:
        return len(self.n)


def _weighted_stats(c: Clusters, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(r, slope) of each resample; ``w`` (B, G) counts how often each cluster was drawn.
    Degenerate resamples (x or y constant: no r; x constant: no slope) are NaN."""
    wn = w * c.n  # points contributed by each cluster
    total = wn.sum(1)
    mx = (wn @ c.mx) / total
    my = (wn @ c.my) / total
    ex = c.mx[None, :] - mx[:, None]  # (B, G) cluster mean minus resample mean
    ey = c.my[None, :] - my[:, None]
    sxx = w @ c.qxx + (wn * ex * ex).sum(1)
    syy = w @ c.qyy + (wn * ey * ey).sum(1)
    sxy = w @ c.qxy + (wn * ex * ey).sum(1)
    # Constancy on the values themselves (a mean may differ from equal values by rounding).
    drawn = w > 0
    const_x = (np.where(drawn, c.hi_x, -np.inf).max(1) == np.where(drawn, c.lo_x, np.inf).min(1))
    const_y = (np.where(drawn, c.hi_y, -np.inf).max(1) == np.where(drawn, c.lo_y, np.inf).min(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0)
        slope = sxy / sxx
    return np.where(const_x | const_y, np.nan, r), np.where(const_x, np.nan, slope)


def draw_counts(rng: np.random.Generator, n_boot: int, g: int):
    """Blocks of (b, G) cluster counts, one row per resample: G draws with replacement.
    Each block comes from ``rng.integers(0, G, (b, G))``, the index draw of a point bootstrap."""
    block = max(1, min(n_boot, _BLOCK_ELEMENTS // max(g, 1)))
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        idx = rng.integers(0, g, size=(b, g))
        flat = idx + g * np.arange(b)[:, None]
        yield np.bincount(flat.ravel(), minlength=b * g).reshape(b, g).astype(np.float64)


def cluster_bootstrap(x: np.ndarray, y: np.ndarray, labels: np.ndarray | None = None,
                      n_boot: int = 2000, seed: int = 0, ci: float = 0.95
                      ) -> dict[str, float]:
    """Percentile bootstrap CIs of Pearson r and of the least-squares slope over clusters.

    ``labels`` names each point's cluster (None: each point is its own, the ordinary
    bootstrap). Deterministic for a seed: a fresh generator per call. Resamples without a
    statistic (x or y constant) are left out; if more than half are, that CI is NaN.
    Returns r_low, r_high, slope_low, slope_high.
    """
    nan = float("nan")
    out = {"r_low": nan, "r_high": nan, "slope_low": nan, "slope_high": nan}
    c = Clusters.of(x, y, labels)
    if n_boot <= 0 or c.size < 2:
        return out
    rng = np.random.default_rng(seed)
    rs, slopes = [], []
    for w in draw_counts(rng, n_boot, c.size):
        r, s = _weighted_stats(c, w)
        rs.append(r)
        slopes.append(s)
    alpha = (1.0 - ci) / 2.0
    for name, values in (("r", np.concatenate(rs)), ("slope", np.concatenate(slopes))):
        valid = values[np.isfinite(values)]
        if len(valid) >= MIN_VALID_FRACTION * n_boot:
            low, high = np.quantile(valid, [alpha, 1.0 - alpha])
            out[f"{name}_low"], out[f"{name}_high"] = float(low), float(high)
    return out


def aligned_blocks(x: np.ndarray, y: np.ndarray, labels: np.ndarray | None,
                   steps: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """x and y as (G, T) arrays, cluster by step; None when the clusters are not all
    measured at the same steps (no step-aligned pairing of layers exists)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if labels is None:
        return x[:, None], y[:, None]
    labels = np.asarray(labels)
    steps = np.zeros(len(x), int) if steps is None else np.asarray(steps)
    ul, gi = np.unique(labels, return_inverse=True)
    us, ti = np.unique(steps, return_inverse=True)
    if len(x) != len(ul) * len(us):
        return None
    flat = gi * len(us) + ti
    if len(np.unique(flat)) != len(flat):  # a (cluster, step) twice
        return None
    bx, by = np.empty(len(flat)), np.empty(len(flat))
    bx[flat], by[flat] = x, y
    return bx.reshape(len(ul), len(us)), by.reshape(len(ul), len(us))


def cluster_permutation_p(x: np.ndarray, y: np.ndarray, labels: np.ndarray | None = None,
                          steps: np.ndarray | None = None, n_perm: int = 9999, seed: int = 0
                          ) -> tuple[float, int]:
    """Two-sided permutation p-value of pooled Pearson r, permuting y's cluster blocks.

    Returns (p, permutations used). p = 2·min(P(T* ≥ T), P(T* ≤ T)), capped at 1, by
    scipy's ``permutation_test``: exact over all G! pairings when G! ≤ ``n_perm`` (so p ≥ 2/G!
    unless capped), else ``n_perm`` seeded random pairings with each tail counted as
    (1 + hits) / (n_perm + 1), never below 1/(n_perm + 1). NaN when no step-aligned pairing
    exists (clusters at different steps), with fewer than 2 clusters, or ``n_perm`` ≤ 0.
    """
    blocks = aligned_blocks(x, y, labels, steps)
    if n_perm <= 0 or blocks is None or blocks[0].shape[0] < 2:
        return float("nan"), 0
    bx, by = blocks
    g = bx.shape[0]
    # Σx, Σy, Σx², Σy² do not change under a permutation of y's blocks: r is an increasing
    # function of Σ x·y_perm, so that is the statistic. Centring keeps it well conditioned.
    bx, by = bx - bx.mean(), by - by.mean()
    cross = bx @ by.T  # cross[g, h] = Σ_t x[g, t] · y[h, t]
    rows = np.arange(g)

    def statistic(perm: np.ndarray, axis: int = -1) -> np.ndarray:
        return cross[rows, perm.astype(np.intp)].sum(axis=-1)

    exact = math.factorial(g) <= n_perm
    res = stats.permutation_test((rows,), statistic, permutation_type="pairings", vectorized=True,
                                 n_resamples=n_perm, alternative="two-sided",
                                 rng=np.random.default_rng(seed))
    return float(res.pvalue), math.factorial(g) if exact else int(n_perm)
