"""``--train-norms-biases`` (LoRA/DoRA also train norms and biases, the paper's VL-BART recipe)
and the ``mix`` multi-task corpus."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from builders import plain_reference
from wda.train import cli as T
from wda.train.adapt import AdapterSpec, add_adapters, adapter_parameters, norm_bias_parameters
from wda.train.corpus import MIX_BLOCK, MIX_PARTS, load_corpus
from wda.train.model import ModelConfig, Transformer
from test_train import tiny

NORMS = {f"layers.{i}.{n}.weight" for i in range(2) for n in ("ln1", "ln2")} | {"ln_f.weight"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("norms")
    cfg = tiny(tmp, train_norms_biases=True, methods=("lora", "dora"), track_every=0)
    return cfg, T.train_all(cfg)


def test_norm_bias_parameters_names() -> None:
    model = Transformer(ModelConfig(n_layers=2, d_model=16, n_heads=2, max_seq_len=8, bias=True))
    add_adapters(model, AdapterSpec("dora", r=2))
    names = set(norm_bias_parameters(model))
    assert {n for n in names if not n.endswith(".bias")} == NORMS
    biases = {n for n in names if n.endswith(".bias")}
    assert "layers.0.attn.q_proj.base_layer.bias" in biases and "layers.1.mlp.fc.bias" in biases
    assert biases == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert not names & set(adapter_parameters(model, trainable_only=False))  # no A, B, m
    assert not any(".weight" in n and "ln" not in n for n in names)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("on", [False, True])
def test_trainable_and_changed_parameters(run, method, on) -> None:
    cfg, out = run
    base = T.load_base(out / "base")
    sub = dataclasses.replace(cfg, train_norms_biases=on, steps=3, checkpoints="1")
    model, hist = T.finetune(sub, method, base, T.load_corpora(sub))
    adapter = set(adapter_parameters(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter | (NORMS if on else set())
    in_groups = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert hist["trainable_params"] == in_groups
    before = base.state_dict()
    after = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if k.replace(".base_layer.", ".") in before}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == (NORMS if on else set())


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_checkpoint_holds_the_norms_and_analyses_exactly(run, method) -> None:
    from wda.analysis.engine import analyze
    from wda.train.adapt import merge_adapters

    cfg, out = run
    base = T.load_base(out / "base")
    model, _ = T.finetune(cfg, method, base, T.load_corpora(cfg))  # same seed: same run
    final = out / method / f"checkpoint-{cfg.steps}"
    saved = load_file(str(final / "norms_biases.safetensors"))
    trained = model.state_dict()
    assert set(saved) == NORMS
    for k, v in saved.items():
        assert torch.equal(v, trained[k]) and not torch.equal(v, base.state_dict()[k]), k
    merged = merge_adapters(model).state_dict()
    table = analyze(out, runs=[method], device="cpu", progress=False)
    final_rows = table[table["step"] == cfg.steps]
    assert len(final_rows) == 2 * cfg.n_layers
    for _, row in final_rows.iterrows():
        key = row["module"] + ".weight"
        dm, dd, _ = plain_reference(base.state_dict()[key], merged[key])
        assert row["delta_m"] == pytest.approx(dm, rel=1e-5, abs=1e-9)
        assert row["delta_d"] == pytest.approx(dd, rel=1e-4, abs=1e-9)


def test_mix_corpus_takes_equal_shares_of_every_part() -> None:
    mix = load_corpus("mix", seed=3, max_bytes=30_000, val_fraction=0.1)
    data = bytes(mix.train.numpy()) + bytes(mix.val.numpy())
    assert len(data) == 30_000
    parts = [bytes(load_corpus(n, seed=3, max_bytes=10_000, val_fraction=0.1).train.numpy())
             + bytes(load_corpus(n, seed=3, max_bytes=10_000, val_fraction=0.1).val.numpy())
             for n in MIX_PARTS]
    blocks = [p[i:i + MIX_BLOCK] for p in parts for i in range(0, len(p), MIX_BLOCK)]
    assert all(b in data for b in blocks) and sum(map(len, blocks)) == len(data)
    assert sorted(data) == sorted(b"".join(parts))  # the same bytes, reordered by block
    assert data != b"".join(parts)  # interleaved, not one part after another


def test_driver_summary_of_a_run(run) -> None:
    """driver_summary's r is the points' Pearson r, and its attribution adds up to it."""
    import numpy as np

    from wda.train.sweep import driver_summary, measure

    cfg, out = run
    table = driver_summary({"tiny": out}, fractions=(1 / 3, 2 / 3, 1.0))
    assert set(table["method"]) == {"LoRA", "DoRA"} and set(table["matrix"]) == {"q_proj", "v_proj"}
    m = measure(out, axes=("out",))
    for _, row in table.iterrows():
        g = m[(m["method"] == row["method"]) & (m["matrix"] == row["matrix"])]
        assert row["n"] == len(g) == 3 * cfg.n_layers
        assert row["pearson_r"] == pytest.approx(np.corrcoef(g["delta_d"], g["delta_m"])[0, 1], abs=1e-12)
        parts = row["r_size"] + row["r_alignment"] + row["r_base_norm"]
        assert parts == pytest.approx(row["pearson_r"], abs=1e-9)
        assert row["r_radial"] + row["r_tangential"] == pytest.approx(row["pearson_r"], abs=1e-9)
        assert row["s_mean_cv"] == pytest.approx(np.std(g["s_mean"]) / np.mean(g["s_mean"]))


def test_sgd_fine_tuning_steps_by_lr_times_gradient(tmp_path) -> None:
    """optimizer="sgd", one step, no momentum, no clipping: W_1 = W_0 − lr·∇L(W_0) exactly."""
    cfg = tiny(tmp_path, optimizer="sgd", beta1=0.0, grad_clip=0.0, steps=1, checkpoints="1",
               ft_lr=0.5, methods=("ft",), track_every=0)
    corpora = T.load_corpora(cfg)
    torch.manual_seed(0)
    base = Transformer(cfg.model_config())
    model, _ = T.finetune(cfg, "ft", base, corpora)
    x, y = T.random_batch(corpora.downstream.train, cfg.batch_size, cfg.seq_len,
                          torch.Generator().manual_seed(cfg.seed))
    ref = Transformer(base.cfg)
    ref.load_state_dict(base.state_dict())
    ref.loss(x, y).backward()
    for (k, p0), (_, p1) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p1.detach(), p0.detach() - 0.5 * p0.grad, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="optimizer"):
        tiny(tmp_path, optimizer="adam")


def test_base_dir_is_used_instead_of_pretraining(run, tmp_path) -> None:
    cfg, out = run
    sub = dataclasses.replace(cfg, out=str(tmp_path / "o"), cache_dir=str(tmp_path / "empty"),
                              base_dir=str(out / "base"), pretrain_seed=7, methods=("ft",),
                              steps=2, checkpoints="1")
    got = T.train_all(sub)
    assert (got / "base" / "model.safetensors").read_bytes() == (out / "base" / "model.safetensors").read_bytes()
    assert not (tmp_path / "empty").exists()  # nothing pretrained, nothing cached
    with pytest.raises(ValueError, match="config.json"):
        T.train_all(dataclasses.replace(sub, d_model=16, n_heads=2, overwrite=True))
    with pytest.raises(ValueError, match="no saved base"):
        T.train_all(dataclasses.replace(sub, base_dir=str(tmp_path), overwrite=True))
