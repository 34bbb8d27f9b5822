"""Fused MLP projections: which output rows of a gated MLP's fused gate/up weight are the gate
and which the up projection.

Gated (SwiGLU) MLPs of some families store the gate and the up projection as one matrix of
2·I output rows, where the forward pass cuts the output in two halves along the feature axis:

====================  =================  ===================================================
family (model_type)   module             output rows
====================  =================  ===================================================
phi3, glm, glm4       ``gate_up_proj``   [gate (I) | up (I)], I = ``intermediate_size``
                                         (transformers ``Phi3MLP`` / ``GlmMLP`` /
                                         ``Glm4MLP.forward``: ``gate, up = gate_up_proj(x)
                                         .chunk(2, dim=-1)``; ``down(up * act(gate))``)
chatglm (2/3)         ``dense_h_to_4h``  [gate (F) | up (F)], F = ``ffn_hidden_size`` (the
                                         remote code's ``swiglu``: ``x = chunk(x, 2, -1);
                                         silu(x[0]) * x[1]``)
====================  =================  ===================================================

ChatGLM-6B (v1, also ``model_type`` chatglm) has a plain GELU ``dense_h_to_4h`` of 4·H rows
and no ``ffn_hidden_size`` in its config: it is not gated and is left whole. The same
``FusedPart`` as for fused attention (``fused_qkv``), with kinds ``gate`` and ``up``: module
``model.layers.0.mlp.gate_up_proj`` becomes ``….gate_up_proj.gate`` and ``….gate_up_proj.up``.
Pure: no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wda.formats.fused_qkv import FusedLayoutError, FusedPart, contiguous

PARTS = ("gate", "up")


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # the last name component of the fused module
    size: str  # the config field giving the rows of each half


FAMILIES: dict[str, Family] = {
    "phi3": Family("Phi-3", "gate_up_proj", "intermediate_size"),
    "glm": Family("GLM", "gate_up_proj", "intermediate_size"),
    "glm4": Family("GLM-4", "gate_up_proj", "intermediate_size"),
    "chatglm": Family("ChatGLM2/3", "dense_h_to_4h", "ffn_hidden_size"),
}


def family(config: dict[str, Any] | None) -> Family | None:
    """The fused-MLP family of a model config, or None (ChatGLM v1: no ``ffn_hidden_size``)."""
    fam = FAMILIES.get(str((config or {}).get("model_type") or ""))
    return fam if fam is not None and (config or {}).get(fam.size) is not None else None


def is_fused(config: dict[str, Any] | None, module: str) -> bool:
    fam = family(config)
    return fam is not None and module.rsplit(".", 1)[-1] == fam.module


def fused_parts(config: dict[str, Any] | None, module: str, out_features: int) -> list[FusedPart] | None:
    """The gate and up parts of ``module`` (its output rows), or None when it is not a fused
    gate/up projection. Raises FusedLayoutError when the config does not fit the weight."""
    if not is_fused(config, module):
        return None
    fam = family(config)
    size = config[fam.size]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise FusedLayoutError(f"config field {fam.size!r} must be a positive integer, not {size!r}")
    if out_features != 2 * size:
        raise FusedLayoutError(f"the fused weight has {out_features} output features, the config gives "
                               f"gate {size} + up {size} = {2 * size} ({fam.size})")
    return [FusedPart(module, kind, rows, out_features) for kind, rows in contiguous((size, size), PARTS).items()]
