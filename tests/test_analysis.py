"""The analysis on real Hugging Face / PEFT checkpoint folders, against float64 references
computed from PEFT's own ``merge_and_unload()`` with a plain formula."""

from __future__ import annotations

import shutil
import weakref

import pandas as pd
import pytest
import torch
from peft import LoraConfig

import wda
import wda.analysis.engine as analysis
from builders import Q_V, ft_checkpoints, peft_checkpoints, save_full, tiny_gpt2, tiny_llama
from wda.formats import open_checkpoint
from wda.train.dora import merge_dora


def reference(w0: torch.Tensor, wt: torch.Tensor, dim: int = 1) -> tuple[float, float]:
    """Eqs. 3-4 plainly in float64; ``dim`` is reduced (1: per output row of (out, in))."""
    a, b = w0.double(), wt.double()
    m0, mt = a.norm(dim=dim), b.norm(dim=dim)
    cos = (a * b).sum(dim=dim) / (m0 * mt)
    return float((mt - m0).abs().mean()), float((1 - cos).mean())


def check_against(df: pd.DataFrame, run: str, base_sd: dict, states: dict, modules, dim=1,
                  transpose=False, rel=1e-4) -> int:
    n = 0
    for step, sd in states.items():
        for mod in modules:
            w0, wt = base_sd[mod + ".weight"], sd[mod + ".weight"]
            if transpose:
                w0, wt = w0.t(), wt.t()
            dm, dd = reference(w0, wt, dim)
            row = df[(df.run == run) & (df.step == step) & (df.module == mod)]
            assert len(row) == 1, (run, step, mod)
            assert row.delta_m.iloc[0] == pytest.approx(dm, rel=rel)
            assert row.delta_d.iloc[0] == pytest.approx(dd, rel=rel)
            n += 1
    return n


def qv_modules(sd: dict) -> list[str]:
    return [k[:-7] for k in sd if k.endswith((".q_proj.weight", ".v_proj.weight"))]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    model = tiny_llama()
    save_full(model, d / "base")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    runs = {
        "ft": ft_checkpoints(model, d / "ft", scale=0.004),
        "lora": peft_checkpoints(model, d / "lora", LoraConfig(r=4, lora_alpha=8, target_modules=Q_V)),
        "dora": peft_checkpoints(model, d / "dora", LoraConfig(r=4, lora_alpha=8, target_modules=Q_V,
                                                               use_dora=True), seed=3),
        "rs_patterns": peft_checkpoints(
            model, d / "rs_patterns",
            LoraConfig(r=4, lora_alpha=8, target_modules=Q_V, use_dora=True, use_rslora=True,
                       rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6},
                       alpha_pattern={"layers.0.self_attn.v_proj": 3.0}), seed=4),
    }
    return d, base_sd, runs


def test_llama_ft_lora_dora_rslora_patterns(llama_dir):
    d, base_sd, runs = llama_dir
    df = wda.analyze(d, progress=False)
    mods = qv_modules(base_sd)
    assert set(df.module) == set(mods)
    assert set(zip(df.run, df.method)) == {("ft", "FT"), ("lora", "LoRA"), ("dora", "DoRA"),
                                          ("rs_patterns", "DoRA")}
    n = sum(check_against(df, run, base_sd, states, mods) for run, states in runs.items())
    assert n == len(df)
    assert list(df.columns[:8]) == ["run", "method", "step", "module", "layer", "matrix", "delta_m", "delta_d"]
    assert (df.axis == "out").all() and set(df.matrix) == {"q_proj", "v_proj"}
    assert sorted(df.layer.unique()) == [0, 1, 2]
    # the v projection is (12, 48) (1 kv head of 12): one vector per output feature
    assert set(df[df.matrix == "v_proj"].n_vectors) == {12}


def test_axis_in_is_recorded_and_computed(llama_dir):
    d, base_sd, runs = llama_dir
    df = wda.analyze(d, axis="in", modules=["v_proj"], progress=False)
    assert (df.axis == "in").all() and set(df.n_vectors) == {48}
    check_against(df, "dora", base_sd, runs["dora"], [m for m in qv_modules(base_sd) if "v_proj" in m], dim=0)


def test_module_filters_and_plan(llama_dir):
    d, base_sd, _ = llama_dir
    p = wda.plan(d, modules=[r"model\.layers\.[01]\.self_attn\.q_proj"])
    assert set(p.module) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert set(p.out_features) == {48} and set(p.in_features) == {48}
    assert sorted(p[p.run == "ft"].step.unique()) == [10, 20, 30]
    # without adapters in the directory, the default is the attention q/v projections
    p2 = wda.plan(d, modules=["o_proj"])
    assert set(p2.run) == {"ft"}  # adapters do not touch o_proj


def test_dora_merge_self_check(llama_dir):
    """Per-output norms of the merged DoRA weight equal the magnitude vector."""
    d, base_sd, _ = llama_dir
    ck = open_checkpoint(d / "dora" / "checkpoint-20")
    mod = "model.layers.2.self_attn.v_proj"
    t = ck.read_adapter(mod)
    w0 = base_sd[mod + ".weight"]
    merged = merge_dora(w0, t["a"], t["b"], ck.adapters[mod].scaling, t["m"])
    assert torch.allclose(merged.norm(dim=1), t["m"], rtol=1e-5)
    assert not torch.allclose(merged.norm(dim=0)[:12], t["m"], rtol=1e-2)


def test_sharded_bin_bf16_and_base_option(tmp_path):
    model = tiny_llama(seed=5, layers=2)
    base_dir = tmp_path / "elsewhere" / "pretrained"
    save_full(model, base_dir)
    d = tmp_path / "ck"
    sharded = ft_checkpoints(model, d / "sharded", steps=(1, 2), scale=0.004, max_shard_size="20KB")
    legacy = ft_checkpoints(model, d / "legacy", steps=(5,), scale=0.004, seed=7, legacy_bin=True)
    bf = ft_checkpoints(model.to(torch.bfloat16), d / "bf16", steps=(3,), scale=0.004, seed=8)
    assert list((d / "sharded" / "checkpoint-1").glob("model-*-of-*.safetensors"))
    assert (d / "legacy" / "checkpoint-5" / "pytorch_model.bin").is_file()
    df = wda.analyze(d, base=base_dir, progress=False)
    base_sd = {k: v.float() for k, v in tiny_llama(seed=5, layers=2).state_dict().items()}
    mods = qv_modules(base_sd)
    check_against(df, "sharded", base_sd, sharded, mods)
    check_against(df, "legacy", base_sd, legacy, mods)
    check_against(df, "bf16", base_sd, {3: {k: v.float() for k, v in bf[3].items()}}, mods)


def test_gpt2_conv1d_full_and_fan_in_fan_out_adapters(tmp_path):
    """c_attn measured whole (``split_fused=False``, the CLI's --no-split); the q/k/v split
    is tested in test_fused_qkv.py."""
    model = tiny_gpt2()
    save_full(model, tmp_path / "base")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    ft = ft_checkpoints(model, tmp_path / "ft", steps=(1, 2), scale=0.004)
    cfg = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    lora = peft_checkpoints(model, tmp_path / "lora", LoraConfig(**cfg))
    dora = peft_checkpoints(model, tmp_path / "dora", LoraConfig(**cfg, use_dora=True))
    df = wda.analyze(tmp_path, progress=False, split_fused=False)
    mods = sorted(k[:-7] for k in base_sd if k.endswith("attn.c_attn.weight"))
    assert set(df.module) == set(mods)
    assert set(df.n_vectors) == {96}  # c_attn stores (in=32, out=96): one vector per output feature
    for run, states in (("ft", ft), ("lora", lora), ("dora", dora)):
        check_against(df, run, base_sd, states, mods, transpose=True)
    # without adapters in the directory, config.json (model_type gpt2) tells the layout
    shutil.rmtree(tmp_path / "lora")
    shutil.rmtree(tmp_path / "dora")
    p = wda.plan(tmp_path, split_fused=False)
    assert p.transposed.all() and set(p.out_features) == {96}


def test_streaming_memory_does_not_grow_with_steps(tmp_path, monkeypatch):
    """Matrices alive at once stay bounded by the batch and the prefetch depth, for 8 or 20 steps."""
    model = tiny_llama(seed=9, layers=2)
    save_full(model, tmp_path / "base")
    ft_checkpoints(model, tmp_path / "ft", steps=tuple(range(1, 21)), scale=0.004)

    def peak_alive(n_steps: int) -> int:
        for p in (tmp_path / "ft").glob("checkpoint-*"):
            if int(p.name.split("-")[1]) > n_steps:
                p.rename(tmp_path / "ft" / f"hidden-{p.name}")  # not a checkpoint-<step>: ignored
        alive, peak = [0], [0]

        def tracked(*args):
            loaded = read_item(*args)
            for t in loaded.tensors.values():
                alive[0] += 1
                peak[0] = max(peak[0], alive[0])
                weakref.finalize(t, lambda: alive.__setitem__(0, alive[0] - 1))
            return loaded

        monkeypatch.setattr(analysis, "_read_item", tracked)
        df = wda.analyze(tmp_path, progress=False)
        assert df.step.nunique() == n_steps
        for p in (tmp_path / "ft").glob("hidden-*"):
            p.rename(tmp_path / "ft" / p.name[len("hidden-"):])
        return peak[0]

    read_item = analysis._read_item  # wrapped afresh by each call, never a wrapper in a wrapper

    # W_0, a batch of full-weight checkpoints measured in one pass, the read-ahead, one in hand.
    # Batches and read-ahead go by bytes, within counts: tiny matrices make the largest ones
    from wda.analysis.prefetch import LARGE_AHEAD_MAX
    assert peak_alive(20) <= 1 + analysis._BATCH_MAX + LARGE_AHEAD_MAX + 1
    # their smallest, so that 20 steps are many batches: the peak stays that of two
    monkeypatch.setattr(analysis, "_BATCH_BYTES", 0)
    bound = 1 + analysis._BATCH_MIN + analysis.AnalysisOptions().prefetch + 1
    small, large = peak_alive(2 * analysis._BATCH_MIN), peak_alive(20)
    assert large <= small + 1 and large <= bound


def test_read_buffers_are_reused(tmp_path, monkeypatch):
    """The tensors are read into pooled buffers: for 8 or 20 steps, no more buffers than the
    matrices alive at once (W_0, a batch, the read-ahead, one in hand)."""
    import wda.analysis.buffers
    import wda.formats.tensors

    model = tiny_llama(seed=9, layers=2)
    save_full(model, tmp_path / "base")
    ft_checkpoints(model, tmp_path / "ft", steps=tuple(range(1, 21)), scale=0.004)
    monkeypatch.setattr(wda.analysis.buffers, "POOLED_MIN", 0)  # tiny tensors: pool them all
    monkeypatch.setattr(wda.formats.tensors, "MAPPED_MIN", 1 << 62)  # and copy them (CUDA's path)
    pools, reads = [], [0]

    class Counted(wda.analysis.buffers.BufferPool):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            pools.append(self)

        def take(self, nbytes):
            reads[0] += 1
            return super().take(nbytes)

    monkeypatch.setattr(analysis, "BufferPool", Counted)

    def buffers(n_steps: int) -> tuple[int, int]:
        pools.clear()
        reads[0] = 0
        mods = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
        hidden = [p for p in (tmp_path / "ft").glob("checkpoint-*") if int(p.name.split("-")[1]) > n_steps]
        for p in hidden:
            p.rename(tmp_path / "ft" / f"hidden-{p.name}")  # not a checkpoint-<step>: ignored
        try:
            df = wda.analyze(tmp_path, modules=mods, progress=False)
        finally:
            for p in (tmp_path / "ft").glob("hidden-*"):
                p.rename(tmp_path / "ft" / p.name[len("hidden-"):])
        assert df.step.nunique() == n_steps and len(pools) == 1
        return pools[0].allocated, reads[0]

    monkeypatch.setattr(analysis, "_BATCH_BYTES", 0)  # batches and read-ahead of the fewest matrices
    bound = 1 + analysis._BATCH_MIN + analysis.AnalysisOptions().prefetch + 1
    (small, n_small), (large, n_large) = buffers(8), buffers(20)
    assert (n_small, n_large) == (2 * 9, 2 * 21), "every tensor goes through the pool"
    # how many are in flight at once depends on the reader thread's timing, never on the steps
    assert small <= bound and large <= bound


def test_table_sorts_by_method_then_keys_with_missing_values_last():
    """``_table`` (sorted and assembled in Python) gives pandas' stable multi-key sort of the
    same rows: FT, LoRA, DoRA, then other methods; a missing key (None, or NaN: a tracker's
    empty field read back) after the present ones, the keys after it still sorted; dtypes
    as pandas infers them."""
    import random

    rng = random.Random(3)
    for stacks in (["x", "y", None, "nan"], ["nan"]):  # "nan": a new NaN object per row, as pandas'
        rows = []
        for i in range(400):
            row = {c: None for c in analysis.METRIC_COLUMNS}
            row.update(run=rng.choice(["a", "b"]), method=rng.choice(["DoRA", "FT", "LoRA", "other"]),
                       step=rng.randrange(5), module=f"m{rng.randrange(3)}", layer=rng.randrange(4),
                       matrix=rng.choice(["q_proj", "v_proj"]), stack=rng.choice(stacks), n_vectors=8,
                       n_excluded=0, delta_m=rng.random(), axis="out", _path=f"p{i}",
                       train_loss=rng.choice([None, 1.5]))
            row["stack"] = float(row["stack"]) if row["stack"] == "nan" else row["stack"]
            rows.append(row)
        got = analysis._table([dict(r) for r in rows])
        want = analysis._table_pandas([dict(r) for r in rows])
        pd.testing.assert_frame_equal(got, want)
        assert list(dict.fromkeys(got["method"])) == ["FT", "LoRA", "DoRA", "other"]
