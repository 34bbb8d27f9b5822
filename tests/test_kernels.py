"""The fused CPU kernels (wda/analysis/kernels.py) against torch's own dtype conversions and float64."""

import math

import pytest
import torch

from wda.analysis import kernels
from wda.analysis.decompose import BaseWeight, vector_changes

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_pattern_decodes_like_torch(dtype):
    """All 65536 bit patterns, one per row: |x| from the kernel's own decoding (float64
    output) equals torch's conversion exactly, NaN and Inf included."""
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(-1, 1)
    out = torch.empty(x.shape[0], dtype=torch.float64)
    kernels.row_norms(x, out)
    ref = x.double().abs().reshape(-1)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.equal(out[ok], ref[ok])


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("u_dtype,v_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32),
    (torch.float64, torch.float64), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
    (torch.float16, torch.float64)])
def test_row_dots_match_float64(u_dtype, v_dtype, out_dtype):
    g = torch.Generator().manual_seed(1)
    u = (torch.randn(37, 1000, generator=g, dtype=torch.float64) * 0.02).to(u_dtype)
    v = (u.double() + 1e-3 * torch.randn(37, 1000, generator=g, dtype=torch.float64) * 0.02).to(v_dtype)
    ud, dd2 = torch.empty(37, dtype=out_dtype), torch.empty(37, dtype=out_dtype)
    kernels.row_dots(u, [v], ud[None], dd2[None])
    # the reference converts each stored value to float64 the way torch does
    u64, d64 = u.double(), v.double() - u.double()
    if out_dtype == torch.float32:  # the kernel differences in float32: δ is then rounded
        d64 = (v.to(torch.float32) - u.to(torch.float32)).double()
    ref_ud, ref_dd = (u64 * d64).sum(1), (d64 * d64).sum(1)
    scale = (u64.abs() * d64.abs()).sum(1)  # the size of the terms of u·δ
    tol = 1e-6 if out_dtype == torch.float32 else 1e-13
    assert ((ud.double() - ref_ud).abs() <= tol * scale).all()
    assert ((dd2.double() - ref_dd).abs() <= tol * ref_dd).all()
    n0 = torch.empty(37, dtype=out_dtype)
    kernels.row_norms(u, n0)
    assert torch.allclose(n0.double(), u64.norm(dim=1), rtol=tol, atol=0)
    wide = torch.empty(u.shape, dtype=out_dtype)
    kernels.widen(u, wide)
    assert torch.equal(wide, u.to(out_dtype))


@pytest.mark.parametrize("rows", [999, 1000])  # odd: the column kernel's last, unpaired row
@pytest.mark.parametrize("u_dtype,v_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                             (torch.float32, torch.float32)])
def test_col_dots_match_float64(rows, u_dtype, v_dtype):
    """Vectors stored as columns (axis "in", Conv1D): the column kernels against float64."""
    g = torch.Generator().manual_seed(7)
    u = (torch.randn(rows, 37, generator=g, dtype=torch.float64) * 0.02).to(u_dtype)
    v = (u.double() + 1e-3 * torch.randn(rows, 37, generator=g, dtype=torch.float64) * 0.02).to(v_dtype)
    ud, dd2 = torch.empty(1, 37), torch.empty(1, 37)
    kernels.col_dots(u, [v], ud, dd2)
    u64, d64 = u.double(), (v.float() - u.float()).double()  # δ rounded to float32, as in the kernel
    ref_ud, ref_dd = (u64 * d64).sum(0), (d64 * d64).sum(0)
    scale = (u64.abs() * d64.abs()).sum(0)
    assert ((ud[0].double() - ref_ud).abs() <= 1e-6 * scale).all()
    assert torch.allclose(dd2[0].double(), ref_dd, rtol=1e-6, atol=0)
    n0 = torch.empty(37)
    kernels.col_norms(u, n0)
    assert torch.allclose(n0.double(), u64.norm(dim=0), rtol=1e-6, atol=0)


def test_result_does_not_depend_on_the_number_of_threads():
    g = torch.Generator().manual_seed(2)
    u = torch.randn(512, 512, generator=g).bfloat16()
    v = (u.float() + 0.01 * torch.randn(512, 512, generator=g)).bfloat16()
    before = torch.get_num_threads()
    for dots in (kernels.row_dots, kernels.col_dots):
        results = []
        try:
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                ud, dd2 = torch.empty(512), torch.empty(512)
                dots(u, [v], ud[None], dd2[None])
                results.append((ud, dd2))
        finally:
            torch.set_num_threads(before)
        for ud, dd2 in results[1:]:
            assert torch.equal(ud, results[0][0]) and torch.equal(dd2, results[0][1])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_reach_the_sums(bad):
    """fastmath is limited to reassociation: a NaN/Inf in a row must not be optimised away
    (the caller's finiteness check is what names the broken file)."""
    u = torch.ones(4, 300, dtype=torch.bfloat16)
    v = u.clone()
    v[2, 17] = bad
    ud, dd2 = torch.empty(4), torch.empty(4)
    kernels.row_dots(u, [v], ud[None], dd2[None])
    assert not math.isfinite(dd2[2].item())
    assert torch.isfinite(dd2[[0, 1, 3]]).all() and torch.isfinite(ud[[0, 1, 3]]).all()
    ud, dd2 = torch.empty(300), torch.empty(300)
    kernels.col_dots(u, [v], ud[None], dd2[None])
    assert not math.isfinite(dd2[17].item()) and torch.isfinite(dd2[:17]).all()


def test_strided_rows_and_what_is_not_supported():
    w = torch.randn(64, 200)
    cols = w[:, 10:150]  # rows contiguous, stride between rows 200
    ud, dd2 = torch.empty(64), torch.empty(64)
    kernels.row_dots(cols, [cols * 1.5], ud[None], dd2[None])
    c64 = cols.double()
    assert torch.allclose(ud.double(), (c64 * 0.5 * c64).sum(1), rtol=1e-6)
    assert kernels.supports(cols) and not kernels.supports(w.t())  # columns: torch path
    assert not kernels.supports(w.to(torch.float8_e4m3fn))


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("theta", [1e-5, 1e-2, 1.0])
def test_kernel_and_torch_paths_agree_with_float64(dtype, theta, axis, monkeypatch):
    """BaseWeight with and without the kernels (row kernels for axis "out", column kernels
    for "in"): both within float32 reach of the float64 reference, on an analytic rotation of
    every vector (ΔD = 1 - cos θ) plus a rescaling."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(96, 160, generator=g, dtype=torch.float64).to(dtype).double()
    other = torch.randn(96, 160, generator=g, dtype=torch.float64)
    other -= (other * w0).sum(1, keepdim=True) / (w0 * w0).sum(1, keepdim=True) * w0  # ⊥ w0
    other *= w0.norm(dim=1, keepdim=True) / other.norm(dim=1, keepdim=True)
    scale = torch.linspace(0.9, 1.1, 96, dtype=torch.float64).unsqueeze(1)
    wt = (scale * (math.cos(theta) * w0 + math.sin(theta) * other)).float()  # a float32 checkpoint
    w0, wt = (w0, wt) if axis == "out" else (w0.t().contiguous(), wt.t().contiguous())  # vectors: columns
    ref = vector_changes(w0, wt.double(), axis=axis, dtype=torch.float64)
    out = {}
    for path in ("kernels", "torch"):
        monkeypatch.setenv("WDA_NO_KERNELS", "1" if path == "torch" else "0")
        base = BaseWeight(w0.to(dtype), axis=axis, dtype=torch.float32)
        assert (base._rows, base._cols) == (path == "kernels" and axis == "out", path == "kernels" and axis == "in")
        out[path] = base.changes(wt)
    # Δm = (2 u·δ + |δ|²) / (|u| + |v|) from float32 sums of n terms: its rounding is about
    # sqrt(n)·eps·|u| where δ is as large as u (θ = 1), whatever the order of the sums (it
    # differs with the vector width of the CPU)
    n = w0.shape[1] if axis == "out" else w0.shape[0]
    atol = 2 * math.sqrt(n) * torch.finfo(torch.float32).eps * ref.m0.max().item()
    for ch in out.values():
        assert torch.allclose(ch.dm.double(), ref.dm, rtol=1e-5, atol=atol)
        assert torch.allclose(ch.dd.double(), ref.dd, rtol=1e-4, atol=0)


def test_several_checkpoints_in_one_pass_equal_one_at_a_time(monkeypatch):
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(300, 256, generator=g).bfloat16()
    wts = [(w0.float() + 0.01 * (k + 1) * torch.randn(300, 256, generator=g)).bfloat16() for k in range(3)]
    ud, dd2 = torch.empty(3, 300), torch.empty(3, 300)
    kernels.row_dots(w0, wts, ud, dd2)
    for k, wt in enumerate(wts):
        one, two = torch.empty(1, 300), torch.empty(1, 300)
        kernels.row_dots(w0, [wt], one, two)
        assert torch.equal(one[0], ud[k]) and torch.equal(two[0], dd2[k])
    base = BaseWeight(w0)
    together = base.measure_many(wts)
    assert together == [base.measure(wt) for wt in wts]
    monkeypatch.setenv("WDA_NO_KERNELS", "1")
    slow = BaseWeight(w0).measure_many(wts)
    for a, b in zip(together, slow):
        assert math.isclose(a.delta_m, b.delta_m, rel_tol=1e-5) and math.isclose(a.delta_d, b.delta_d, rel_tol=1e-4)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.row_dots(w0, [wts[0], wts[1].float()], ud[:2], dd2[:2])


def test_lowrank_sums_match_float64():
    """u·δ and |δ|² of δ_k = s_k·B_k·A_k from the factors of two adapters of different ranks
    in one call, against float64; the cancellation flag is raised exactly on rows whose |δ|²
    is a near-cancelling sum of its Gram terms."""
    g = torch.Generator().manual_seed(5)
    rows, n = 300, 200
    av = torch.randn(6, n, generator=g, dtype=torch.float64)
    av[5] = av[4] + 1e-5 * torch.randn(n, generator=g, dtype=torch.float64)  # nearly dependent
    bv = 0.1 * torch.randn(rows, 6, generator=g, dtype=torch.float64)
    bv[40:, 5] = 0.0  # rows 40..: nearly orthogonal rows of A, no cancellation
    bv[:40] = 0.0
    bv[:40, 4], bv[:40, 5] = 1.0, -1.0  # rows 0..39: A_4 - A_5 cancels to ~1e-5 of its terms
    av2 = torch.randn(3, n, generator=g, dtype=torch.float64)  # a second adapter, rank 3
    bv2 = torch.randn(rows, 3, generator=g, dtype=torch.float64)
    u = torch.randn(rows, n, generator=g, dtype=torch.float64)
    a, b = torch.cat([av, av2]), torch.cat([bv, bv2], 1)
    p = u @ a.t()
    ud, dd2 = torch.empty(2, rows), torch.empty(2, rows)
    ok = torch.empty(2, rows, dtype=torch.bool)
    kernels.lowrank_sums(b.float(), p.float(), a.float(), [0, 6, 9], [0.7, -1.5], 1e-2, ud, dd2, ok)
    assert not ok[0, :40].any() and ok[0, 40:].all() and ok[1].all()
    for k, (s, bk, ak, pk) in enumerate([(0.7, bv, av, p[:, :6]), (-1.5, bv2, av2, p[:, 6:])]):
        delta = s * bk @ ak
        ref_ud, ref_dd2 = (u * delta).sum(1), (delta * delta).sum(1)
        terms = abs(s) * (bk.abs() * pk.abs()).sum(1)
        assert ((ud[k].double() - ref_ud).abs() <= 1e-6 * terms).all()
        keep = ok[k]
        assert torch.allclose(dd2[k].double()[keep], ref_dd2[keep], rtol=1e-5, atol=0)
    # adapters of one rank (B's columns taken as a (K, vectors, r) view, not padded), three of them
    avs = [torch.randn(3, n, generator=g, dtype=torch.float64) for _ in range(3)]
    bvs = [torch.randn(rows, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    a, b = torch.cat(avs), torch.cat(bvs, 1)
    p = u @ a.t()
    ud, dd2 = torch.empty(3, rows), torch.empty(3, rows)
    ok = torch.empty(3, rows, dtype=torch.bool)
    kernels.lowrank_sums(b.float(), p.float(), a.float(), [0, 3, 6, 9], [0.5, 2.0, -1.0], 1e-2, ud, dd2, ok)
    for k, s in enumerate([0.5, 2.0, -1.0]):
        delta = s * bvs[k] @ avs[k]
        terms = abs(s) * (bvs[k].abs() * p[:, 3 * k:3 * k + 3].abs()).sum(1)
        assert ((ud[k].double() - (u * delta).sum(1)).abs() <= 1e-6 * terms).all()
        assert ok[k].all() and torch.allclose(dd2[k].double(), (delta * delta).sum(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_closed_form_matches_the_torch_form_and_float64(dtype):
    """The per-vector closed form (dm, dd from u·δ, |δ|², |u|) against BaseWeight's torch
    form, and both against the residual form in float64, on rows of every kind."""
    gen = torch.Generator().manual_seed(6)
    w0 = torch.randn(200, 64, generator=gen, dtype=torch.float64)
    w0[7] = 0.0  # zero base row: not closed
    wt = w0 + 0.03 * torch.randn(w0.shape, generator=gen, dtype=torch.float64)
    wt[1] = 1.5 * w0[1]  # along u: not closed
    perp = torch.randn(64, generator=gen, dtype=torch.float64)
    perp -= (perp @ w0[2]) / (w0[2] @ w0[2]) * w0[2]
    wt[2] = -0.2 * w0[2] + 2 * w0[2].norm() / perp.norm() * perp  # q < 0, yet δ not along u
    wt[3] = w0[3]  # unchanged
    d = wt - w0
    ud, dd2 = (w0 * d).sum(1).to(dtype), (d * d).sum(1).to(dtype)
    base = BaseWeight(w0.to(dtype), dtype=dtype)
    dm, dd = torch.empty_like(ud), torch.empty_like(ud)
    closed = torch.empty(200, dtype=torch.bool)
    ok = torch.ones(200, dtype=torch.bool)
    ok[10] = False
    assert kernels.closed_form(ud, dd2, base.n0, ok, 0.5, dm, dd, closed)
    finite, tdm, tdd, tclosed = base._closed_form(ud, dd2, ok)
    assert finite and torch.equal(closed, tclosed)
    assert not closed[[1, 7, 10]].any() and closed[[0, 2, 3]].all()
    ref = vector_changes(w0, wt, dtype=torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for got in ((dm, dd), (tdm, tdd)):
        assert torch.allclose(got[0].double()[closed], ref.dm[closed], rtol=tol, atol=1e-12)
        assert torch.allclose(got[1].double()[closed], ref.dd[closed], rtol=tol, atol=1e-12)
    for bad in (math.nan, math.inf):
        worse = dd2.clone()
        worse[150] = bad
        assert not kernels.closed_form(ud, worse, base.n0, None, 0.5, dm, dd, closed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_closed_sums_equal_closed_form_then_vector_sums(dtype):
    """``closed_sums`` (the per-checkpoint tail in one call) against ``closed_form`` followed
    by ``vector_sums`` over the closed vectors, for several checkpoints at once: the same nine
    sums, the vectors it leaves out counted (zero base row, δ along u, ``ok`` False), and a
    NaN or Inf flagged on its own checkpoint only."""
    gen = torch.Generator().manual_seed(8)
    w0 = torch.randn(120, 48, generator=gen, dtype=torch.float64)
    w0[5] = 0.0
    base = BaseWeight(w0.to(dtype), dtype=dtype)
    uds, dd2s, oks = [], [], []
    for k in range(3):
        wt = w0 + 0.02 * (k + 1) * torch.randn(w0.shape, generator=gen, dtype=torch.float64)
        wt[9 + k] = 1.3 * w0[9 + k]  # along u
        d = wt - w0
        uds.append((w0 * d).sum(1).to(dtype))
        dd2s.append((d * d).sum(1).to(dtype))
        ok = torch.ones(120, dtype=torch.bool)
        ok[20 + k] = False
        oks.append(ok)
    ud, dd2, ok = torch.stack(uds), torch.stack(dd2s), torch.stack(oks)
    got = kernels.closed_sums(ud, dd2, base.n0, ok, 0.5)
    for k in range(3):
        dm, dd = torch.empty_like(ud[k]), torch.empty_like(ud[k])
        closed = torch.empty(120, dtype=torch.bool)
        assert kernels.closed_form(ud[k], dd2[k], base.n0, ok[k], 0.5, dm, dd, closed)
        want = kernels.vector_sums(base.n0, dm, dd, closed)
        assert got[k, 9] == 120 - int(closed.sum()) == 3 and got[k, 10] == 0
        assert got[k, :9].tolist() == pytest.approx(want, rel=1e-12, abs=0)
    got = kernels.closed_sums(ud, dd2, base.n0, None, 0.5)  # without ok: only 2 left out each
    assert got[:, 9].tolist() == [2, 2, 2]
    worse = dd2.clone()
    worse[1, 40] = math.nan
    assert kernels.closed_sums(ud, worse, base.n0, None, 0.5)[:, 10].tolist() == [0, 1, 0]


def test_closed_sums_with_a_magnitude_equal_the_per_vector_dora_path():
    """DoRA's tail from the sums (magnitude given) against the same checkpoint through
    ``changes_lowrank`` and ``summarize``: negative and zero magnitudes included; a NaN
    magnitude is flagged."""
    from wda.analysis.decompose import summarize

    gen = torch.Generator().manual_seed(9)
    w0 = torch.randn(64, 40, generator=gen)
    a, b = torch.randn(4, 40, generator=gen), 0.1 * torch.randn(64, 4, generator=gen)
    m = torch.linalg.vector_norm(w0, dim=1) * (1 + 0.05 * torch.randn(64, generator=gen))
    m[3], m[8] = -m[3], 0.0
    base = BaseWeight(w0)
    fast = base.measure_lowrank(a, b, 0.5, m)
    slow = summarize(base.changes_lowrank(a, b, 0.5, m))
    assert fast.n_excluded == slow.n_excluded == 1
    for f in ("delta_m", "delta_d", "m0_mean", "s_mean", "align_mean", "align_abs_mean",
              "delta_m_radial", "delta_m_tangential"):
        assert getattr(fast, f) == pytest.approx(getattr(slow, f), rel=1e-12, abs=1e-15), f
    bv, av = base._factors(a, b)
    ud, dd2, ok = (t[0] for t in base._lowrank_sums(bv, av, [0, av.shape[0]], [0.5], base._project(av)))
    bad = m.clone()
    bad[5] = math.nan
    assert kernels.closed_sums(ud[None], dd2[None], base.n0, ok[None], 0.5, bad[None])[0, 10] == 1
