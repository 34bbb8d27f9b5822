"""wda.Tracker: rows measured while training equal the report's rows on checkpoints saved at
the same steps; tracking changes nothing in training; bad input is one clear line and never a
corrupted metrics.csv; ``python -m wda.report`` renders a tracker's folder.

The reference is the analysis engine reading real checkpoints written by transformers / PEFT
/ wda.train.adapt (``wda.analyze``), a path that shares no code with the tracker's reading of live
modules (scaling from adapter_config.json, names from the files, tensors from disk).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import wda
from wda.errors import WdaError
from wda.tracking.tracker import Tracker, metric_columns

from builders import tiny_gpt2, tiny_llama

STEPS = (2, 4)
TEXT = ("run", "method", "module", "matrix", "axis", "stack")


# ---- tiny training runs that save checkpoints and track at the same steps --------------------
def _batches(vocab: int, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 12), generator=g) for _ in range(n)]


def _train(model: nn.Module, save, tracker: Tracker | None, lr: float = 3e-2) -> list[float]:
    """Adam on a causal LM; saves and tracks at STEPS. Returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step, ids in enumerate(_batches(64), start=1):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if tracker is not None:
            tracker.step(step)
        if step in STEPS:
            save(step)
    return losses


def _case(name: str, d: Path, axis: str) -> Tracker:
    """Build the model of ``name``, save base/, train with a tracker while saving checkpoints."""
    from peft import LoraConfig, get_peft_model

    from wda.train.adapt import AdapterSpec, add_adapters, save_adapter

    gpt2 = name.startswith("gpt2")
    model = tiny_gpt2() if gpt2 else tiny_llama(layers=2)
    model.save_pretrained(d / "base")
    run = d / "run"
    targets = ["c_attn"] if gpt2 else ["q_proj", "v_proj"]
    if name in ("ft", "gpt2_ft"):
        save = lambda s: model.save_pretrained(run / f"checkpoint-{s}")  # noqa: E731
        tracked = model
        modules = targets
    elif name.startswith("wda_"):
        spec = {"wda_lora": AdapterSpec("lora", r=4, alpha=8.0, targets=targets),
                "wda_dora": AdapterSpec("dora", r=4, alpha=8.0, use_rslora=True, targets=targets,
                                        magnitude_only=("o_proj",))}[name]
        torch.manual_seed(1)
        add_adapters(model, spec)
        save = lambda s: save_adapter(model, run / f"checkpoint-{s}", spec)  # noqa: E731
        tracked, modules = model, None
    else:
        cfg = {"peft_lora": LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=True,
                                       rank_pattern={"layers.1.self_attn.q_proj": 2},
                                       alpha_pattern={"v_proj": 5}),
               "peft_dora": LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                       rank_pattern={"v_proj": 3}),
               "gpt2_peft_dora": LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                            fan_in_fan_out=True)}[name]
        torch.manual_seed(1)
        tracked = get_peft_model(model, cfg)
        save = lambda s: tracked.save_pretrained(run / f"checkpoint-{s}")  # noqa: E731
        modules = None
    tracker = Tracker(tracked, modules, steps=STEPS, out=d / "tracker", axis=axis, run="run")
    tracked.train()
    _train(tracked, save, tracker)
    return tracker


def _key(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["run", "module", "step"]).reset_index(drop=True)


def assert_rows_equal(tracked: pd.DataFrame, reference: pd.DataFrame) -> None:
    """Same columns, same keys and labels; every measured number to 1e-6 relative (NaN for
    NaN: the logged training columns are empty without a trainer_state.json)."""
    import numpy as np

    assert list(tracked.columns) == list(reference.columns)
    a, b = _key(tracked), _key(reference)
    assert len(a) == len(b) > 0
    for col in a.columns:
        if col in TEXT:
            assert a[col].tolist() == b[col].tolist(), col
            continue
        x, y = a[col].to_numpy(float), b[col].to_numpy(float)
        # ΔM, ΔD, |W_0| each to 1e-6; a signed diagnostic mean (alignment: terms of both
        # signs cancel) to 1e-6 of its column's largest value
        scale = abs(y) if col in ("delta_m", "delta_d", "m0_mean") else np.nanmax(abs(y), initial=0.0)
        same = (np.isnan(x) & np.isnan(y)) | (abs(x - y) <= 1e-6 * scale)
        assert same.all(), (col, abs(x - y).max(), x, y)
    assert (b["delta_m"] > 0).all()  # the runs did train (magnitude-only modules keep ΔD = 0)
    assert (b.loc[b["matrix"] != "o_proj", "delta_d"] > 0).all()


CASES = ["ft", "wda_lora", "wda_dora", "peft_lora", "peft_dora", "gpt2_ft", "gpt2_peft_dora"]


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("name", CASES)
def test_rows_equal_the_report_on_checkpoints_saved_at_the_same_steps(name, axis, tmp_path):
    if axis == "in" and name not in ("ft", "wda_dora", "peft_lora"):
        pytest.skip("axis 'in' on one case per path: full weights, wda DoRA (dense), PEFT LoRA")
    tracker = _case(name, tmp_path, axis)
    rows = pd.read_csv(tmp_path / "tracker" / "metrics.csv")
    # the tracker measures a fused projection (GPT-2 c_attn) whole: the report's --no-split
    ref = wda.analyze(tmp_path, modules=tracker.modules, axis=axis, device="cpu", progress=False,
                      split_fused=False)
    assert_rows_equal(rows, ref)
    assert set(rows["step"]) == set(STEPS)
    method = {"ft": "FT", "gpt2_ft": "FT", "wda_lora": "LoRA", "peft_lora": "LoRA"}.get(name, "DoRA")
    assert set(rows["method"]) == {method}
    if name == "wda_dora":  # the magnitude-only modules are tracked too
        assert rows["module"].str.endswith("o_proj").any()
    if name.startswith("gpt2"):
        assert tracker.modules == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    # W_0: a copy only for full fine-tuning (just the selected matrices)
    w0 = sum(m.numel() * m.element_size() for n, m in _weights(tracker).items())
    assert tracker.w0_bytes == (w0 if name.endswith("ft") else 0)


def _weights(tracker: Tracker) -> dict[str, torch.Tensor]:
    return {t.info.name: t.base.vecs for t in tracker._modules}


def test_metrics_csv_has_the_report_schema_and_measurement_fields_flow_through(tmp_path):
    import dataclasses

    from wda.analysis.engine import METRIC_COLUMNS
    from wda.analysis.decompose import Measurement

    assert metric_columns()[: len(METRIC_COLUMNS)] == METRIC_COLUMNS
    assert {f.name for f in dataclasses.fields(Measurement)} <= set(metric_columns())
    model = nn.ModuleDict({"q_proj": nn.Linear(5, 3)})
    Tracker(model, every=1, out=tmp_path / "t").step(1)
    header = (tmp_path / "t" / "metrics.csv").read_text().splitlines()[0]
    assert header.split(",") == metric_columns()


# ---- the tracker changes nothing in training -------------------------------------------------
def _wda_run(method: str, dropout: float, mode: str, track: Path | None):
    """A tiny wda Transformer fine-tuned a few steps; returns (losses, state, rng, grads seen)."""
    from wda.train.adapt import AdapterSpec, add_adapters
    from wda.train.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=2, d_model=16, n_heads=2, max_seq_len=16, dropout=dropout))
    if method != "ft":
        add_adapters(model, AdapterSpec(method, r=2, alpha=4.0, dropout=dropout, targets=("q_proj", "v_proj")))
    model.train(mode == "train")
    tracker = Tracker(model, every=1, out=track) if track else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses, checks = [], []
    for step in range(1, 5):
        x = torch.randint(0, 256, (2, 16), generator=g)
        loss = model.loss(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if tracker is not None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            modes = [m.training for m in model.modules()]
            rng, flags = torch.get_rng_state(), (torch.is_grad_enabled(), torch.get_num_threads())
            assert tracker.step(step)
            checks.append(all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters()
                              if p.grad is not None) and modes == [m.training for m in model.modules()]
                          and torch.equal(rng, torch.get_rng_state())
                          and flags == (torch.is_grad_enabled(), torch.get_num_threads()))
    return torch.stack(losses), model.state_dict(), torch.get_rng_state(), checks


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("method", ["ft", "dora"])
def test_tracking_changes_nothing_in_training(method, dropout, mode, tmp_path):
    loss0, state0, rng0, _ = _wda_run(method, dropout, mode, None)
    loss1, state1, rng1, checks = _wda_run(method, dropout, mode, tmp_path / "t")
    assert torch.equal(loss0, loss1)
    assert state0.keys() == state1.keys() and all(torch.equal(state0[k], state1[k]) for k in state0)
    assert torch.equal(rng0, rng1)
    assert checks == [True] * 4
    assert len(pd.read_csv(tmp_path / "t" / "metrics.csv")) == 4 * 4  # 2 layers x q, v x 4 steps


# ---- bad input -------------------------------------------------------------------------------
def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"q_proj": nn.Linear(6, 4), "norm": nn.LayerNorm(6), "conv": nn.Conv2d(2, 3, 3)})


def _stack(n: int) -> nn.Module:
    """layers.<i>.q_proj for i < n."""
    torch.manual_seed(0)
    return nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(6, 4)})
                                                   for _ in range(n)])})


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, WdaError)
    return text


@pytest.mark.parametrize("kwargs, message", [
    ({"modules": ["k_proj"]}, "'k_proj' matches no module"),
    ({"modules": ["norm"]}, "not 2-D matrices ('norm' has shape (6,))"),
    ({"modules": ["conv"]}, "'conv' has shape (3, 2, 3, 3)"),
    ({"modules": []}, "names no module"),
    ({"every": 0}, "every must be a positive integer"),
    ({"every": None}, "exactly one of every=N or steps"),
    ({"steps": [3, -1], "every": None}, "non-negative integer"),
    ({"axis": "rows"}, "axis must be one of out, in"),
])
def test_bad_settings_are_one_clear_line(kwargs, message, tmp_path):
    kw = {"every": 1, "out": tmp_path / "t"} | kwargs
    with pytest.raises(WdaError) as err:
        Tracker(_toy(), **kw)
    assert message in _one_line(err)
    assert not (tmp_path / "t").exists()


def test_a_model_without_the_named_modules(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(WdaError) as err:
        Tracker(model, every=1, out=tmp_path / "t")
    assert "no attention query/value projection" in _one_line(err) and "'0'" in str(err.value)
    with pytest.raises(WdaError) as err:
        Tracker(model, ["q_proj"], every=1, out=tmp_path / "t")
    assert "matches no module" in _one_line(err)
    with pytest.raises(WdaError, match="torch.nn.Module"):
        Tracker({"q_proj": torch.zeros(2, 2)}, every=1, out=tmp_path / "t")


def test_unwritable_out_and_an_existing_run_are_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(WdaError) as err:
        Tracker(_toy(), every=1, out=blocker / "t")
    assert "cannot write the tracker's files" in _one_line(err)
    with pytest.raises(WdaError, match="exists and is not a folder"):
        Tracker(_toy(), every=1, out=blocker)
    Tracker(_toy(), every=1, out=tmp_path / "t").step(1)
    before = (tmp_path / "t" / "metrics.csv").read_bytes()
    with pytest.raises(WdaError, match="refusing to mix"):
        Tracker(_toy(), every=1, out=tmp_path / "t")
    assert (tmp_path / "t" / "metrics.csv").read_bytes() == before


def test_steps_going_backwards_and_repeats(tmp_path):
    model = _toy()
    t = Tracker(model, every=2, out=tmp_path / "t")
    assert not t.step(1) and t.step(2) and not t.step(2) and not t.step(3)  # a repeat does nothing
    before = (tmp_path / "t" / "metrics.csv").read_bytes()
    with pytest.raises(WdaError) as err:
        t.step(1)
    assert "step 1 comes after step 3" in _one_line(err)
    for bad in (2.0, True, "4", -4):
        with pytest.raises(WdaError, match="non-negative integer"):
            t.step(bad)
    assert (tmp_path / "t" / "metrics.csv").read_bytes() == before
    assert t.step(torch.tensor(4)) and t.step(6)  # integer tensors are steps
    assert pd.read_csv(tmp_path / "t" / "metrics.csv")["step"].tolist() == [2, 4, 6]


def test_a_full_disk_leaves_only_whole_steps(tmp_path, monkeypatch):
    """A write cut short (ENOSPC after part of the step's rows) is cut back to the last step."""
    model = _stack(2)
    t = Tracker(model, every=1, out=tmp_path / "t")
    t.step(1)
    path = tmp_path / "t" / "metrics.csv"
    before = path.read_bytes()
    real = os.write

    def full_disk(fd, data):
        real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(WdaError) as err:
        t.step(2)
    assert "no space left" in _one_line(err) and "every earlier step is in the file" in str(err.value)
    assert path.read_bytes() == before
    monkeypatch.setattr(os, "write", real)
    assert t.step(3)  # space again: appending goes on from the last whole step
    assert pd.read_csv(path)["step"].tolist() == [1, 1, 3, 3]


def test_non_finite_weights_and_merged_adapters_are_refused(tmp_path):
    from wda.train.adapt import AdapterSpec, add_adapters

    model = nn.ModuleDict({"q_proj": nn.Linear(6, 4)})
    t = Tracker(model, every=1, out=tmp_path / "t")
    t.step(1)
    before = (tmp_path / "t" / "metrics.csv").read_bytes()
    with torch.no_grad():
        model["q_proj"].weight[0, 0] = float("nan")
    with pytest.raises(WdaError) as err:
        t.step(2)
    assert "non-finite values (NaN/Inf) in module 'q_proj' at step 2" in _one_line(err)
    assert (tmp_path / "t" / "metrics.csv").read_bytes() == before

    model = nn.ModuleDict({"q_proj": nn.Linear(6, 4)})
    add_adapters(model, AdapterSpec("dora", r=2, targets=("q_proj",)))
    t = Tracker(model, every=1, out=tmp_path / "d")
    model["q_proj"].merge()
    with pytest.raises(WdaError) as err:
        t.step(1)
    assert "adapter merged" in _one_line(err)


def test_mixing_adapters_and_plain_modules_is_refused(tmp_path):
    from wda.train.adapt import AdapterSpec, add_adapters

    model = nn.ModuleDict({"q_proj": nn.Linear(6, 4), "o_proj": nn.Linear(4, 6)})
    add_adapters(model, AdapterSpec("lora", r=2, targets=("q_proj",)))
    with pytest.raises(WdaError) as err:
        Tracker(model, ["q_proj", "o_proj"], every=1, out=tmp_path / "t")
    assert "mixes adapter layers and plain modules ('o_proj')" in _one_line(err)


# ---- the report from a tracker's folder ------------------------------------------------------
@pytest.fixture(scope="module")
def tracked_runs(tmp_path_factory) -> Path:
    """Two tracked runs (FT and PEFT DoRA) with checkpoints at the same steps."""
    d = tmp_path_factory.mktemp("tracked")
    for name in ("ft", "peft_dora"):
        tracker = _case(name, d / name, "out")
        assert tracker.run == "run"
    return d


def _report(capsys, *argv) -> tuple[int, str, str]:
    from wda.report.cli import main

    rc = main([str(a) for a in argv] + ["--no-progress", "--bootstrap", "50"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_report_on_a_tracker_folder_is_the_report_on_its_checkpoints(tracked_runs, tmp_path, capsys):
    d = tracked_runs / "peft_dora"
    rc, _, err = _report(capsys, d / "tracker", "--out", tmp_path / "from_tracker")
    assert rc == 0, err
    rc, _, err = _report(capsys, d, "--out", tmp_path / "from_checkpoints", "--no-figures")
    assert rc == 0, err
    a, b = (tmp_path / "from_tracker", tmp_path / "from_checkpoints")
    ta, tb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    assert_rows_equal(ta, tb)
    assert ta[["run", "step", "module"]].equals(tb[["run", "step", "module"]])  # the report's order
    fa, fb = pd.read_csv(a / "fits.csv"), pd.read_csv(b / "fits.csv")
    assert list(fa.columns) == list(fb.columns) and len(fa) == len(fb) == 2
    for col in ("slope", "pearson_r", "spearman_rho"):
        assert (abs(fa[col] - fb[col]) <= 1e-5 * abs(fb[col]) + 1e-9).all(), col
    names = {p.name for p in a.iterdir()}
    assert {"metrics.csv", "fits.csv", "fits_per_step.csv", "report.md", "manifest.json",
            "figure2_q_proj.png", "figure2_q_proj.pdf", "trajectories_v_proj.png"} <= names
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "tracker"
    settings = manifest["source"]["trackers"][0]["settings"]
    assert settings["steps"] == list(STEPS) and settings["method"] == "DoRA" and settings["axis"] == "out"
    assert [r["steps"] for r in manifest["runs"]] == [list(STEPS)]
    assert "source" not in json.loads((b / "manifest.json").read_text())
    text = (a / "report.md").read_text()
    assert "measured during training by wda.Tracker, no checkpoints" in text and "Figure 2" in text


def test_report_on_several_tracked_runs_and_its_options(tracked_runs, tmp_path, capsys):
    # a folder of runs: ft/tracker and peft_dora/tracker, renamed so that the runs differ
    root = tmp_path / "runs"
    for name in ("ft", "peft_dora"):
        dst = root / name / "tracker"
        dst.mkdir(parents=True)
        df = pd.read_csv(tracked_runs / name / "tracker" / "metrics.csv", keep_default_na=False)
        df.assign(run=name).to_csv(dst / "metrics.csv", index=False)
        settings = json.loads((tracked_runs / name / "tracker" / "tracker.json").read_text())
        (dst / "tracker.json").write_text(json.dumps(settings | {"run": name}))
    rc, out, err = _report(capsys, root, "--trackers", "--dry-run")
    assert rc == 0 and "ft " in out and "peft_dora" in out and "DoRA" in out, err
    rc, _, err = _report(capsys, root, "--trackers", "--out", tmp_path / "rep", "--no-figures", "--modules", "q_proj")
    assert rc == 0, err
    m = pd.read_csv(tmp_path / "rep" / "metrics.csv")
    assert m["run"].tolist()[0] == "ft" and set(m["run"]) == {"ft", "peft_dora"}
    assert set(m["matrix"]) == {"q_proj"}
    rc, _, err = _report(capsys, root, "--trackers", "--out", tmp_path / "rep3", "--modules", "k_proj")
    assert rc == 2 and "--modules 'k_proj' matches no tracked module" in err
    # --trackers reads <run>/tracker/ beside a base/ (a checkpoint folder that also tracked)
    rc, _, err = _report(capsys, tracked_runs / "ft", "--trackers", "--out", tmp_path / "t2", "--no-figures")
    assert rc == 0, err
    assert json.loads((tmp_path / "t2" / "manifest.json").read_text())["source"]["kind"] == "tracker"
    # the tracker's axis and dtype are fixed: asking for others is one clear line
    rc, _, err = _report(capsys, root, "--trackers", "--out", tmp_path / "rep2", "--axis", "in")
    assert rc == 2 and "measured with axis 'out', not 'in'" in err and "--axis out" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "rep2").exists()


def test_report_reads_whole_steps_of_an_interrupted_run_and_refuses_broken_files(tmp_path, capsys):
    model = _stack(3)
    t = Tracker(model, every=1, out=tmp_path / "t")
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01).add_(0.01)
        t.step(step)
    path = tmp_path / "t" / "metrics.csv"
    whole = path.read_bytes()
    path.write_bytes(whole + b"t,FT,4,layers.0.q_proj,0,q_pr")  # a crash in the middle of a write
    rc, _, err = _report(capsys, tmp_path / "t", "--out", tmp_path / "rep", "--no-figures")
    assert rc == 0, err
    assert len(pd.read_csv(tmp_path / "rep" / "metrics.csv")) == 9
    assert "incomplete last line was left out" in (tmp_path / "rep" / "report.md").read_text()
    path.write_bytes(whole.replace(b",FT,2,", b",FT,two,", 1))
    rc, _, err = _report(capsys, tmp_path / "t", "--out", tmp_path / "rep3")
    assert rc == 2 and "step 'two' is not a number" in err and len(err.strip().splitlines()) == 1
    path.write_bytes(whole.splitlines(keepends=True)[0])
    rc, _, err = _report(capsys, tmp_path / "t", "--out", tmp_path / "rep4")
    assert rc == 2 and "recorded no step yet" in err


# ---- wda.train tracks its runs ---------------------------------------------------------------
def test_wda_train_tracks_its_runs_between_the_checkpoints(tmp_path):
    """The embedded runs: dense rows in <run>/tracker/ that, at the checkpoint steps, are the
    report's rows on the checkpoints; every other file is what an untracked run writes."""
    from test_train import safetensors_files, tiny

    from wda.train import cli as T

    cfg = tiny(tmp_path, track_every=2)
    out = T.train_all(cfg)
    ref = wda.analyze(out, device="cpu", progress=False)
    assert set(ref["step"]) == {4, 8, 12}
    for method, name in (("ft", "FT"), ("lora", "LoRA"), ("dora", "DoRA")):
        rows = pd.read_csv(out / method / "tracker" / "metrics.csv")
        assert sorted(set(rows["step"])) == list(range(2, 13, 2)) and set(rows["method"]) == {name}
        at_ckpt = rows[rows["step"].isin([4, 8, 12])]
        assert_rows_equal(at_ckpt, ref[ref["run"] == method])
        assert json.loads((out / method / "tracker" / "tracker.json").read_text())["every"] == 2
    untracked = T.train_all(tiny(tmp_path, out=str(tmp_path / "plain"), track_every=0))
    assert not list(untracked.rglob("tracker"))
    assert safetensors_files(untracked) == safetensors_files(out)
    a, b = (json.loads((d / "train_log.json").read_text())["runs"] for d in (out, untracked))
    assert all(a[m]["train_loss"] == b[m]["train_loss"] and a[m]["eval"] == b[m]["eval"] for m in a)
