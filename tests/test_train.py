"""wda.train / wda.train.model / wda.train.corpus: layout, determinism, cache, base identity, merges.

Everything runs on a tiny config (2 layers, d_model 32, a few dozen steps): seconds on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wda.train import cli as T
from wda.train.corpus import CORPORA, eval_windows, load_corpus, random_batch
from wda.train.dora import lora_scaling, merge_dora, merge_lora
from wda.train.model import ModelConfig, Transformer

ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>layers\.(\d+)\.attn\.(q_proj|v_proj))\."
                         r"(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")


def tiny(tmp: Path, **kw) -> T.TrainConfig:
    opts = dict(out=str(tmp / "out"), cache_dir=str(tmp / "cache"), n_layers=2, d_model=32,
                n_heads=2, seq_len=32, pretrain_steps=30, pretrain_lr=1e-2, pretrain_batch_size=4,
                pretrain_warmup=2, pretrain_max_bytes=40_000, downstream_max_bytes=40_000,
                steps=12, batch_size=4, checkpoints="3", eval_windows=8, eval_every=0,
                log_every=0, threads=1, lora_lr=1e-2, dora_lr=1e-2, ft_lr=1e-3)
    opts.update(kw)
    return T.TrainConfig(**opts)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[T.TrainConfig, Path]:
    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny(tmp)
    return cfg, T.train_all(cfg)


def read_log(out: Path) -> dict:
    return json.loads((out / "train_log.json").read_text())


def safetensors_files(out: Path) -> dict[str, bytes]:
    """Bytes of every safetensors file under ``out``. Adapter files are reduced to their
    content (sorted metadata, then tensors): safetensors writes metadata with more than one
    key in random order (a Rust HashMap), and wda.train.adapt.save_adapter writes two keys."""
    return {str(p.relative_to(out)): content(p) if p.name.startswith("adapter") else p.read_bytes()
            for p in sorted(out.rglob("*.safetensors"))}


def content(path: Path) -> bytes:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.dumps(f.metadata(), sort_keys=True).encode()
        parts = [meta] + [k.encode() + f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())]
    return b"\0".join(parts)


def load_adapter_files(ckpt: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """adapter_config.json and the tensors of an adapter checkpoint, grouped by module."""
    config = json.loads((ckpt / "adapter_config.json").read_text())
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(ckpt / "adapter_model.safetensors")).items():
        m = ADAPTER_KEY.match(key)
        assert m, f"unexpected adapter key {key}"
        by_module.setdefault(m["module"], {})[m["part"]] = t
    return config, by_module


# ---- schedule and checkpoint steps ---------------------------------------------------------
def test_checkpoint_steps_spec() -> None:
    assert T.checkpoint_steps("4", 800) == [200, 400, 600, 800]
    assert T.checkpoint_steps(4, 800) == [200, 400, 600, 800]
    assert T.checkpoint_steps("0.625,0.75,0.875,1.0", 800) == [500, 600, 700, 800]
    assert T.checkpoint_steps("10,20", 100) == [10, 20, 100]  # final step always saved
    assert T.checkpoint_steps("0.5", 100, save_every=30) == [30, 50, 60, 90, 100]
    assert T.checkpoint_steps("5", 3) == [1, 2, 3]  # more checkpoints than steps: deduplicated
    for bad in ("0", "0.0", "1.5", "50,101", "-3,10"):
        with pytest.raises(ValueError):
            T.checkpoint_steps(bad, 100)
    with pytest.raises(ValueError):
        T.TrainConfig(checkpoints="900,1.0", steps=800)


def test_lr_factor_shapes() -> None:
    n = 100
    for sched in T.SCHEDULES:
        f = [T.lr_factor(s, n, sched, warmup=10, min_ratio=0.1) for s in range(n)]
        assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # warmup ramp
        assert max(f) == pytest.approx(1.0)
        assert all(0.1 - 1e-12 <= x <= 1.0 + 1e-12 for x in f[10:])
        if sched == "constant":
            assert f[10:] == [1.0] * 90
        else:
            assert all(a >= b for a, b in zip(f[10:], f[11:]))  # decays monotonically
            assert f[-1] < 0.15


# ---- model and corpora ---------------------------------------------------------------------
def test_model_is_causal_and_named_for_the_analysis() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=2, d_model=32, n_heads=4, max_seq_len=16)).eval()
    x = torch.randint(0, 256, (2, 16))
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert torch.equal(a[:, :10], b[:, :10])  # the future does not leak into the past
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    names = {k for k, _ in model.named_modules()}
    for i in range(2):
        assert {f"layers.{i}.attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} <= names
    assert "layers.1.attn.q_proj.weight" in model.state_dict()


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_corpora_are_deterministic(name: str) -> None:
    a = load_corpus(name, seed=1, max_bytes=20_000, val_fraction=0.1)
    b = load_corpus(name, seed=1, max_bytes=20_000, val_fraction=0.1)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert len(a.train) + len(a.val) == 20_000 and len(a.val) == 2_000
    c = load_corpus(name, seed=2, max_bytes=20_000, val_fraction=0.1)
    assert a.digest() != c.digest()  # the seed reorders the files / regenerates the task


def test_corpora_differ_in_kind() -> None:
    code = bytes(load_corpus("stdlib", max_bytes=50_000).train.numpy())
    prose = bytes(load_corpus("topics", max_bytes=50_000).train.numpy())
    assert prose.count(b" the ") > 5 * code.count(b" the ")  # English prose vs code
    assert code.count(b"self") > 10 * max(1, prose.count(b"self"))
    for line in bytes(load_corpus("arith", max_bytes=5_000).train.numpy()).split(b"\n")[1:-1]:
        lhs, rhs = line.split(b"=")
        a, b = lhs.split(b"+")
        assert int(a) + int(b) == int(rhs)


def test_batches_are_next_byte_pairs() -> None:
    data = torch.arange(200, dtype=torch.uint8)
    x, y = random_batch(data, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    ex, ey = eval_windows(data, 5, 16)
    assert torch.equal(ex[:, 1:], ey[:, :-1])


# ---- a whole run ---------------------------------------------------------------------------
def test_layout(run) -> None:
    cfg, out = run
    steps = T.checkpoint_steps(cfg.checkpoints, cfg.steps)
    base = load_file(str(out / "base" / "model.safetensors"))
    assert json.loads((out / "base" / "config.json").read_text())["n_layers"] == cfg.n_layers
    for method in cfg.methods:
        found = sorted(int(p.name.split("-")[1]) for p in (out / method).glob("checkpoint-*"))
        assert found == steps
    for step in steps:
        ft = load_file(str(out / "ft" / f"checkpoint-{step}" / "model.safetensors"))
        assert ft.keys() == base.keys()
        assert all(ft[k].shape == base[k].shape for k in base)
        for method in ("lora", "dora"):
            config, modules = load_adapter_files(out / method / f"checkpoint-{step}")
            assert config["use_dora"] is (method == "dora")
            assert config["r"] == cfg.rank and config["lora_alpha"] == cfg.alpha
            assert set(modules) == {f"layers.{i}.attn.{p}" for i in range(cfg.n_layers)
                                    for p in ("q_proj", "v_proj")}
            for module, parts in modules.items():
                w0 = base[module + ".weight"]  # adapter modules name base tensors
                assert parts["lora_A.weight"].shape == (cfg.rank, w0.shape[1])
                assert parts["lora_B.weight"].shape == (w0.shape[0], cfg.rank)
                if method == "dora":
                    assert parts["lora_magnitude_vector"].shape == (w0.shape[0],)
                else:
                    assert "lora_magnitude_vector" not in parts
    record = read_log(out)
    assert record["config"]["seed"] == cfg.seed
    for method in cfg.methods:
        h = record["runs"][method]
        assert len(h["train_loss"]) == len(h["lr"]) == cfg.steps
        assert h["checkpoint_steps"] == steps
        assert {r["step"] for r in h["eval"]} >= {0, *steps}
    assert len(record["pretrain"]["train_loss"]) == cfg.pretrain_steps


def test_runs_learn(run) -> None:
    cfg, out = run
    record = read_log(out)
    pre = record["pretrain"]["eval"]
    assert pre[-1]["pretrain_val"] < pre[0]["pretrain_val"] - 0.5
    ft = record["runs"]["ft"]["eval"]
    assert ft[-1]["downstream_val"] < ft[0]["downstream_val"]
    # (q/v adapters on a 30-step base barely move the loss: check they trained at all)
    for method in ("lora", "dora"):
        _, modules = load_adapter_files(out / method / f"checkpoint-{cfg.steps}")
        assert all(p["lora_B.weight"].abs().max() > 0 for p in modules.values()), method
        assert all(torch.isfinite(torch.tensor(record["runs"][method]["train_loss"])))


def test_base_is_the_start_of_every_run(run) -> None:
    cfg, out = run
    base = T.load_base(out / "base")
    ev = T.eval_sets(cfg, T.load_corpora(cfg))[0]
    start = T.evaluate(base, ev)
    for method, h in read_log(out)["runs"].items():
        # adapters start as the identity (B = 0, m = ||W_0||): every run starts at W_0
        assert h["eval"][0]["downstream_val"] == pytest.approx(start, abs=1e-6), method


def test_same_seed_gives_identical_files(run, tmp_path) -> None:
    cfg, out = run
    # cached base (second use of cfg.cache_dir) and a base pretrained again from scratch
    again = T.train_all(dataclasses.replace(cfg, out=str(tmp_path / "again")))
    fresh = T.train_all(dataclasses.replace(cfg, out=str(tmp_path / "fresh"), use_cache=False))
    ref = safetensors_files(out)
    assert len(ref) == 1 + 3 * len(T.checkpoint_steps(cfg.checkpoints, cfg.steps))
    assert safetensors_files(again) == ref
    assert safetensors_files(fresh) == ref
    other = T.train_all(dataclasses.replace(cfg, out=str(tmp_path / "other"), seed=1,
                                            pretrain_seed=cfg.resolved_pretrain_seed()))
    files = safetensors_files(other)
    assert files["base/model.safetensors"] == ref["base/model.safetensors"]
    last = f"checkpoint-{cfg.steps}"
    for m, name in (("ft", "model"), ("lora", "adapter_model"), ("dora", "adapter_model")):
        assert files[f"{m}/{last}/{name}.safetensors"] != ref[f"{m}/{last}/{name}.safetensors"]


def test_cache_is_used_the_second_time(run, tmp_path, monkeypatch) -> None:
    cfg, out = run
    assert read_log(out)["pretrain"]["cached"] is False
    entries = list(Path(cfg.cache_dir).glob("base-*"))
    assert len(entries) == 1 and not list(Path(cfg.cache_dir).glob(".tmp-*"))

    def no_pretraining(*a, **k):
        raise AssertionError("pretrained again despite a cached base")

    monkeypatch.setattr(T, "pretrain", no_pretraining)
    again = T.train_all(dataclasses.replace(cfg, out=str(tmp_path / "again"), methods=("ft",)))
    assert read_log(again)["pretrain"]["cached"] is True


def test_cache_key_covers_base_options_only(run) -> None:
    cfg, _ = run
    corpora = T.load_corpora(cfg)
    key = T.cache_key(cfg, corpora)
    for change in (dict(steps=7), dict(ft_lr=1.0), dict(rank=2), dict(seed=5, pretrain_seed=cfg.seed),
                   dict(checkpoints="2"), dict(eval_windows=4), dict(downstream_corpus="arith")):
        assert T.cache_key(dataclasses.replace(cfg, **change), corpora) == key, change
    for change in (dict(pretrain_steps=21), dict(pretrain_lr=1e-4), dict(d_model=16),
                   dict(n_layers=3), dict(seq_len=16), dict(seed=5), dict(pretrain_beta2=0.9)):
        assert T.cache_key(dataclasses.replace(cfg, **change), corpora) != key, change
    other = T.load_corpora(dataclasses.replace(cfg, corpus_seed=3))
    assert T.cache_key(cfg, other) != key  # the corpus bytes are part of the key


def test_the_default_base_ships_and_is_used_without_pretraining(tmp_path, monkeypatch) -> None:
    """The default options' base is committed (wda/train/bases): found by its options and
    corpus with an empty cache, loaded without pretraining, with the default base options."""
    cfg = T.TrainConfig(cache_dir=str(tmp_path / "empty-cache"))
    corpora = T.load_corpora(cfg)
    shipped = sorted(T.SHIPPED_BASES.glob("base-*"))
    assert shipped, "no base ships in wda/train/bases"
    made = [json.loads((d / "pretrain_log.json").read_text())["made_with"] for d in shipped]
    if corpora.pretrain.digest() not in {m["pretrain_corpus_sha256"] for m in made}:
        pytest.skip("this Python's standard library is not the one the shipped base was pretrained on")
    entry = T.shipped_base(cfg, corpora)
    assert entry is not None, "the shipped base's key no longer matches the default options"
    assert json.loads((entry / "pretrain_log.json").read_text())["options"] == T.base_options(cfg)

    def no_pretraining(*a, **k):
        raise AssertionError("pretrained although the base ships with wda")

    monkeypatch.setattr(T, "pretrain", no_pretraining)
    model, hist = T.load_or_pretrain(cfg, corpora)
    assert hist["cached"] is True and hist["cache_path"] == str(entry)
    ref = load_file(str(entry / "model.safetensors"))
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "empty-cache").exists()  # the shipped base is read in place
    with pytest.raises(AssertionError, match="pretrained although"):  # --no-use-cache pretrains
        T.load_or_pretrain(dataclasses.replace(cfg, use_cache=False), corpora)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_checkpoints_merge_to_the_trained_model(run, method, tmp_path) -> None:
    cfg, out = run
    base = T.load_base(out / "base")
    model, _ = T.finetune(cfg, method, base, T.load_corpora(cfg), tmp_path / method)
    final = f"checkpoint-{cfg.steps}"
    # the same config through the per-method API writes the same adapter as train_all did
    name = "adapter_model.safetensors"
    assert content(tmp_path / method / final / name) == content(out / method / final / name)

    config, modules = load_adapter_files(out / method / final)
    s = lora_scaling(config["r"], config["lora_alpha"], config.get("use_rslora", False))
    merged = {k: v.clone() for k, v in base.state_dict().items()}
    for module, p in modules.items():
        w0 = merged[module + ".weight"]
        if method == "lora":
            merged[module + ".weight"] = merge_lora(w0, p["lora_A.weight"], p["lora_B.weight"], s)
        else:
            merged[module + ".weight"] = merge_dora(w0, p["lora_A.weight"], p["lora_B.weight"], s,
                                                    p["lora_magnitude_vector"])
    plain = Transformer(base.cfg).eval()
    plain.load_state_dict(merged)
    x = torch.randint(0, 256, (3, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, before = model(x), plain(x), base(x)
    assert not torch.allclose(want, before, atol=1e-4)  # training moved the model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ft_final_checkpoint_is_the_trained_model(run, tmp_path) -> None:
    cfg, out = run
    base = T.load_base(out / "base")
    model, _ = T.finetune(cfg, "ft", base, T.load_corpora(cfg))
    saved = load_file(str(out / "ft" / f"checkpoint-{cfg.steps}" / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(saved[k], v), k


def test_ft_only_targets_trains_only_targets(run, tmp_path) -> None:
    cfg, out = run
    base = T.load_base(out / "base")
    sub = dataclasses.replace(cfg, ft_only_targets=True, steps=3, checkpoints="1")
    model, h = T.finetune(sub, "ft", base, T.load_corpora(sub))
    before, after = base.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"layers.{i}.attn.{p}.weight" for i in range(cfg.n_layers) for p in ("q_proj", "v_proj")}


def test_refuses_to_mix_with_old_checkpoints(run) -> None:
    cfg, out = run
    with pytest.raises(FileExistsError):
        T.train_all(cfg)


def test_adapter_files_are_byte_identical(run, tmp_path) -> None:
    from wda.train.adapt import load_adapter, save_adapter

    cfg, out = run
    model = T.load_base(out / "base")
    spec = load_adapter(model, out / "dora" / f"checkpoint-{cfg.steps}")
    saved = set()
    for i in range(20):  # with two keys in random order, 20 saves show both orders (p = 1 - 2^-19)
        save_adapter(model, tmp_path / str(i), spec)
        saved.add((tmp_path / str(i) / "adapter_model.safetensors").read_bytes())
    assert len(saved) == 1


# ---- CLI -----------------------------------------------------------------------------------
def test_cli_has_a_flag_for_every_option() -> None:
    dests = {a.dest for a in T._parser()._actions}
    assert {f.name for f in dataclasses.fields(T.TrainConfig)} <= dests
    args = T._parser().parse_args(["--targets", "q_proj,k_proj", "--no-use-cache",
                                   "--pretrain-max-bytes", "none", "--methods", "ft"])
    cfg = T.TrainConfig(**vars(args))
    assert cfg.targets == ("q_proj", "k_proj") and cfg.use_cache is False
    assert cfg.pretrain_max_bytes is None and cfg.methods == ("ft",)
    assert T.TrainConfig(**vars(T._parser().parse_args([]))) == T.TrainConfig()


def test_cli_runs_and_rejects_bad_options(tmp_path, capsys) -> None:
    cfg = tiny(tmp_path, methods=("ft",))
    argv = ["--out", str(tmp_path / "cli"), "--cache-dir", cfg.cache_dir, "--methods", "ft",
            "--n-layers", "1", "--d-model", "16", "--n-heads", "2", "--seq-len", "16",
            "--pretrain-steps", "5", "--steps", "4", "--checkpoints", "2", "--eval-windows", "4",
            "--pretrain-max-bytes", "20000", "--downstream-max-bytes", "20000"]
    assert T.main(argv) == 0
    assert "ft" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cli" / "ft").iterdir()) == ["checkpoint-2", "checkpoint-4", "tracker"]
    assert T.main(argv + ["--overwrite", "--methods", "sgd"]) == 2
    assert "sgd" in capsys.readouterr().err
