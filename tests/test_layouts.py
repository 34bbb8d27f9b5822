"""Where the checkpoints are: a Trainer output_dir as one run, runs given one by one, a base
found offline in the local Hugging Face cache, trainer_state.json beside each checkpoint.

The runs are real ``transformers.Trainer`` runs (a tiny Llama, 4 steps, checkpoints at 2
and 4, a few seconds); the hub cache is laid out as huggingface_hub lays it out. Every
measurement is checked against the float64 textbook form of Eqs. 3-4 on the weights the
model held when each checkpoint was saved (taken in memory, not read from the files).
"""

from __future__ import annotations

import copy
import json
import shutil

import pandas as pd
import pytest
import torch

import wda
from builders import Q_V, hub_cached, one_line_error, plain_reference, tiny_llama, trainer_run
from wda.report.cli import main
from wda.formats.trainer_state import logged_near
from wda.steps import UNKNOWN_STEP

REPO = "org/tiny"
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """base/ (a plain folder), a hub cache holding the same base as org/tiny, and two
    Trainer output dirs: full fine-tuning ``ft_out`` and PEFT DoRA ``dora_out`` (trained
    from the model loaded as org/tiny, so its adapters name that base)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("layouts")
    model = tiny_llama(seed=4, layers=2)
    base_sd = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(d / "base")
    hub_cached(model, d / "hub", REPO, SHA, refs=("main", "v1"))
    ft_refs, ft_log = trainer_run(copy.deepcopy(model), d / "ft_out")
    loaded = AutoModelForCausalLM.from_pretrained(REPO, cache_dir=str(d / "hub"), local_files_only=True)
    assert loaded.name_or_path == REPO
    dora_refs, dora_log = trainer_run(loaded, d / "dora_out", seed=1,
                                      peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=Q_V, use_dora=True))
    cfg = json.loads((d / "dora_out" / "checkpoint-2" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == REPO  # written by PEFT itself
    return d, base_sd, {"ft": (ft_refs, ft_log), "dora": (dora_refs, dora_log)}


@pytest.fixture
def offline_hub(trained, monkeypatch):
    d = trained[0]
    monkeypatch.setenv("HF_HUB_CACHE", str(d / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return d / "hub"


def check_run(df: pd.DataFrame, run: str, base_sd, refs, modules: set[str]) -> None:
    sub = df[df["run"] == run]
    assert sorted(set(sub["step"])) == sorted(refs) == [2, 4]
    assert set(sub["module"]) == modules
    for row in sub.itertuples():
        key = row.module + ".weight"
        dm, dd, _ = plain_reference(base_sd[key], refs[row.step][key])
        assert dd > 1e-8  # the run moved the weights: the comparison is not of zeros
        assert row.delta_m == pytest.approx(dm, rel=1e-4)
        assert row.delta_d == pytest.approx(dd, rel=1e-4)


def qv(base_sd) -> set[str]:
    return {k[:-len(".weight")] for k in base_sd if k.endswith(("q_proj.weight", "v_proj.weight"))}


def cli(capsys, *args: str) -> tuple[int, str]:
    rc = main([*args, "--no-figures", "--bootstrap", "20"])
    return rc, capsys.readouterr().err


# ---- a Trainer output_dir is one run ---------------------------------------------------------
def test_trainer_output_dir_is_one_run(trained, tmp_path, capsys):
    d, base_sd, runs = trained
    refs, log = runs["ft"]
    out = tmp_path / "report"
    rc, err = cli(capsys, str(d / "ft_out"), "--base", str(d / "base"), "--out", str(out))
    assert rc == 0, err
    df = pd.read_csv(out / "metrics.csv")
    assert set(df["run"]) == {"ft_out"} and set(df["method"]) == {"FT"}
    check_run(df, "ft_out", base_sd, refs, qv(base_sd))
    # trainer_state.json: what was logged at each checkpoint's step (logging_steps=1)
    logged = {e["step"]: e for e in log if "loss" in e}
    for row in df.itertuples():
        assert row.train_loss == pytest.approx(logged[row.step]["loss"], rel=1e-12)
        assert row.learning_rate == pytest.approx(logged[row.step]["learning_rate"], rel=1e-12)
        assert row.epoch == pytest.approx(logged[row.step]["epoch"], rel=1e-12)


def test_trainer_peft_run_finds_its_base_in_the_hub_cache(trained, offline_hub):
    """No --base, no CKPT_DIR/base: the adapters' base_model_name_or_path (org/tiny) is
    found offline in the local hub cache."""
    d, base_sd, runs = trained
    layout = wda.analysis.engine.AnalysisOptions().discover(d / "dora_out")
    assert layout.base == offline_hub / "models--org--tiny" / "snapshots" / SHA
    df = wda.analyze(d / "dora_out", progress=False)
    check_run(df, "dora_out", base_sd, runs["dora"][0], qv(base_sd))
    assert set(df["method"]) == {"DoRA"}


@pytest.mark.parametrize("spec", [REPO, f"{REPO}@v1", f"{REPO}@{SHA}"])
def test_base_as_a_hub_id(trained, offline_hub, spec):
    d, base_sd, runs = trained
    df = wda.analyze(d / "ft_out", base=spec, progress=False)
    check_run(df, "ft_out", base_sd, runs["ft"][0], qv(base_sd))


def test_report_plots_change_against_training_loss(trained, tmp_path, capsys):
    d = trained[0]
    out = tmp_path / "report"
    rc = main([str(d / "ft_out"), "--base", str(d / "base"), "--out", str(out), "--no-progress",
               "--bootstrap", "20", "--modules", "q_proj"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "loss_q_proj.png").stat().st_size > 1000
    assert "loss_q_proj.png" in (out / "report.md").read_text()


def test_trainer_output_dir_with_only_the_final_save(trained, tmp_path, capsys):
    """save_strategy="no", then trainer.save_model() and save_state(): the folder itself is
    one checkpoint, its step the state's global_step."""
    d, base_sd, _ = trained
    model = tiny_llama(seed=4, layers=2)
    refs, _ = trainer_run(model, tmp_path / "final", max_steps=3, final_only=True)
    assert not list((tmp_path / "final").glob("checkpoint-*"))
    assert (tmp_path / "final" / "model.safetensors").is_file()
    df = wda.analyze(tmp_path / "final", base=d / "base", progress=False)
    assert set(df["run"]) == {"final"} and set(df["step"]) == {3}
    for row in df.itertuples():
        dm, dd, _ = plain_reference(base_sd[row.module + ".weight"], refs[3][row.module + ".weight"])
        assert row.delta_m == pytest.approx(dm, rel=1e-4) and row.delta_d == pytest.approx(dd, rel=1e-4)
    (tmp_path / "final" / "trainer_state.json").unlink()  # nothing records the step now
    capsys.readouterr()  # what the Trainer itself wrote
    rc, err = cli(capsys, str(tmp_path / "final"), "--base", str(d / "base"), "--out", str(tmp_path / "o"))
    assert rc == 0, err
    df = pd.read_csv(tmp_path / "o" / "metrics.csv")
    assert set(df["step"]) == {UNKNOWN_STEP} and df["train_loss"].isna().all()
    assert "its step is not recorded" in (tmp_path / "o" / "report.md").read_text()


def test_runs_given_one_by_one(trained, tmp_path, capsys):
    d, base_sd, runs = trained
    out = tmp_path / "report"
    rc, err = cli(capsys, "--run", f"full={d / 'ft_out'}", "--run", f"dora={d / 'dora_out'}",
                  "--base", str(d / "base"), "--out", str(out))
    assert rc == 0, err
    df = pd.read_csv(out / "metrics.csv")
    assert set(df["run"]) == {"full", "dora"}
    check_run(df, "full", base_sd, runs["ft"][0], qv(base_sd))
    check_run(df, "dora", base_sd, runs["dora"][0], qv(base_sd))
    manifest = json.loads((out / "manifest.json").read_text())
    assert {r["name"]: r["path"] for r in manifest["runs"]} == {
        "full": str((d / "ft_out").resolve()), "dora": str((d / "dora_out").resolve())}


def test_a_run_added_to_a_folder_of_runs(trained, tmp_path):
    d, base_sd, runs = trained
    root = tmp_path / "ck"
    shutil.copytree(d / "base", root / "base")
    shutil.copytree(d / "ft_out", root / "ft")
    df = wda.analyze(root, runs={"dora": d / "dora_out"}, progress=False)
    assert set(df["run"]) == {"ft", "dora"}
    check_run(df, "dora", base_sd, runs["dora"][0], qv(base_sd))


# ---- bad variants: one line naming the file, exit 2 --------------------------------------------
def test_hub_id_not_in_the_cache(trained, offline_hub, tmp_path, capsys):
    d = trained[0]
    rc, err = cli(capsys, str(d / "ft_out"), "--base", "org/absent", "--out", str(tmp_path / "o"))
    one_line_error(rc, err, "'org/absent'", str(offline_hub), "--base")
    rc, err = cli(capsys, str(d / "ft_out"), "--base", f"{REPO}@v2", "--out", str(tmp_path / "o"))
    one_line_error(rc, err, f"{REPO!r} (revision v2)")


def test_adapters_naming_a_base_not_in_the_cache(trained, tmp_path, monkeypatch, capsys):
    d = trained[0]
    empty = tmp_path / "empty-hub"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, err = cli(capsys, str(d / "dora_out"), "--out", str(tmp_path / "o"))
    one_line_error(rc, err, str(d / "dora_out" / "checkpoint-2" / "adapter_config.json"), f"{REPO!r}",
                   str(empty), "--base")


def test_full_weights_run_without_a_base(trained, tmp_path, capsys):
    d = trained[0]
    rc, err = cli(capsys, str(d / "ft_out"), "--out", str(tmp_path / "o"))
    one_line_error(rc, err, str(d / "ft_out"), "no base weights", "--base")


def test_step_and_global_step_disagree(trained, tmp_path, capsys):
    d = trained[0]
    run = tmp_path / "ft_out"
    shutil.copytree(d / "ft_out", run)
    (run / "checkpoint-4").rename(run / "checkpoint-6")
    rc, err = cli(capsys, str(run), "--base", str(d / "base"), "--out", str(tmp_path / "o"))
    one_line_error(rc, err, str(run / "checkpoint-6" / "trainer_state.json"), "global_step 4", "step 6")


def test_trainer_state_not_json(trained, tmp_path, capsys):
    d = trained[0]
    run = tmp_path / "ft_out"
    shutil.copytree(d / "ft_out", run)
    (run / "checkpoint-2" / "trainer_state.json").write_text("{")
    rc, err = cli(capsys, str(run), "--base", str(d / "base"), "--out", str(tmp_path / "o"))
    one_line_error(rc, err, str(run / "checkpoint-2" / "trainer_state.json"), "not valid JSON")


@pytest.mark.parametrize("specs, words", [
    (["full"], ["'full' is not NAME=PATH"]),
    (["full=/nonexistent/run"], ["/nonexistent/run", "does not exist"]),
    (["a={ft}", "a={dora}"], ["run named 'a'"]),
    (["a={base}"], ["is the base weights (W_0) itself"]),
    (["a={empty}"], ["holds no checkpoint-<step>/ folders and no checkpoint"]),
])
def test_bad_run_options(trained, tmp_path, capsys, specs, words):
    d = trained[0]
    args = []
    for s in specs:
        args += ["--run", s.format(ft=d / "ft_out", dora=d / "dora_out", base=d / "base", empty=tmp_path)]
    rc, err = cli(capsys, *args, "--base", str(d / "base"), "--out", str(tmp_path / "o"))
    one_line_error(rc, err, *words)


def test_input_is_checked_before_out(tmp_path, capsys):
    """A missing CKPT_DIR is named even when --out is a folder wda would refuse."""
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("x")
    rc, err = cli(capsys, str(tmp_path / "nope"), "--out", str(precious))
    one_line_error(rc, err, str(tmp_path / "nope"), "does not exist")
    assert (precious / "chapter1.tex").read_text() == "x"


def test_progress_bar_only_on_a_terminal_unless_asked(trained, tmp_path, capsys):
    d = trained[0]
    base = ["--run", f"ft={d / 'ft_out'}", "--base", str(d / "base")]
    rc, err = cli(capsys, *base, "--out", str(tmp_path / "a"))  # stderr is not a terminal here
    assert rc == 0 and "wda: measuring" not in err and "\r" not in err, err
    rc, err = cli(capsys, *base, "--out", str(tmp_path / "b"), "--progress")
    assert rc == 0 and "wda: measuring" in err, err


# ---- trainer_state.json ------------------------------------------------------------------------
def test_logged_near_takes_the_nearest_training_log_entry():
    history = [{"step": 10, "loss": 3.0, "learning_rate": 1e-3, "epoch": 0.1},
               {"step": 10, "eval_loss": 9.0},  # an evaluation entry: no training loss
               {"step": 20, "loss": 2.0, "learning_rate": 5e-4, "epoch": 0.2},
               {"step": 40, "loss": 1.0, "epoch": 0.4}]
    assert logged_near(history, 20) == {"train_loss": 2.0, "learning_rate": 5e-4, "epoch": 0.2}
    assert logged_near(history, 30)["train_loss"] == 2.0  # a tie: the earlier entry
    assert logged_near(history, 36) == {"train_loss": 1.0, "learning_rate": None, "epoch": 0.4}
    assert logged_near(history, 12, epoch=0.125)["epoch"] == 0.125  # the state's own epoch wins
    assert logged_near([], 5) == {"train_loss": None, "learning_rate": None, "epoch": None}


def test_metrics_without_trainer_state_have_empty_log_columns(pristine, tmp_path, capsys):
    out = tmp_path / "report"
    rc, err = cli(capsys, str(pristine), "--out", str(out), "--modules", "q_proj")
    assert rc == 0, err
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["train_loss", "learning_rate", "epoch"]
    df = pd.read_csv(out / "metrics.csv")
    assert df[["train_loss", "learning_rate", "epoch"]].isna().all().all()
    assert torch.isfinite(torch.tensor(df["delta_d"].to_numpy())).all()
