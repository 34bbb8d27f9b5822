"""An SD 1.x / 2.x kohya U-Net LoRA (diffusers module names) against an original Stable
Diffusion checkpoint (``model.diffusion_model.input_blocks...``): the original names of a tiny
diffusers U-Net of SD 1.x's layout (cross-attention down and up blocks, two resnets per block)
are written here from the diffusers names, checked to be what diffusers' own
``convert_ldm_unet_checkpoint`` maps back onto the diffusers state dict key for key, and the
LoRA is measured against them exactly as against the diffusers base (float64 formula)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

import wda
from builders import plain_reference
from wda.formats import sd_unet_names

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore")

L = 2  # layers_per_block of SD 1.x
R = 4
MODULES = ["down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q",
           "down_blocks.0.attentions.0.proj_in",
           "down_blocks.1.resnets.1.conv1",
           "down_blocks.0.downsamplers.0.conv",
           "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
           "mid_block.resnets.1.conv2",
           "up_blocks.0.upsamplers.0.conv",
           "up_blocks.1.upsamplers.0.conv",
           "up_blocks.2.attentions.2.proj_out",
           "up_blocks.1.resnets.2.conv_shortcut"]


def tiny_sd_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=L, block_out_channels=(8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=8, norm_num_groups=8).eval()


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def to_original(key: str, up_attn_blocks: set[int]) -> str:
    """A diffusers U-Net key in original SD naming (diffusers -> LDM, written out here)."""
    per = L + 1
    for d, o in _TOP.items():
        if key.startswith(d + "."):
            return o + key[len(d):]

    def res(rest):
        head, _, tail = rest.partition(".")
        return f"{_RESNET.get(head, head)}.{tail}"

    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"input_blocks.{int(m[1]) * per + int(m[2]) + 1}.0.{res(m[3])}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{int(m[1]) * per + int(m[2]) + 1}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{res(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{res(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        return f"output_blocks.{b * per + L}.{2 if b in up_attn_blocks else 1}.conv.{m[2]}"
    raise AssertionError(f"no rule for {key}")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(folder, diffusers state dict, {original key: diffusers key}) of a tiny SD 1.x U-Net,
    with diffusers' own conversion checked to map the original names back, key for key."""
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    unet = tiny_sd_unet()
    sd = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    up_attn = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    names = {to_original(k, up_attn): k for k in sd}
    assert len(names) == len(sd)
    back = convert_ldm_unet_checkpoint({LDM_UNET_KEY + o: o for o in names}, dict(unet.config))
    assert {v: k for k, v in back.items()} == names  # diffusers maps every original name back onto its key
    d = tmp_path_factory.mktemp("sd1")
    save_file({LDM_UNET_KEY + o: sd[k].contiguous() for o, k in names.items()}, d / "sd15.safetensors")
    return d, sd, names


def test_rule_agrees_with_diffusers_for_every_module(original):
    _, sd, names = original
    modules = {o[:-len(".weight")]: k[:-len(".weight")] for o, k in names.items() if o.endswith(".weight")}
    assert sd_unet_names.layers_per_block(modules) == L
    for o, k in modules.items():
        assert sd_unet_names.to_diffusers(o, L) == k, o
    assert sd_unet_names.to_diffusers("input_blocks.0.0", L) == "conv_in"
    assert sd_unet_names.to_diffusers("output_blocks.3.7.conv", L) is None
    assert sd_unet_names.layers_per_block(["input_blocks.1.0.in_layers.2"]) is None


def test_sd1_lora_against_an_original_checkpoint(original, tmp_path):
    d, sd, names = original
    gen = torch.Generator().manual_seed(5)
    lora, refs = {}, {}
    for mod in MODULES:
        w = sd[mod + ".weight"]
        down = torch.randn(R, w.shape[1], *w.shape[2:], generator=gen) * 0.05
        up = torch.randn(w.shape[0], R, *((1, 1) if w.dim() == 4 else ()), generator=gen) * 0.05
        k = "lora_unet_" + mod.replace(".", "_")  # kohya's name (diffusers names for SD 1.x)
        lora[f"{k}.lora_down.weight"], lora[f"{k}.lora_up.weight"], lora[f"{k}.alpha"] = down, up, torch.tensor(2.0)
        refs[mod] = w.double().flatten(1) + 2.0 / R * (up.double().flatten(1) @ down.double().flatten(1))
    (tmp_path / "run" / "checkpoint-1").mkdir(parents=True)
    save_file(lora, tmp_path / "run" / "checkpoint-1" / "style.safetensors")
    df = wda.analyze(tmp_path / "run", base=d / "sd15.safetensors", progress=False, dtype="float64")
    original_of = {k[:-len(".weight")]: "model.diffusion_model." + o[:-len(".weight")] for o, k in names.items()}
    assert set(df.module) == {original_of[m] for m in MODULES}
    for mod in MODULES:
        row = df[df.module == original_of[mod]]
        dm, dd, _ = plain_reference(sd[mod + ".weight"].flatten(1), refs[mod])
        assert row.delta_m.iloc[0] == pytest.approx(dm, rel=1e-6) and row.delta_d.iloc[0] == pytest.approx(dd, rel=1e-6)
