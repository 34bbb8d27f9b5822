"""Closed forms of Eqs. 2-4 on non-square weights, against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from wda.analysis.decompose import NonFiniteWeights, magnitude, measure, vector_changes

OUT, IN = 37, 53  # non-square: an axis mix-up changes the number of vectors


def naive64(w0: torch.Tensor, wt: torch.Tensor, dim: int) -> tuple[float, float]:
    """Eqs. 3-4 written plainly in float64 (accurate when changes are not tiny)."""
    a, b = w0.double(), wt.double()
    m0, mt = a.norm(dim=dim), b.norm(dim=dim)
    cos = (a * b).sum(dim=dim) / (m0 * mt)
    return float((mt - m0).abs().mean()), float((1 - cos).mean())


def rotate_rows(w: torch.Tensor, theta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rotate each row u by theta_i in the plane of u and a random direction ⟂ u: |v| = |u|."""
    r = torch.randn(w.shape, generator=gen, dtype=w.dtype)
    u_hat = w / w.norm(dim=1, keepdim=True)
    r = r - (r * u_hat).sum(1, keepdim=True) * u_hat
    r_hat = r / r.norm(dim=1, keepdim=True)
    n = w.norm(dim=1, keepdim=True)
    return torch.cos(theta)[:, None] * w + torch.sin(theta)[:, None] * n * r_hat


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_scaling_rows_changes_magnitude_only(gen):
    w0 = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    c = 0.5 + torch.rand(OUT, generator=gen, dtype=torch.float64)  # per-row factors in [0.5, 1.5)
    wt = w0 * c[:, None]
    for dtype in (torch.float32, torch.float64):
        m = measure(w0.float() if dtype == torch.float32 else w0, wt.float() if dtype == torch.float32 else wt,
                    axis="out", dtype=dtype)
        planted = float(((c - 1).abs() * w0.norm(dim=1)).mean())
        assert m.delta_m == pytest.approx(planted, rel=1e-5)
        assert abs(m.delta_d) < 1e-12
        assert m.n_vectors == OUT and m.n_excluded == 0


@pytest.mark.parametrize("theta", [1e-1, 1e-3, 1e-4, 1e-5])
def test_rotating_rows_changes_direction_only_float64(gen, theta):
    w0 = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    th = torch.full((OUT,), theta, dtype=torch.float64)
    wt = rotate_rows(w0, th, gen)
    m = measure(w0, wt, axis="out", dtype=torch.float64)
    assert m.delta_d == pytest.approx(1 - math.cos(theta), rel=1e-6)
    assert m.delta_m < 1e-12 * float(w0.norm(dim=1).mean())


@pytest.mark.parametrize("theta", [1e-2, 1e-4, 1e-5])
def test_float32_matches_float64_at_tiny_angles(gen, theta):
    """Stored float32, computed float32: the stable form matches float64 on the same inputs,
    where a float32 ``1 - cos`` is wrong by orders of magnitude."""
    w0 = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    th = theta * (0.5 + torch.rand(OUT, generator=gen, dtype=torch.float64))
    w0f, wtf = w0.float(), rotate_rows(w0, th, gen).float()
    got = measure(w0f, wtf, axis="out", dtype=torch.float32)
    ref = measure(w0f, wtf, axis="out", dtype=torch.float64)  # same stored values, float64 math
    assert got.delta_d == pytest.approx(ref.delta_d, rel=1e-4)
    assert got.delta_m == pytest.approx(ref.delta_m, rel=1e-3, abs=1e-9)
    # and the analytic value, up to the rounding of the float32 storage itself
    assert ref.delta_d == pytest.approx(float((1 - torch.cos(th)).mean()), rel=2e-2)
    # the naive float32 formula fails here: the test discriminates
    naive = float((1 - torch.nn.functional.cosine_similarity(w0f, wtf, dim=1)).mean())
    if theta <= 1e-4:
        assert abs(naive - ref.delta_d) > 0.1 * ref.delta_d


def test_axis_in_is_axis_out_of_the_transpose(gen):
    w0 = torch.randn(OUT, IN, generator=gen)
    wt = w0 + 0.1 * torch.randn(OUT, IN, generator=gen)
    a = measure(w0, wt, axis="in")
    b = measure(w0.t().contiguous(), wt.t().contiguous(), axis="out")
    assert a.n_vectors == IN and b.n_vectors == IN
    assert a.delta_m == pytest.approx(b.delta_m, rel=1e-6)
    assert a.delta_d == pytest.approx(b.delta_d, rel=1e-6)
    for axis, dim in (("out", 1), ("in", 0)):
        dm, dd = naive64(w0, wt, dim)
        m = measure(w0, wt, axis=axis)
        assert m.delta_m == pytest.approx(dm, rel=1e-5)
        assert m.delta_d == pytest.approx(dd, rel=1e-5)
    assert magnitude(w0, "out").shape == (OUT,) and magnitude(w0, "in").shape == (IN,)


def test_bf16_inputs_are_measured_in_float32(gen):
    w0 = torch.randn(OUT, IN, generator=gen).bfloat16()
    wt = (w0.float() * 1.1 + 0.05 * torch.randn(OUT, IN, generator=gen)).bfloat16()
    m = measure(w0, wt, axis="out")
    dm, dd = naive64(w0, wt, 1)  # float64 on the bf16 values themselves
    assert m.delta_m == pytest.approx(dm, rel=1e-4)
    assert m.delta_d == pytest.approx(dd, rel=1e-4)


def test_zero_norm_rows_are_excluded_and_counted(gen):
    w0 = torch.randn(OUT, IN, generator=gen)
    wt = w0 + 0.1 * torch.randn(OUT, IN, generator=gen)
    w0[3] = 0.0  # zero in the base
    wt[7] = 0.0  # zero in the checkpoint
    m = measure(w0, wt)
    keep = torch.ones(OUT, dtype=torch.bool)
    keep[[3, 7]] = False
    dm, dd = naive64(w0[keep], wt[keep], 1)
    assert m.n_excluded == 2 and m.n_vectors == OUT
    assert math.isfinite(m.delta_d) and math.isfinite(m.delta_m)
    assert m.delta_m == pytest.approx(dm, rel=1e-5)
    assert m.delta_d == pytest.approx(dd, rel=1e-5)


def test_opposite_rows_give_delta_d_two_and_range(gen):
    w0 = torch.randn(OUT, IN, generator=gen)
    ch = vector_changes(w0, -2 * w0)
    assert torch.allclose(ch.dd, torch.full((OUT,), 2.0))
    assert torch.allclose(ch.dm, w0.norm(dim=1), rtol=1e-5)


def test_non_finite_weights_raise(gen):
    w0 = torch.randn(OUT, IN, generator=gen)
    wt = w0.clone()
    wt[2, 5] = float("nan")
    with pytest.raises(NonFiniteWeights):
        measure(w0, wt)
    wt[2, 5] = float("inf")
    with pytest.raises(NonFiniteWeights):
        measure(w0, wt)


def test_shape_mismatch_is_an_error(gen):
    with pytest.raises(ValueError, match="shape"):
        measure(torch.zeros(3, 4), torch.zeros(4, 3))
