"""wda.report.fit: least-squares line, Pearson / Spearman, bootstrap CI, undefined groups."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wda.report.fit import FIT_COLUMNS, bootstrap_r_ci, fit_groups, fit_per_step, fit_xy, ordered_runs


def table(x, y, run="r", method="FT", matrix="q_proj", step=None, layer=None) -> pd.DataFrame:
    """Points of one group; by default every point is its own layer at one step
    (independent points)."""
    n = len(x)
    return pd.DataFrame({
        "run": run, "method": method, "matrix": matrix,
        "step": np.zeros(n, int) if step is None else step,
        "layer": np.arange(n) if layer is None else layer,
        "delta_d": np.asarray(x, float), "delta_m": np.asarray(y, float),
    })


def pearson_f64(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx @ dy) / np.sqrt((dx @ dx) * (dy @ dy)))


def test_recovers_planted_line_within_stderr():
    rng = np.random.default_rng(1)
    # ΔD at its real scale (1e-6 ... 1e-3) so that tiny x values are exercised too.
    x = rng.uniform(1e-6, 1e-3, 200)
    slope, intercept = -12.0, 0.02
    y = slope * x + intercept + rng.normal(0, 1e-3, x.size)
    fit = fit_groups(table(x, y), n_boot=0).iloc[0]
    assert fit["n"] == 200
    assert abs(fit["slope"] - slope) < 3 * fit["slope_stderr_naive"]
    assert abs(fit["intercept"] - intercept) < 3 * fit["intercept_stderr_naive"]
    # and the stderr is small enough for this to mean something
    assert fit["slope_stderr_naive"] < abs(slope) / 5


def test_r_matches_float64_closed_form_and_sign():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1e-4, 50).astype(np.float32)
    y = (-3.0 * x + rng.normal(0, 1e-4, 50)).astype(np.float32)
    fit = fit_groups(table(x, y), n_boot=0).iloc[0]
    expected = pearson_f64(x, y)
    assert expected < 0
    assert fit["pearson_r"] == pytest.approx(expected, abs=1e-12)
    assert fit["r_squared"] == pytest.approx(expected**2, abs=1e-12)
    # Spearman without ties: 1 - 6 Σd² / (n (n² - 1)) on the ranks
    d = np.argsort(np.argsort(x)) - np.argsort(np.argsort(y))
    rho = 1 - 6 * (d**2).sum() / (50 * (50**2 - 1))
    assert fit["spearman_rho"] == pytest.approx(rho, abs=1e-12)


def test_perfect_anticorrelation_gives_minus_one():
    x = np.linspace(1e-6, 1e-5, 10)
    fit = fit_groups(table(x, 5.0 - 2e3 * x), n_boot=500).iloc[0]
    assert fit["pearson_r"] == pytest.approx(-1.0, abs=1e-12)
    assert fit["spearman_rho"] == pytest.approx(-1.0, abs=1e-12)
    assert fit["slope"] == pytest.approx(-2e3, rel=1e-9)
    assert fit["r_ci_low"] == pytest.approx(-1.0) and fit["r_ci_high"] == pytest.approx(-1.0)


@pytest.mark.parametrize("x, y, note", [
    ([1.0, 2.0], [3.0, 1.0], "n < 3"),
    ([2e-6] * 5, [1.0, 2.0, 3.0, 4.0, 5.0], "ΔD constant"),
    ([1.0, 2.0, 3.0, 4.0], [0.1] * 4, "ΔM constant"),
    ([1.0] * 3, [7.0] * 3, "ΔD and ΔM constant"),
    ([0.0] * 4, [0.0] * 4, "unchanged from base"),
    ([1.0, 2.0, np.nan, np.inf], [1.0, 3.0, 2.0, 0.0], "n < 3"),  # non-finite points dropped
])
def test_undefined_groups_are_nan_with_a_note_and_no_warning(x, y, note):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy must not spill Constant/NearConstant warnings
        fit = fit_groups(table(x, y)).iloc[0]
    assert fit["note"] == note
    for col in ("slope", "intercept", "pearson_r", "p_perm", "p_naive", "spearman_rho",
                "r_ci_low", "r_ci_high", "r_squared"):
        assert np.isnan(fit[col]), col
    assert fit["n"] == np.isfinite(np.asarray(x) + np.asarray(y)).sum()


def test_constant_up_to_rounding_counts_as_constant():
    # The mean of equal float64 values may differ from them by an ulp; r would be noise.
    x = np.full(6, 0.1) + np.array([0, 1, 0, 1, 0, 0]) * np.spacing(0.1)
    assert fit_xy(x, np.arange(6.0))["note"] == "ΔD constant"


def test_bootstrap_ci_contains_true_r_and_is_deterministic():
    rng = np.random.default_rng(3)
    rho = 0.6
    xy = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=400)
    x, y = 1e-5 * xy[:, 0], xy[:, 1]
    low, high = bootstrap_r_ci(x, y, n_boot=2000, seed=7)
    assert low < rho < high
    assert low < pearson_f64(x, y) < high
    assert high - low < 0.3  # about 4 standard errors at n = 400
    assert bootstrap_r_ci(x, y, n_boot=2000, seed=7) == (low, high)
    assert bootstrap_r_ci(x, y, n_boot=2000, seed=8) != (low, high)
    # a wider level gives a wider interval
    low99, high99 = bootstrap_r_ci(x, y, n_boot=2000, seed=7, ci=0.99)
    assert low99 < low and high < high99


def test_bootstrap_skips_constant_resamples_even_with_rounding():
    # Three copies of 0.1 average to 0.1 + 1.4e-17, so a resample of point 0 alone has
    # "spread" of pure rounding, and would score r = +1 on anti-correlated data.
    x, y = np.array([0.1, 0.3, 0.5]), np.array([0.2, 0.1, 0.0])
    assert pearson_f64(x, y) == pytest.approx(-1.0, abs=1e-12)
    low, high = bootstrap_r_ci(x, y, n_boot=2000, seed=0)
    assert low == pytest.approx(-1.0) and high == pytest.approx(-1.0)


def test_bootstrap_ci_of_a_group_does_not_depend_on_other_groups():
    rng = np.random.default_rng(4)
    a = table(rng.random(30), rng.random(30), run="a")
    b = table(rng.random(10), rng.random(10), run="b")
    alone = fit_groups(a, n_boot=300).iloc[0]
    together = fit_groups(pd.concat([b, a]), n_boot=300).set_index("run").loc["a"]
    assert (alone["r_ci_low"], alone["r_ci_high"]) == (together["r_ci_low"], together["r_ci_high"])


def test_rows_sorted_by_method_then_keys_and_columns_present():
    rng = np.random.default_rng(5)
    parts = [table(rng.random(5), rng.random(5), run=r, method=m, matrix=k)
             for r, m in [("zeta", "custom"), ("dora", "DoRA"), ("ft", "FT"), ("lora", "LoRA")]
             for k in ("v_proj", "q_proj")]
    fits = fit_groups(pd.concat(parts), n_boot=0)
    assert list(fits["method"]) == ["FT", "FT", "LoRA", "LoRA", "DoRA", "DoRA", "custom", "custom"]
    assert list(fits["matrix"][:2]) == ["q_proj", "v_proj"]
    assert list(fits.columns) == ["run", "method", "matrix", *FIT_COLUMNS]
    assert ordered_runs(pd.concat(parts)) == ["ft", "lora", "dora", "zeta"]
    # names in natural order within a method: r8 before r64
    ranks = pd.concat([table([1, 2, 3], [3, 1, 2], run=f"lora-r{r}", method="LoRA")
                       for r in (64, 8, 16)])
    assert list(fit_groups(ranks, n_boot=0)["run"]) == ["lora-r8", "lora-r16", "lora-r64"]


def test_per_step_correlation_can_differ_in_sign_from_pooled():
    # Simpson's paradox: within each step ΔM falls with ΔD across layers, but both grow
    # with the step, so the pooled correlation is positive.
    layers, steps = np.arange(6), np.array([100, 200, 300])
    L, S = np.meshgrid(layers, steps)
    x = (S / 100 + 0.1 * L).ravel() * 1e-5
    y = (S / 100 - 0.1 * L).ravel()
    df = table(x, y, step=S.ravel(), layer=L.ravel())
    pooled = fit_groups(df, n_boot=0).iloc[0]
    per_step = fit_per_step(df, n_boot=0)
    assert pooled["pearson_r"] > 0.9
    assert list(per_step["step"]) == [100, 200, 300]
    assert (per_step["n"] == len(layers)).all()
    np.testing.assert_allclose(per_step["pearson_r"], -1.0, atol=1e-12)


def test_missing_column_is_a_clear_error():
    with pytest.raises(ValueError, match="delta_m"):
        fit_groups(table([1, 2, 3], [1, 2, 3]).drop(columns="delta_m"))


def test_empty_table_gives_empty_fits_with_columns():
    fits = fit_groups(table([], []))
    assert fits.empty and "pearson_r" in fits.columns


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(1e-8, 1e4), shift=st.floats(-100, 100), seed=st.integers(0, 1000))
def test_r_invariant_to_rescaling_x_and_flips_sign_with_it(scale, shift, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.random(12), rng.random(12)
    base = fit_xy(x, y, n_boot=0)
    # shift in units of the spread: a huge offset on a tiny spread is ill-conditioned data
    scaled = fit_xy(scale * (x + shift), y, n_boot=0)
    flipped = fit_xy(-scale * x, y, n_boot=0)
    assert scaled["pearson_r"] == pytest.approx(base["pearson_r"], abs=1e-6)
    assert flipped["pearson_r"] == pytest.approx(-base["pearson_r"], abs=1e-6)
    # a slope is not a correlation: it scales with 1 / scale
    assert scaled["slope"] == pytest.approx(base["slope"] / scale, rel=1e-6)
