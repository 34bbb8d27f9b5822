"""``wda.report.attribution``: the closed forms, the effective layer of a point, and the two exact
splits of r on planted inputs with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wda.report.attribution import (FACTORS, attribute, direction_change, drivers, effective_factors,
                             relative_magnitude_change, shapley_r)
from wda.analysis.decompose import BaseWeight

IN = 24


def planted_vectors(s: float, a: float, rows: int, norm: float, seed: int):
    """(W_0, W_t) of ``rows`` vectors of norm ``norm``, each moved by δ with ‖δ‖ = s‖u‖ and
    cos(δ, u) = a exactly (float64)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, IN, generator=g, dtype=torch.float64)
    u = norm * u / u.norm(dim=1, keepdim=True)
    w = torch.randn(rows, IN, generator=g, dtype=torch.float64)
    uh = u / norm
    perp = w - (w * uh).sum(1, keepdim=True) * uh
    perp = perp / perp.norm(dim=1, keepdim=True)
    return u, u + s * norm * (a * uh + math.sqrt(1 - a * a) * perp)


@given(st.floats(1e-4, 3.0), st.floats(-1.0, 1.0), st.integers(0, 1000))
@settings(max_examples=80, deadline=None)
def test_closed_forms_match_vectors(s, a, seed):
    u, v = planted_vectors(s, a, 1, 2.5, seed)
    cos = float((u * v).sum() / (u.norm() * v.norm()))
    assert float(direction_change(s, a)) == pytest.approx(1 - cos, rel=1e-8, abs=1e-15)
    assert float(relative_magnitude_change(s, a)) == pytest.approx(
        abs(float(v.norm() / u.norm()) - 1), rel=1e-9, abs=1e-15)


@given(st.floats(1e-3, 2.0), st.floats(-1.0, 1.0), st.floats(0.1, 10.0))
@settings(max_examples=80, deadline=None)
def test_effective_layer_round_trip(s, a, m0):
    """The effective (s, a) of a point reproduces it exactly, and is the planted (s, a) when
    the vectors grow (2as + s² > 0)."""
    d, m = direction_change(s, a), m0 * relative_magnitude_change(s, a)
    se, ae = effective_factors(np.array([d]), np.array([m]), np.array([m0]))
    assert float(direction_change(se, ae)[0]) == pytest.approx(float(d), rel=1e-7, abs=1e-14)
    assert float(m0 * relative_magnitude_change(se, ae)[0]) == pytest.approx(float(m), rel=1e-7, abs=1e-14)
    if 2 * a * s + s * s > 1e-6:
        assert float(se[0]) == pytest.approx(s, rel=1e-6)
        assert float(ae[0]) == pytest.approx(a, abs=1e-6)


def _points(s, a, m0):
    s, a, m0 = (np.broadcast_to(np.asarray(x, float), np.broadcast(s, a, m0).shape) for x in (s, a, m0))
    return direction_change(s, a), m0 * relative_magnitude_change(s, a), s, a, m0


def test_one_varying_factor_takes_all_of_r():
    """Only the update size varies: all of r is size's, the others get exactly 0. Only the
    alignment varies at a fixed size: all of r is alignment's, and it is negative (the
    paper's mechanism: a radial update buys magnitude at the expense of direction)."""
    s = np.linspace(0.01, 0.2, 9)
    d, m, *_ = _points(s, 0.3, 1.7)
    phi = shapley_r(s, np.full(9, 0.3), np.full(9, 1.7))
    r = np.corrcoef(d, m)[0, 1]
    assert phi["size"] == pytest.approx(r, rel=1e-12) and r > 0.9
    assert phi["alignment"] == 0.0 and phi["base_norm"] == 0.0

    a = np.linspace(0.05, 0.95, 9)
    d, m, *_ = _points(0.05, a, 1.7)
    phi = shapley_r(np.full(9, 0.05), a, np.full(9, 1.7))
    r = np.corrcoef(d, m)[0, 1]
    assert phi["alignment"] == pytest.approx(r, rel=1e-12) and r < -0.9
    assert phi["size"] == 0.0 and phi["base_norm"] == 0.0


@given(st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_parts_sum_to_r(seed):
    """Efficiency: the three factor parts sum to r for any mixture of the factors."""
    rng = np.random.default_rng(seed)
    s, a, m0 = rng.uniform(0.01, 0.5, 12), rng.uniform(-0.2, 1.0, 12), rng.uniform(0.5, 3, 12)
    d, m, *_ = _points(s, a, m0)
    phi = shapley_r(s, a, m0)
    assert sum(phi.values()) == pytest.approx(np.corrcoef(d, m)[0, 1], abs=1e-10)


def _table(layers):
    """metrics rows of planted layers measured by the analysis' own code, one row per
    (layer, step): each layer's vectors share one (s, a), its base norm is given."""
    rows = []
    for i, (s, a, norm) in enumerate(layers):
        w0, wt = planted_vectors(s, a, 16, norm, seed=i)
        meas = BaseWeight(w0.float()).measure(wt.float())
        rows.append({"run": "r", "method": "FT", "matrix": "q", "layer": i, "step": 1,
                     "delta_m": meas.delta_m, "delta_d": meas.delta_d, "m0_mean": meas.m0_mean,
                     "delta_m_radial": meas.delta_m_radial,
                     "delta_m_tangential": meas.delta_m_tangential})
    return pd.DataFrame(rows)


def test_measured_points_recover_the_planted_factors():
    """Through BaseWeight: the effective layer of each point is the planted (s, a), and with
    only the size varying the whole r goes to size."""
    layers = [(s, 0.4, 2.0) for s in (0.02, 0.05, 0.1, 0.15, 0.3)]
    t = _table(layers)
    se, ae = effective_factors(t.delta_d, t.delta_m, t.m0_mean)
    np.testing.assert_allclose(se, [x[0] for x in layers], rtol=1e-5)
    np.testing.assert_allclose(ae, 0.4, atol=1e-5)
    row = attribute(t)
    assert row["r_size"] == pytest.approx(row["pearson_r"], rel=1e-4)
    assert abs(row["r_alignment"]) < 1e-4 and abs(row["r_base_norm"]) < 1e-4
    assert row["r_radial"] + row["r_tangential"] == pytest.approx(row["pearson_r"], abs=1e-12)


def test_orthogonal_updates_are_all_tangential():
    """δ ⟂ u in every layer: ΔM is all tangential, so is r."""
    t = _table([(s, 0.0, 1.0 + s) for s in (0.05, 0.1, 0.2, 0.4)])
    row = attribute(t)
    assert row["r_radial"] == pytest.approx(0.0, abs=1e-5)
    assert row["r_tangential"] == pytest.approx(row["pearson_r"], abs=1e-5)
    assert sum(row[f"r_{k}"] for k in FACTORS) == pytest.approx(row["pearson_r"], abs=1e-9)


def test_undefined_groups_and_per_step():
    t = pd.concat([_table([(0.1, 0.2, 1.0)])] * 4)  # identical points
    assert attribute(t)["note"] == "ΔD and ΔM constant"
    assert math.isnan(attribute(t)["r_size"])
    t = pd.concat([_table([(0.05 * (k + 1) * (i + 1), 0.3, 1.0) for i in range(4)]).assign(step=k)
                   for k in (1, 2)])
    per = drivers(t, by=("run", "method", "matrix", "step"))
    assert list(per.step) == [1, 2] and (per.n == 4).all()
    assert np.allclose(per[[f"r_{k}" for k in FACTORS]].sum(1), per.pearson_r, atol=1e-9)


def test_report_writes_the_attribution(pristine, tmp_path, capsys):
    """drivers.csv: the r of fits.csv, each split summing to it; report.md explains it; the
    drivers figure is drawn per matrix kind."""
    from wda.report.cli import main

    out = tmp_path / "rep"
    assert main([str(pristine), "--out", str(out), "--no-progress", "--bootstrap", "0"]) == 0
    capsys.readouterr()
    why, fits = pd.read_csv(out / "drivers.csv"), pd.read_csv(out / "fits.csv")
    merged = why.merge(fits, on=["run", "method", "matrix"], suffixes=("", "_fit"))
    assert len(merged) == len(fits) == 6
    np.testing.assert_allclose(merged.pearson_r, merged.pearson_r_fit, rtol=1e-9)
    np.testing.assert_allclose(why[[f"r_{k}" for k in FACTORS]].sum(1), why.pearson_r, atol=1e-9)
    np.testing.assert_allclose(why.r_radial + why.r_tangential, why.pearson_r, atol=1e-9)
    per = pd.read_csv(out / "drivers_per_step.csv")
    assert set(per.step) == {10, 20}
    text = (out / "report.md").read_text()
    assert "## What drives the correlation" in text and "drivers_q_proj.png" in text
    assert (out / "drivers_q_proj.png").stat().st_size > 0
