"""OpenCLIP text-encoder module names as Hugging Face CLIP names.

The text encoder of SD 2.x (``cond_stage_model.model.``) and SDXL's second one
(``conditioner.embedders.1.model.``) are OpenCLIP models in an original checkpoint, while kohya-ss
names their LoRA modules after transformers' CLIP (``lora_te_`` / ``lora_te2_`` +
``text_model.encoder.layers.N.self_attn.q_proj``). The renaming is that of diffusers' own
``convert_open_clip_checkpoint`` (``diffusers/loaders/single_file_utils.py``), written out here for
the modules a LoRA adapts (prefix stripped, no ``.weight``):

==========================================  ==================================================
OpenCLIP                                    transformers CLIP
==========================================  ==================================================
``transformer.resblocks.N.attn.in_proj``    ``text_model.encoder.layers.N.self_attn.q_proj``,
                                            ``k_proj``, ``v_proj``: rows [Q | K | V] of the one
                                            fused ``in_proj_weight`` (parts q, k, v)
``transformer.resblocks.N.attn.out_proj``   ``text_model.encoder.layers.N.self_attn.out_proj``
``transformer.resblocks.N.mlp.c_fc``        ``text_model.encoder.layers.N.mlp.fc1``
``transformer.resblocks.N.mlp.c_proj``      ``text_model.encoder.layers.N.mlp.fc2``
==========================================  ==================================================

A q/k/v module is named in the base's terms as the part ``<attn>.in_proj.q`` (``.k``, ``.v``):
its adapter holds that part's rows only. Pure: names only.
"""

from __future__ import annotations

import re

from wda.formats.fused_qkv import PARTS

# original-checkpoint prefix of an OpenCLIP text encoder -> kohya's prefix of its LoRA modules
PREFIXES = (("cond_stage_model.model.", "lora_te"),  # SD 2.x
            ("conditioner.embedders.1.model.", "lora_te2"))  # SDXL's second text encoder
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)$")
_INNER = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def to_hf(module: str) -> dict[str, str]:
    """transformers CLIP name -> the module (or ``in_proj`` part) of this OpenCLIP module (prefix
    stripped) it is; empty when the rule does not name it."""
    m = _BLOCK.match(module)
    if not m:
        return {}
    layer, inner = f"text_model.encoder.layers.{m.group(1)}", m.group(2)
    if inner == "attn.in_proj":
        return {f"{layer}.self_attn.{kind}_proj": f"{module}.{kind}" for kind in PARTS}
    return {f"{layer}.{_INNER[inner]}": module}
