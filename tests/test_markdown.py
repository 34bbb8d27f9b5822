"""wda.report.markdown: report.md text from tables and manifest."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from wda.report.fit import fit_groups, fit_per_step
from wda.report.markdown import PAPER_R, fmt_r, render_report, table

MANIFEST = {
    "ckpt_dir": "/data/my ckpts", "axis": "out", "dtype": "float32", "device": "cpu",
    "command": ["python", "-m", "wda.report", "/data/my ckpts", "--out", "reports/x"],
    "versions": {"torch": "2.13.0", "wda": "0.1.0"},
    "skipped": [{"path": "lora/checkpoint-7", "reason": "no weight files"}],
    "notes": ["base has 2 tied tensors"],
}
FIGURES = {"Figure 2 (q_proj)": "figure2_q_proj.png",
           "Figure 2 (q_proj), vector": "figure2_q_proj.pdf",
           "Trajectories": "figs/traj v_proj.png"}


def metrics(seed=0, layers=3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    runs = [("ft", "FT"), ("lora", "LoRA"), ("dora", "DoRA"), ("exp|7", "custom")]
    rows = [dict(run=r, method=m, step=s, layer=l, matrix=k,
                 module=f"model.layers.{l}.attn.{k}",
                 delta_d=rng.uniform(1e-6, 1e-4), delta_m=rng.uniform(1e-3, 1e-2),
                 n_vectors=64, n_excluded=0, m0_mean=1.0, axis="out")
            for r, m in runs for s in (100, 200) for l in range(layers) for k in ("q_proj", "v_proj")]
    df = pd.DataFrame(rows)
    # one run with a single point per matrix: its fits are undefined (n < 3)
    tiny = df[(df["run"] == "ft") & (df["step"] == 100) & (df["layer"] == 0)]
    return pd.concat([df, tiny.assign(run="tiny", method="LoRA")], ignore_index=True)


def render(df: pd.DataFrame, manifest=MANIFEST, figures=FIGURES) -> str:
    return render_report(df, fit_groups(df, n_boot=100), fit_per_step(df, n_boot=0),
                         manifest, figures)


@pytest.fixture(scope="module")
def report() -> str:
    return render(metrics())


def test_every_run_method_and_matrix_appears(report):
    for run in ("ft", "lora", "dora", "tiny", r"exp\|7"):  # "|" escaped inside tables
        assert f"| {run} |" in report
    for kind in ("q_proj", "v_proj"):
        assert f"`{kind}`" in report


def test_paper_reference_values_with_citation_and_sign_column(report):
    # Sec. 4.1: "FT and DoRA exhibit negative correlation values of -0.62 and -0.31 ...
    # LoRA shows a positive correlation with a value of 0.83"
    assert PAPER_R == {"FT": -0.62, "LoRA": 0.83, "DoRA": -0.31}
    for method, r in PAPER_R.items():
        assert f"{method} {r:+.2f}" in report
    assert "Sec. 4.1" in report and "Fig. 2" in report
    assert "sign agrees" in report
    # the comparison covers the query kind only: value matrices have no paper number
    section = report.split("## Comparison with the paper")[1].split("\n## ")[0]
    assert "q_proj" in section and "v_proj" not in section


def test_sign_agreement_follows_our_r():
    df = metrics()
    fits = fit_groups(df, n_boot=0)
    fits.loc[fits["run"] == "ft", "pearson_r"] = -0.5   # FT paper: negative -> agrees
    fits.loc[fits["run"] == "lora", "pearson_r"] = -0.5  # LoRA paper: positive -> disagrees
    md = render_report(df, fits, None, MANIFEST, {})
    section = md.split("## Comparison with the paper")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines()
            if line.startswith("| ") and " q_proj " in line}
    assert rows["ft"].rstrip(" |").endswith("yes")
    assert rows["lora"].rstrip(" |").endswith("no")
    assert rows["tiny"].rstrip(" |").endswith("undefined")


def test_figures_are_linked_by_relative_path(report):
    assert "![Figure 2 (q_proj)](figure2_q_proj.png)" in report
    assert "(figure2_q_proj.pdf)" in report
    assert "![Trajectories](figs/traj%20v_proj.png)" in report  # a space must not break the link


def test_command_versions_and_inputs(report):
    assert "python -m wda.report '/data/my ckpts' --out reports/x" in report
    assert "| torch | 2.13.0 |" in report
    assert "/data/my ckpts" in report and "float32" in report and "dim=1" in report
    assert "lora/checkpoint-7" in report and "no weight files" in report
    assert "base has 2 tied tensors" in report


def test_undefined_fits_are_spelled_out_never_nan(report):
    assert "undefined (n < 3)" in report
    assert not re.search(r"\bnan\b", report, flags=re.IGNORECASE)


def test_excluded_vectors_are_listed_per_module():
    df = metrics()
    hit = (df["run"] == "dora") & (df["layer"] == 2) & (df["matrix"] == "v_proj")
    df.loc[hit, "n_excluded"] = 3
    md = render(df)
    assert "| dora | `model.layers.2.attn.v_proj` | 2 | 3 | 64 |" in md
    assert "No zero-norm vectors were excluded" in render(metrics())


def test_minimal_manifest_and_no_figures_still_render():
    md = render(metrics(), manifest={}, figures={})
    assert "not recorded" in md and "No figures." in md
    assert "command not recorded" in md


def test_per_step_table_has_every_step_and_run(report):
    # 3 layers: below the minimum, so no per-step r at all, and the report says why
    few = report.split("## Cross-layer correlation at each step")[1].split("\n## ")[0]
    assert "No step has 5 or more layers" in few and "2/n!" in few
    section = render(metrics(layers=5)).split("## Cross-layer correlation at each step")[1]
    section = section.split("\n## ")[0]
    for step in (100, 200):
        assert f"| {step} |" in section
    assert "ft · q_proj (n = 5)" in section and "tiny · v_proj (n = 1)" in section
    assert "not reported (n = 1 < 5)" in section


def test_helpers():
    assert fmt_r(0.834) == "+0.83" and fmt_r(-0.6251) == "-0.63"
    assert fmt_r(float("nan"), "ΔD constant") == "undefined (ΔD constant)"
    lines = table(["a", "b"], [(1, "x|y")], [True, False]).splitlines()
    assert lines == ["| a | b |", "|---:|---|", "| 1 | x\\|y |"]
