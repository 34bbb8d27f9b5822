"""Diffusion LoRA / DoRA files in the kohya-ss / LyCORIS format, written here from the format's
description (FORMATS.md §3), on a tiny diffusers U-Net: plain LoRA and LoCon against diffusers'
own conversion, loading and fusing (``load_lora_into_unet`` + ``fuse_lora``), DoRA on either
``dora_scale`` axis against the formula in float64; original-SD naming of the base."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import wda
from builders import dry_run_error, plain_reference

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore")

R = 4
# attention projections (self, cross), a 1x1 conv, a 3x3 conv (LoCon)
MODULES = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
           "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
           "down_blocks.0.attentions.0.proj_in",
           "down_blocks.0.resnets.0.conv1"]
# kohya's network_alpha for linear and 1x1 modules, conv_alpha for the 3x3 LoCon one
KOHYA_ALPHAS = (2.0, 2.0, 2.0, 1.0)
# one alpha per module, and none (alpha = r): diffusers 0.42's conversion gives every module of
# one attention block the same alpha, so these are checked against the formula only
ODD_ALPHAS = (2.0, 8.0, None, 1.0)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=8, norm_num_groups=8).eval()


def kohya_name(module: str, prefix: str = "lora_unet") -> str:
    return prefix + "_" + module.replace(".", "_")  # the format's rule, written out


def write_kohya(path: Path, factors: dict, prefix="lora_unet") -> None:
    """A kohya-ss / LyCORIS file: <name>.lora_down.weight (r, in[, kh, kw]), .lora_up.weight
    (out, r[, 1, 1]), .alpha (0-d), .dora_scale."""
    sd = {}
    for mod, f in factors.items():
        k = kohya_name(mod, prefix)
        sd[f"{k}.lora_down.weight"] = f["down"].contiguous()
        sd[f"{k}.lora_up.weight"] = f["up"].contiguous()
        if f.get("alpha") is not None:
            sd[f"{k}.alpha"] = torch.tensor(f["alpha"])
        if f.get("dora_scale") is not None:
            sd[f"{k}.dora_scale"] = f["dora_scale"].contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(R)})


def make_factors(weights: dict, gen, dora: str | None = None, alphas=KOHYA_ALPHAS, scale=0.05) -> dict:
    out = {}
    for mod, alpha in zip(MODULES, alphas):
        w = weights[mod]
        o, i = w.shape[0], w.shape[1]
        conv = w.dim() == 4
        down = torch.randn(R, i, *w.shape[2:], generator=gen) * scale
        up = torch.randn(o, R, *((1, 1) if conv else ()), generator=gen) * scale
        f = {"down": down, "up": up, "alpha": alpha}
        tail = (1, 1) if conv else ()
        flat = w.reshape(o, -1)
        if dora == "out":  # (out, 1[, 1, 1]): per output row
            f["dora_scale"] = (flat.norm(dim=1) * (1 + 0.05 * torch.randn(o, generator=gen))).reshape(o, 1, *tail)
        elif dora == "in":  # (1, in[, 1, 1]): per input channel, over the output rows and kernel
            per_in = w.transpose(0, 1).reshape(i, -1).norm(dim=1)
            f["dora_scale"] = (per_in * (1 + 0.05 * torch.randn(i, generator=gen))).reshape(1, i, *tail)
        out[mod] = f
    return out


def merged_float64(w0: torch.Tensor, f: dict) -> torch.Tensor:
    """LyCORIS's merge written out in float64 on the unflattened kernel: W_c = W_0 + (alpha/r)·up·down,
    then W_c · dora_scale / ||W_c|| on the axis the shape of dora_scale names."""
    w0 = w0.double()
    s = (f["alpha"] if f.get("alpha") else R) / R
    delta = (f["up"].double().flatten(1) @ f["down"].double().flatten(1)).reshape(w0.shape)
    wc = w0 + s * delta
    m = f.get("dora_scale")
    if m is None:
        return wc
    m = m.double()
    if m.shape[0] == w0.shape[0]:
        norm = wc.flatten(1).norm(dim=1).reshape(m.shape)
    else:
        norm = wc.transpose(0, 1).flatten(1).norm(dim=1).reshape(m.shape)
    return wc * m / norm


def diffusers_fused(unet, path: Path) -> dict:
    """diffusers' own path: convert the kohya file, load it into the U-Net, fuse."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from safetensors.torch import load_file

    u = copy.deepcopy(unet).double()
    sd = {k: v.double() for k, v in load_file(path).items()}
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(sd)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, u, adapter_name="kohya")
    u.fuse_lora()
    return {mod: u.get_submodule(mod).weight.detach().clone() for mod in MODULES}


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("kohya")
    unet = tiny_unet()
    unet.save_pretrained(d / "base")  # diffusers layout: diffusion_pytorch_model.safetensors
    weights = {mod: unet.get_submodule(mod).weight.detach().clone() for mod in MODULES}
    gen = torch.Generator().manual_seed(3)
    refs = {}
    for run, dora, alphas in (("lora", None, KOHYA_ALPHAS), ("lora_alphas", None, ODD_ALPHAS),
                              ("dora_out", "out", ODD_ALPHAS), ("dora_in", "in", KOHYA_ALPHAS)):
        refs[run] = {}
        for step in (5, 10):
            f = make_factors(weights, gen, dora, alphas)
            path = d / run / f"checkpoint-{step}" / f"{run}-{step:06d}.safetensors"
            write_kohya(path, f)
            if run == "lora":
                refs[run][step] = diffusers_fused(unet, path)
                formula = {mod: merged_float64(weights[mod], f[mod]) for mod in MODULES}
                for mod in MODULES:  # the formula the other runs are checked against is diffusers'
                    assert torch.allclose(refs[run][step][mod], formula[mod], rtol=0, atol=1e-6)
            else:
                refs[run][step] = {mod: merged_float64(weights[mod], f[mod]) for mod in MODULES}
    return d, weights, refs


def check(df, run, weights, states, rel=1e-4) -> int:
    n = 0
    for step, merged in states.items():
        for mod, wt in merged.items():
            row = df[(df.run == run) & (df.step == step) & (df.module == mod)]
            assert len(row) == 1, (run, step, mod)
            dm, dd, _ = plain_reference(weights[mod].flatten(1), wt.flatten(1))
            assert row.delta_m.iloc[0] == pytest.approx(dm, rel=rel), (run, step, mod)
            assert row.delta_d.iloc[0] == pytest.approx(dd, rel=rel), (run, step, mod)
            assert row.n_vectors.iloc[0] == weights[mod].shape[0]
            n += 1
    return n


def test_lora_and_dora_both_axes(unet_dir):
    d, weights, refs = unet_dir
    df = wda.analyze(d, progress=False, dtype="float64")
    assert dict(zip(df.run, df.method)) == {"lora": "LoRA", "lora_alphas": "LoRA", "dora_out": "DoRA",
                                            "dora_in": "DoRA"}
    n = sum(check(df, run, weights, states) for run, states in refs.items())
    assert n == len(df) == 4 * 2 * len(MODULES)
    df32 = wda.analyze(d, progress=False)
    assert df32.delta_d.to_numpy() == pytest.approx(df.delta_d.to_numpy(), rel=1e-4)


def test_original_sd_naming_of_the_base(tmp_path):
    """A text-encoder LoRA (lora_te_...) against an original SD 1.x checkpoint, whose CLIP
    weights sit under cond_stage_model.transformer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=64, max_position_embeddings=16))
    # as in v1-5-pruned.safetensors (saved from transformers 4's CLIPTextModel, whose weights
    # sit under text_model.; transformers 5 names them without it)
    sd = {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v.contiguous()
          for k, v in te.state_dict().items()}
    sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"] = torch.randn(32, 32, 1, 1)
    (tmp_path / "base").mkdir()
    save_file(sd, tmp_path / "base" / "v1-5-tiny.safetensors")
    gen = torch.Generator().manual_seed(1)
    mods = [f"text_model.encoder.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    factors = {m: {"down": torch.randn(R, 32, generator=gen) * 0.05, "up": torch.randn(32, R, generator=gen) * 0.05,
                   "alpha": 4.0} for m in mods}
    write_kohya(tmp_path / "te" / "checkpoint-1" / "te.safetensors", factors, prefix="lora_te")
    df = wda.analyze(tmp_path, base=tmp_path / "base" / "v1-5-tiny.safetensors", progress=False, dtype="float64")
    assert len(df) == len(mods)
    for m in mods:
        w0 = sd[f"cond_stage_model.transformer.{m}.weight"]
        row = df[df.module == f"cond_stage_model.transformer.{m}"]
        dm, dd, _ = plain_reference(w0, merged_float64(w0, factors[m]))
        assert row.delta_m.iloc[0] == pytest.approx(dm, rel=1e-4)
        assert row.delta_d.iloc[0] == pytest.approx(dd, rel=1e-4)


def _rewrite(path: Path, fn) -> None:
    from safetensors.torch import load_file

    sd = load_file(path)
    fn(sd)
    save_file(sd, path)


Q = kohya_name(MODULES[0])


@pytest.mark.parametrize("case", ["loha", "lokr", "dora_scale_neither", "up_shape", "name_not_in_base",
                                  "down_without_up"])
def test_bad_variants_one_line(unet_dir, tmp_path, capsys, case):
    src, _, _ = unet_dir
    d = tmp_path / "d"
    shutil.copytree(src, d)
    f = d / "dora_out" / "checkpoint-5" / "dora_out-000005.safetensors"
    if case == "loha":
        _rewrite(f, lambda sd: sd.update({f"{Q}.hada_w1_a": torch.ones(32, R), f"{Q}.hada_w1_b": torch.ones(R, 32)}))
        words = [f.name, "LoHa", "not supported yet"]
    elif case == "lokr":
        _rewrite(f, lambda sd: sd.update({f"{Q}.lokr_w1": torch.ones(4, 4)}))
        words = [f.name, "LoKr", "not supported yet"]
    elif case == "dora_scale_neither":
        _rewrite(f, lambda sd: sd.__setitem__(f"{Q}.dora_scale", torch.ones(2, 3)))
        words = [f.name, "dora_scale", "(2, 3)", "neither"]
    elif case == "up_shape":  # a plain LoRA file: the base names the mismatch
        f = d / "lora" / "checkpoint-5" / "lora-000005.safetensors"
        _rewrite(f, lambda sd: sd.__setitem__(f"{Q}.lora_up.weight", torch.ones(31, R)))
        words = [f.name, Q, "(31, 4)"]
    elif case == "name_not_in_base":
        _rewrite(f, lambda sd: sd.update({k.replace("attn1_to_q", "attn1_to_x"): v.clone() for k, v in list(sd.items())
                                          if k.startswith(Q)}))
        words = [f.name, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_x", "base"]
    else:
        _rewrite(f, lambda sd: sd.pop(f"{Q}.lora_up.weight"))
        words = [f.name, Q, "lora_up.weight"]
    dry_run_error(capsys, d, *words)
