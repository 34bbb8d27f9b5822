"""LoRALinear / DoRALinear against closed forms: float64 references, autograd, finite differences."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch import nn

from wda.train.dora import (DoRALinear, LoRALinear, _sum_of_products, dora_weight_norm_dense,
                      dora_weight_norm_lean, lora_scaling, merge_dora, merge_lora)

F64 = torch.float64


def make_base(out_f: int, in_f: int, dtype=F64, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    return lin


def perturb(layer: nn.Module, seed: int = 1) -> None:
    """Random nonzero B (and m) so the adapter is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith(("lora_B", "lora_A")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
            elif name == "lora_magnitude_vector":
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g, dtype=p.dtype))


def dora_reference(layer: DoRALinear, x: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    """Naive Eq. 5: form W' = m · V' / ||V'|| and apply it; autograd gives Eq. 6 (or Eq. 11)."""
    w0, b0 = layer.base_layer.weight, layer.base_layer.bias
    if layer.magnitude_only:
        v = w0
    else:
        v = merge_lora(w0, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)  # (out, in)
    norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)  # (out, in) -> (out, 1)
    if detach_norm:
        norm = norm.detach()
    w = layer.lora_magnitude_vector.reshape(-1, 1) * v / norm
    return torch.nn.functional.linear(x, w, b0)


def grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def finite_diff(f, t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of the scalar f() w.r.t. every entry of t (perturbed in place)."""
    out = torch.zeros_like(t)
    flat = t.detach().view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        out.view(-1)[i] = (fp - fm) / (2 * eps)
    return out


# ---------------------------------------------------------------- norms: lean path == dense path

@pytest.mark.parametrize("out_f,in_f,r", [(48, 80, 8), (80, 48, 3), (7, 5, 4)])
def test_lean_norm_equals_dense_norm_float64(out_f, in_f, r):
    g = torch.Generator().manual_seed(out_f)
    w0 = torch.randn(out_f, in_f, generator=g, dtype=F64)
    w0[2] = 0.0  # a zero row of W_0 (real models have some)
    a = torch.randn(r, in_f, generator=g, dtype=F64)
    b = torch.randn(out_f, r, generator=g, dtype=F64)
    s = lora_scaling(r, 16.0)
    dense = dora_weight_norm_dense(w0, a, b, s)
    torch.testing.assert_close(dora_weight_norm_lean(w0, a, b, s), dense, rtol=1e-12, atol=1e-12)
    w0_sq = w0.square().sum(dim=1)  # (out, in) -> (out,)
    torch.testing.assert_close(dora_weight_norm_lean(w0, a, b, s, w0_sq), dense, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- init and forward

@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_init_equals_base_layer_and_only_adapter_trains(cls):
    base = make_base(48, 80)
    x = torch.randn(3, 5, 80, dtype=F64)
    expected = base(x)
    layer = cls(base, r=4, alpha=8.0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) > 0
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    expected_names = {"lora_A.weight", "lora_B.weight"}
    if cls is DoRALinear:
        expected_names.add("lora_magnitude_vector")
        # Eq. 2 init: m = ||W_0|| per output row, (out, in) -> (out,)
        torch.testing.assert_close(layer.lora_magnitude_vector.detach(),
                                   torch.linalg.vector_norm(base.weight, dim=1))
    assert trainable == expected_names


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_forward_matches_eq1(use_rslora):
    layer = LoRALinear(make_base(48, 80), r=6, alpha=12.0, use_rslora=use_rslora)
    perturb(layer)
    x = torch.randn(4, 80, dtype=F64)
    s = 12.0 / math.sqrt(6) if use_rslora else 12.0 / 6
    w = merge_lora(layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight, s)
    torch.testing.assert_close(layer(x), x @ w.T + layer.base_layer.bias)


@pytest.mark.parametrize("out_f,in_f", [(48, 80), (80, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_dora_forward_matches_eq5(out_f, in_f, bias):
    layer = DoRALinear(make_base(out_f, in_f, bias=bias), r=5, alpha=10.0)
    perturb(layer)
    x = torch.randn(2, 3, in_f, dtype=F64)
    w = merge_dora(layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight,
                   layer.scaling, layer.lora_magnitude_vector)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, layer.base_layer.bias))
    with torch.no_grad():  # the inference path uses the same formulas
        torch.testing.assert_close(layer.eval()(x), dora_reference(layer, x, True))


def test_magnitude_only_has_no_low_rank_factors():
    layer = DoRALinear(make_base(48, 80), r=4, alpha=8.0, magnitude_only=True)
    assert not hasattr(layer, "lora_A") and not hasattr(layer, "lora_B")
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_magnitude_vector"]
    perturb(layer)
    x = torch.randn(6, 80, dtype=F64, requires_grad=True)
    y = layer(x)
    w0 = layer.base_layer.weight
    m = layer.lora_magnitude_vector
    # Table 6 granularity: W' = m · W_0 / ||W_0||
    ref = torch.nn.functional.linear(x, m.reshape(-1, 1) * w0 / w0.norm(dim=1, keepdim=True),
                                     layer.base_layer.bias)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    for got, want in zip(grads((y * g).sum(), [m, x]), grads((ref * g).sum(), [m, x])):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- gradients (Eq. 6 and Eq. 11)

@pytest.mark.parametrize("detach_norm", [True, False])
def test_dora_gradients_match_float64_autograd_reference(detach_norm):
    layer = DoRALinear(make_base(7, 11), r=3, alpha=6.0, detach_norm=detach_norm)
    perturb(layer)
    x = torch.randn(4, 11, dtype=F64, requires_grad=True)
    params = [layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, x]
    g = torch.randn(4, 7, dtype=F64)
    got = grads((layer(x) * g).sum(), params)
    want = grads((dora_reference(layer, x, detach_norm) * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # The flag must matter: the detached norm drops Eq. 6's projection term for A and B.
    other = grads((dora_reference(layer, x, not detach_norm) * g).sum(), params)
    assert not torch.allclose(got[1], other[1])
    torch.testing.assert_close(got[2], other[2])  # Sec. 4.3: dL/dm is unchanged


@pytest.mark.parametrize("detach_norm", [True, False])
def test_dora_gradients_match_finite_differences(detach_norm):
    layer = DoRALinear(make_base(5, 8, seed=3), r=2, alpha=4.0, detach_norm=detach_norm)
    perturb(layer, seed=4)
    x = torch.randn(3, 8, dtype=F64)
    g = torch.randn(3, 5, dtype=F64)
    a, b, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    frozen = dora_weight_norm_dense(layer.base_layer.weight, a, b, layer.scaling).detach()

    def loss() -> float:
        with torch.no_grad():
            if not detach_norm:  # the true function of (A, B, m): Eq. 6
                return float((layer(x) * g).sum())
            # Eq. 11: the same function with ||V'|| held at its value at the evaluation point
            v = merge_lora(layer.base_layer.weight, a, b, layer.scaling)
            w = (m / frozen).reshape(-1, 1) * v
            return float(((x @ w.T + layer.base_layer.bias) * g).sum())

    analytic = grads((layer(x) * g).sum(), [a, b, m])
    for t, an in zip([a, b, m], analytic):
        torch.testing.assert_close(an, finite_diff(loss, t), rtol=1e-6, atol=1e-7)


def test_dora_gradients_with_unfrozen_bias_and_frozen_magnitude():
    layer = DoRALinear(make_base(7, 11), r=3, alpha=6.0)
    perturb(layer)
    layer.base_layer.bias.requires_grad_(True)
    layer.lora_magnitude_vector.requires_grad_(False)
    x = torch.randn(2, 4, 11, dtype=F64)
    params = [layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.bias]
    g = torch.randn(2, 4, 7, dtype=F64)
    got = grads((layer(x) * g).sum(), params)
    want = grads((dora_reference(layer, x, True) * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_chunked_sum_of_products():
    g, z = torch.randn(3, 37, 5, dtype=F64), torch.randn(3, 37, 5, dtype=F64)
    want = (g * z).sum(dim=(0, 1))  # (..., out) -> (out,)
    for chunk_elems in (1, 7, 5 * 111, 1 << 20):  # 1 row, partial last chunk, exact, one chunk
        torch.testing.assert_close(_sum_of_products(g, z, F64, chunk_elems), want)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_gradients_match_reference(use_rslora):
    layer = LoRALinear(make_base(7, 11), r=3, alpha=6.0, use_rslora=use_rslora)
    perturb(layer)
    bias = layer.base_layer.bias.requires_grad_(True)  # unfrozen by a user: must still be right
    x = torch.randn(2, 4, 11, dtype=F64, requires_grad=True)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    g = torch.randn(2, 4, 7, dtype=F64)
    ref = x @ merge_lora(layer.base_layer.weight, a, b, layer.scaling).T + bias
    params = [a, b, x, bias]
    for got, want in zip(grads((layer(x) * g).sum(), params), grads((ref * g).sum(), params)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- dropout

@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_dropout_only_on_the_low_rank_input(cls):
    layer = cls(make_base(48, 80), r=4, alpha=8.0, dropout=0.5)
    perturb(layer)
    x = torch.randn(6, 80, dtype=F64)
    torch.manual_seed(123)
    y = layer.train()(x)
    torch.manual_seed(123)  # same RNG draw -> same mask
    xd = torch.nn.functional.dropout(x, 0.5, training=True)
    w0, b0 = layer.base_layer.weight, layer.base_layer.bias
    a, b, s = layer.lora_A.weight, layer.lora_B.weight, layer.scaling
    z = x @ w0.T + s * (xd @ a.T @ b.T)  # base sees x, the adapter sees drop(x)
    if cls is DoRALinear:
        c = layer.lora_magnitude_vector / dora_weight_norm_dense(w0, a, b, s)
        z = z * c
    torch.testing.assert_close(y, z + b0)
    with torch.no_grad():  # eval: no dropout, plain Eq. 1 / Eq. 5
        w = (merge_lora(w0, a, b, s) if cls is LoRALinear
             else merge_dora(w0, a, b, s, layer.lora_magnitude_vector))
        torch.testing.assert_close(layer.eval()(x), x @ w.T + b0)


# ---------------------------------------------------------------- merge / unmerge

@pytest.mark.parametrize("kind", ["lora", "dora", "dora_magnitude_only"])
def test_merge_equals_forward_and_unmerge_restores(kind):
    base = make_base(48, 80)
    w0 = base.weight.detach().clone()
    if kind == "lora":
        layer = LoRALinear(base, r=4, alpha=8.0)
    else:
        layer = DoRALinear(base, r=4, alpha=8.0, magnitude_only=kind.endswith("only"))
    perturb(layer)
    x = torch.randn(5, 80, dtype=F64)
    with torch.no_grad():
        y = layer(x)
        expected_w = layer.merged_weight()
        layer.unmerge()  # not merged: nothing to undo
        torch.testing.assert_close(base.weight, w0, rtol=0, atol=0)
        layer.merge()
        layer.merge()  # merged already: folds nothing twice
        assert layer.merged
        torch.testing.assert_close(base.weight, expected_w)
        torch.testing.assert_close(layer(x), y)  # merged weight == forward
        torch.testing.assert_close(layer(x), base(x))  # while merged: just the base layer
        if kind != "lora":  # the self-check of DESIGN.md: merged row norms == m, (out, in) -> (out,)
            torch.testing.assert_close(torch.linalg.vector_norm(base.weight, dim=1),
                                       layer.lora_magnitude_vector)
        layer.unmerge()
        assert not layer.merged
        torch.testing.assert_close(base.weight, w0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer(x), y)


def test_zero_row_stays_finite_and_survives_merge():
    base = make_base(6, 9)
    with torch.no_grad():
        base.weight[1] = 0.0
    w0 = base.weight.detach().clone()
    layer = DoRALinear(base, r=2, alpha=4.0)  # m_1 = ||W_0,1|| = 0, ||V'_1|| = 0 at init
    x = torch.randn(3, 9, dtype=F64)
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 1], base.bias[1].expand(3))
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.requires_grad)
    with torch.no_grad():
        layer.merge()
        assert torch.isfinite(base.weight).all()
        layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), w0)


def test_norm_cache_follows_base_weight_changes():
    layer = DoRALinear(make_base(6, 9), r=2, alpha=4.0)
    perturb(layer)
    x = torch.randn(3, 9, dtype=F64)
    layer(x)  # fills the ||W_0||² cache
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)  # in place: same storage, new version
    torch.testing.assert_close(layer(x), dora_reference(layer, x, True))


# ---------------------------------------------------------------- low precision

@pytest.mark.parametrize("mode", ["bf16", "fp32_adapter", "autocast"])
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_low_precision_close_to_fp32_reference(cls, mode):
    """bf16 base (adapter in bf16 or fp32, as PEFT's autocast_adapter_dtype) and CPU autocast."""
    base32 = make_base(48, 80, dtype=torch.float32)
    with torch.no_grad():  # a bf16-representable W_0 and b, shared by both layers
        base32.weight.copy_(base32.weight.bfloat16())
        base32.bias.copy_(base32.bias.bfloat16())
    ref = cls(base32, r=4, alpha=8.0)
    perturb(ref)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16())
    low = copy.deepcopy(ref)
    if mode != "autocast":
        low.base_layer.to(torch.bfloat16)
        for name, p in low.named_parameters():
            if not name.startswith("base_layer"):
                p.data = p.data.to(torch.bfloat16 if mode == "bf16" else torch.float32)
    x = torch.randn(3, 8, 80).bfloat16()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    with ctx:
        y = low(x if mode != "autocast" else x.float())
    assert y.dtype == torch.bfloat16
    want = ref(x.float()).detach()
    # bf16 keeps 8 significant bits: errors scale with the output's size, not each entry's.
    torch.testing.assert_close(y.float(), want, rtol=0, atol=2.0**-6 * want.abs().max().item())
    y.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in low.parameters() if p.requires_grad)


def test_meta_device_init_then_reset_magnitude():
    """Large-model init: build on the meta device, materialise, load W_0, reset m = ||W_0||."""
    torch.manual_seed(0)
    real = nn.Linear(40, 24, bias=False)
    with torch.device("meta"):
        layer = DoRALinear(nn.Linear(40, 24, bias=False), r=4, alpha=8)
    layer = layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.base_layer.weight.copy_(real.weight)
    layer.reset_lora_parameters()  # to_empty() left A and B uninitialised
    layer.reset_magnitude()
    assert torch.allclose(layer.lora_magnitude_vector, real.weight.norm(dim=1))
    x = torch.randn(5, 40)
    assert torch.allclose(layer(x), real(x), atol=1e-6)
