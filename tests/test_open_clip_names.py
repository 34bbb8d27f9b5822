"""kohya text-encoder LoRA / DoRA files (transformers CLIP names) against an original checkpoint
whose text encoder is OpenCLIP: SDXL's second one (``lora_te2_`` against
``conditioner.embedders.1.model.``) and SD 2.x's (``lora_te_`` against ``cond_stage_model.model.``).
The OpenCLIP names of a tiny transformers CLIP text model are written here (q, k, v stacked into
one ``in_proj_weight``), checked to be what diffusers' own ``convert_open_clip_checkpoint`` maps
back onto the model's weights key for key; adapters on q/k/v are measured against their rows of
the fused weight, exactly as a float64 merge of the separate q_proj / k_proj / v_proj."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import wda
from builders import one_line_error, plain_reference
from wda.formats import open_clip_names

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore")

R, D, LAYERS = 4, 32, 2
SDXL_TE2, SD2_TE = "conditioner.embedders.1.model.", "cond_stage_model.model."
# transformers CLIP module -> (alpha; None: no alpha, scale 1)
ADAPTED = {"text_model.encoder.layers.0.self_attn.q_proj": 2.0,
           "text_model.encoder.layers.0.self_attn.k_proj": 8.0,
           "text_model.encoder.layers.0.self_attn.v_proj": None,
           "text_model.encoder.layers.1.self_attn.q_proj": 1.0,
           "text_model.encoder.layers.1.self_attn.out_proj": 4.0,
           "text_model.encoder.layers.1.mlp.fc1": 2.0,
           "text_model.encoder.layers.0.mlp.fc2": 2.0}


def tiny_clip(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, vocab_size=64, max_position_embeddings=16)).eval()


def hf_weights(model) -> dict[str, torch.Tensor]:
    """The model's weights under transformers 4's names (``text_model.``, as kohya names them)."""
    return {"text_model." + k.removeprefix("text_model."): v.detach().clone() for k, v in model.state_dict().items()}


def to_open_clip(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text model's weights in OpenCLIP names (transformers -> OpenCLIP, written out here)."""
    sd = {"token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
          "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
          "ln_final.weight": hf["text_model.final_layer_norm.weight"],
          "ln_final.bias": hf["text_model.final_layer_norm.bias"]}
    for i in range(LAYERS):
        h, o = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for t in ("weight", "bias"):
            sd[f"{o}attn.in_proj_{t}"] = torch.cat([hf[f"{h}self_attn.{p}_proj.{t}"] for p in "qkv"])
            for new, old in (("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"),
                             ("mlp.c_proj", "mlp.fc2"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
                sd[f"{o}{new}.{t}"] = hf[f"{h}{old}.{t}"]
    return {k: v.contiguous() for k, v in sd.items()}


def kohya_file(path: Path, hf: dict, gen, prefix: str, dora: str | None = None) -> dict:
    """A kohya-ss / LyCORIS file of ``ADAPTED`` (lora_down (r, in), lora_up (out, r), alpha,
    dora_scale (out, 1) or (1, in)); returns each module's float64 merged weight W' and its W_0."""
    sd, refs = {}, {}
    for mod, alpha in ADAPTED.items():
        w0 = hf[mod + ".weight"]
        o, i = w0.shape
        down, up = torch.randn(R, i, generator=gen) * 0.1, torch.randn(o, R, generator=gen) * 0.1
        k = prefix + "_" + mod.replace(".", "_")
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{k}.alpha"] = torch.tensor(alpha)
        wc = w0.double() + (alpha or R) / R * (up.double() @ down.double())
        if dora == "out":  # per output row: W' = m · W_c / ‖W_c‖ (norm of each row)
            m = w0.norm(dim=1, keepdim=True) * (1 + 0.1 * torch.randn(o, 1, generator=gen))
            sd[f"{k}.dora_scale"] = m
            wc = m.double() * wc / wc.norm(dim=1, keepdim=True)
        elif dora == "in":  # per input channel: the norm over the output rows (of this module alone)
            m = w0.norm(dim=0, keepdim=True) * (1 + 0.1 * torch.randn(1, i, generator=gen))
            sd[f"{k}.dora_scale"] = m
            wc = m.double() * wc / wc.norm(dim=0, keepdim=True)
        refs[mod] = (w0, wc)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, path)
    return refs


def base_name(prefix: str, hf_module: str) -> str:
    """The module (or in_proj part) wda names for a transformers CLIP module of an OpenCLIP base."""
    i, rest = hf_module.removeprefix("text_model.encoder.layers.").split(".", 1)
    tail = {"self_attn.q_proj": "attn.in_proj.q", "self_attn.k_proj": "attn.in_proj.k",
            "self_attn.v_proj": "attn.in_proj.v", "self_attn.out_proj": "attn.out_proj",
            "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}[rest]
    return f"{prefix}transformer.resblocks.{i}.{tail}"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """An SDXL checkpoint (CLIP-L te1 + OpenCLIP te2) and an SD 2.x one (OpenCLIP), tiny; the
    OpenCLIP names checked against diffusers' conversion, value for value."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    d = tmp_path_factory.mktemp("openclip")
    te1, te2, te = tiny_clip(0), tiny_clip(1), tiny_clip(2)
    hf1, hf2, hf = hf_weights(te1), hf_weights(te2), hf_weights(te)
    for model, weights, prefix in ((te2, hf2, SDXL_TE2), (te, hf, SD2_TE)):
        back = convert_open_clip_checkpoint(model, {prefix + k: v for k, v in to_open_clip(weights).items()},
                                            prefix=prefix)
        back = {"text_model." + k.removeprefix("text_model."): v for k, v in back.items()}
        assert set(back) == set(weights) - {"text_model.embeddings.position_ids"}
        for k, v in back.items():  # q, k, v rows in diffusers' order are the model's own
            assert torch.equal(v, weights[k]), k
    unet = {"model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.randn(8, 8, 1, 1)}
    sdxl = {**unet, **{f"conditioner.embedders.0.transformer.{k}": v.contiguous() for k, v in hf1.items()},
            **{SDXL_TE2 + k: v for k, v in to_open_clip(hf2).items()}}
    sd2 = {**unet, **{SD2_TE + k: v for k, v in to_open_clip(hf).items()}}
    save_file(sdxl, d / "sdxl-tiny.safetensors")
    save_file(sd2, d / "sd2-tiny.safetensors")
    return d, hf1, hf2, hf


def test_rule():
    assert open_clip_names.to_hf("transformer.resblocks.3.attn.in_proj") == {
        f"text_model.encoder.layers.3.self_attn.{p}_proj": f"transformer.resblocks.3.attn.in_proj.{p}" for p in "qkv"}
    assert open_clip_names.to_hf("transformer.resblocks.0.mlp.c_proj") == {
        "text_model.encoder.layers.0.mlp.fc2": "transformer.resblocks.0.mlp.c_proj"}
    assert open_clip_names.to_hf("token_embedding") == {} == open_clip_names.to_hf("transformer.resblocks.0.ln_1")


def check(df, run, prefix, refs) -> None:
    rows = df[(df.run == run) & df.module.str.startswith(prefix)]
    assert set(rows.module) == {base_name(prefix, m) for m in refs}
    for mod, (w0, wt) in refs.items():
        row = rows[rows.module == base_name(prefix, mod)]
        dm, dd, _ = plain_reference(w0, wt)
        assert row.delta_m.iloc[0] == pytest.approx(dm, rel=1e-6), (run, mod)
        assert row.delta_d.iloc[0] == pytest.approx(dd, rel=1e-6), (run, mod)
        assert row.n_vectors.iloc[0] == w0.shape[0]


@pytest.mark.parametrize("dora", [None, "out", "in"])
def test_sdxl_te2_and_sd2_te_against_open_clip(bases, tmp_path, dora):
    d, hf1, hf2, hf = bases
    gen = torch.Generator().manual_seed(7)
    refs2 = kohya_file(tmp_path / "xl" / "checkpoint-1" / "xl.safetensors", hf2, gen, "lora_te2", dora)
    df = wda.analyze(tmp_path / "xl", base=d / "sdxl-tiny.safetensors", progress=False, dtype="float64")
    assert set(df.method) == {"DoRA" if dora else "LoRA"}
    check(df, "xl", SDXL_TE2, refs2)
    assert set(df[df.module.str.endswith("in_proj.q")].matrix) == {"in_proj.q"}
    refs = kohya_file(tmp_path / "sd2" / "checkpoint-1" / "sd2.safetensors", hf, gen, "lora_te", dora)
    df = wda.analyze(tmp_path / "sd2", base=d / "sd2-tiny.safetensors", progress=False, dtype="float64")
    check(df, "sd2", SD2_TE, refs)
    if dora is None:  # float32 and --no-split (adapters on parts: still their parts) agree
        df32 = wda.analyze(tmp_path / "sd2", base=d / "sd2-tiny.safetensors", progress=False, split_fused=False)
        assert df32.delta_d.to_numpy() == pytest.approx(df.delta_d.to_numpy(), rel=1e-4)


def test_sdxl_file_with_te1_and_te2(bases, tmp_path):
    """One SDXL LoRA adapting both text encoders: te1 by its transformers names, te2 through OpenCLIP."""
    d, hf1, hf2, _ = bases
    gen = torch.Generator().manual_seed(11)
    refs1 = kohya_file(tmp_path / "a.safetensors", hf1, gen, "lora_te1")
    refs2 = kohya_file(tmp_path / "b.safetensors", hf2, gen, "lora_te2")
    from safetensors.torch import load_file

    run = tmp_path / "run" / "checkpoint-3"
    run.mkdir(parents=True)
    save_file({**load_file(tmp_path / "a.safetensors"), **load_file(tmp_path / "b.safetensors")},
              run / "style.safetensors")
    df = wda.analyze(tmp_path / "run", base=d / "sdxl-tiny.safetensors", progress=False, dtype="float64")
    assert len(df) == len(refs1) + len(refs2)
    for mod, (w0, wt) in refs1.items():
        row = df[df.module == f"conditioner.embedders.0.transformer.{mod}"]
        dm, dd, _ = plain_reference(w0, wt)
        assert row.delta_d.iloc[0] == pytest.approx(dd, rel=1e-6) and row.delta_m.iloc[0] == pytest.approx(dm, rel=1e-6)
    check(df, "run", SDXL_TE2, refs2)


Q = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.mark.parametrize("case", ["up_of_whole_in_proj", "dora_scale_of_whole_in_proj", "layer_not_in_base",
                                  "in_proj_not_fused"])
def test_bad_variants_one_line(bases, tmp_path, capsys, case):
    from safetensors.torch import load_file
    from wda.report.cli import main

    d, _, hf2, _ = bases
    f = tmp_path / "xl" / "checkpoint-1" / "xl.safetensors"
    kohya_file(f, hf2, torch.Generator().manual_seed(1), "lora_te2", "out")
    sd, base = load_file(f), d / "sdxl-tiny.safetensors"
    if case == "up_of_whole_in_proj":  # up with the rows of q, k and v: not a q_proj adapter
        sd[f"{Q}.lora_up.weight"] = torch.ones(3 * D, R)
        sd[f"{Q}.dora_scale"] = torch.ones(3 * D, 1)
        words = [f.name, Q, f"({3 * D}, {R})"]
    elif case == "dora_scale_of_whole_in_proj":
        sd[f"{Q}.dora_scale"] = torch.ones(3 * D, 1)
        words = [f.name, "dora_scale", f"({3 * D}, 1)", "neither"]
    elif case == "layer_not_in_base":
        sd.update({k.replace("layers_0_", "layers_7_"): v.clone() for k, v in sd.items() if k.startswith(Q)})
        words = [f.name, "lora_te2_text_model_encoder_layers_7_self_attn_q_proj", "base"]
    else:  # a base whose in_proj_weight does not hold q, k and v of one embedding
        sdb = load_file(base)
        sdb[SDXL_TE2 + "transformer.resblocks.0.attn.in_proj_weight"] = torch.ones(2 * D, D)
        base = tmp_path / "bad-base.safetensors"
        save_file(sdb, base)
        words = [base.name, "in_proj", f"({2 * D}, {D})"]
    save_file(sd, f)
    rc = main([str(tmp_path / "xl"), "--base", str(base), "--dry-run"])
    one_line_error(rc, capsys.readouterr().err, *words)
