"""Outputs as the README describes them: the axis everywhere, one count of matrices, checks
the dry run shares with the real run, what a report says about its runs, how to reproduce
it, where it may be written; and the Python API as a notebook uses it."""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch

import wda
from wda.errors import WdaError
from wda.report.cli import main
from builders import peft_checkpoints, save_full, tiny_gpt2


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([*argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def quick(ck: Path, out: Path, *extra: str) -> list[str]:
    return [str(ck), "--out", str(out), "--no-progress", "--no-figures", "--bootstrap", "50",
            "--permutations", "50", *extra]


@pytest.mark.parametrize("flag", ["--bootstrap", "--permutations"])
def test_negative_resample_counts_are_one_clear_line(pristine, tmp_path, capsys, flag):
    for extra in ([], ["--dry-run"]):
        rc, out, err = cli(capsys, *quick(pristine, tmp_path / "out", flag, "-5"), *extra)
        assert rc == 2 and out == ""
        assert err.strip().splitlines() == [f"wda: error: {flag} must be a whole number >= 0 (0: none), not -5"]
    assert not (tmp_path / "out").exists()


def test_bootstrap_zero_says_no_ci(pristine, tmp_path, capsys):
    rc, _, err = cli(capsys, *quick(pristine, tmp_path / "out", "--bootstrap", "0"))
    assert rc == 0, err
    md = (tmp_path / "out" / "report.md").read_text()
    assert "no CI: 0 bootstrap resamples" in md and "(resamples)" not in md
    fits = pd.read_csv(tmp_path / "out" / "fits.csv")
    assert fits["r_ci_low"].isna().all() and fits["p_perm"].notna().any()


def test_axis_recorded_in_every_table_and_in_figure_names(pristine, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = cli(capsys, str(pristine), "--out", str(out), "--no-progress", "--axis", "in",
                     "--bootstrap", "20", "--permutations", "20")
    assert rc == 0, err
    for name in ("metrics.csv", "fits.csv", "fits_per_step.csv"):
        assert set(pd.read_csv(out / name)["axis"]) == {"in"}, name
    files = {p.name for p in out.iterdir()}
    for kind in ("q_proj", "v_proj"):
        assert {f"figure2_{kind}_axis-in.png", f"figure2_{kind}_axis-in.pdf",
                f"trajectories_{kind}_axis-in.png"} <= files
    assert not any(n.startswith("figure2_") and "axis" not in n for n in files)
    manifest = json.loads((out / "manifest.json").read_text())
    # every figure file, vector ones too
    assert sorted(manifest["figures"]) == sorted(n for n in files if n.endswith((".png", ".pdf")))
    assert "axis in" in (out / "report.md").read_text()


def test_dry_run_count_is_the_progress_bar_total_and_the_rows(pristine, tmp_path, capsys):
    rc, dry, _ = cli(capsys, str(pristine), "--dry-run")
    n = int(re.search(r"(\d+) matrices to measure", dry)[1])
    rc, _, err = cli(capsys, str(pristine), "--out", str(tmp_path / "out"), "--no-figures",
                     "--bootstrap", "0", "--permutations", "0", "--progress")
    assert rc == 0
    assert f"{n}/{n}" in err  # tqdm's last state on stderr
    assert len(pd.read_csv(tmp_path / "out" / "metrics.csv")) == n


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_dry_run_checks_the_device(pristine, capsys):
    rc, out, err = cli(capsys, str(pristine), "--dry-run", "--device", "cuda")
    assert rc == 2 and "no CUDA device is available" in err and len(err.strip().splitlines()) == 1


def test_fan_in_fan_out_flag_contradicting_the_adapter_config(tmp_path, capsys):
    from peft import LoraConfig

    model = tiny_gpt2()
    save_full(model, tmp_path / "base")
    peft_checkpoints(model, tmp_path / "lora", LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                          fan_in_fan_out=True), steps=(1,))
    rc, _, err = cli(capsys, str(tmp_path), "--dry-run", "--fan-in-fan-out", "no")
    assert rc == 2
    assert "fan_in_fan_out: true" in err and "contradicts the adapter config" in err
    assert "re-save" not in err
    assert cli(capsys, str(tmp_path), "--dry-run", "--fan-in-fan-out", "yes")[0] == 0


def test_out_holding_another_inputs_report_needs_force(pristine, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(pristine, other)
    out = tmp_path / "out"
    assert cli(capsys, *quick(pristine, out))[0] == 0
    before = (out / "manifest.json").read_bytes()
    rc, _, err = cli(capsys, *quick(other, out))
    assert rc == 2 and "holds the report of another input" in err and str(pristine.resolve()) in err
    assert "--force" in err and (out / "manifest.json").read_bytes() == before
    assert cli(capsys, *quick(pristine, out))[0] == 0  # the same input: replaced quietly
    assert cli(capsys, *quick(other, out, "--force"))[0] == 0
    assert json.loads((out / "manifest.json").read_text())["ckpt_dir_resolved"] == str(other.resolve())


def test_a_moved_report_of_the_same_input_is_replaced(pristine, tmp_path, capsys, monkeypatch):
    """A report made with relative paths, moved (a cloned repository) together with its input,
    is still the report of that input: replaced without --force. An input elsewhere still
    needs it."""
    old = tmp_path / "old"
    shutil.copytree(pristine, old / "runs" / "demo")
    monkeypatch.chdir(old)
    assert cli(capsys, *quick(Path("runs/demo"), Path("reports/demo")))[0] == 0
    new = tmp_path / "clone"
    shutil.copytree(old, new)
    monkeypatch.chdir(new)
    other = tmp_path / "elsewhere"
    shutil.copytree(pristine, other)
    before = (new / "reports/demo/manifest.json").read_bytes()
    rc, _, err = cli(capsys, *quick(other, Path("reports/demo")))
    assert rc == 2 and "holds the report of another input" in err
    assert (new / "reports/demo/manifest.json").read_bytes() == before
    assert cli(capsys, *quick(Path("runs/demo"), Path("reports/demo")))[0] == 0
    manifest = json.loads((new / "reports/demo/manifest.json").read_text())
    assert manifest["ckpt_dir_resolved"] == str((new / "runs/demo").resolve())


def test_default_out_inside_the_input_is_refused(pristine, tmp_path, capsys, monkeypatch):
    ck = tmp_path / "ck"
    shutil.copytree(pristine, ck)
    monkeypatch.chdir(ck)
    rc, _, err = cli(capsys, ".", "--no-progress", "--no-figures")
    assert rc == 2 and "inside the input" in err
    assert not (ck / "reports").exists()


def test_help_names_the_console_script(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/wda-report", "--help"])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: wda-report")
    monkeypatch.setattr(sys, "argv", ["/x/wda/report.py", "--help"])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m wda.report")


def test_report_lists_each_run_its_settings_and_coverage(pristine, tmp_path, capsys):
    from peft import LoraConfig

    from builders import tiny_llama

    ck = tmp_path / "ck"
    shutil.copytree(pristine, ck)
    peft_checkpoints(tiny_llama(layers=2), ck / "konly", LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj"],
                                                                   lora_dropout=0.1), steps=(5,))
    out = tmp_path / "out"
    rc, stdout, err = cli(capsys, *quick(ck, out, "--modules", "q_proj"))
    assert rc == 0, err
    assert "from 4 run(s) (konly: none of the selected modules)" in stdout
    md = (out / "report.md").read_text()
    runs = md.split("### Runs")[1].split("\n\n")[1]
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in runs.splitlines()[2:]}
    assert list(lines) == ["ft", "konly", "lora", "dora"]  # the one run order: method, then name
    assert "none of the selected modules" in lines["konly"] and "| 0.1 |" in lines["konly"]
    assert "| 4 | 8 | no | `q_proj`, `v_proj` | 0.0 |" in lines["lora"]  # r, alpha, rsLoRA, targets, dropout
    assert "2 (`q_proj`)" in lines["lora"] and "| 0–1 |" not in lines["lora"]  # layers 0, 1
    assert "| 0, 1 |" in lines["lora"]
    manifest = json.loads((out / "manifest.json").read_text())
    konly = next(r for r in manifest["runs"] if r["name"] == "konly")
    assert konly["modules"] == 0 and konly["adapter"]["target_modules"] == ["k_proj"]


def test_reproduce_has_the_train_step_and_rooted_paths(pristine, tmp_path, capsys, monkeypatch):
    from wda.train.cli import TrainConfig

    top = tmp_path / "repo"
    (top / ".git").mkdir(parents=True)
    ck = top / "runs" / "demo"
    shutil.copytree(pristine, ck)
    cfg = asdict(TrainConfig(steps=120, seed=3, targets=("q_proj",)))
    (ck / "train_log.json").write_text(json.dumps({"config": cfg, "runs": {"ft": {}, "lora": {}, "dora": {}}}))
    (top / "sub").mkdir()
    monkeypatch.chdir(top / "sub")  # made from a sub-folder with relative paths
    rc, _, err = cli(capsys, "../runs/demo", "--out", "../reports/demo", "--no-progress", "--no-figures",
                     "--bootstrap", "0", "--permutations", "0")
    assert rc == 0, err
    md = (top / "reports" / "demo" / "report.md").read_text()
    block = md.split("## How to reproduce")[1].split("```bash\n")[1].split("```")[0].splitlines()
    assert block[0].startswith('cd "$(git rev-parse --show-toplevel)"')
    assert block[1] == "python -m wda.train --out runs/demo --seed 3 --steps 120 --targets q_proj"
    assert block[2].startswith("python -m wda.report runs/demo --out reports/demo")
    # lr and steps of each run from train_log.json
    runs = md.split("### Runs")[1]
    assert "| 0.0002 | 120 |" in runs and "| 0.001 | 120 |" in runs
    # outside a git checkout: absolute paths
    plain = tmp_path / "plain"
    shutil.copytree(pristine, plain / "ck")
    monkeypatch.chdir(plain)
    assert cli(capsys, "ck", "--out", "r", "--no-progress", "--no-figures", "--bootstrap", "0")[0] == 0
    manifest = json.loads((plain / "r" / "manifest.json").read_text())
    assert manifest["reproduce"] == [f"python -m wda.report {plain / 'ck'} --out {plain / 'r'} "
                                     "--no-progress --no-figures --bootstrap 0"]


def test_regex_errors_show_the_pattern_as_typed_and_a_working_form(pristine, capsys):
    rc, _, err = cli(capsys, str(pristine), "--dry-run", "--modules", r"layers\.0\.self_attn\.q_proj")
    assert rc == 2
    assert r"'layers\.0\.self_attn\.q_proj' matches no" in err and "\\\\" not in err
    assert r"'.*layers\.0\.self_attn\.q_proj' matches 1" in err
    rc, _, err = cli(capsys, str(pristine), "--dry-run", "--modules", "q_proj(")
    assert rc == 2 and "not a valid regular expression" in err and r"'q_proj\('" in err


# ---- the Python API ----------------------------------------------------------------------
def test_analyze_takes_modules_as_a_string_a_comma_list_or_a_list(pristine):
    one = wda.analyze(pristine, modules="q_proj", progress=False)
    assert set(one["matrix"]) == {"q_proj"}
    both = wda.analyze(pristine, modules="q_proj, v_proj", progress=False)
    pd.testing.assert_frame_equal(both, wda.analyze(pristine, modules=["q_proj", "v_proj"], progress=False))
    assert set(both["matrix"]) == {"q_proj", "v_proj"}


def test_python_errors_name_keywords_not_cli_flags(pristine):
    with pytest.raises(WdaError) as err:
        wda.analyze(pristine, modules="nope", progress=False)
    assert "modules='nope' matches no" in str(err.value) and "--" not in str(err.value)
    with pytest.raises(WdaError, match="no run named 'x'") as err:
        wda.plan(pristine, runs=["ft", "x"])
    assert "runs here: ft, lora, dora" in str(err.value)


def test_runs_and_steps_filter_and_the_full_result(pristine):
    p = wda.plan(pristine, runs="lora,ft", steps=[20])
    assert set(p["run"]) == {"ft", "lora"} and set(p["step"]) == {20}
    res = wda.analyze(pristine, runs=["dora"], steps=10, return_result=True, progress=False)
    assert set(res.metrics["run"]) == {"dora"} and set(res.metrics["step"]) == {10}
    assert [r.name for r in res.layout.runs] == ["dora"] and res.options.only_steps == (10,)
    with pytest.raises(WdaError, match="no checkpoint at step 7"):
        wda.analyze(pristine, steps=[7], progress=False)


def test_make_report_writes_the_cli_report_from_keywords(pristine, tmp_path, capsys):
    out = wda.make_report(pristine, tmp_path / "api", modules="q_proj", bootstrap=50, permutations=50,
                          figures=False, progress=False)
    assert cli(capsys, str(pristine), "--out", str(tmp_path / "cli"), "--modules", "q_proj",
               "--bootstrap", "50", "--permutations", "50", "--no-figures", "--no-progress")[0] == 0
    for name in ("metrics.csv", "fits.csv", "fits_per_step.csv"):
        assert (out / name).read_bytes() == (tmp_path / "cli" / name).read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == (f"python -m wda.report {pristine} --out {out} --no-figures "
                                   "--modules q_proj --bootstrap 50 --permutations 50")
    with pytest.raises(WdaError, match="bootstrap= must be"):
        wda.make_report(pristine, tmp_path / "bad", bootstrap=-1)


def test_runs_table_reads_lr_and_steps_from_a_trainer_state(pristine, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(pristine, ck)
    for step in (10, 20):
        (ck / "lora" / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({
            "global_step": step, "max_steps": 40,
            "log_history": [{"step": s, "learning_rate": lr, "loss": 1.0}
                            for s, lr in ((5, 2e-4), (10, 3e-4), (20, 1e-4))[: 2 if step == 10 else 3]]}))
    out = tmp_path / "out"
    rc, _, err = cli(capsys, *quick(ck, out))
    assert rc == 0, err
    lora = next(ln for ln in (out / "report.md").read_text().split("### Runs")[1].splitlines()
                if ln.startswith("| lora |"))
    assert lora.endswith("| 0.0003 (peak logged) | 40 |")
    ft = next(r for r in json.loads((out / "manifest.json").read_text())["runs"] if r["name"] == "ft")
    assert ft["training"] == {} and ft["adapter"] == {}
