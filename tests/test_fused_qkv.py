"""Fused attention projections measured as q, k, v: real transformers models of each family,
full fine-tuning and PEFT LoRA/DoRA on the fused module, against q/k/v weights read back
through the model's own attention code (an identity probe fed into the fused projection,
caught where the model hands q, k, v to its attention) from PEFT's own ``merge_and_unload``."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from peft import LoraConfig

import wda
from builders import ChatGLMStandIn, ft_checkpoints, peft_checkpoints, plain_reference, save_full
from wda.formats import fused_qkv

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- q, k, v through the model's own code ------------------------------------------------
_CAUGHT: list[tuple[torch.Tensor, ...]] = []


def _catch_attention(module, query, key, value, attention_mask, **kw):
    """An attention function that records what the model hands it (batch, heads, seq, d)."""
    _CAUGHT.append((query, key, value))
    b, h, s, d = query.shape
    return torch.zeros(b, s, h, d, dtype=query.dtype), None


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    """(heads, seq=in, d) outputs of an identity probe -> the (heads·d, in) weight rows."""
    h, s, d = x.shape
    return x.permute(0, 2, 1).reshape(h * d, s)


def model_qkv(model, fused: str, catch: str = "attention", group: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """Per layer, the (q, k, v) weights the model's own forward pass splits its fused projection
    into. ``catch``: "attention" (the attention-function interface, before the heads are repeated
    for GQA), or the name of the attention module's own splitting method (Bloom ``_reshape``
    returns (b, h, s, d); Falcon ``_split_heads`` returns (b, s, h, d)). ``group``: Falcon's
    grouped layout broadcasts each key/value head over its ``group`` query heads: take one."""
    from transformers import AttentionInterface

    m = copy.deepcopy(model).double().eval()
    mods = [(n, mod) for n, mod in m.named_modules() if n.endswith("." + fused)]
    n_in = mods[0][1].weight.shape[0 if fused == "c_attn" else 1]
    probe = torch.eye(n_in, dtype=torch.float64)[None]
    caught: list[tuple[torch.Tensor, ...]] = []
    for name, mod in mods:
        if getattr(mod, "bias", None) is not None:
            mod.bias.data.zero_()
        mod.register_forward_pre_hook(lambda _m, args, kwargs: ((probe,), {}), with_kwargs=True)
        if catch != "attention":
            parent = m.get_submodule(name.rpartition(".")[0])
            orig = getattr(parent, catch)

            def wrapped(x, orig=orig):
                out = orig(x)
                caught.append(tuple(t.detach().clone() for t in out))
                return out

            setattr(parent, catch, wrapped)
    if catch == "attention":
        AttentionInterface.register("wda_catch", _catch_attention)
        m.set_attn_implementation("wda_catch")
        _CAUGHT.clear()
    ids = torch.zeros(1, n_in, dtype=torch.long)
    with torch.no_grad():  # positions all 0: rotary embeddings are the identity
        m(input_ids=ids, position_ids=torch.zeros_like(ids))
    if catch == "attention":
        return [tuple(_rows_of(t[0]) for t in qkv) for qkv in _CAUGHT]
    out = []
    for qkv in caught:
        if catch == "_split_heads":  # (b, s, heads, d) -> (heads, s, d)
            qkv = tuple(t[0].permute(1, 0, 2) for t in qkv)
            qkv = (qkv[0], qkv[1][::group], qkv[2][::group])
        else:
            qkv = tuple(t[0] for t in qkv)
        out.append(tuple(_rows_of(t) for t in qkv))
    return out


# ---- the families ----------------------------------------------------------------------------
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64))


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, vocab_size=64))


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM
    return BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64))


def _falcon(**kw):
    from transformers import FalconConfig, FalconForCausalLM

    def build():
        return FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              vocab_size=64, **kw))
    return build


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(Phi3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _mpt():
    from transformers import MptConfig, MptForCausalLM
    return MptForCausalLM(MptConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=64))


# name, builder, fused module, how q/k/v are caught, (q, k, v) row counts, GQA group
FAMILIES = [
    ("gpt2", _gpt2, "c_attn", "attention", (32, 32, 32), 1),
    ("neox", _neox, "query_key_value", "attention", (32, 32, 32), 1),
    ("bloom", _bloom, "query_key_value", "_reshape", (32, 32, 32), 1),
    ("falcon_grouped", _falcon(new_decoder_architecture=True, num_kv_heads=2), "query_key_value",
     "_split_heads", (32, 16, 16), 2),
    ("falcon_mqa", _falcon(new_decoder_architecture=False, multi_query=True), "query_key_value",
     "_split_heads", (32, 8, 8), 1),
    ("falcon_classic", _falcon(new_decoder_architecture=False, multi_query=False), "query_key_value",
     "_split_heads", (32, 32, 32), 1),
    ("phi3", _phi3, "qkv_proj", "attention", (32, 16, 16), 1),
]


def _load(model, sd):
    m = copy.deepcopy(model).double()
    m.load_state_dict({k: v for k, v in sd.items()}, strict=False)
    return m


def _check(df, run, step, ref0, reft, fused_names, rel=1e-4) -> int:
    n = 0
    for layer, (parts0, partst) in enumerate(zip(ref0, reft)):
        for kind, w0, wt in zip("qkv", parts0, partst):
            mod = f"{fused_names[layer]}.{kind}"
            row = df[(df.run == run) & (df.step == step) & (df.module == mod)]
            assert len(row) == 1, (run, step, mod)
            dm, dd, _ = plain_reference(w0, wt)
            assert row.delta_m.iloc[0] == pytest.approx(dm, rel=rel), (run, step, mod)
            assert row.delta_d.iloc[0] == pytest.approx(dd, rel=rel), (run, step, mod)
            assert row.n_vectors.iloc[0] == w0.shape[0]
            n += 1
    return n


@pytest.mark.parametrize("name,build,fused,catch,sizes,group", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_against_model_code_and_peft_merge(tmp_path, name, build, fused, catch, sizes, group):
    torch.manual_seed(0)
    model = build().eval()
    save_full(model, tmp_path / "base")
    fused_names = [n for n, _ in model.named_modules() if n.endswith("." + fused)]
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref0 = model_qkv(_load(model, base_sd), fused, catch, group)
    assert [tuple(w.shape[0] for w in p) for p in ref0] == [sizes] * len(fused_names)
    fifo = dict(fan_in_fan_out=True) if fused == "c_attn" else {}
    runs = {
        "ft": ft_checkpoints(model, tmp_path / "ft", steps=(1, 2), scale=0.004),
        "lora": peft_checkpoints(model, tmp_path / "lora", LoraConfig(r=4, lora_alpha=8, target_modules=[fused],
                                                                      **fifo)),
        "dora": peft_checkpoints(model, tmp_path / "dora", LoraConfig(r=4, lora_alpha=8, target_modules=[fused],
                                                                      use_dora=True, **fifo), seed=3),
    }
    df = wda.analyze(tmp_path, progress=False, dtype="float64")
    assert set(df.matrix) == {f"{fused}.{k}" for k in "qkv"}
    n = 0
    for run, states in runs.items():
        for step, sd in states.items():
            n += _check(df, run, step, ref0, model_qkv(_load(model, sd), fused, catch, group), fused_names)
    assert n == len(df) == 3 * 2 * 3 * len(fused_names)
    if name == "gpt2":  # the float32 default agrees too (Conv1D: column-stored parts)
        df32 = wda.analyze(tmp_path, progress=False)
        assert df32.delta_d.to_numpy() == pytest.approx(df.delta_d.to_numpy(), rel=1e-4)


def test_mpt_against_its_chunk_and_peft_merge(tmp_path):
    """MPT splits ``Wqkv(x).chunk(3, dim=2)`` inline (no hook point): q, k, v are the thirds
    of the output rows, taken here with torch.chunk."""
    torch.manual_seed(0)
    model = _mpt().eval()
    save_full(model, tmp_path / "base")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules() if n.endswith(".Wqkv")]
    lora = peft_checkpoints(model, tmp_path / "lora", LoraConfig(r=4, lora_alpha=8, target_modules=["Wqkv"]))
    dora = peft_checkpoints(model, tmp_path / "dora", LoraConfig(r=4, lora_alpha=8, target_modules=["Wqkv"],
                                                                 use_dora=True), seed=3)
    df = wda.analyze(tmp_path, progress=False, dtype="float64")

    def parts(sd):
        return [sd[n + ".weight"].double().chunk(3, dim=0) for n in names]

    n = sum(_check(df, run, step, parts(base_sd), parts(sd), names)
            for run, states in (("lora", lora), ("dora", dora)) for step, sd in states.items())
    assert n == len(df) == 2 * 2 * 3 * len(names)


# ---- ChatGLM2/3 (remote code only): a stand-in with its module names ----------------------
def _chatglm_reference(w: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, ...]:
    """The layout of ChatGLM2's ``SelfAttention.forward`` written out in float64: with
    multi_query_attention, ``split([h·kv, g·kv, g·kv])``; else view as (h, 3·kv) and cut each
    head's row block in three."""
    h, kv = cfg["num_attention_heads"], cfg["kv_channels"]
    w = w.double()
    if cfg.get("multi_query_attention"):
        g = cfg["multi_query_group_num"]
        return tuple(w.split([h * kv, g * kv, g * kv], dim=0))
    per_head = w.reshape(h, 3 * kv, -1)
    return tuple(per_head[:, i * kv:(i + 1) * kv].reshape(h * kv, -1) for i in range(3))


class _GLMStandIn(ChatGLMStandIn):
    """Only the fused projections of a ChatGLM, under ChatGLM's module names."""

    def __init__(self, cfg: dict, layers: int = 2) -> None:
        h, kv, hidden = cfg["num_attention_heads"], cfg["kv_channels"], cfg["hidden_size"]
        g = cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else h
        out = h * kv + 2 * g * kv

        def block() -> torch.nn.Module:
            blk = torch.nn.Module()
            blk.self_attention = torch.nn.Module()
            blk.self_attention.query_key_value = torch.nn.Linear(hidden, out, bias=True)
            return blk
        super().__init__(block, layers)


@pytest.mark.parametrize("mqa", [True, False], ids=["multi_query", "per_head"])
def test_chatglm_layout_against_float64_reference(tmp_path, mqa):
    cfg = {"model_type": "chatglm", "hidden_size": 32, "num_attention_heads": 4, "kv_channels": 8,
           "multi_query_attention": mqa, "multi_query_group_num": 2}
    torch.manual_seed(0)
    model = _GLMStandIn(cfg)
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules() if n.endswith(".query_key_value")]
    ft = ft_checkpoints(model, tmp_path / "ft", steps=(1, 2), scale=0.004)
    dora = peft_checkpoints(model, tmp_path / "dora", LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"],
                                                                 use_dora=True), seed=3)
    df = wda.analyze(tmp_path, progress=False, dtype="float64")

    def parts(sd):
        return [_chatglm_reference(sd[n + ".weight"], cfg) for n in names]

    n = sum(_check(df, run, step, parts(base_sd), parts(sd), names)
            for run, states in (("ft", ft), ("dora", dora)) for step, sd in states.items())
    assert n == len(df) == 2 * 2 * 3 * len(names)
    sizes = {k: 32 if k == "q" else (16 if mqa else 32) for k in "qkv"}
    assert {r.matrix.rsplit(".", 1)[1]: r.n_vectors for r in df.itertuples()} == sizes


# ---- choice of parts, --no-split, bad configs ---------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    model = _gpt2().eval()
    save_full(model, d / "base")
    ft_checkpoints(model, d / "ft", steps=(1, 2), scale=0.004)
    return d


def test_default_parts_modules_filter_and_no_split(gpt2_dir):
    p = wda.plan(gpt2_dir)  # no adapters: the default is the query and value parts
    assert set(p.matrix) == {"c_attn.q", "c_attn.v"}
    assert set(p.out_features) == {32} and p.transposed.all()
    assert set(wda.plan(gpt2_dir, modules=["c_attn"]).matrix) == {"c_attn.q", "c_attn.k", "c_attn.v"}
    assert set(wda.plan(gpt2_dir, modules=["c_attn.k"]).matrix) == {"c_attn.k"}
    assert set(wda.plan(gpt2_dir, modules=[r".*h\.1\.attn\.c_attn\.q"]).module) == {"transformer.h.1.attn.c_attn.q"}
    whole = wda.plan(gpt2_dir, split_fused=False)
    assert set(whole.matrix) == {"c_attn"} and set(whole.out_features) == {96}


def test_cli_no_split(gpt2_dir, capsys):
    from wda.report.cli import main

    assert main([str(gpt2_dir), "--dry-run"]) == 0
    split = capsys.readouterr().out
    assert main([str(gpt2_dir), "--dry-run", "--no-split"]) == 0
    whole = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn.q  (out=32, in=32)" in split
    assert "c_attn.q" not in whole and "transformer.h.0.attn.c_attn  (out=96, in=32)" in whole


def test_config_that_does_not_fit_is_one_line(gpt2_dir, tmp_path, capsys):
    from wda.report.cli import main

    d = tmp_path / "d"
    shutil.copytree(gpt2_dir, d)
    cfg = json.loads((d / "base" / "config.json").read_text())
    cfg["n_embd"] = 40  # c_attn holds 96 = 3 x 32 output features
    (d / "base" / "config.json").write_text(json.dumps(cfg))
    assert main([str(d), "--dry-run"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "config.json" in lines[0] and "c_attn" in lines[0] and "--no-split" in lines[0]
    assert "Traceback" not in err
    assert main([str(d), "--dry-run", "--no-split"]) == 0


# ---- the rules themselves ---------------------------------------------------------------------
def test_rules_cover_every_row_once():
    cases = [
        ({"model_type": "gpt2", "n_embd": 12}, "h.0.attn.c_attn", 36),
        ({"model_type": "gpt2", "n_embd": 12}, "h.0.crossattention.c_attn", 24),
        ({"model_type": "bloom", "hidden_size": 12, "n_head": 2}, "h.0.self_attention.query_key_value", 36),
        ({"model_type": "phi3", "hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 1,
          "head_dim": 8}, "l.0.self_attn.qkv_proj", 48),
        ({"model_type": "falcon", "hidden_size": 16, "num_attention_heads": 4, "multi_query": True},
         "h.0.self_attention.query_key_value", 24),
        ({"model_type": "gpt_neox", "hidden_size": 12, "num_attention_heads": 3}, "l.0.query_key_value", 36),
        ({"model_type": "falcon", "hidden_size": 16, "num_attention_heads": 4, "num_kv_heads": 2,
          "new_decoder_architecture": True}, "h.0.self_attention.query_key_value", 32),
        ({"model_type": "chatglm", "hidden_size": 16, "num_attention_heads": 4, "kv_channels": 4,
          "multi_query_attention": True, "multi_query_group_num": 1}, "l.0.self_attention.query_key_value", 24),
    ]
    for cfg, name, out in cases:
        parts = fused_qkv.fused_parts(cfg, name, out)
        rows = sorted(r for p in parts for r in p.rows)
        assert rows == list(range(out)), name
    assert fused_qkv.fused_parts({"model_type": "llama"}, "l.0.q_proj", 12) is None
    assert fused_qkv.fused_parts({"model_type": "gpt2", "n_embd": 12}, "h.0.mlp.c_fc", 48) is None
    with pytest.raises(fused_qkv.FusedLayoutError, match="num_kv_heads|divisible|output features"):
        fused_qkv.fused_parts({"model_type": "falcon", "hidden_size": 16, "num_attention_heads": 4,
                               "num_kv_heads": 3, "new_decoder_architecture": True}, "x.query_key_value", 32)
