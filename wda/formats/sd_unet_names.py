"""Original Stable Diffusion (LDM) U-Net module names as diffusers names.

kohya-ss names the modules of an SD 1.x / 2.x U-Net LoRA after diffusers
(``lora_unet_down_blocks_0_attentions_0_...``) and those of an SDXL one after the original
checkpoint (``lora_unet_input_blocks_4_1_...``). Matching an SD 1.x / 2.x LoRA to an original
checkpoint (``model.diffusion_model.input_blocks...``) needs the original names in diffusers'
terms: the renaming of diffusers' own ``convert_ldm_unet_checkpoint``
(``diffusers/loaders/single_file_utils.py``), written out here for module names (no
``.weight``). L is ``layers_per_block``; the first downsampler sits at ``input_blocks.{L+1}``.

==================================  ============================================
original                            diffusers
==================================  ============================================
``time_embed.0`` / ``time_embed.2``  ``time_embedding.linear_1`` / ``linear_2``
``input_blocks.0.0``                ``conv_in``
``out.0`` / ``out.2``               ``conv_norm_out`` / ``conv_out``
``input_blocks.i.0.op``             ``down_blocks.b.downsamplers.0.conv``, b = (i-1) // (L+1)
``input_blocks.i.0.<resnet>``       ``down_blocks.b.resnets.j.<resnet>``, (b, j) = divmod(i-1, L+1)
``input_blocks.i.1.<rest>``         ``down_blocks.b.attentions.j.<rest>``
``middle_block.0`` / ``.2``         ``mid_block.resnets.0`` / ``.1``
``middle_block.1.<rest>``           ``mid_block.attentions.0.<rest>``
``output_blocks.i.0.<resnet>``      ``up_blocks.b.resnets.j.<resnet>``, (b, j) = divmod(i, L+1)
``output_blocks.i.1.<rest>``        ``up_blocks.b.attentions.j.<rest>`` (not ``.1.conv``)
``output_blocks.i.{1,2}.conv``      ``up_blocks.b.upsamplers.0.conv``
==================================  ============================================

In a resnet: ``in_layers.0`` → ``norm1``, ``in_layers.2`` → ``conv1``, ``out_layers.0`` →
``norm2``, ``out_layers.3`` → ``conv2``, ``emb_layers.1`` → ``time_emb_proj``,
``skip_connection`` → ``conv_shortcut``. Attention blocks keep their inner names. Pure: names only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

TOP_LEVEL = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
          ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut"))
_MIDDLE = re.compile(r"^middle_block\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_OP = re.compile(r"^input_blocks\.(\d+)\.0\.op$")


def layers_per_block(modules: Iterable[str]) -> int | None:
    """L of a U-Net given its original module names (prefix stripped): the first downsampler,
    ``input_blocks.{L+1}.0.op``; None when there is none (then the layout is not told)."""
    ops = [int(m.group(1)) for m in map(_OP.match, modules) if m]
    return min(ops) - 1 if ops and min(ops) > 1 else None


def _resnet(rest: str) -> str:
    for old, new in RESNET:
        rest = rest.replace(old, new)
    return rest


def to_diffusers(module: str, layers: int) -> str | None:
    """The diffusers name of an original U-Net module (prefix ``model.diffusion_model.``
    stripped), or None when the rule does not name it."""
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    per = layers + 1
    m = _MIDDLE.match(module)
    if m:
        k, rest = int(m.group(1)), m.group(2)
        if k % 2 == 0:
            return f"mid_block.resnets.{max(k - 1, 0)}.{_resnet(rest)}"
        return f"mid_block.attentions.{max(k - 1, 0)}.{rest}"
    m = _BLOCK.match(module)
    if not m:
        return None
    kind, i, slot, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if kind == "input_blocks":
        if i == 0:
            return None
        b, j = divmod(i - 1, per)
        if slot == 0 and rest == "op":
            return f"down_blocks.{b}.downsamplers.0.conv"
        if slot == 0:
            return f"down_blocks.{b}.resnets.{j}.{_resnet(rest)}"
        return f"down_blocks.{b}.attentions.{j}.{rest}" if slot == 1 else None
    b, j = divmod(i, per)
    if slot in (1, 2) and rest == "conv":
        return f"up_blocks.{b}.upsamplers.0.conv"
    if slot == 0:
        return f"up_blocks.{b}.resnets.{j}.{_resnet(rest)}"
    return f"up_blocks.{b}.attentions.{j}.{rest}" if slot == 1 else None
