"""LoRA (Eq. 1) and DoRA (Eq. 5): merged-weight functions and training layers.

All weights here are in the ``(out, in)`` layout of ``nn.Linear``; ``A`` is ``(r, in)``,
``B`` is ``(out, r)``, the DoRA magnitude ``m`` is ``(out,)`` (one per output feature,
as in the paper's reference code and PEFT).
"""

from __future__ import annotations

import math

import torch


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


def merge_dora(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
               magnitude: torch.Tensor) -> torch.Tensor:
    """Eq. 5: W' = m · V' / ||V'||, V' = W_0 + s·B·A, norm per output row (dim=1)."""
    v = merge_lora(w0, a, b, scaling)  # (out, in)
    norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)  # (out, 1)
    return v * (magnitude.reshape(-1, 1) / norm)
