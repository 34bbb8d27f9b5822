"""The math of the paper's weight decomposition (Eqs. 2-4): pure tensor functions.

Conventions (DESIGN.md, "The axis"):
- every weight is given in the ``(out, in)`` layout of ``nn.Linear`` (callers transpose
  Conv1D ``(in, out)`` weights before they get here);
- ``axis="out"`` means one magnitude per OUTPUT feature, ``norm(dim=1)`` -> ``(out,)``, as
  in the DoRA reference code, PEFT and torchtune; ``axis="in"`` means one per input
  feature, ``norm(dim=0)`` -> ``(in,)`` (LyCORIS/kohya ``dora_scale`` style).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Axis = Literal["out", "in"]
AXES: tuple[str, ...] = ("out", "in")


class NonFiniteWeights(ValueError):
    """A weight holds NaN or Inf: its ΔM / ΔD would be meaningless."""


def reduce_dim(axis: Axis) -> int:
    """The dim reduced to get one magnitude per vector of an (out, in) weight."""
    if axis == "out":
        return 1  # (out, in) -> (out,)
    if axis == "in":
        return 0  # (out, in) -> (in,)
    raise ValueError(f"axis must be 'out' or 'in', not {axis!r}")


def magnitude(weight: torch.Tensor, axis: Axis = "out") -> torch.Tensor:
    """Eq. 2: m = ||W|| per vector (L2 norm), in the weight's dtype."""
    return torch.linalg.vector_norm(weight, dim=reduce_dim(axis))


def direction(weight: torch.Tensor, axis: Axis = "out") -> torch.Tensor:
    """Eq. 2: V / ||V|| per vector. Zero vectors stay zero."""
    dim = reduce_dim(axis)
    norm = torch.linalg.vector_norm(weight, dim=dim, keepdim=True)
    return weight / torch.where(norm > 0, norm, torch.ones_like(norm))


@dataclass(frozen=True)
class VectorChanges:
    """Per-vector changes of W_t against W_0 (one entry per magnitude vector)."""

    m0: torch.Tensor  # ||W_0^n||
    dm: torch.Tensor  # m_t^n - m_0^n (signed)
    dd: torch.Tensor  # 1 - cos(W_t^n, W_0^n), in [0, 2]
    valid: torch.Tensor  # bool: both norms > 0 (cosine defined)


def vector_changes(w0: torch.Tensor, wt: torch.Tensor, axis: Axis = "out",
                   dtype: torch.dtype = torch.float32) -> VectorChanges:
    """Magnitude and direction change of every vector of ``wt`` against ``w0``.

    Numerics: with u = W_0^n, v = W_t^n, δ = v - u (computed once, exact for nearby
    floats) and c = (|v| - |u|) / |u|,

        1 - cos(u, v) = 0.5 * || u/|u| - v/|v| ||^2 = 0.5 * || c·u - δ ||^2 / |v|^2
        |v| - |u|     = (2 u·δ + |δ|^2) / (|u| + |v|)

    Both forms avoid the cancellation of ``1 - cos`` (at θ = 1e-4 rad the true value is
    5e-9, below float32 resolution around 1) and of ``|v| - |u|``: every error stays
    relative to the size of the change itself, so float32 matches float64 at tiny angles.
    """
    if w0.shape != wt.shape:
        raise ValueError(f"shape mismatch: base {tuple(w0.shape)} vs checkpoint {tuple(wt.shape)}")
    if w0.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w0.shape)}")
    dim = reduce_dim(axis)
    u = w0.to(dtype)
    v = wt.to(dtype)
    delta = v - u
    n0 = torch.linalg.vector_norm(u, dim=dim)  # (out,) for axis "out"
    nt = torch.linalg.vector_norm(v, dim=dim)
    ud = (u * delta).sum(dim=dim)  # u·δ
    dd2 = (delta * delta).sum(dim=dim)  # |δ|^2
    if not (torch.isfinite(n0).all() and torch.isfinite(nt).all()):
        # A NaN row norm would otherwise fail the `> 0` test and be silently excluded.
        which = "base" if not torch.isfinite(n0).all() else "checkpoint"
        raise NonFiniteWeights(f"non-finite values (NaN/Inf) in the {which} weight")
    valid = (n0 > 0) & (nt > 0)
    safe_n0 = torch.where(valid, n0, torch.ones_like(n0))
    safe_nt = torch.where(valid, nt, torch.ones_like(nt))
    # |v| - |u| without cancellation; for invalid vectors fall back to the plain difference.
    dm = torch.where(valid, (2 * ud + dd2) / (safe_n0 + safe_nt), nt - n0)
    c = (dm / safe_n0).unsqueeze(dim)  # broadcast along the reduced dim
    resid = c * u - delta  # (out, in): |v|·(u/|u| - v/|v|), no cancellation
    dd = 0.5 * (resid * resid).sum(dim=dim) / (safe_nt * safe_nt)
    dd = torch.where(valid, dd.clamp(0.0, 2.0), torch.zeros_like(dd))
    return VectorChanges(m0=n0, dm=dm, dd=dd, valid=valid)


@dataclass(frozen=True)
class Measurement:
    """Eqs. 3-4 for one (checkpoint, module): means over the valid vectors."""

    delta_m: float  # Eq. 3: mean_n |m_t^n - m_0^n|
    delta_d: float  # Eq. 4: mean_n (1 - cos(W_t^n, W_0^n))
    n_vectors: int  # vectors in the matrix along the chosen axis
    n_excluded: int  # zero-norm vectors (in W_0 or W_t) left out of both means
    m0_mean: float  # mean ||W_0^n|| over valid vectors (context for relative changes)


def measure(w0: torch.Tensor, wt: torch.Tensor, axis: Axis = "out",
            dtype: torch.dtype = torch.float32) -> Measurement:
    """ΔM (Eq. 3) and ΔD (Eq. 4) of ``wt`` against ``w0``.

    Zero-norm vectors (real models have some) have no direction: they are excluded from
    both means and counted in ``n_excluded`` rather than turning the layer into NaN.
    """
    ch = vector_changes(w0, wt, axis=axis, dtype=dtype)
    n = ch.valid.numel()
    k = int(ch.valid.sum())
    if k == 0:
        nan = float("nan")
        return Measurement(nan, nan, n, n, nan)
    # Sums in float64 so that means over many vectors add no error of their own.
    vm = ch.valid.to(torch.float64)
    dm = (ch.dm.abs().to(torch.float64) * vm).sum() / k
    dd = (ch.dd.to(torch.float64) * vm).sum() / k
    m0 = (ch.m0.to(torch.float64) * vm).sum() / k
    return Measurement(float(dm), float(dd), n, n - k, float(m0))


def measure_many(w0: torch.Tensor, wts: list[torch.Tensor], axis: Axis = "out",
                 dtype: torch.dtype = torch.float32) -> list[Measurement]:
    """``measure`` for several checkpoints of one matrix (W_0 cast once)."""
    u = w0.to(dtype)
    return [measure(u, wt, axis=axis, dtype=dtype) for wt in wts]
