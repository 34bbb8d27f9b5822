"""The per-module diagnostics (update size, alignment, ΔM's radial and tangential parts):
their identities, planted cases with a known answer, and every measuring path against the
float64 definitions of ``builders.diagnostics_reference``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import diagnostics_reference, plain_reference
from wda.analysis import kernels
from wda.analysis.decompose import MEASUREMENT_FIELDS, BaseWeight, summarize, vector_changes

OUT, IN, R = 29, 41, 3
DIAG = ("s_mean", "align_mean", "align_abs_mean", "delta_m_radial", "delta_m_tangential")


@pytest.fixture(params=["kernels", "torch"])
def path(request, monkeypatch):
    if request.param == "kernels" and not kernels.available():
        pytest.skip("numba is not installed")
    monkeypatch.setenv("WDA_NO_KERNELS", "0" if request.param == "kernels" else "1")
    return request.param


def _check(meas, w0, wt, rel=2e-5, abs_=2e-6):
    """``meas`` against the float64 definitions on the (out, in) weights w0, wt."""
    ref = diagnostics_reference(w0, wt)
    for k in DIAG:
        assert getattr(meas, k) == pytest.approx(ref[k], rel=rel, abs=abs_), k
    dm, dd, _ = plain_reference(w0, wt)
    assert meas.delta_m == pytest.approx(dm, rel=rel)
    assert meas.delta_m_radial + meas.delta_m_tangential == pytest.approx(meas.delta_m, rel=1e-12)
    n0, nt = w0.double().norm(dim=1), wt.double().norm(dim=1)
    assert meas.delta_m_rel == pytest.approx(dm / float(n0[(n0 > 0) & (nt > 0)].mean()), rel=rel)


@given(st.integers(0, 2**31 - 1), st.floats(1e-3, 2.0), st.floats(-0.9, 0.9))
@settings(max_examples=60, deadline=None)
def test_identities_of_size_and_alignment(seed, s, a):
    """Per vector: ||v||/||u|| = sqrt(1 + 2as + s²) and 1 - cos(v, u) = 1 - (1+as)/sqrt(...),
    and a vector built with size s and alignment a is measured as such."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, IN, generator=g, dtype=torch.float64) * 3.0
    w = torch.randn(1, IN, generator=g, dtype=torch.float64)
    uh = u / u.norm()
    perp = w - (w * uh).sum() * uh
    perp = perp / perp.norm()
    delta = s * u.norm() * (a * uh + math.sqrt(1 - a * a) * perp)  # |δ| = s|u|, cos(δ, u) = a
    v = u + delta
    rho = math.sqrt(1 + 2 * a * s + s * s)
    assert float(v.norm() / u.norm()) == pytest.approx(rho, rel=1e-12)
    cos = float((u * v).sum() / (u.norm() * v.norm()))
    assert 1 - cos == pytest.approx(1 - (1 + a * s) / rho, rel=1e-9, abs=1e-15)
    m = summarize(vector_changes(u, v, dtype=torch.float64))
    assert m.s_mean == pytest.approx(s, rel=1e-9)
    assert m.align_mean == pytest.approx(a, rel=1e-9, abs=1e-12)
    assert m.delta_m_radial + m.delta_m_tangential == pytest.approx(m.delta_m, rel=1e-12)


def test_planted_rescaling_and_orthogonal_update():
    """A pure rescaling is all radial (alignment ±1, ΔD = 0); an update orthogonal to u is all
    tangential (alignment 0, u·δ = 0), its ΔM exactly ||v|| - ||u||."""
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    c = torch.linspace(-0.5, 0.5, OUT, dtype=torch.float64).unsqueeze(1)
    c[c.abs() < 1e-9] = 0.25
    m = BaseWeight(w0, dtype=torch.float64).measure(w0 * (1 + c))
    assert m.delta_d == pytest.approx(0.0, abs=1e-15)
    assert m.s_mean == pytest.approx(float(c.abs().mean()), rel=1e-12)
    assert m.align_abs_mean == pytest.approx(1.0, rel=1e-12)
    assert m.align_mean == pytest.approx(float(torch.sign(c).mean()), rel=1e-12, abs=1e-12)
    assert m.delta_m_radial == pytest.approx(m.delta_m, rel=1e-12)
    assert m.delta_m_tangential == pytest.approx(0.0, abs=1e-12)

    w = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    uh = w0 / w0.norm(dim=1, keepdim=True)
    perp = w - (w * uh).sum(1, keepdim=True) * uh  # δ ⟂ u, row by row
    m = BaseWeight(w0, dtype=torch.float64).measure(w0 + 0.1 * perp)
    assert m.align_abs_mean == pytest.approx(0.0, abs=1e-12)
    assert m.delta_m_radial == pytest.approx(0.0, abs=1e-12)
    assert m.delta_m_tangential == pytest.approx(m.delta_m, rel=1e-10)
    ref = ((w0 + 0.1 * perp).norm(dim=1) - w0.norm(dim=1)).mean()
    assert m.delta_m == pytest.approx(float(ref), rel=1e-10)


def test_unchanged_and_zero_vectors():
    """An unchanged vector counts with size 0 and alignment 0; zero-norm vectors are left
    out of every mean, as of ΔM and ΔD."""
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(OUT, IN, generator=g)
    wt = w0 + 0.05 * torch.randn(OUT, IN, generator=g)
    wt[3] = w0[3]
    w0[5] = 0.0
    wt[7] = 0.0
    m = BaseWeight(w0).measure(wt)
    assert m.n_excluded == 2
    _check(m, w0, wt)
    nan = summarize(vector_changes(torch.zeros(2, 3), torch.zeros(2, 3)))
    assert all(math.isnan(getattr(nan, k)) for k in DIAG)


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_full_weights_every_path(path, axis, stored):
    """Row kernels, column kernels and the torch form, stored in float32 or bf16."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(OUT, IN, generator=g).to(stored)
    wts = [(w0.float() + sc * torch.randn(OUT, IN, generator=g)).to(stored) for sc in (0.01, 0.3)]
    wts[1][2] = -1.7 * w0[2]  # a sign flip: the residual form's rows
    base = BaseWeight(w0, axis=axis)
    t = (lambda x: x.t()) if axis == "in" else (lambda x: x)
    for wt, meas in zip(wts, base.measure_many(wts)):
        _check(meas, t(w0.float()), t(wt.float()))


def test_transposed_storage(path):
    """GPT-2's Conv1D (in, out) storage: W_0 and W_t handed over as transposed views."""
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(IN, OUT, generator=g)
    wt = w0 + 0.05 * torch.randn(IN, OUT, generator=g)
    _check(BaseWeight(w0.t()).measure(wt.t()), w0.t(), wt.t())


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("dora", [False, True])
def test_adapters_from_factors(path, axis, dora):
    """LoRA (Eq. 1) and DoRA (Eq. 5) measured from the factors, against the merged matrix
    written out in float64 here."""
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(OUT, IN, generator=g)
    a, b = 0.3 * torch.randn(R, IN, generator=g), 0.3 * torch.randn(OUT, R, generator=g)
    s = 2.0
    v = w0.double() + s * (b.double() @ a.double())
    mag = None
    if dora:
        mag = w0.norm(dim=1) * (1 + 0.2 * torch.randn(OUT, generator=g))
        mag[4] = -mag[4]  # a negative magnitude flips the row
        v = mag.double().unsqueeze(1) * v / v.norm(dim=1, keepdim=True)
    meas = BaseWeight(w0, axis=axis).measure_lowrank(a, b, s, mag)
    t = (lambda x: x.t()) if axis == "in" else (lambda x: x)
    _check(meas, t(w0.double()), t(v))


@pytest.mark.parametrize("axis", ["out", "in"])
def test_magnitude_only(path, axis):
    """DoRA with a magnitude only (paper Table 6): all radial on the output axis."""
    g = torch.Generator().manual_seed(6)
    w0 = torch.randn(OUT, IN, generator=g)
    mag = w0.norm(dim=1) * (1 + 0.1 * torch.randn(OUT, generator=g))
    v = mag.double().unsqueeze(1) * w0.double() / w0.double().norm(dim=1, keepdim=True)
    meas = BaseWeight(w0, axis=axis).measure_rescaled(mag)
    t = (lambda x: x.t()) if axis == "in" else (lambda x: x)
    _check(meas, t(w0.double()), t(v))
    if axis == "out":
        assert meas.delta_m_tangential == pytest.approx(0.0, abs=1e-7)


def test_fields_are_the_metrics_columns():
    from wda.analysis.engine import METRIC_COLUMNS

    assert all(f in METRIC_COLUMNS for f in MEASUREMENT_FIELDS)
    assert set(DIAG) <= set(MEASUREMENT_FIELDS)
