"""Property-based tests (hypothesis) of the metric math in wda.analysis.decompose (paper Eqs. 2-4).

Every expectation is a closed form or an invariance, computed here in float64 from the
construction of the inputs, never from a run of the code under test. Matrices are
non-square by default (a square one hides axis bugs) and may hold zero rows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from builders import plain_reference
from wda.analysis.decompose import BaseWeight, NonFiniteWeights, measure, vector_changes

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)

# Entries are 0 or of magnitude in [1e-3, 1e3]: zero rows occur, subnormals (whose squares
# underflow and make every norm formula meaningless) do not.
entries = st.one_of(st.just(0.0), st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3))


@st.composite
def pair(draw, min_side: int = 1, max_side: int = 7):
    """(W_0, W_t) of one random shape, float64, W_t = W_0 + a random change."""
    out_f = draw(st.integers(min_side, max_side))
    in_f = draw(st.integers(min_side, max_side))
    w0 = draw(arrays(np.float64, (out_f, in_f), elements=entries))
    delta = draw(arrays(np.float64, (out_f, in_f), elements=entries))
    scale = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 10.0]))
    return torch.from_numpy(w0), torch.from_numpy(w0 + scale * delta)


def approx(x: float, rel: float = 1e-9, abs_: float = 1e-12):
    return pytest.approx(x, rel=rel, abs=abs_)


@SETTINGS
@given(pair(), st.randoms(use_true_random=False), st.sampled_from(["out", "in"]))
def test_invariant_to_the_order_of_vectors(wp, rnd, axis):
    """Permuting the vectors (rows for axis out, columns for axis in) of both weights alike
    changes nothing: ΔM and ΔD are means over vectors."""
    w0, wt = wp
    dim = 0 if axis == "out" else 1  # the dim that indexes vectors
    perm = list(range(w0.shape[dim]))
    rnd.shuffle(perm)
    idx = torch.tensor(perm)
    a = measure(w0, wt, axis=axis, dtype=torch.float64)
    b = measure(w0.index_select(dim, idx), wt.index_select(dim, idx), axis=axis, dtype=torch.float64)
    assert (b.n_vectors, b.n_excluded) == (a.n_vectors, a.n_excluded)
    if math.isnan(a.delta_m):
        assert math.isnan(b.delta_m) and a.n_excluded == a.n_vectors
    else:
        assert b.delta_m == approx(a.delta_m) and b.delta_d == approx(a.delta_d)


@SETTINGS
@given(pair(), st.sampled_from([torch.float32, torch.float64]))
def test_ranges_delta_d_in_0_2_delta_m_nonnegative(wp, dtype):
    w0, wt = wp
    ch = vector_changes(w0, wt, dtype=dtype)
    assert ((ch.dd >= 0) & (ch.dd <= 2)).all()
    n0, nt = w0.norm(dim=1), wt.norm(dim=1)
    assert torch.equal(ch.valid, (n0 > 0) & (nt > 0))  # exactly the zero-norm vectors are left out
    m = measure(w0, wt, dtype=dtype)
    assert m.n_vectors == w0.shape[0] and m.n_excluded == int((~ch.valid).sum())
    if m.n_excluded < m.n_vectors:
        assert 0.0 <= m.delta_d <= 2.0 and m.delta_m >= 0.0
        assert math.isfinite(m.delta_d) and math.isfinite(m.delta_m)


@SETTINGS
@given(pair(), arrays(np.float64, 7, elements=st.floats(0.05, 20.0)))
def test_scaling_vectors_changes_magnitude_only(wp, factors):
    """W_t^n = c_n W_0^n with c_n > 0: ΔD = 0, ΔM = mean_n |c_n - 1| ||W_0^n|| (valid rows)."""
    w0, _ = wp
    c = torch.from_numpy(factors[: w0.shape[0]])
    wt = w0 * c[:, None]
    norms = torch.linalg.vector_norm(w0, dim=1)
    valid = norms > 0
    assume(valid.any())
    want_dm = float(((c - 1).abs() * norms)[valid].mean())
    m = measure(w0, wt, dtype=torch.float64)
    assert m.n_excluded == int((~valid).sum())
    assert m.delta_d == approx(0.0, abs_=1e-14)
    assert m.delta_m == approx(want_dm, rel=1e-12)
    # float32 compute against float64 on the same float32 inputs: rounding W_t to float32 moves
    # ||W_t|| by ~6e-8 relative, i.e. ΔM by 6e-8·c/|c - 1| (1.5e-5 at c = 0.996) before any
    # arithmetic, so the reference is the float32 inputs measured in float64.
    w32, t32 = w0.float(), wt.float()
    m32, ref = measure(w32, t32), measure(w32.double(), t32.double(), dtype=torch.float64)
    assert m32.delta_d == approx(0.0, abs_=1e-6) and m32.delta_m == approx(ref.delta_m, rel=1e-5)


@SETTINGS
@given(pair(), arrays(np.float64, 7, elements=st.floats(0.05, 20.0)))
def test_flipping_vectors_gives_delta_d_two(wp, factors):
    """W_t^n = -c_n W_0^n: opposite directions, 1 - cos = 2; ΔM = mean |c_n - 1| ||W_0^n||."""
    w0, _ = wp
    c = torch.from_numpy(factors[: w0.shape[0]])
    valid = torch.linalg.vector_norm(w0, dim=1) > 0
    assume(valid.any())
    m = measure(w0, -w0 * c[:, None], dtype=torch.float64)
    assert m.delta_d == approx(2.0, rel=1e-12)
    want_dm = float(((c - 1).abs() * torch.linalg.vector_norm(w0, dim=1))[valid].mean())
    assert m.delta_m == approx(want_dm, rel=1e-12)


@SETTINGS
@given(pair(min_side=2), arrays(np.float64, 7, elements=st.floats(0.0, math.pi)), st.integers(0, 2**31))
def test_rotating_vectors_changes_direction_only(wp, angles, seed):
    """Each vector turned by θ_n in a plane containing it, its norm kept:
    ΔM = 0 and ΔD = mean_n (1 - cos θ_n)."""
    w0, _ = wp
    gen = torch.Generator().manual_seed(seed)
    theta = torch.from_numpy(angles[: w0.shape[0]])
    norms = torch.linalg.vector_norm(w0, dim=1, keepdim=True)
    valid = norms[:, 0] > 0
    assume(valid.any())
    u = w0 / torch.where(norms > 0, norms, 1)  # unit rows
    r = torch.randn(w0.shape, generator=gen, dtype=torch.float64)
    v = r - (r * u).sum(1, keepdim=True) * u  # orthogonal to u (Gram-Schmidt)
    v_norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    assume(bool((v_norm[valid] > 1e-3).all()))
    v = v / v_norm
    wt = norms * (torch.cos(theta)[:, None] * u + torch.sin(theta)[:, None] * v)
    m = measure(w0, wt, dtype=torch.float64)
    assert m.delta_m == approx(0.0, abs_=1e-9 * float(norms.max()))
    assert m.delta_d == approx(float((1 - torch.cos(theta))[valid].mean()), rel=1e-9, abs_=1e-13)


@SETTINGS
@given(pair())
def test_axis_in_is_axis_out_of_the_transpose(wp):
    w0, wt = wp
    a = measure(w0, wt, axis="in", dtype=torch.float64)
    b = measure(w0.t().contiguous(), wt.t().contiguous(), axis="out", dtype=torch.float64)
    assert (a.n_vectors, a.n_excluded) == (b.n_vectors, b.n_excluded) == (w0.shape[1], a.n_excluded)
    if not math.isnan(b.delta_m):
        assert a.delta_m == approx(b.delta_m) and a.delta_d == approx(b.delta_d)


@SETTINGS
@given(pair(), st.integers(1, 4))
def test_zero_vectors_are_excluded_not_averaged_in(wp, k):
    """Adding k zero rows to both weights changes neither mean; they are counted."""
    w0, wt = wp
    zeros = torch.zeros(k, w0.shape[1], dtype=w0.dtype)
    a = measure(w0, wt, dtype=torch.float64)
    b = measure(torch.cat([w0, zeros]), torch.cat([wt, zeros]), dtype=torch.float64)
    assert b.n_vectors == a.n_vectors + k and b.n_excluded == a.n_excluded + k
    if not math.isnan(a.delta_m):
        assert b.delta_m == approx(a.delta_m) and b.delta_d == approx(a.delta_d)


@SETTINGS
@given(pair(), st.floats(1e-2, 1e2))
def test_common_scale_leaves_delta_d_and_scales_delta_m(wp, a):
    w0, wt = wp
    m = measure(w0, wt, dtype=torch.float64)
    s = measure(a * w0, a * wt, dtype=torch.float64)
    if not math.isnan(m.delta_m):
        assert s.delta_d == approx(m.delta_d, rel=1e-9, abs_=1e-14)
        assert s.delta_m == approx(a * m.delta_m, rel=1e-9, abs_=1e-12 * a)


@SETTINGS
@given(pair())
def test_float32_agrees_with_float64(wp):
    """The stable forms keep float32 close to float64 for any change, large or tiny."""
    w0, wt = wp
    m64 = measure(w0, wt, dtype=torch.float64)
    m32 = measure(w0.float(), wt.float(), dtype=torch.float32)
    if math.isnan(m64.delta_m):
        return
    assume(m32.n_excluded == m64.n_excluded)  # a float32 cast can flush nothing here; be explicit
    scale = float(torch.linalg.vector_norm(w0, dim=1).max())
    assert m32.delta_m == approx(m64.delta_m, rel=1e-4, abs_=1e-6 * scale)
    assert m32.delta_d == approx(m64.delta_d, rel=1e-3, abs_=1e-6)


@SETTINGS
@given(pair(), st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.booleans(),
       st.integers(0, 10_000))
def test_non_finite_values_raise_never_vanish(wp, bad, in_base, pos):
    """A NaN/Inf anywhere is an error: never silently excluded like a zero vector."""
    w0, wt = (t.clone() for t in wp)
    target = w0 if in_base else wt
    target.view(-1)[pos % target.numel()] = bad
    with pytest.raises(NonFiniteWeights):
        measure(w0, wt)


@st.composite
def adapter(draw):
    """(W_0, A, B, s, magnitude or None): a LoRA or DoRA update of a random base."""
    out_f, in_f, r = draw(st.integers(1, 7)), draw(st.integers(1, 7)), draw(st.integers(1, 3))
    w0 = torch.from_numpy(draw(arrays(np.float64, (out_f, in_f), elements=entries)))
    a = torch.from_numpy(draw(arrays(np.float64, (r, in_f), elements=st.floats(-1, 1))))
    b = torch.from_numpy(draw(arrays(np.float64, (out_f, r), elements=st.floats(-1, 1))))
    s = draw(st.sampled_from([0.5, 2.0]))
    mag = None
    if draw(st.booleans()):
        mag = torch.from_numpy(draw(arrays(np.float64, out_f, elements=st.one_of(
            st.just(0.0), st.floats(1e-2, 1e2), st.floats(-1e2, -1e-2)))))
    return w0, a, b, s, mag


def _merged(w0, a, b, s, mag):
    v = w0 + s * (b @ a)  # Eq. 1
    if mag is None:
        return v
    norm = v.norm(dim=1, keepdim=True)  # Eq. 5: norm per output row of the (out, in) weight
    return mag[:, None] * v / torch.where(norm > 0, norm, 1.0)


@SETTINGS
@given(adapter())
def test_adapters_measured_from_factors_match_the_merged_weight(ad):
    """LoRA (Eq. 1) and DoRA (Eq. 5) measured from A, B, m equal the plain Eqs. 3-4 on the
    merged matrix, and keep ΔD in [0, 2], ΔM >= 0."""
    w0, a, b, s, mag = ad
    merged = _merged(w0, a, b, s, mag)
    assume(bool(((merged.norm(dim=1) > 1e-6) | (merged.norm(dim=1) == 0)).all()))
    dm, dd, excluded = plain_reference(w0, merged)
    m = BaseWeight(w0, dtype=torch.float64).measure_lowrank(a, b, s, mag)
    assert m.n_excluded == excluded
    if excluded == w0.shape[0]:
        return
    assert 0.0 <= m.delta_d <= 2.0 and m.delta_m >= 0.0
    assert m.delta_m == approx(dm, rel=1e-7, abs_=1e-9) and m.delta_d == approx(dd, rel=1e-7, abs_=1e-9)


@SETTINGS
@given(adapter(), st.sampled_from([float("nan"), float("inf")]), st.integers(0, 100),
       st.sampled_from(["a", "b", "m"]))
def test_non_finite_adapter_factors_raise(ad, bad, pos, which):
    """A NaN/Inf in lora_A, lora_B or the DoRA magnitude is an error, not a NaN row."""
    w0, a, b, s, mag = ad
    if which == "m" and mag is None:
        mag = torch.ones(w0.shape[0], dtype=torch.float64)
    t = {"a": a, "b": b, "m": mag}[which].clone()
    t.view(-1)[pos % t.numel()] = bad
    a, b, mag = (t if which == "a" else a), (t if which == "b" else b), (t if which == "m" else mag)
    assume(bool(torch.isfinite(s * (b @ a)).all()) == (which == "m"))  # NaN·0 may vanish in B·A
    with pytest.raises(NonFiniteWeights):
        BaseWeight(w0, dtype=torch.float64).measure_lowrank(a, b, s, mag)
