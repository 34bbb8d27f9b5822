"""A folder that is itself one checkpoint is a run of one checkpoint: the DoRA authors'
released weights (``LLama-7B/dora_r32/`` = adapter_config.json + adapter_model.bin, no
``checkpoint-<step>/``; FORMATS.md §1), a PEFT ``save_pretrained`` folder. Several such
folders side by side are several runs. Their step is not recorded (-1) unless a
``checkpoint-<N>`` name or a trainer_state.json says it; the report says each is a single
endpoint. Measured against Eq. 5 merged in float64 by hand (the reference code's format) and
PEFT's own merge_and_unload on a float64 copy (PEFT's format)."""

from __future__ import annotations

import copy
import json
import shutil

import pandas as pd
import pytest
import torch

import wda
from builders import Q_V, nvlabs_run, one_line_error, perturb_, plain_reference, save_full, tiny_llama
from wda.report.cli import main
from wda.steps import UNKNOWN_STEP

RANKS = (4, 8)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """``llama-base/``; ``LLama-7B/dora_r4/``, ``dora_r8/`` in the reference code's format, as
    the released folders are laid out; ``peft-dora/``: PEFT DoRA ``save_pretrained`` output."""
    from peft import LoraConfig, get_peft_model

    d = tmp_path_factory.mktemp("bare")
    model = tiny_llama(layers=2)
    save_full(model, d / "llama-base")
    base_sd = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    refs = {f"dora_r{r}": nvlabs_run(d / "LLama-7B" / f"dora_r{r}", model, steps=(UNKNOWN_STEP,), r=r,
                                     alpha=2 * r, seed=r, bare=True)[UNKNOWN_STEP] for r in RANKS}
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=Q_V, use_dora=True))
    perturb_([p for n, p in pm.named_parameters() if "lora_" in n], 0.05, torch.Generator().manual_seed(7))
    pm.save_pretrained(d / "peft-dora")
    merged = copy.deepcopy(pm).double().merge_and_unload().state_dict()
    refs["peft-dora"] = {k[:-len(".weight")]: v.detach().clone() for k, v in merged.items()
                         if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert not list(d.rglob("checkpoint-*")) and not list(d.rglob("trainer_state.json"))
    return d, base_sd, refs


def check(df: pd.DataFrame, run: str, base_sd, merged: dict, step: int = UNKNOWN_STEP) -> None:
    sub = df[df["run"] == run]
    assert set(sub["step"]) == {step}
    assert set(sub["module"]) == set(merged)
    for row in sub.itertuples():
        dm, dd, _ = plain_reference(base_sd[row.module + ".weight"], merged[row.module])
        assert dm > 1e-6  # the adapter moved the weights (magnitude-only modules: ΔD = 0)
        assert row.delta_m == pytest.approx(dm, rel=1e-4) and row.delta_d == pytest.approx(dd, rel=1e-4)


def cli(capsys, *args: str) -> tuple[int, str]:
    rc = main([*args, "--bootstrap", "20", "--no-progress"])
    return rc, capsys.readouterr().err


def test_folder_of_released_adapters_is_several_runs(released, tmp_path, capsys):
    d, base_sd, refs = released
    out = tmp_path / "report"
    rc, err = cli(capsys, str(d / "LLama-7B"), "--base", str(d / "llama-base"), "--out", str(out), "--no-figures")
    assert rc == 0, err
    df = pd.read_csv(out / "metrics.csv")
    assert set(df["run"]) == {"dora_r4", "dora_r8"} and set(df["method"]) == {"DoRA"}
    for run in ("dora_r4", "dora_r8"):
        check(df, run, base_sd, refs[run])
    assert set(df["matrix"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj"}  # o/up magnitude-only
    assert (df[df["matrix"] == "q_proj"]["delta_d"] > 1e-8).all()
    report = (out / "report.md").read_text()
    for run in ("dora_r4", "dora_r8"):
        assert f"run '{run}' is one checkpoint, a single endpoint (its step is not recorded" in report
    assert "Every run is one checkpoint (a single endpoint)" in report
    assert "| dora_r4 | DoRA | not recorded |" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert {r["name"]: r["steps"] for r in manifest["runs"]} == {"dora_r4": [-1], "dora_r8": [-1]}
    assert {r["name"]: r["adapter"]["r"] for r in manifest["runs"]} == {"dora_r4": 4, "dora_r8": 8}


def test_one_released_adapter_is_one_run(released):
    d, base_sd, refs = released
    df = wda.analyze(d / "LLama-7B" / "dora_r8", base=d / "llama-base", progress=False)
    assert set(df["run"]) == {"dora_r8"}
    check(df, "dora_r8", base_sd, refs["dora_r8"])


def test_peft_save_pretrained_folder_with_figures(released, tmp_path, capsys):
    """The single-endpoint report: Figure 2 of its layers, no trajectory over steps."""
    d, base_sd, refs = released
    out = tmp_path / "report"
    rc, err = cli(capsys, str(d / "peft-dora"), "--base", str(d / "llama-base"), "--out", str(out))
    assert rc == 0, err
    df = pd.read_csv(out / "metrics.csv")
    check(df, "peft-dora", base_sd, refs["peft-dora"])
    assert set(df["method"]) == {"DoRA"}
    assert (out / "figure2_q_proj.png").stat().st_size > 1000
    assert not list(out.glob("trajectories_*"))  # a course over training needs two checkpoints
    per_step = pd.read_csv(out / "fits_per_step.csv")
    assert set(per_step["step"]) == {UNKNOWN_STEP}
    assert "single endpoint" in (out / "report.md").read_text()


def test_runs_given_one_by_one_as_bare_folders(released, tmp_path, capsys):
    d, base_sd, refs = released
    out = tmp_path / "report"
    rc, err = cli(capsys, "--run", f"r4={d / 'LLama-7B' / 'dora_r4'}", "--run", f"peft={d / 'peft-dora'}",
                  "--base", str(d / "llama-base"), "--out", str(out), "--no-figures")
    assert rc == 0, err
    df = pd.read_csv(out / "metrics.csv")
    assert set(df["run"]) == {"r4", "peft"}
    check(df, "r4", base_sd, refs["dora_r4"])
    check(df, "peft", base_sd, refs["peft-dora"])


def test_step_from_a_checkpoint_name_or_the_trainer_state(released, tmp_path):
    """A ``checkpoint-<N>`` folder given as CKPT_DIR is step N of the run it is in; a bare
    folder with a trainer_state.json takes its global_step."""
    d, base_sd, refs = released
    ck = tmp_path / "out-dir" / "checkpoint-30"
    shutil.copytree(d / "LLama-7B" / "dora_r4", ck)
    df = wda.analyze(ck, base=d / "llama-base", progress=False)
    assert set(df["run"]) == {"out-dir"}
    check(df, "out-dir", base_sd, refs["dora_r4"], step=30)
    bare = shutil.copytree(d / "peft-dora", tmp_path / "final")
    (bare / "trainer_state.json").write_text(json.dumps({"global_step": 12, "log_history": []}))
    df = wda.analyze(bare, base=d / "llama-base", progress=False)
    check(df, "final", base_sd, refs["peft-dora"], step=12)


def test_multi_step_runs_keep_their_trajectories(released, tmp_path, capsys):
    """A bare endpoint beside a run of checkpoints: the checkpoints' course is plotted, the
    endpoint is noted as such."""
    d, base_sd, refs = released
    root = tmp_path / "runs"
    shutil.copytree(d / "LLama-7B" / "dora_r4", root / "final")
    shutil.copytree(d / "LLama-7B" / "dora_r4", root / "ckpts" / "checkpoint-1")
    shutil.copytree(d / "LLama-7B" / "dora_r8", root / "ckpts" / "checkpoint-2")
    shutil.copytree(d / "llama-base", root / "base")
    out = tmp_path / "report"
    rc, err = cli(capsys, str(root), "--out", str(out), "--modules", "q_proj")
    assert rc == 0, err
    df = pd.read_csv(out / "metrics.csv")
    assert {r: sorted(set(df[df.run == r]["step"])) for r in ("final", "ckpts")} == {"final": [-1], "ckpts": [1, 2]}
    check(df[df.step == 2], "ckpts", base_sd, {m: w for m, w in refs["dora_r8"].items() if m.endswith("q_proj")},
          step=2)
    assert (out / "trajectories_q_proj.png").is_file()
    report = (out / "report.md").read_text()
    assert "run 'final' is one checkpoint" in report and "run 'ckpts'" not in report
    assert "Each layer is measured at several steps" in report


# ---- bad variants: one line naming the file, exit 2 --------------------------------------------
def test_the_base_given_as_a_run(released, tmp_path, capsys):
    d = released[0]
    rc, err = cli(capsys, "--run", f"a={d / 'llama-base'}", "--base", str(d / "llama-base"),
                  "--out", str(tmp_path / "o"))
    one_line_error(rc, err, str(d / "llama-base"), "is the base weights (W_0) itself", "'a'")


def test_a_broken_bare_adapter_among_others(released, tmp_path, capsys):
    d = released[0]
    root = shutil.copytree(d / "LLama-7B", tmp_path / "LLama-7B")
    (root / "dora_r8" / "adapter_model.bin").unlink()
    rc, err = cli(capsys, str(root), "--base", str(d / "llama-base"), "--out", str(tmp_path / "o"))
    one_line_error(rc, err, str(root / "dora_r8"), "no adapter_model.bin", "--skip-broken")
    rc, err = cli(capsys, str(root), "--base", str(d / "llama-base"), "--out", str(tmp_path / "o"),
                  "--skip-broken", "--no-figures")
    assert rc == 0 and "skipped" in err, err
    assert set(pd.read_csv(tmp_path / "o" / "metrics.csv")["run"]) == {"dora_r4"}


def test_full_weights_beside_the_runs_are_not_a_run(released, tmp_path):
    """A model folder beside the runs (a teacher, a merged model) is noted, not measured;
    given with --run it is a run."""
    d, base_sd, refs = released
    root = tmp_path / "runs"
    shutil.copytree(d / "LLama-7B" / "dora_r4", root / "dora_r4")
    shutil.copytree(d / "llama-base", root / "base")
    shutil.copytree(d / "llama-base", root / "teacher")
    layout = wda.analysis.engine.AnalysisOptions().discover(root)
    assert [r.name for r in layout.runs] == ["dora_r4"]
    assert any("teacher: ignored (full weights" in n and "--run" in n for n in layout.notes)
    df = wda.analyze(root, runs={"teacher": root / "teacher"}, progress=False)
    assert set(df["run"]) == {"dora_r4", "teacher"} and (df[df.run == "teacher"]["delta_m"] == 0).all()
