"""``BaseWeight``: the one-pass (blocked) and low-rank forms of Eqs. 3-4 against the residual
form of ``vector_changes`` in float64, on non-square weights and on the rows that need care."""

from __future__ import annotations

import pytest
import torch

from wda.analysis import kernels
from wda.analysis.decompose import BaseWeight, NonFiniteWeights, summarize, vector_changes
from wda.train.dora import merge_dora, merge_lora

OUT, IN, R = 37, 53, 4


@pytest.fixture(autouse=True, params=["kernels", "torch"])
def path(request, monkeypatch):
    """Every test here runs twice: on the fused CPU kernels and on the torch form (GPUs,
    strided rows, WDA_NO_KERNELS=1)."""
    if request.param == "kernels" and not kernels.available():
        pytest.skip("numba is not installed")
    monkeypatch.setenv("WDA_NO_KERNELS", "0" if request.param == "kernels" else "1")
    return request.param


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def ref64(w0: torch.Tensor, wt: torch.Tensor, axis: str = "out"):
    return summarize(vector_changes(w0.double(), wt.double(), axis=axis, dtype=torch.float64))


def close(got, ref, rel=1e-5):
    assert got.n_vectors == ref.n_vectors and got.n_excluded == ref.n_excluded
    assert got.delta_m == pytest.approx(ref.delta_m, rel=rel, abs=1e-12)
    assert got.delta_d == pytest.approx(ref.delta_d, rel=rel, abs=1e-12)
    assert got.m0_mean == pytest.approx(ref.m0_mean, rel=1e-6)


def awkward_rows(w0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A checkpoint mixing ordinary rows with the ones the closed form must hand over."""
    wt = w0 + 0.05 * torch.randn(w0.shape, generator=gen, dtype=w0.dtype)
    wt[1] = 1.5 * w0[1]  # pure rescaling: δ along u
    wt[2] = -2.0 * w0[2]  # sign flip: q < 0, ΔD = 2
    wt[3] = 0.0  # zero in the checkpoint
    wt[4] = w0[4]  # unchanged
    wt[5] = w0[5] * (1 + 1e-3) + 1e-4 * torch.randn(w0.shape[1], generator=gen, dtype=w0.dtype)
    return wt


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("block", [1, 3, 8, None])
def test_blocked_matches_residual_form(gen, axis, block):
    w0 = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    w0[6] = 0.0  # zero in the base
    wt = awkward_rows(w0, gen)
    got = BaseWeight(w0.float(), axis=axis, block_rows=block).measure(wt.float())
    close(got, ref64(w0.float(), wt.float(), axis))
    got64 = BaseWeight(w0, axis=axis, dtype=torch.float64, block_rows=block).measure(wt)
    close(got64, ref64(w0, wt, axis), rel=1e-12)


def test_per_vector_values_and_bf16_storage(gen):
    w0 = torch.randn(OUT, IN, generator=gen).bfloat16()
    wt = awkward_rows(w0.float(), gen).bfloat16()
    base = BaseWeight(w0, block_rows=5)
    assert base.vecs.dtype == torch.bfloat16  # kept as stored: float32 holds bf16 exactly
    ch, ref = base.changes(wt), vector_changes(w0.double(), wt.double(), dtype=torch.float64)
    assert torch.equal(ch.valid, ref.valid)
    assert torch.allclose(ch.dm.double(), ref.dm, rtol=1e-5, atol=1e-7)
    assert torch.allclose(ch.dd.double(), ref.dd, rtol=1e-4, atol=1e-9)


def test_transposed_and_strided_checkpoints(gen):
    """Conv1D weights arrive as (in, out) transposed views: no copy needed by the caller."""
    w0 = torch.randn(IN, OUT, generator=gen)  # stored (in, out)
    wt = w0 + 0.1 * torch.randn(IN, OUT, generator=gen)
    for axis in ("out", "in"):
        got = BaseWeight(w0.t(), axis=axis, block_rows=4).measure(wt.t())
        close(got, ref64(w0.t(), wt.t(), axis))


def test_tiny_angles_float32(gen):
    w0 = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    r = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    r -= (r * w0).sum(1, keepdim=True) / (w0 * w0).sum(1, keepdim=True) * w0
    r *= w0.norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True)
    for theta in (1e-2, 1e-4):
        wt = (torch.cos(torch.tensor(theta)) * w0 + torch.sin(torch.tensor(theta)) * r).float()
        got = BaseWeight(w0.float(), block_rows=7).measure(wt)
        ref = ref64(w0.float(), wt)
        assert got.delta_d == pytest.approx(ref.delta_d, rel=1e-4)
        assert got.delta_m == pytest.approx(ref.delta_m, rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_lowrank_lora_matches_dense_float64(gen, axis):
    w0 = torch.randn(OUT, IN, generator=gen)
    a, b = torch.randn(R, IN, generator=gen), 0.1 * torch.randn(OUT, R, generator=gen)
    b[3] = 0.0  # an untouched row
    got = BaseWeight(w0, axis=axis, block_rows=8).measure_lowrank(a, b, 0.5)
    ref = ref64(w0, merge_lora(w0.double(), a.double(), b.double(), 0.5), axis)
    close(got, ref)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_lowrank_dora_matches_merged_float64(gen, axis):
    w0 = torch.randn(OUT, IN, generator=gen)
    w0[6] = 0.0
    a, b = torch.randn(R, IN, generator=gen), 0.1 * torch.randn(OUT, R, generator=gen)
    m = w0.norm(dim=1) * (1 + 0.05 * torch.randn(OUT, generator=gen))
    m[2] = -m[2]  # a negative magnitude flips the row
    m[4] = 0.0  # a zero magnitude zeroes it
    got = BaseWeight(w0, axis=axis).measure_lowrank(a, b, 2.0, m)
    merged = merge_dora(w0.double(), a.double(), b.double(), 2.0, m.double())
    close(got, ref64(w0, merged, axis))


def test_lowrank_rows_along_u_and_dependent_factors(gen):
    """Updates along W_0's own rows (δ ∥ u) and nearly dependent rows of A take the dense path."""
    w0 = torch.randn(OUT, IN, generator=gen)
    a = torch.cat([w0[:2], 1.00001 * (w0[:1] + 1e-4 * torch.randn(1, IN, generator=gen))])  # (3, in)
    b = 0.01 * torch.randn(OUT, 3, generator=gen)
    b[0] = torch.tensor([0.3, 0.0, 0.0])  # row 0: δ = 0.3 s u_0, a pure rescaling
    b[1] = torch.tensor([0.0, -0.2, 0.0])  # row 1: δ along u_1
    # rows 5..34: A_0 - A_2 cancels to ~1e-4 of its terms; the Gram form |δ|² = B (A Aᵀ) Bᵀ
    # is then rounding noise (here 15-30x too large), the guard sends them to the dense form
    b[5:35] = torch.stack([torch.ones(30), 1e-5 * torch.randn(30, generator=gen), -torch.ones(30)], 1) \
        * (0.5 + torch.rand(30, 1, generator=gen))
    base = BaseWeight(w0)
    got = base.changes_lowrank(a, b, 1.0)
    ref = vector_changes(w0.double(), merge_lora(w0.double(), a.double(), b.double(), 1.0), dtype=torch.float64)
    assert float(got.dd[0]) < 1e-12 and abs(float(got.dd[1])) < 1e-12
    rest = torch.ones(OUT, dtype=torch.bool)
    rest[5:35] = False
    assert torch.allclose(got.dm.double()[rest], ref.dm[rest], rtol=1e-5, atol=1e-8)
    assert torch.allclose(got.dd.double()[rest], ref.dd[rest], rtol=1e-4, atol=1e-12)
    # any float32 evaluation of B·A loses ~3 digits on the cancelling rows, not more
    assert torch.allclose(got.dm.double()[5:35], ref.dm[5:35], rtol=2e-2)
    assert torch.allclose(got.dd.double()[5:35], ref.dd[5:35], rtol=2e-2)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_magnitude_only_dora(gen, axis):
    w0 = torch.randn(OUT, IN, generator=gen)
    w0[6] = 0.0
    m = w0.norm(dim=1) * (1 + 0.05 * torch.randn(OUT, generator=gen))
    m[2] = -m[2]
    n = w0.double().norm(dim=1, keepdim=True)
    merged = torch.where(n > 0, w0.double() * m.double().unsqueeze(1) / torch.where(n > 0, n, 1.0), 0.0)
    close(BaseWeight(w0, axis=axis).measure_rescaled(m), ref64(w0, merged, axis))


def test_non_finite_inputs_raise(gen):
    w0 = torch.randn(OUT, IN, generator=gen)
    base = BaseWeight(w0, block_rows=4)
    wt = w0.clone()
    wt[9, 3] = float("nan")
    with pytest.raises(NonFiniteWeights):
        base.measure(wt)
    a, b = torch.randn(R, IN, generator=gen), torch.randn(OUT, R, generator=gen)
    b[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeights):
        base.measure_lowrank(a, b, 1.0)
    b[0, 0] = 0.0
    m = w0.norm(dim=1)
    m[3] = float("nan")
    for axis in ("out", "in"):
        with pytest.raises(NonFiniteWeights):
            BaseWeight(w0, axis=axis).measure_lowrank(a, b, 1.0, m)
        with pytest.raises(NonFiniteWeights):
            BaseWeight(w0, axis=axis).measure_rescaled(m)
    w0[1, 1] = float("inf")
    with pytest.raises(NonFiniteWeights, match="base"):
        BaseWeight(w0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(gen):
    w0 = torch.randn(OUT, IN, generator=gen).bfloat16()
    wt = awkward_rows(w0.float(), gen).bfloat16()
    a, b = torch.randn(R, IN, generator=gen), 0.1 * torch.randn(OUT, R, generator=gen)
    m = w0.float().norm(dim=1)
    cpu, gpu = BaseWeight(w0), BaseWeight(w0.cuda())
    close(gpu.measure(wt.cuda()), cpu.measure(wt), rel=1e-5)
    close(gpu.measure_lowrank(a.cuda(), b.cuda(), 2.0, m.cuda()), cpu.measure_lowrank(a, b, 2.0, m), rel=1e-5)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_projecting_several_adapters_at_once(gen, axis):
    """One pass over W_0 for adapters of different ranks gives each its own numbers."""
    w0 = torch.randn(OUT, IN, generator=gen).bfloat16()
    base = BaseWeight(w0, axis=axis, block_rows=5)
    adapters = [(torch.randn(r, IN, generator=gen), 0.1 * torch.randn(OUT, r, generator=gen)) for r in (2, 4, 7)]
    projected = base.project(adapters)
    assert [p.shape for p in projected] == [(base.vecs.shape[0], r) for r in (2, 4, 7)]
    for (a, b), p in zip(adapters, projected):
        close(base.measure_lowrank(a, b, 0.5, projected=p), base.measure_lowrank(a, b, 0.5), rel=1e-6)
        close(base.measure_lowrank(a, b, 0.5, projected=p), ref64(w0.float(), merge_lora(w0.double(), a.double(), b.double(), 0.5), axis))


@pytest.mark.parametrize("axis", ["out", "in"])
def test_many_adapters_at_once_equal_each_alone_and_float64(gen, axis):
    """``measure_lowrank_many``: LoRA and DoRA adapters of different ranks and scalings in one
    call (one GEMM, one kernel call for the sums, one for the means) give each adapter the
    numbers it gets alone, and the float64 merge's; rows the closed form does not take (δ
    along u) go to the dense form for their adapter only."""
    w0 = torch.randn(OUT, IN, generator=gen).bfloat16()
    adapters = []
    for k, r in enumerate((2, 4, 7, 4)):
        a, b = torch.randn(r, IN, generator=gen), 0.1 * torch.randn(OUT, r, generator=gen)
        m = None
        if k % 2:  # DoRA: a magnitude per output row (axis "in": merged densely)
            m = w0.float().norm(dim=1) * (1 + 0.05 * torch.randn(OUT, generator=gen))
            m[2] = -m[2]
        adapters.append((a, b, 0.5 * (k + 1), m))
    adapters[2][1][0] = 0.0
    adapters[2][0][0] = w0[1].float()  # adapter 2, row 1: δ has a part along u_1
    adapters[2][1][1] = torch.tensor([3.0, 0, 0, 0, 0, 0, 0])
    base = BaseWeight(w0, axis=axis, block_rows=5)
    together = base.measure_lowrank_many(adapters)
    for (a, b, s, m), got in zip(adapters, together):
        alone = base.measure_lowrank(a, b, s, m)
        close(got, alone, rel=1e-6)
        merged = merge_lora(w0.double(), a.double(), b.double(), s) if m is None else \
            merge_dora(w0.double(), a.double(), b.double(), s, m.double())
        close(got, ref64(w0, merged, axis))
    assert base.measure_lowrank_many([]) == []


@pytest.mark.parametrize("axis", ["out", "in"])
def test_lowrank_on_a_bf16_base_projected_in_blocks(gen, axis):
    """A bf16 W_0 is converted a block at a time for the projection W_0 Aᵀ (2 blocks here,
    along the rows or, for axis "in", along the stored rows summed into one product)."""
    w0 = torch.randn(1100, 2048, generator=gen).bfloat16()
    a, b = torch.randn(8, 2048, generator=gen), 0.01 * torch.randn(1100, 8, generator=gen)
    got = BaseWeight(w0, axis=axis).measure_lowrank(a, b, 2.0)
    close(got, ref64(w0, merge_lora(w0.double(), a.double(), b.double(), 2.0), axis))
