"""LoRA (Eq. 1) and DoRA (Eq. 5): merged-weight functions and training layers.

All weights here are in the ``(out, in)`` layout of ``nn.Linear``; ``A`` is ``(r, in)``,
``B`` is ``(out, r)``, the DoRA magnitude ``m`` is ``(out,)`` (one per output feature,
as in the paper's reference code and PEFT).

The layers wrap a frozen ``nn.Linear`` under the attribute names PEFT uses
(``base_layer``, ``lora_A``, ``lora_B``, ``lora_magnitude_vector``, ``lora_dropout``), so a
wda parameter name maps onto a PEFT checkpoint key by prefixing it (see ``wda.train.adapt``).

How ``DoRALinear`` avoids PEFT's cost
-------------------------------------
Eq. 5 as a weight is ``W' = diag(c) V'`` with ``V' = W_0 + s·B·A`` and ``c = m / ||V'||``
(one entry per output row). Applied to an input that is

    y = c ⊙ (W_0 x + s·B(A x)) + b                                     (Eq. 5, on the outputs)

so the forward never forms an ``(out, in)`` matrix. The row norms come from the expansion

    ||V'_i||² = ||W_0,i||² + 2s·B_i·(W_0 Aᵀ)_i + s²·B_i (A Aᵀ) B_iᵀ

where ``||W_0||²`` is cached (``W_0`` is frozen), ``W_0 Aᵀ`` is ``(out, r)`` and ``A Aᵀ`` is
``(r, r)``: O(out·in·r) flops and O(out·r) memory, against two ``(out, in)`` temporaries for
``||W_0 + s·B·A||`` formed densely (``dora_weight_norm_dense``, kept as the reference).
Measured on CPU (fp32, 1 thread, median): 4096x4096 r=16 dense 97 ms / 128 MiB, lean 8.7 ms /
0.8 MiB; 1024x1024 r=16 dense 1.4 ms / 8 MiB, lean 0.44 ms / 0.2 MiB (a 2048-token matmul with
W_0 takes 440 ms / 30 ms). On GPU the lean path should win as well: it reads W_0 once in a skinny
GEMM, where the dense one writes and re-reads (out, in) fp32 buffers (not measured: no GPU here).
Because the expansion only involves (out, r) and (r, r) tensors, the full gradient of Eq. 6
(``detach_norm=False``) also adds no (out, in) tensor to the autograd graph.

The rest of the layer keeps DoRA's backward as light as LoRA's: ``_RowScale`` applies c and
keeps only z = V' x for dL/dm, and ``_base_plus_lora`` lets the GEMM do the sum W_0 x + s·B(Ax).

Dropout: only the low-rank branch sees the dropped input,
``y = c ⊙ (W_0 x + s·B(A(drop(x)))) + b``, i.e. Eq. 5 with LoRA's Eq. 1 dropout on the
adapter input ``A``. PEFT (and the DoRA reference code) instead drop the input of the whole
DoRA delta ``W' - W_0``: ``y = W_0 x + b + (c - 1) ⊙ W_0 drop(x) + c ⊙ s·B(A(drop(x)))``,
which needs a second full matmul with ``W_0``. The two agree whenever dropout is off
(``p = 0`` or eval mode), hence on every saved/loaded adapter; they differ only in which
training noise is injected.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's ``scaling``)."""
    if r <= 0:
        raise ValueError(f"rank must be positive, got r={r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Eq. 1's update: s·B·A, (out, r) @ (r, in) -> (out, in)."""
    return (b @ a) * scaling


def merge_lora(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Eq. 1: W' = W_0 + s·B·A."""
    return w0 + lora_delta(a, b, scaling)


def magnitude_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """c = m / ||V'|| per output row, and 0 where ||V'|| = 0.

    Zero rows exist in real models; there Eq. 5's direction is undefined and PEFT returns NaN.
    Taking c = 0 keeps the row at zero (W'_i = 0) with finite gradients: the double ``where``
    keeps the unselected branch from sending NaN/inf back through autograd.
    """
    ok = norm > 0
    return torch.where(ok, magnitude / torch.where(ok, norm, torch.ones_like(norm)),
                       torch.zeros_like(norm))


def merge_dora(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
               magnitude: torch.Tensor) -> torch.Tensor:
    """Eq. 5: W' = m · V' / ||V'||, V' = W_0 + s·B·A, norm per output row (dim=1).

    A row with ||V'|| = 0 merges to zero (see ``magnitude_scale``).
    """
    v = merge_lora(w0, a, b, scaling)  # (out, in)
    norm = torch.linalg.vector_norm(v, dim=1)  # (out, in) -> (out,)
    return v * magnitude_scale(magnitude, norm).reshape(-1, 1)


def merge_dora_input_axis(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                          magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA with one magnitude per *input* channel (LyCORIS ``dora_scale`` of shape (1, in)):
    W' = V' · m / ||V'||, the norm of each input channel taken over the output rows and, for a
    conv kernel flattened to (out, in·kh·kw), over its kernel positions too."""
    v = merge_lora(w0, a, b, scaling)  # (out, in·k)
    out, n = v.shape
    per = v.reshape(out, magnitude.numel(), n // magnitude.numel())  # (out, in, k)
    norm = torch.linalg.vector_norm(per, dim=(0, 2))  # (in,)
    return (per * magnitude_scale(magnitude.reshape(-1), norm).reshape(1, -1, 1)).reshape(out, n)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16 weights, float64 stays float64 (DESIGN: compute in >= fp32)."""
    return torch.promote_types(dtype, torch.float32)


def dora_weight_norm_dense(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                           scaling: float) -> torch.Tensor:
    """||W_0 + s·B·A|| per output row by forming the (out, in) sum: the reference path."""
    cdt = compute_dtype(w0.dtype)
    v = merge_lora(w0.to(cdt), a.to(cdt), b.to(cdt), scaling)  # (out, in)
    return torch.linalg.vector_norm(v, dim=1)  # (out, in) -> (out,)


def dora_weight_norm_lean(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                          w0_sq: torch.Tensor | None = None) -> torch.Tensor:
    """||W_0 + s·B·A|| per output row without forming any (out, in) temporary.

    ``w0_sq`` is ``||W_0||²`` per row if the caller has it cached. Exact in exact arithmetic;
    in floating point it loses relative accuracy only when ``s·B·A`` nearly cancels a row
    of ``W_0`` (||V'|| << ||W_0||), which a trained adapter does not do.
    """
    cdt = compute_dtype(w0.dtype)
    if w0_sq is None:
        w0_sq = torch.linalg.vector_norm(w0, dim=1, dtype=cdt).square()  # (out, in) -> (out,)
    wa = F.linear(w0, a.to(w0.dtype)).to(cdt)  # (out, in) @ (in, r) -> (out, r)
    a, b = a.to(cdt), b.to(cdt)
    gram = a @ a.T  # (r, in) @ (in, r) -> (r, r)
    cross = (b * wa).sum(dim=1)  # B_i·(W_0 Aᵀ)_i: (out, r) -> (out,)
    quad = ((b @ gram) * b).sum(dim=1)  # B_i (A Aᵀ) B_iᵀ: (out, r) -> (out,)
    sq = w0_sq.to(cdt) + (2.0 * scaling) * cross + (scaling * scaling) * quad
    # Rounding can push an (almost) zero row slightly negative; sqrt'(0) = inf would poison
    # the gradient, so rows with sq <= 0 get norm 0 through a gradient-safe double where.
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def _sum_of_products(g: torch.Tensor, z: torch.Tensor, dtype: torch.dtype,
                     chunk_elems: int = 1 << 20) -> torch.Tensor:
    """sum over tokens of g ⊙ z, (..., out) -> (out,), in chunks of tokens so that no second
    (tokens, out) temporary is alive next to g and z (it would set the backward's peak)."""
    out = g.shape[-1]
    g2, z2 = g.reshape(-1, out), z.reshape(-1, out)  # (T, out)
    acc = torch.zeros(out, dtype=dtype, device=g.device)
    step = max(1, chunk_elems // max(out, 1))
    for i in range(0, g2.shape[0], step):
        acc += (g2[i:i + step] * z2[i:i + step]).sum(dim=0, dtype=dtype)  # (chunk, out) -> (out,)
    return acc


class _RowScale(torch.autograd.Function):
    """y = c ⊙ z + b over the last dim, with a backward lighter than autograd's addcmul:
    it makes dL/dz = c ⊙ g and dL/dc = sum_tokens g ⊙ z without a third (tokens, out) tensor."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # z is only needed for dL/dc; skip keeping it when the magnitude is frozen.
        ctx.save_for_backward(z if ctx.needs_input_grad[1] else None, c)
        ctx.has_bias = bias is not None
        cz = c.to(z.dtype)  # y in z's dtype, also under autocast (fp32 c and b would promote it)
        return z * cz if bias is None else torch.addcmul(bias.to(z.dtype), z, cz)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, c = ctx.saved_tensors
        grad_c = _sum_of_products(g, z, c.dtype) if ctx.needs_input_grad[1] else None
        grad_z = g * c.to(g.dtype) if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(dim=0)  # (T, out) -> (out,)
        return grad_z, grad_c, grad_b


class _AdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus PEFT-named low-rank factors."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float,
                 use_rslora: bool, low_rank: bool = True) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(base).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = int(r), float(alpha), bool(use_rslora)
        self.scaling = lora_scaling(self.r, self.alpha, self.use_rslora)
        self.merged = False
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if low_rank:
            kw = {"device": base.weight.device, "dtype": base.weight.dtype}
            self.lora_A = nn.Linear(base.in_features, self.r, bias=False, **kw)
            self.lora_B = nn.Linear(self.r, base.out_features, bias=False, **kw)
            self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that inspects ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """LoRA/PEFT init: A Kaiming-uniform, B = 0, so the adapter starts as the identity."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def _base_plus_lora(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """W_0 x + s·B(A(drop(x))) (+ bias), (..., in) -> (..., out).

        Two savings over ``base(x) + s * lora(x)``, each one pass over a (tokens, out) tensor
        in forward or backward: s multiplies the (tokens, r) factor A x (s·B(Ax) = B(s·Ax)),
        and the sum is the GEMM's own accumulation, ``l.addmm_(x, W_0ᵀ)`` writing into the
        fresh output of B. Under autocast or mixed dtypes the plain ops are used instead.
        """
        w = self.base_layer.weight
        a, b = self.lora_A.weight, self.lora_B.weight
        xd = self.lora_dropout(x)
        if torch.is_autocast_enabled(x.device.type) or not (x.dtype == w.dtype == a.dtype == b.dtype):
            y = F.linear(x, w, bias)
            lora = F.linear(F.linear(xd.to(a.dtype), a), b)
            return torch.add(y, lora.to(y.dtype), alpha=self.scaling)
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        h = F.linear(xd.reshape(-1, x.shape[-1]), a) * self.scaling  # (T, in) -> (T, r)
        z = F.linear(h, b).addmm_(x2, w.t())  # (T, r) -> (T, out), += W_0 x in the GEMM
        if bias is not None:
            z = z.add_(bias)  # still the fresh 2-D tensor: in place is safe and saves a buffer
        return z.reshape(*x.shape[:-1], w.shape[0])

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in the compute dtype, (out, in)."""
        cdt = compute_dtype(self.base_layer.weight.dtype)
        return lora_delta(self.lora_A.weight.to(cdt), self.lora_B.weight.to(cdt), self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``base_layer.weight`` (``_fold``); the forward is then the
        base layer alone. A second call does nothing."""
        if not self.merged:
            self._fold(self.base_layer.weight)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (``_unfold``, float tolerance). Does nothing when not merged."""
        if self.merged:
            self._unfold(self.base_layer.weight)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


class LoRALinear(_AdapterLinear):
    """Eq. 1: y = W_0 x + b + s·B(A(drop(x))), ``W_0`` and ``b`` frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__(base, r, alpha, dropout, use_rslora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return self._base_plus_lora(x, self.base_layer.bias)

    def merged_weight(self) -> torch.Tensor:
        """Eq. 1: W_0 + s·B·A, (out, in), compute dtype."""
        w = self.base_layer.weight
        return w.to(compute_dtype(w.dtype)) + self.delta_weight()

    def _fold(self, w: torch.Tensor) -> None:
        """W_0 -> W_0 + s·B·A in place."""
        w.copy_(self.merged_weight().to(w.dtype))

    def _unfold(self, w: torch.Tensor) -> None:
        """W' -> W' - s·B·A in place."""
        w.copy_((w.to(compute_dtype(w.dtype)) - self.delta_weight()).to(w.dtype))


class DoRALinear(_AdapterLinear):
    """Eq. 5: W' = m · (W_0 + s·B·A) / ||W_0 + s·B·A||, norm per output row (dim=1).

    ``m`` (``lora_magnitude_vector``, (out,)) starts at ``||W_0||`` so the layer starts as the
    base layer. ``detach_norm=True`` treats ||V'|| as a constant in backprop (Sec. 4.3,
    Eq. 11); ``False`` gives the full gradient (Eq. 6). ``magnitude_only=True`` trains ``m``
    alone, W' = m · W_0 / ||W_0|| (Table 6), and has no ``lora_A``/``lora_B``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, detach_norm: bool = True,
                 magnitude_only: bool = False) -> None:
        super().__init__(base, r, alpha, dropout, use_rslora, low_rank=not magnitude_only)
        self.detach_norm = bool(detach_norm)
        self.magnitude_only = bool(magnitude_only)
        self._w0_sq: torch.Tensor | None = None
        self._w0_key: tuple | None = None
        self._merge_scale: torch.Tensor | None = None
        self._merge_lost: tuple[torch.Tensor, torch.Tensor] | None = None
        # m = ||W_0|| per output row; taken from the cached ||W_0||² that the forward uses, so
        # that c = m / ||V'|| is exactly 1 at init (B = 0) in fp32/fp64.
        m = self.base_sq_norm().sqrt()  # (out,)
        self.lora_magnitude_vector = nn.Parameter(m.to(base.weight.dtype))

    def base_sq_norm(self) -> torch.Tensor:
        """||W_0||² per output row, (out,), compute dtype; cached while ``W_0`` is unchanged.

        The key covers storage, in-place version, dtype and device, so ``copy_``/``load_state_dict``
        and ``.to()`` refresh it. Writes through ``weight.data`` bypass the version counter:
        call ``invalidate_cache()`` after those.
        """
        w = self.base_layer.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if self._w0_sq is None or self._w0_key != key:
            with torch.no_grad():
                self._w0_sq = torch.linalg.vector_norm(
                    w, dim=1, dtype=compute_dtype(w.dtype)).square()  # (out, in) -> (out,)
            self._w0_key = key
        return self._w0_sq

    def invalidate_cache(self) -> None:
        self._w0_sq, self._w0_key = None, None

    def reset_magnitude(self) -> None:
        """m = ||W_0|| per output row again: after building on the meta device, ``to_empty()``
        and loading W_0 (large-model init), m must be recomputed from the real weights."""
        self.invalidate_cache()
        with torch.no_grad():
            m = self.lora_magnitude_vector
            m.copy_(self.base_sq_norm().sqrt().to(m.dtype))

    def weight_norm(self) -> torch.Tensor:
        """||V'|| = ||W_0 + s·B·A|| per output row, (out,), compute dtype (lean path)."""
        w0_sq = self.base_sq_norm()
        if self.magnitude_only:
            return w0_sq.sqrt()
        grad_ctx = torch.no_grad() if self.detach_norm else contextlib.nullcontext()
        with grad_ctx:  # Sec. 4.3: a detached norm adds nothing to the autograd graph
            return dora_weight_norm_lean(self.base_layer.weight, self.lora_A.weight,
                                         self.lora_B.weight, self.scaling, w0_sq)

    def scale(self) -> torch.Tensor:
        """c = m / ||V'||, (out,), compute dtype."""
        m = self.lora_magnitude_vector
        return magnitude_scale(m.to(compute_dtype(m.dtype)), self.weight_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        # V' x = W_0 x + s·B(A(drop(x))), (..., out)
        z = F.linear(x, base.weight) if self.magnitude_only else self._base_plus_lora(x)
        # Eq. 5 on the outputs: y = c ⊙ V' x + b; backward keeps z (not a weight) for dL/dm.
        return _RowScale.apply(z, self.scale(), base.bias)

    def _direction_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """V' (out, in) and c = m / ||V'|| (out,), compute dtype, with the dense (exact) norm."""
        w = self.base_layer.weight
        cdt = compute_dtype(w.dtype)
        v = w.to(cdt) if self.magnitude_only else w.to(cdt) + self.delta_weight()  # (out, in)
        norm = torch.linalg.vector_norm(v, dim=1)  # (out, in) -> (out,)
        return v, magnitude_scale(self.lora_magnitude_vector.to(cdt), norm)

    def merged_weight(self) -> torch.Tensor:
        """Eq. 5: W' = c ⊙ V', (out, in), compute dtype."""
        v, c = self._direction_and_scale()
        return v * c.reshape(-1, 1)

    def _fold(self, w: torch.Tensor) -> None:
        """W_0 -> W' in place; its row norms then equal ``m``."""
        v, c = self._direction_and_scale()
        # c is what unmerge divides by; rows with c = 0 (m = 0 or V'_i = 0) cannot be
        # recovered by division, so keep their W_0 rows (normally none).
        self._merge_scale = c
        lost = (c == 0).nonzero().flatten()
        self._merge_lost = (lost, w[lost].clone()) if lost.numel() else None
        w.copy_((v * c.reshape(-1, 1)).to(w.dtype))

    def _unfold(self, w: torch.Tensor) -> None:
        """W' -> W_0 = W' / c - s·B·A in place."""
        c = self._merge_scale
        w0 = w.to(c.dtype) / torch.where(c == 0, torch.ones_like(c), c).reshape(-1, 1)
        if not self.magnitude_only:
            w0 -= self.delta_weight()
        w.copy_(w0.to(w.dtype))
        if self._merge_lost is not None:
            rows, values = self._merge_lost
            w[rows] = values
        self._merge_scale, self._merge_lost = None, None

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", detach_norm={self.detach_norm}, "
                f"magnitude_only={self.magnitude_only}")
