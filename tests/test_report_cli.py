"""The CLI as a whole: the report is swapped in only when complete (a failed or interrupted
run leaves an earlier one intact and no temp folders), same inputs give byte-identical
CSVs, --skip-broken lists what it skipped, zero-norm vectors and undefined fits are
reported as such, --dry-run and --help."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import wda.report.fit
import wda.report.markdown
import wda.report.plot
from wda.errors import WdaError
from wda.report.cli import main
from builders import plain_reference

Q0 = "model.layers.0.self_attn.q_proj"
PEFT = "base_model.model."
CSVS = ("metrics.csv", "fits.csv", "fits_per_step.csv", "drivers.csv", "drivers_per_step.csv")


def cli(capsys, ckpt_dir: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    rc = main([str(ckpt_dir), "--out", str(out), "--no-progress", "--no-figures", "--bootstrap", "100",
               *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def edit_tensors(path: Path, fn) -> None:
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


def dead_pid() -> int:
    """The id of a process that has exited (a run killed before its own cleanup)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- never lose a result -------------------------------------------------------------------
def test_success_writes_the_contract_files_and_nothing_else(ck, capsys):
    out = ck.parent / "reports" / "r1"  # parent folder created on demand
    rc, stdout, err = cli(capsys, ck, out)
    assert rc == 0, err
    assert set(snapshot(out)) == {*CSVS, "report.md", "manifest.json"}
    assert leftovers(out) == []
    assert str(out) in stdout and "Traceback" not in err
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == 3 * 2 * 4  # 3 runs x 2 steps x 4 modules (q, v of 2 layers)


@pytest.mark.parametrize("where, exc, status", [
    ("wda.report.fit.fit_groups", RuntimeError("boom in the fit"), 1),
    ("wda.report.markdown.render_report", KeyboardInterrupt(), 130),
    ("wda.report.markdown.render_report", WdaError("somewhere", "a late problem"), 2),
    ("wda.report.plot.figure2", MemoryError(), 1),
])
def test_failed_or_interrupted_rendering_keeps_the_earlier_report(ck, capsys, monkeypatch, where, exc,
                                                                   status):
    out = ck.parent / "out"
    assert cli(capsys, ck, out)[0] == 0
    before = snapshot(out)
    (ck / "ft" / "checkpoint-10").rename(ck / "ft" / "checkpoint-5")  # the new run would differ

    def fail(*a, **kw):
        raise exc

    module, name = where.rsplit(".", 1)
    monkeypatch.setattr(sys.modules[module], name, fail)
    figures = [] if module == "wda.report.plot" else ["--no-figures"]
    rc = main([str(ck), "--out", str(out), "--no-progress", "--bootstrap", "10", *figures])
    err = capsys.readouterr().err
    assert rc == status, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(out) == before
    assert leftovers(out) == []


def test_bad_input_keeps_the_earlier_report(ck, capsys):
    out = ck.parent / "out"
    assert cli(capsys, ck, out)[0] == 0
    before = snapshot(out)
    p = ck / "lora" / "checkpoint-20" / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-50])
    rc, _, err = cli(capsys, ck, out)
    assert rc == 2 and str(p) in err
    assert snapshot(out) == before and leftovers(out) == []


def test_a_failed_swap_puts_the_earlier_report_back(ck, capsys, monkeypatch):
    """The swap is two renames (out -> old, tmp -> out); if the second fails the first is undone."""
    out = ck.parent / "out"
    assert cli(capsys, ck, out)[0] == 0
    before = snapshot(out)
    real = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(f".{out.name}.tmp-"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    rc, _, err = cli(capsys, ck, out)
    assert rc == 2 and "Traceback" not in err
    assert str(out) in err and "No space left on device" in err
    assert snapshot(out) == before and leftovers(out) == []


def test_folders_of_a_killed_run_are_cleaned_up(ck, capsys):
    out = ck.parent / "out"
    pid = dead_pid()
    (ck.parent / f".out.tmp-{pid}").mkdir()
    (ck.parent / f".out.tmp-{pid}" / "metrics.csv").write_text("half written")
    rc, _, err = cli(capsys, ck, out)
    assert rc == 0, err
    assert leftovers(out) == []


def test_a_report_caught_between_the_renames_of_a_killed_run_is_restored(ck, capsys):
    """Killed after out -> .out.old-PID and before tmp -> out: the next run puts it back,
    even when that run itself then fails on bad input."""
    out = ck.parent / "out"
    assert cli(capsys, ck, out)[0] == 0
    before = snapshot(out)
    os.replace(out, ck.parent / f".out.old-{dead_pid()}")
    shutil.rmtree(ck / "base")
    rc, _, err = cli(capsys, ck, out)
    assert rc == 2 and "no base weights" in err
    assert snapshot(out) == before and leftovers(out) == []


def test_refuses_to_replace_a_folder_that_is_not_a_report(ck, capsys):
    precious = ck.parent / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("weeks of work")
    rc, _, err = cli(capsys, ck, precious)
    assert rc == 2 and str(precious) in err and "not a wda report" in err
    assert (precious / "chapter1.tex").read_text() == "weeks of work"
    assert len(err.strip().splitlines()) == 1


def test_refuses_to_replace_the_input(ck, capsys):
    before = snapshot(ck)
    for out in (ck, ck.parent):  # the checkpoint folder itself, or a folder holding it
        rc, _, err = cli(capsys, ck, out)
        assert rc == 2 and "holds the input" in err and str(out) in err
    assert snapshot(ck) == before


def test_refuses_a_file_as_out(ck, capsys):
    f = ck.parent / "notes.txt"
    f.write_text("keep me")
    rc, _, err = cli(capsys, ck, f)
    assert rc == 2 and str(f) in err and "not a folder" in err
    assert f.read_text() == "keep me"


# ---- same inputs, same bytes ---------------------------------------------------------------
def test_same_inputs_give_byte_identical_csvs(ck, capsys, tmp_path):
    """Twice into two folders, once more replacing the first, and from a copy of the inputs
    elsewhere: the CSVs (with the seeded bootstrap) are the same bytes."""
    copy = tmp_path / "elsewhere" / "same"
    shutil.copytree(ck, copy)
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "a", tmp_path / "c"]
    got = []
    for out, src in zip(outs, (ck, ck, ck, copy)):
        assert cli(capsys, src, out)[0] == 0
        got.append({name: (out / name).read_bytes() for name in CSVS})
    assert all(g == got[0] for g in got[1:])
    fits = pd.read_csv(tmp_path / "a" / "fits.csv")
    assert fits["r_ci_low"].notna().any()  # the bootstrap did run: its determinism was tested


# ---- --skip-broken -------------------------------------------------------------------------
def test_skip_broken_analyses_the_rest_and_lists_what_was_skipped(ck, capsys):
    """Broken at each stage: discovery (truncated file, bad step name), header validation
    (missing lora_B) and streaming (NaN). Each is listed with its file in manifest.json,
    report.md and on stderr; the rest is analysed."""
    truncated = ck / "ft" / "checkpoint-20" / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    shutil.copytree(ck / "ft" / "checkpoint-10", ck / "ft" / "checkpoint-final")
    no_b = ck / "lora" / "checkpoint-20" / "adapter_model.safetensors"
    edit_tensors(no_b, lambda sd: sd.pop(f"{PEFT}{Q0}.lora_B.weight"))
    nan = ck / "dora" / "checkpoint-20" / "adapter_model.safetensors"

    def poison(sd):
        sd[f"{PEFT}{Q0}.lora_magnitude_vector"][0] = float("nan")
    edit_tensors(nan, poison)
    broken = {truncated.parent: truncated, ck / "ft" / "checkpoint-final": ck / "ft" / "checkpoint-final",
              no_b.parent: no_b, nan.parent: nan.parent}

    out = ck.parent / "out"
    rc, _, err = cli(capsys, ck, out, "--skip-broken")
    assert rc == 0, err
    assert "Traceback" not in err
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {Path(s["path"]): s["reason"] for s in manifest["skipped"]}
    assert set(listed) == set(broken)
    for folder, named in broken.items():
        assert str(named) in listed[folder]
    report = (out / "report.md").read_text()
    assert "Skipped checkpoints" in report
    for folder in broken:
        assert str(folder) in report
    skipped_lines = [ln for ln in err.splitlines() if ln.startswith("wda: skipped")]
    assert len(skipped_lines) == len(broken)
    m = pd.read_csv(out / "metrics.csv")
    assert set(zip(m.run, m.step)) == {("ft", 10), ("lora", 10), ("dora", 10)}  # all the rest
    assert len(m) == 3 * 4 and np.isfinite(m[["delta_m", "delta_d"]].to_numpy()).all()
    assert [r["steps"] for r in manifest["runs"]] == [[10], [10], [10]]


def test_dry_run_lists_the_plan_and_what_would_be_skipped(ck, capsys):
    out = ck.parent / "out"
    p = ck / "lora" / "checkpoint-20" / "adapter_config.json"
    p.write_text("{")
    assert cli(capsys, ck, out, "--dry-run")[0] == 2
    rc, stdout, err = cli(capsys, ck, out, "--dry-run", "--skip-broken")
    assert rc == 0, err
    assert "ft" in stdout and "steps 10, 20" in stdout and "steps 10\n" in stdout
    assert "model.layers.1.self_attn.v_proj  (out=12, in=48)" in stdout
    assert "skipped" in stdout and str(p) in stdout
    assert not out.exists()


def test_help_documents_the_flags_and_exit_statuses(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--skip-broken", "--dry-run", "--debug", "--modules", "--axis", "--out"):
        assert flag in text
    assert "0 done, 2 bad input, 1 internal error, 130 interrupted" in text


# ---- a read error in the prefetch thread -----------------------------------------------------
@pytest.fixture
def flaky(ck, monkeypatch):
    """Reads from lora/checkpoint-10's file fail like an I/O error on a flaky disk, after a
    clean open (headers are fine)."""
    real_open, real_preadv, threads, bad_fds = os.open, os.preadv, [], set()
    bad = ck / "lora" / "checkpoint-10" / "adapter_model.safetensors"

    def open_(path, *a, **kw):
        fd = real_open(path, *a, **kw)
        (bad_fds.add if Path(path) == bad else bad_fds.discard)(fd)
        return fd

    def preadv(fd, buffers, offset, *a):
        if fd in bad_fds:
            threads.append(threading.current_thread().name)
            raise OSError(5, "Input/output error")
        return real_preadv(fd, buffers, offset, *a)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "preadv", preadv)
    return bad, threads


def test_read_error_in_the_prefetch_thread_names_the_file(ck, capsys, flaky):
    bad, threads = flaky
    out = ck.parent / "out"
    rc, _, err = cli(capsys, ck, out)
    assert threads and set(threads) == {"wda-reader"}  # it surfaced in the reader thread
    assert rc == 2 and "Traceback" not in err
    line, = err.strip().splitlines()
    assert str(bad) in line and "cannot read tensor" in line and "Input/output error" in line
    assert not out.exists() and leftovers(out) == []


def test_read_error_in_the_prefetch_thread_is_skipped_and_listed(ck, capsys, flaky):
    bad, _ = flaky
    out = ck.parent / "out"
    rc, _, err = cli(capsys, ck, out, "--skip-broken")
    assert rc == 0, err
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert [Path(s["path"]) for s in skipped] == [bad.parent] and str(bad) in skipped[0]["reason"]
    m = pd.read_csv(out / "metrics.csv")
    assert sorted(m[m.run == "lora"].step.unique()) == [20]


# ---- numerics that could mislead -----------------------------------------------------------
def test_zero_norm_vectors_are_excluded_counted_and_reported_per_module(ck, capsys):
    """4 zero rows in the base q_proj of layer 0 (like Llama o_proj rows), 2 more pruned to
    zero in ft step 20: excluded from both means, counted per row, listed per module."""
    def zero_base(sd):
        sd[Q0 + ".weight"][:4] = 0

    def zero_ft(sd):
        sd[Q0 + ".weight"][10:12] = 0
    edit_tensors(ck / "base" / "model.safetensors", zero_base)
    edit_tensors(ck / "ft" / "checkpoint-20" / "model.safetensors", zero_ft)
    out = ck.parent / "out"
    rc, _, err = cli(capsys, ck, out)
    assert rc == 0, err
    m = pd.read_csv(out / "metrics.csv")
    w0 = load_file(ck / "base" / "model.safetensors")[Q0 + ".weight"]
    for step in (10, 20):
        wt = load_file(ck / "ft" / f"checkpoint-{step}" / "model.safetensors")[Q0 + ".weight"]
        dm, dd, excluded = plain_reference(w0, wt)
        row = m[(m.run == "ft") & (m.step == step) & (m.module == Q0)].iloc[0]
        assert row.n_excluded == excluded == (4 if step == 10 else 6)
        assert row.delta_m == pytest.approx(dm, rel=1e-4) and row.delta_d == pytest.approx(dd, rel=1e-4)
    assert (m[m.module == Q0].n_excluded >= 4).all() and (m[m.module != Q0].n_excluded == 0).all()
    assert np.isfinite(m[["delta_m", "delta_d"]].to_numpy()).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["excluded_zero_norm_vectors"] == {Q0: 6}
    report = (out / "report.md").read_text()
    assert "zero-norm" in report.lower() and Q0 in report


def _only_ft(d: Path, steps: dict[int, dict]) -> None:
    shutil.rmtree(d / "lora"), shutil.rmtree(d / "dora"), shutil.rmtree(d / "ft")
    for step, sd in steps.items():
        (d / "ft" / f"checkpoint-{step}").mkdir(parents=True)
        save_file(sd, d / "ft" / f"checkpoint-{step}" / "model.safetensors", metadata={"format": "pt"})


def test_fit_of_fewer_than_three_points_is_undefined_not_zero(ck, capsys):
    base = load_file(ck / "base" / "model.safetensors")
    moved = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
             for k, v in base.items()}
    _only_ft(ck, {10: moved})
    out = ck.parent / "out"
    rc, _, err = cli(capsys, ck, out, "--modules", r"model\.layers\.[01]\.self_attn\.q_proj")
    assert rc == 0, err
    fits = pd.read_csv(out / "fits.csv")
    row, = fits.itertuples()
    assert row.n == 2
    assert np.isnan(row.pearson_r) and np.isnan(row.slope) and np.isnan(row.spearman_rho)
    assert "n < 3" in row.note


def test_fit_with_zero_variance_is_undefined_not_zero(ck, capsys):
    """Checkpoints equal to the base: every ΔD and ΔM is 0 (not NaN), and r is undefined."""
    base = load_file(ck / "base" / "model.safetensors")
    _only_ft(ck, {1: base, 2: base, 3: base})
    out = ck.parent / "out"
    rc, _, err = cli(capsys, ck, out)
    assert rc == 0, err
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == 12 and (m.delta_m == 0).all() and (m.delta_d == 0).all()
    fits = pd.read_csv(out / "fits.csv")
    assert len(fits) == 2 and fits.pearson_r.isna().all() and fits.slope.isna().all()
    assert (fits.note == "unchanged from base").all()


@pytest.mark.parametrize("stage", ["discovery", "streaming"])
def test_skip_broken_with_nothing_left_is_an_error_not_an_empty_report(ck, capsys, stage):
    for p in ck.glob("*/checkpoint-*/*.safetensors"):
        if stage == "discovery":  # caught from the header
            p.write_bytes(p.read_bytes()[:100])
        else:  # caught only while measuring
            def poison(sd):
                next(v for k, v in sorted(sd.items()) if Q0 in k and v.dim() == 2).view(-1)[0] = float("nan")
            edit_tensors(p, poison)
    out = ck.parent / "out"
    rc, _, err = cli(capsys, ck, out, "--skip-broken")
    assert rc == 2 and str(ck) in err and "no valid checkpoint left" in err
    assert not out.exists()


def test_skip_broken_sets_both_duplicates_aside(ck, capsys):
    """checkpoint-10 and checkpoint-010 are both step 10: neither is guessed, both are listed."""
    shutil.copytree(ck / "ft" / "checkpoint-10", ck / "ft" / "checkpoint-010")
    out = ck.parent / "out"
    rc, _, err = cli(capsys, ck, out, "--skip-broken")
    assert rc == 0, err
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert {Path(s["path"]).name for s in skipped} == {"checkpoint-10", "checkpoint-010"}
    assert all("duplicate step 10" in s["reason"] for s in skipped)
    m = pd.read_csv(out / "metrics.csv")
    assert sorted(m[m.run == "ft"].step.unique()) == [20]


@pytest.mark.parametrize("tensor", ["lora_A.weight", "lora_B.weight"])
def test_a_skipped_adapter_does_not_change_its_neighbours(ck, capsys, tensor):
    """Adapters of one matrix may be measured together: an Inf in one checkpoint's factors
    must skip that checkpoint only and leave the other rows exactly as in a clean run."""
    clean = ck.parent / "clean"
    assert cli(capsys, ck, clean)[0] == 0
    p = ck / "lora" / "checkpoint-20" / "adapter_model.safetensors"

    def poison(sd):
        sd[f"{PEFT}{Q0}.{tensor}"].view(-1)[0] = float("inf")
    edit_tensors(p, poison)
    out = ck.parent / "out"
    rc, _, err = cli(capsys, ck, out, "--skip-broken")
    assert rc == 0, err
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert [Path(s["path"]) for s in skipped] == [p.parent]
    want = pd.read_csv(clean / "metrics.csv")
    want = want[~((want.run == "lora") & (want.step == 20))].reset_index(drop=True)
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv"), want)
