"""wda.report.resample: cluster bootstrap and layer-permutation p against explicit references,
and the planted cases where repeated measures make the naive numbers overconfident."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from wda.report.fit import MIN_LAYERS_PER_STEP, fit_groups, fit_per_step
from wda.report.resample import aligned_blocks, cluster_bootstrap, cluster_permutation_p


def r_of(x, y) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def reference_bootstrap(x, y, labels, n_boot, seed, ci=0.95):
    """The textbook cluster bootstrap, one resample at a time: draw G cluster indices with the
    generator call the implementation makes, concatenate their points, np.corrcoef/polyfit."""
    x, y, labels = map(np.asarray, (x, y, labels))
    order = list(dict.fromkeys(labels.tolist()))  # first appearance
    members = [np.flatnonzero(labels == c) for c in order]
    idx = np.random.default_rng(seed).integers(0, len(order), size=(n_boot, len(order)))
    rs, slopes = [], []
    for row in idx:
        pts = np.concatenate([members[i] for i in row])
        xb, yb = x[pts], y[pts]
        if np.ptp(xb) == 0:
            continue
        slopes.append(np.polyfit(xb, yb, 1)[0])
        if np.ptp(yb) > 0:
            rs.append(r_of(xb, yb))
    a = (1 - ci) / 2
    return np.quantile(rs, [a, 1 - a]), np.quantile(slopes, [a, 1 - a])


def test_cluster_bootstrap_matches_the_resample_by_resample_reference():
    rng = np.random.default_rng(0)
    sizes = [3, 1, 4, 2, 5, 3]  # unbalanced clusters: the weights must count points
    labels = np.repeat([f"m{i}" for i in (5, 2, 0, 4, 1, 3)], sizes)  # not in sorted order
    x = rng.normal(size=len(labels)) * 1e-4
    y = 3e2 * x + rng.normal(size=len(labels)) * 1e-2
    got = cluster_bootstrap(x, y, labels, n_boot=400, seed=11)
    r_ref, s_ref = reference_bootstrap(x, y, labels, 400, 11)
    np.testing.assert_allclose([got["r_low"], got["r_high"]], r_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose([got["slope_low"], got["slope_high"]], s_ref, rtol=1e-10)


def test_one_point_per_cluster_is_the_ordinary_bootstrap_draw_for_draw():
    rng = np.random.default_rng(1)
    x, y = rng.random(25), rng.random(25)
    labels = [f"layer{i}" for i in rng.permutation(25)]  # any names, one point each
    clustered = cluster_bootstrap(x, y, labels, n_boot=500, seed=3)
    assert clustered == cluster_bootstrap(x, y, None, n_boot=500, seed=3)  # bit for bit
    r_ref, _ = reference_bootstrap(x, y, np.arange(25), 500, 3)  # point indices as clusters
    np.testing.assert_allclose([clustered["r_low"], clustered["r_high"]], r_ref, atol=1e-12)


def test_exact_permutation_p_enumerates_every_pairing_of_layers():
    rng = np.random.default_rng(2)
    g, t = 5, 3
    steps = np.tile([10, 20, 30], g)
    labels = np.repeat(np.arange(g), t)
    x = rng.random(g * t) + 0.2 * steps / 10
    y = 0.5 * x + rng.random(g * t)
    p, used = cluster_permutation_p(x, y, labels, steps, n_perm=9999)
    assert used == math.factorial(g)
    bx, by = x.reshape(g, t), y.reshape(g, t)  # rows: layers, columns: steps
    r0 = r_of(bx.ravel(), by.ravel())
    null = np.array([r_of(bx.ravel(), by[list(perm)].ravel())
                     for perm in itertools.permutations(range(g))])
    tol = 1e-12
    expected = min(1.0, 2 * min((null >= r0 - tol).mean(), (null <= r0 + tol).mean()))
    assert p == pytest.approx(expected, abs=1e-15)


def test_monte_carlo_permutation_p_is_never_below_one_over_n_plus_one_and_is_seeded():
    x = np.linspace(0, 1, 30)
    y = x + 1e-3 * np.sin(np.arange(30))  # r ~ 1: no random pairing comes close
    p, used = cluster_permutation_p(x, y, None, None, n_perm=199, seed=0)
    assert used == 199
    assert p >= 1 / 200
    assert p == pytest.approx(2 / 200)  # each tail (1 + 0 hits) / 200, doubled
    rng = np.random.default_rng(3)
    a, b = rng.random(30), rng.random(30)
    assert cluster_permutation_p(a, b, n_perm=500, seed=4) == cluster_permutation_p(a, b, n_perm=500, seed=4)
    assert cluster_permutation_p(a, b, n_perm=500, seed=4) != cluster_permutation_p(a, b, n_perm=500, seed=5)


def test_four_layers_can_never_reach_five_percent_five_can():
    """The reason for MIN_LAYERS_PER_STEP: a perfect line over n layers has exact p = 2/n!."""
    for n, p_min in ((4, 2 / 24), (5, 2 / 120)):
        x = np.arange(n, dtype=float)
        p, used = cluster_permutation_p(x, 2 * x + 1, n_perm=9999)
        assert used == math.factorial(n) and p == pytest.approx(p_min)
    assert MIN_LAYERS_PER_STEP == 5 and 2 / math.factorial(4) > 0.05 > 2 / math.factorial(5)


def planted(layers: int, steps: int, within: float, seed: int = 0) -> pd.DataFrame:
    """Each layer sits at its own (ΔD, ΔM) with the layer means correlated; its steps
    scatter around that point by ``within`` (relative)."""
    rng = np.random.default_rng(seed)
    cx = rng.uniform(1e-4, 1e-3, layers)
    cy = 5.0 * cx + rng.normal(0, 1e-3, layers)
    L = np.repeat(np.arange(layers), steps)
    S = np.tile(100 * (1 + np.arange(steps)), layers)
    return pd.DataFrame({
        "run": "ft", "method": "FT", "matrix": "q_proj", "step": S, "layer": L,
        "module": [f"model.layers.{i}.self_attn.q_proj" for i in L],
        "delta_d": cx[L] * (1 + within * rng.normal(size=len(L))),
        "delta_m": cy[L] * (1 + within * rng.normal(size=len(L))),
    })


def test_repeated_measures_of_few_layers_naive_p_tiny_structured_p_large():
    df = planted(layers=4, steps=50, within=1e-3)
    f = fit_groups(df, n_boot=2000).iloc[0]
    assert f["n"] == 200 and f["n_layers"] == 4
    assert f["p_naive"] < 1e-10  # 200 "independent" points
    # 4 layers give 4! = 24 equally likely pairings: two-sided p ≥ 2/24 whatever r is
    assert f["n_perm"] == 24 and f["p_perm"] >= 2 / 24
    naive_w = f["r_ci_high_naive"] - f["r_ci_low_naive"]
    assert naive_w < 0.05 < f["r_ci_high"] - f["r_ci_low"]
    assert f["r_ci_high"] - f["r_ci_low"] > 10 * naive_w
    assert f["slope_ci_low"] <= f["slope"] <= f["slope_ci_high"]


def test_independent_points_naive_and_structured_agree():
    # Independent layers at one step each: the layer permutation is the ordinary
    # permutation test of r, whose p the t-test approximates for normal data.
    rng = np.random.default_rng(7)
    n = 60
    xy = rng.multivariate_normal([0, 0], [[1, 0.3], [0.3, 1]], size=n)
    df = pd.DataFrame({"run": "ft", "method": "FT", "matrix": "q", "step": 0,
                       "module": [f"l.{i}.q" for i in range(n)],
                       "delta_d": 1e-4 * (3 + xy[:, 0]), "delta_m": 1e-2 * (3 + xy[:, 1])})
    f = fit_groups(df, n_boot=2000, n_perm=19999).iloc[0]
    assert 0.001 < f["p_naive"] < 0.1
    assert f["p_perm"] == pytest.approx(f["p_naive"], rel=0.25)
    assert (f["r_ci_low"], f["r_ci_high"]) == (f["r_ci_low_naive"], f["r_ci_high_naive"])
    # iid points at several steps: resampling layers is valid too, and agrees roughly
    pts = rng.multivariate_normal([0, 0], [[1, 0.4], [0.4, 1]], size=(30, 4)).reshape(-1, 2)
    df = pd.DataFrame({"run": "ft", "method": "FT", "matrix": "q", "step": np.tile(range(4), 30),
                       "module": np.repeat([f"l.{i}.q" for i in range(30)], 4),
                       "delta_d": 3 + pts[:, 0], "delta_m": 3 + pts[:, 1]})
    f = fit_groups(df, n_boot=2000, n_perm=19999).iloc[0]
    assert f["p_naive"] < 1e-3 and f["p_perm"] < 5e-3
    assert abs(f["r_ci_low"] - f["r_ci_low_naive"]) < 0.1
    assert abs(f["r_ci_high"] - f["r_ci_high_naive"]) < 0.1


def test_shared_time_trend_alone_is_not_evidence_against_the_layer_null():
    # Both grow with the step in every layer, with no layer-specific link: the pooled r is
    # high and its naive p tiny, but any pairing of layers gives the same picture.
    rng = np.random.default_rng(8)
    g, t = 8, 6
    S = np.tile(np.arange(1, t + 1), g)
    df = pd.DataFrame({"run": "ft", "method": "FT", "matrix": "q", "step": S,
                       "module": np.repeat([f"l.{i}.q" for i in range(g)], t),
                       "delta_d": S * (1 + 0.1 * rng.random(g * t)),
                       "delta_m": S * (1 + 0.1 * rng.random(g * t))})
    f = fit_groups(df, n_boot=0).iloc[0]
    assert f["pearson_r"] > 0.9 and f["p_naive"] < 1e-10
    assert f["p_perm"] > 0.05


def test_layers_at_different_steps_have_no_permutation_p_and_say_so():
    df = planted(layers=6, steps=3, within=0.1)
    df = df.drop(index=df.index[0])  # layer 0 lacks one step
    assert aligned_blocks(df["delta_d"], df["delta_m"], df["module"], df["step"]) is None
    f = fit_groups(df, n_boot=100).iloc[0]
    assert np.isnan(f["p_perm"]) and "different steps" in f["note"]
    assert np.isfinite(f["r_ci_low"])  # the bootstrap needs no alignment


def test_per_step_below_the_minimum_layers_is_not_reported():
    df = planted(layers=4, steps=3, within=0.1)
    ps = fit_per_step(df, n_boot=100)
    assert ps["pearson_r"].isna().all() and ps["p_perm"].isna().all()
    assert ps["note"].str.contains("n = 4 < 5").all()
    ps5 = fit_per_step(planted(layers=5, steps=3, within=0.1), n_boot=100)
    assert ps5["pearson_r"].notna().all() and (ps5["n_perm"] == 120).all()
    # per step, one point per layer: the permutation p is the exact test of r over layers
    one = planted(layers=5, steps=3, within=0.1)
    one = one[one["step"] == 100]
    null = [r_of(one["delta_d"], one["delta_m"].to_numpy()[list(p)])
            for p in itertools.permutations(range(5))]
    r0 = r_of(one["delta_d"], one["delta_m"])
    tail = min(np.mean(np.array(null) >= r0 - 1e-12), np.mean(np.array(null) <= r0 + 1e-12))
    assert ps5.iloc[0]["p_perm"] == pytest.approx(min(1, 2 * tail))


def test_fits_reject_negative_resample_counts():
    with pytest.raises(ValueError, match=">= 0"):
        fit_groups(planted(4, 2, 0.1), n_boot=-5)


def test_no_resamples_means_no_ci_but_the_fit():
    f = fit_groups(planted(6, 3, 0.1), n_boot=0, n_perm=0).iloc[0]
    assert np.isfinite(f["pearson_r"]) and np.isnan(f["r_ci_low"]) and np.isnan(f["p_perm"])
    assert f["p_naive"] == pytest.approx(stats.pearsonr(planted(6, 3, 0.1)["delta_d"],
                                                        planted(6, 3, 0.1)["delta_m"]).pvalue)
