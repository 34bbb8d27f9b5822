"""``wda.analysis.gemm``: the analysis' GEMMs are true float32 ones whatever precision the
process asked torch for, and ``linear`` gives x @ wᵀ on either library to float32 rounding."""

from __future__ import annotations

import pytest
import torch

from wda.analysis import gemm
from wda.analysis.decompose import BaseWeight, summarize, vector_changes
from wda.train.dora import merge_dora, merge_lora

CPU = torch.device("cpu")
needs_setting = pytest.mark.skipif(gemm._setting(CPU) is None, reason="torch < 2.9 has no fp32_precision setting")


@pytest.fixture
def precision():
    """Restores the process' float32 matmul precision after the test."""
    before, setting = torch.get_float32_matmul_precision(), gemm._setting(CPU)
    raw = setting.fp32_precision if setting is not None else None
    yield
    torch.set_float32_matmul_precision(before)
    if setting is not None:
        setting.fp32_precision = raw


def _onednn_works() -> bool:
    try:
        x = torch.ones(2, 3)
        return torch.ops.mkldnn._linear_pointwise(x, x, None, "none", [], "").shape == (2, 2)
    except (AttributeError, RuntimeError):
        return False


@pytest.fixture(params=["torch", "onednn"])
def library(request, monkeypatch):
    """``gemm.linear`` on torch.mm, and on oneDNN's float32 kernel where this torch has it."""
    if request.param == "onednn" and not (torch.backends.mkldnn.is_available() and _onednn_works()):
        pytest.skip("this torch has no oneDNN float32 linear")
    monkeypatch.setattr(gemm, "_onednn_faster", lambda: request.param == "onednn")
    return request.param


@pytest.mark.parametrize("shape", [(37, 53, 4), (768, 768, 80), (1100, 300, 17)])
def test_linear_is_x_times_w_transposed_in_float32(library, shape):
    m, k, n = shape
    gen = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    got = gemm.linear(x, w)
    ref = x.double() @ w.double().t()
    bound = 2 * k * torch.finfo(torch.float32).eps * (x.double().abs() @ w.double().abs().t())
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert bool(((got.double() - ref).abs() <= bound).all())
    strided = gemm.linear(x.t().contiguous().t(), w)  # x a transposed view: torch.mm
    assert bool(((strided.double() - ref).abs() <= bound).all())


@pytest.mark.parametrize("axis", ["out", "in"])
def test_adapters_measured_on_either_library_match_float64(library, axis):
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(320, 256, generator=gen).bfloat16()
    ads = []
    for j in range(4):
        a, b = 0.05 * torch.randn(8, 256, generator=gen), 0.05 * torch.randn(320, 8, generator=gen)
        m = w0.float().norm(dim=1) * (1 + 0.05 * torch.randn(320, generator=gen)) if j % 2 and axis == "out" else None
        ads.append((a, b, 0.5 + j, m))
    base = BaseWeight(w0, axis=axis)
    for (a, b, s, m), got in zip(ads, base.measure_lowrank_many(ads)):
        args = (w0.double(), a.double(), b.double(), s)
        merged = merge_lora(*args) if m is None else merge_dora(*args, m.double())
        ref = summarize(vector_changes(w0.double(), merged, axis=axis, dtype=torch.float64))
        assert got.delta_m == pytest.approx(ref.delta_m, rel=1e-5)
        assert got.delta_d == pytest.approx(ref.delta_d, rel=1e-5)


def test_onednn_only_where_mkl_takes_its_avx2_code(monkeypatch):
    """oneDNN's kernel on an AMD CPU with AVX-512 only: the choice follows the CPU, not a timing."""
    def chosen(vendor, isa):
        monkeypatch.setattr(gemm, "_vendor", lambda: vendor)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
        gemm._onednn_faster.cache_clear()
        return gemm._onednn_faster()
    try:
        assert not chosen("GenuineIntel", "AVX512")
        assert not chosen("AuthenticAMD", "AVX2")
        assert chosen("AuthenticAMD", "AVX512") == (torch.backends.mkldnn.is_available() and _onednn_works())
    finally:
        gemm._onednn_faster.cache_clear()


@needs_setting
@pytest.mark.parametrize("asked", ["high", "medium"])
def test_measuring_gemms_are_float32_whatever_the_process_asked_for(precision, monkeypatch, asked):
    """A training script's lowered float32 matmul precision (TF32 on a GPU, bf16 operands on
    a CPU with AMX) is set aside for the analysis' GEMMs, and back after."""
    setting = gemm._setting(CPU)
    seen = []
    real = gemm.linear
    monkeypatch.setattr(gemm, "linear", lambda x, w: (seen.append(setting.fp32_precision), real(x, w))[1])
    torch.set_float32_matmul_precision(asked)
    lowered = setting.fp32_precision
    gen = torch.Generator().manual_seed(4)
    base = BaseWeight(torch.randn(64, 48, generator=gen))
    a, b = torch.randn(4, 48, generator=gen), torch.randn(64, 4, generator=gen)
    base.measure_lowrank_many([(a, b, 1.0, None)])
    base.measure_lowrank(a, b, 1.0)
    base.project([(a, b)])
    assert len(seen) == 3 and set(seen) <= {"ieee", "none"}
    assert setting.fp32_precision == lowered and torch.get_float32_matmul_precision() == asked


@pytest.mark.parametrize("before", ["highest", "high", "medium"])
def test_the_process_setting_is_restored(precision, before):
    torch.set_float32_matmul_precision(before)
    setting = gemm._setting(CPU)
    was = setting.fp32_precision if setting is not None else None
    with gemm.exact(CPU):
        if setting is not None:
            assert setting.fp32_precision in ("ieee", "none")
        else:
            assert torch.get_float32_matmul_precision() == "highest"
    assert torch.get_float32_matmul_precision() == before
    if setting is not None:
        assert setting.fp32_precision == was
