"""Fused gated-MLP projections measured as gate and up: real transformers Phi-3 and GLM models,
full fine-tuning and PEFT LoRA/DoRA on ``gate_up_proj``, against the gate and up weights read
back through the model's own MLP code (an identity probe fed into the fused projection, the
gate caught where the MLP hands it to its activation, the up part where it reaches
``down_proj``) from PEFT's own ``merge_and_unload``; ChatGLM2/3 (remote code only) through a
stand-in with its module names against ``chunk(2)`` of the rows in float64."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig

import wda
from builders import ChatGLMStandIn, ft_checkpoints, peft_checkpoints, plain_reference, save_full
from wda.formats import fused_mlp

pytestmark = pytest.mark.filterwarnings("ignore")


class _RecordGate(torch.nn.Module):
    """An activation that records its input (the gate) and returns ones."""

    def __init__(self, got: dict) -> None:
        super().__init__()
        self.got = got

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.got["gate"] = x[0].T.clone()  # (in, I) -> (I, in)
        return torch.ones_like(x)


def model_gate_up(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the (gate, up) weights the model's own MLP forward cuts ``gate_up_proj`` into:
    the identity fed to ``gate_up_proj``, the activation replaced by one that records its input
    (the gate) and returns ones, so that ``down_proj`` receives the up part itself."""
    m = copy.deepcopy(model).double().eval()
    mlps = [mod for n, mod in m.named_modules() if hasattr(mod, "gate_up_proj")]
    n_in = mlps[0].gate_up_proj.weight.shape[1]
    probe = torch.eye(n_in, dtype=torch.float64)[None]
    out = []
    for mlp in mlps:
        got = {}
        mlp.gate_up_proj.register_forward_pre_hook(lambda _m, args: (probe,))

        mlp.activation_fn = _RecordGate(got)
        mlp.down_proj.register_forward_pre_hook(lambda _m, args, got=got: got.__setitem__("up", args[0][0].T.clone()))
        out.append(got)
    ids = torch.zeros(1, n_in, dtype=torch.long)  # as many positions as probe rows
    with torch.no_grad():
        m(input_ids=ids)
    return [(g["gate"], g["up"]) for g in out]


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(Phi3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=24, vocab_size=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _glm():
    from transformers import GlmConfig, GlmForCausalLM
    return GlmForCausalLM(GlmConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, intermediate_size=24, vocab_size=64,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=[2]))


def _load(model, sd):
    m = copy.deepcopy(model).double()
    m.load_state_dict(sd, strict=False)
    return m


def _check(df, run, step, ref0, reft, names, rel=1e-4) -> int:
    n = 0
    for layer, (parts0, partst) in enumerate(zip(ref0, reft)):
        for kind, w0, wt in zip(("gate", "up"), parts0, partst):
            row = df[(df.run == run) & (df.step == step) & (df.module == f"{names[layer]}.{kind}")]
            assert len(row) == 1, (run, step, names[layer], kind)
            dm, dd, _ = plain_reference(w0, wt)
            assert dd > 1e-10
            assert row.delta_m.iloc[0] == pytest.approx(dm, rel=rel), (run, step, kind)
            assert row.delta_d.iloc[0] == pytest.approx(dd, rel=rel), (run, step, kind)
            assert row.n_vectors.iloc[0] == w0.shape[0] == 24
            n += 1
    return n


@pytest.mark.parametrize("build", [_phi3, _glm], ids=["phi3", "glm"])
def test_gate_up_against_model_code_and_peft_merge(tmp_path, build):
    torch.manual_seed(0)
    model = build().eval()
    save_full(model, tmp_path / "base")
    names = [n for n, _ in model.named_modules() if n.endswith(".gate_up_proj")]
    ref0 = model_gate_up(model)
    # the model's halves are the first and second half of the rows (what the split relies on)
    w = model.state_dict()[names[0] + ".weight"].double()
    assert torch.equal(ref0[0][0], w[:24]) and torch.equal(ref0[0][1], w[24:])
    runs = {
        "ft": ft_checkpoints(model, tmp_path / "ft", steps=(1, 2), scale=0.004),
        "lora": peft_checkpoints(model, tmp_path / "lora", LoraConfig(r=4, lora_alpha=8, target_modules=["gate_up_proj"])),
        "dora": peft_checkpoints(model, tmp_path / "dora", LoraConfig(r=4, lora_alpha=8, target_modules=["gate_up_proj"],
                                                                      use_dora=True), seed=3),
    }
    df = wda.analyze(tmp_path, progress=False, dtype="float64")
    assert set(df.matrix) == {"gate_up_proj.gate", "gate_up_proj.up"}
    n = sum(_check(df, run, step, ref0, model_gate_up(_load(model, sd)), names)
            for run, states in runs.items() for step, sd in states.items())
    assert n == len(df) == 3 * 2 * 2 * len(names)
    # picked by part, and kept whole with --no-split
    assert set(wda.plan(tmp_path, modules=["gate_up_proj.up"]).matrix) == {"gate_up_proj.up"}
    whole = wda.plan(tmp_path, split_fused=False)
    assert set(whole.matrix) == {"gate_up_proj"} and set(whole.out_features) == {48}


class _ChatGLMStandIn(ChatGLMStandIn):
    """Only the MLPs of a ChatGLM2/3, under ChatGLM's module names."""

    def __init__(self, hidden: int, ffn: int, layers: int = 2) -> None:
        def block() -> torch.nn.Module:
            blk = torch.nn.Module()
            blk.mlp = torch.nn.Module()
            blk.mlp.dense_h_to_4h = torch.nn.Linear(hidden, 2 * ffn, bias=False)
            blk.mlp.dense_4h_to_h = torch.nn.Linear(ffn, hidden, bias=False)
            return blk
        super().__init__(block, layers)


def test_chatglm_dense_h_to_4h_against_float64_chunk(tmp_path):
    cfg = {"model_type": "chatglm", "hidden_size": 32, "num_attention_heads": 4, "kv_channels": 8,
           "ffn_hidden_size": 24}
    torch.manual_seed(0)
    model = _ChatGLMStandIn(32, 24)
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules() if n.endswith(".dense_h_to_4h")]
    dora = peft_checkpoints(model, tmp_path / "dora", LoraConfig(r=4, lora_alpha=8, target_modules=["dense_h_to_4h"],
                                                                 use_dora=True), seed=3)
    df = wda.analyze(tmp_path, progress=False, dtype="float64")
    assert set(df.matrix) == {"dense_h_to_4h.gate", "dense_h_to_4h.up"}

    def parts(sd):  # the remote code's swiglu: silu(chunk(x, 2)[0]) * chunk(x, 2)[1]
        return [sd[n + ".weight"].double().chunk(2, dim=0) for n in names]

    n = sum(_check(df, "dora", step, parts(base_sd), parts(sd), names) for step, sd in dora.items())
    assert n == len(df) == 2 * 2 * len(names)
    # ChatGLM-6B v1: a plain GELU MLP (no ffn_hidden_size), left whole
    (tmp_path / "base" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "ffn_hidden_size"}))
    assert set(wda.plan(tmp_path).matrix) == {"dense_h_to_4h"}


def test_rules_and_a_config_that_does_not_fit(tmp_path, capsys):
    cfg = {"model_type": "phi3", "intermediate_size": 6}
    parts = fused_mlp.fused_parts(cfg, "model.layers.0.mlp.gate_up_proj", 12)
    assert [(p.kind, p.rows) for p in parts] == [("gate", tuple(range(6))), ("up", tuple(range(6, 12)))]
    assert fused_mlp.fused_parts(cfg, "model.layers.0.mlp.down_proj", 12) is None
    assert fused_mlp.fused_parts({"model_type": "llama", "intermediate_size": 6}, "l.0.mlp.gate_up_proj", 12) is None
    with pytest.raises(fused_mlp.FusedLayoutError, match="gate 6 \\+ up 6 = 12"):
        fused_mlp.fused_parts(cfg, "model.layers.0.mlp.gate_up_proj", 14)
    # through the CLI: one line naming config.json
    torch.manual_seed(0)
    model = _phi3().eval()
    save_full(model, tmp_path / "base")
    ft_checkpoints(model, tmp_path / "ft", steps=(1,), scale=0.004)
    c = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**c, "intermediate_size": 20}))
    from wda.report.cli import main

    capsys.readouterr()
    assert main([str(tmp_path), "--dry-run", "--modules", "gate_up_proj"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "config.json" in line and "gate, up" in line and "--no-split" in line
    assert main([str(tmp_path), "--dry-run", "--modules", "gate_up_proj", "--no-split"]) == 0
