"""Fused attention projections: which output rows of a fused q/k/v weight are q, k and v.

Several model families store the query, key and value projections of a layer as one matrix.
Read from the model's ``config.json`` (a plain dict here), ``fused_parts`` gives, for one fused
module, the output rows of its weight in the canonical ``(out, in)`` orientation (GPT-2's
Conv1D, stored ``(in, out)``, transposed first) that form each part. The layouts are those of
the transformers attention code (the reference note in FORMATS.md cites the lines):

====================  ===================  ==============================================
family (model_type)   module               output rows
====================  ===================  ==============================================
gpt2 and its kin      ``c_attn`` (Conv1D)  [Q | K | V], H rows each (``crossattention``: [K | V])
gpt_neox, bloom       ``query_key_value``  per head j: [q_j; k_j; v_j], d rows each
falcon                ``query_key_value``  new_decoder_architecture: per KV group
                                           [q ... q; k; v]; multi_query: [Q | k | v];
                                           neither: per head [q_j; k_j; v_j]
phi3                  ``qkv_proj``         [Q (h·d) | K (g·d) | V (g·d)]
mpt                   ``Wqkv``             [Q | K | V], H rows each
chatglm (2/3)         ``query_key_value``  multi_query_attention: [Q (h·kv) | K (g·kv) |
                                           V (g·kv)]; else per head [q_j; k_j; v_j]
====================  ===================  ==============================================

Without a config: torch.nn.MultiheadAttention's ``in_proj_weight`` (OpenCLIP's text encoder,
in SD 2.x and SDXL checkpoints; the module ``<attn>.in_proj``) is [Q | K | V], E rows each for
an embedding of E features (``in_proj_parts``; diffusers' ``convert_open_clip_checkpoint``
splits it so, q first).

H is the hidden size, h the number of query heads, g the number of key/value heads, d the
head dimension. Only the row sets matter to ΔM and ΔD (means over rows, column norms over
the selected rows), but the rows are listed in head order all the same. Pure: no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

PARTS = ("q", "k", "v")


class FusedLayoutError(ValueError):
    """The config does not describe the fused weight (missing fields, shapes that do not fit)."""


@dataclass(frozen=True)
class FusedPart:
    """One of q, k, v of a fused module: its rows of the canonical (out, in) fused weight."""

    module: str  # the fused module's name, e.g. "transformer.h.0.attn.c_attn"
    kind: str  # "q" | "k" | "v"
    rows: tuple[int, ...]
    fused_out: int  # output features of the whole fused weight

    @property
    def name(self) -> str:
        return f"{self.module}.{self.kind}"


def _get(config: dict[str, Any], *names: str, default: Any = None) -> Any:
    """The first of ``names`` present in the config (HF attribute_map aliases)."""
    for n in names:
        if config.get(n) is not None:
            return config[n]
    if default is not None:
        return default
    raise FusedLayoutError(f"config has none of {', '.join(repr(n) for n in names)}")


def _positive_int(config: dict[str, Any], *names: str, default: Any = None) -> int:
    value = _get(config, *names, default=default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FusedLayoutError(f"config field {names[0]!r} must be a positive integer, not {value!r}")
    return value


def _flag(config: dict[str, Any], name: str) -> bool:
    value = config.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise FusedLayoutError(f"config field {name!r} must be true or false, not {value!r}")
    return value


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise FusedLayoutError(f"{what}: {total} is not divisible by {parts}")
    return total // parts


# ---- the three ways of laying out the rows ------------------------------------------------
def contiguous(sizes: tuple[int, ...], kinds: tuple[str, ...] = PARTS) -> dict[str, tuple[int, ...]]:
    """[Q | K | V] blocks of the given row counts, one after the other."""
    out, start = {}, 0
    for kind, n in zip(kinds, sizes):
        out[kind] = tuple(range(start, start + n))
        start += n
    return out


def per_head(heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """Rows viewed as (heads, 3, head_dim): head j holds q_j, k_j, v_j in that order."""
    return {kind: tuple(j * 3 * head_dim + t * head_dim + x for j in range(heads) for x in range(head_dim))
            for t, kind in enumerate(PARTS)}


def grouped(heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """Rows viewed as (kv_heads, heads/kv_heads + 2, head_dim): each KV group holds its query
    heads, then its key, then its value (Falcon's new decoder architecture)."""
    n = _divide(heads, kv_heads, "query heads per key/value head")
    slot = (n + 2) * head_dim

    def rows(slots) -> tuple[int, ...]:
        return tuple(g * slot + s * head_dim + x for g in range(kv_heads) for s in slots for x in range(head_dim))

    return {"q": rows(range(n)), "k": rows([n]), "v": rows([n + 1])}


# ---- the families --------------------------------------------------------------------------
def _gpt2(config: dict[str, Any], module: str, out: int) -> dict[str, tuple[int, ...]]:
    hidden = _positive_int(config, "n_embd", "hidden_size")
    if ".crossattention." in f".{module}.":  # cross-attention: c_attn holds k and v, q_attn the query
        return _expect(contiguous((hidden,) * 2, ("k", "v")), out)
    return _expect(contiguous((hidden,) * 3), out)


def _neox(config: dict[str, Any], module: str, out: int) -> dict[str, tuple[int, ...]]:
    hidden = _positive_int(config, "hidden_size", "n_embed", "n_embd")
    heads = _positive_int(config, "num_attention_heads", "n_head")
    head_dim = _divide(hidden, heads, "hidden size per attention head")
    return _expect(per_head(heads, head_dim), out)


def _falcon(config: dict[str, Any], module: str, out: int) -> dict[str, tuple[int, ...]]:
    hidden = _positive_int(config, "hidden_size")
    heads = _positive_int(config, "num_attention_heads", "n_head")
    head_dim = _divide(hidden, heads, "hidden size per attention head")
    if _flag(config, "new_decoder_architecture"):
        kv = _positive_int(config, "num_kv_heads", "n_head_kv", default=heads)
        return _expect(grouped(heads, kv, head_dim), out)
    if _flag(config, "multi_query"):
        return _expect(contiguous((hidden, head_dim, head_dim)), out)
    return _expect(per_head(heads, head_dim), out)


def _phi3(config: dict[str, Any], module: str, out: int) -> dict[str, tuple[int, ...]]:
    hidden = _positive_int(config, "hidden_size")
    heads = _positive_int(config, "num_attention_heads")
    kv = _positive_int(config, "num_key_value_heads", default=heads)
    head_dim = _positive_int(config, "head_dim", default=_divide(hidden, heads, "hidden size per attention head"))
    return _expect(contiguous((heads * head_dim, kv * head_dim, kv * head_dim)), out)


def _mpt(config: dict[str, Any], module: str, out: int) -> dict[str, tuple[int, ...]]:
    hidden = _positive_int(config, "d_model", "hidden_size")
    return _expect(contiguous((hidden,) * 3), out)


def _chatglm(config: dict[str, Any], module: str, out: int) -> dict[str, tuple[int, ...]]:
    hidden = _positive_int(config, "hidden_size")
    heads = _positive_int(config, "num_attention_heads")
    kv_channels = _positive_int(config, "kv_channels", default=_divide(hidden, heads, "hidden size per head"))
    if _flag(config, "multi_query_attention"):
        groups = _positive_int(config, "multi_query_group_num")
        return _expect(contiguous((heads * kv_channels, groups * kv_channels, groups * kv_channels)), out)
    return _expect(per_head(heads, kv_channels), out)


def _expect(parts: dict[str, tuple[int, ...]], out: int) -> dict[str, tuple[int, ...]]:
    total = sum(len(r) for r in parts.values())
    if total != out:
        sizes = " + ".join(f"{k} {len(r)}" for k, r in parts.items())
        raise FusedLayoutError(f"the fused weight has {out} output features, the config gives {sizes} = {total}")
    return parts


Rule = Callable[[dict[str, Any], str, int], dict[str, tuple[int, ...]]]


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # the last name component of the fused module
    rule: Rule


_GPT2 = Family("GPT-2", "c_attn", _gpt2)
FAMILIES: dict[str, Family] = {
    "gpt2": _GPT2, "openai-gpt": _GPT2, "imagegpt": _GPT2, "decision_transformer": _GPT2,
    "gpt_neox": Family("GPT-NeoX", "query_key_value", _neox),
    "bloom": Family("Bloom", "query_key_value", _neox),
    "falcon": Family("Falcon", "query_key_value", _falcon),
    "phi3": Family("Phi-3", "qkv_proj", _phi3),
    "mpt": Family("MPT", "Wqkv", _mpt),
    "chatglm": Family("ChatGLM", "query_key_value", _chatglm),
}


def family(config: dict[str, Any] | None) -> Family | None:
    """The fused-attention family of a model config, or None when it fuses nothing we know."""
    if not config:
        return None
    return FAMILIES.get(str(config.get("model_type") or ""))


def is_fused(config: dict[str, Any] | None, module: str) -> bool:
    fam = family(config)
    return fam is not None and module.rsplit(".", 1)[-1] == fam.module


def fused_parts(config: dict[str, Any] | None, module: str, out_features: int) -> list[FusedPart] | None:
    """The q, k, v parts of ``module`` (canonical output rows), or None when it is not fused.
    Raises FusedLayoutError when the config does not fit the weight."""
    fam = family(config)
    if fam is None or not is_fused(config, module):
        return None
    parts = fam.rule(config, module, out_features)
    return [FusedPart(module, kind, rows, out_features) for kind, rows in parts.items()]


def in_proj_parts(module: str, out_features: int, in_features: int) -> list[FusedPart]:
    """The q, k, v parts of a torch.nn.MultiheadAttention ``in_proj_weight`` (3E, E):
    [Q | K | V], E rows each. Raises FusedLayoutError when the weight is not (3E, E)."""
    if out_features != 3 * in_features:
        raise FusedLayoutError(f"a fused in_proj_weight of shape ({out_features}, {in_features}) is not "
                               f"(3·E, E): it does not hold q, k and v of one embedding")
    return [FusedPart(module, kind, rows, out_features)
            for kind, rows in contiguous((in_features,) * 3).items()]


def select_rows(t: torch.Tensor, rows: tuple[int, ...]) -> torch.Tensor:
    """``t[rows]``: a view when the rows are one contiguous block, a gather otherwise."""
    if rows and rows == tuple(range(rows[0], rows[0] + len(rows))):
        return t[rows[0]: rows[0] + len(rows)]
    return t.index_select(0, torch.tensor(rows, dtype=torch.long, device=t.device))
