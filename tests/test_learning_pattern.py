"""The ΔD–ΔM sign pattern on our own embedded runs (DoRA paper Sec. 3.2, 4.1, Fig. 2).

The paper: over the (layer, step) points of the query matrices, Pearson r(ΔD, ΔM) is
negative for FT (-0.62) and DoRA (-0.31) and positive for LoRA (+0.83). What our embedded
runs show instead, and the evidence (seeds, ablations, CPU times), is in
notebooks/LEARNING_PATTERN.md and notebooks/learning_pattern.ipynb; the numbers behind it are
in notebooks/data/. This test trains the default setup once (seed 0, the default
checkpoints) and asserts what held in (at least 4 of) 5 seeds of the sweep; the parts of the paper's
pattern that did not hold are strict expected failures, so the test reports the day they
start to hold (an XPASS fails the run).

The controlled task of ``wda.train.controlled`` (a planted teacher: magnitude-only changes in half
the layers' q, direction-only in the others) is the paper's capability claim under test: there
the paper's three signs held in 10 of 10 seeds, and the test asserts them for two.

Runtime: the default ``python -m wda.train`` run (pretraining, then 3 × 300 fine-tuning
steps) plus one more DoRA run, on the two cores, and two controlled runs on the same base
(3 × 300 cheap regression steps each); see LEARNING_PATTERN.md for the measured time.
The base is cached under $WDA_CACHE_DIR when that is set.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from wda.report.fit import fit_groups
from wda.train.sweep import LATE, covariance_split, measure, select_steps, train_many
from wda.train.cli import TrainConfig, train_all

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "learning_pattern.ipynb"


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory) -> str:
    """A base cache holding the default pretrained base (trained once for every run here)."""
    cache = os.environ.get("WDA_CACHE_DIR") or str(tmp_path_factory.mktemp("cache"))
    train_all(TrainConfig(seed=0, threads=1, cache_dir=cache, methods=()),
              tmp_path_factory.mktemp("base-only"))
    return cache


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, base_cache):
    """The README's default run (seed 0) measured on both axes, and a DoRA run with a 10x
    magnitude lr (the mechanism check), as ``(cfg, default metrics, mag10 metrics)``.

    Same runs as ``python -m wda.train`` with defaults, but after the (cached) pretraining the
    fine-tuning runs share the two cores (FT then DoRA-x10 | LoRA+DoRA), one torch thread
    each: a method's result depends only on the base, the seed and its options.
    """
    tmp = tmp_path_factory.mktemp("learning_pattern")
    cfg = TrainConfig(seed=0, threads=1, cache_dir=base_cache)
    dirs = train_many({"ft": dataclasses.replace(cfg, methods=("ft",)),
                       "adapters": dataclasses.replace(cfg, methods=("lora", "dora")),
                       # the mechanism check: DoRA with a 10x faster magnitude vector
                       "dora-mag10": dataclasses.replace(cfg, methods=("dora",),
                                                         dora_magnitude_lr_mult=10.0)},
                      tmp, workers=2)
    default = pd.concat([measure(dirs[k], cache=False) for k in ("ft", "adapters")], ignore_index=True)
    return cfg, default, measure(dirs["dora-mag10"], cache=False)


def pooled_r(metrics, matrix: str = "q_proj", axis: str = "out") -> dict[str, float]:
    """Pooled Pearson r over the (layer, step) points, per method (via wda.report.fit)."""
    sub = metrics[(metrics["matrix"] == matrix) & (metrics["axis"] == axis)]
    fits = fit_groups(sub, by=("method",), n_boot=0)
    assert fits["note"].eq("").all(), fits[["method", "note"]]
    return dict(zip(fits["method"], fits["pearson_r"]))


@pytest.fixture(scope="module")
def q_out(default_run):
    cfg, metrics, _ = default_run
    # The default checkpoints are the late ones (62.5/75/87.5/100 %): check, do not assume.
    assert sorted(metrics["step"].unique()) == select_steps(metrics, LATE, cfg.steps)["step"].unique().tolist()
    return pooled_r(metrics)


# ---- the helpers (fast) ----------------------------------------------------------------------
def test_covariance_split_is_exact_and_separates_trend_from_layers():
    rng = np.random.default_rng(0)
    step = np.repeat([1, 2, 3, 4], 8)
    layer_x = rng.normal(size=8)
    x = step + 0.3 * np.tile(layer_x, 4)            # both grow with the step ...
    y = step - 0.3 * np.tile(layer_x, 4) + 0.01 * rng.normal(size=32)  # ... opposite across layers
    s = covariance_split(x, y, step)
    assert s["r_pooled"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert s["r_between"] > 0.99 and s["r_within"] < -0.99
    assert s["between_share"] + abs(s["within_share"]) == pytest.approx(1.0)
    # late-style checkpoints (steps close together): the pooled r is the within-step r
    close = covariance_split(1 + 0.01 * step + 0.3 * np.tile(layer_x, 4), y - step + 0.01 * step, step)
    assert close["r_pooled"] == pytest.approx(close["r_within"], abs=0.05)


def test_select_steps_uses_train_rounding_and_refuses_missing_checkpoints():
    m = pd.DataFrame({"step": [188, 225, 263, 300], "delta_d": 1.0, "delta_m": 1.0})
    assert select_steps(m, LATE, 300)["step"].tolist() == [188, 225, 263, 300]
    with pytest.raises(ValueError, match="not saved"):
        select_steps(m, (0.25, 0.5, 0.75, 1.0), 300)


# ---- what held across the seeds of the sweep (notebooks/data/learning_pattern_r.csv) -------
@pytest.mark.slow
def test_lora_query_correlation_is_positive(q_out):
    """Paper: LoRA +0.83. Default setup: positive in 4 of 5 seeds (+0.57, +0.19, +0.61,
    +0.60, -0.01 for seeds 0-4; with 4 layers it was negative in 3 of 3: LEARNING_PATTERN.md)."""
    assert q_out["LoRA"] > 0, q_out


@pytest.mark.slow
def test_value_matrices_are_positive_for_the_adapters(default_run):
    """LoRA and DoRA r on v were positive in every run of the sweep (default setup, 5 seeds:
    LoRA +0.78…+0.96, DoRA +0.27…+0.81)."""
    _, metrics, _ = default_run
    v = pooled_r(metrics, matrix="v_proj")
    assert v["LoRA"] > 0.5 and v["DoRA"] > 0, v


@pytest.mark.slow
@pytest.mark.parametrize("method", ["FT", "LoRA", "DoRA"])
def test_time_trend_is_positive_and_late_checkpoints_suppress_it(default_run, method):
    """The between-step part of the pooled r is the shared time trend (+1: ΔD and ΔM grow
    together in every layer); on the late checkpoints of a linearly decaying lr the steps are
    close together, so the pooled r is the cross-layer (within-step) r to within 0.07 in
    all 5 seeds of the default setup (evenly spaced checkpoints: up to 0.8 apart)."""
    _, metrics, _ = default_run
    sub = metrics[(metrics["matrix"] == "q_proj") & (metrics["axis"] == "out")
                  & (metrics["method"] == method)]
    split = covariance_split(sub["delta_d"].to_numpy(), sub["delta_m"].to_numpy(),
                             sub["step"].to_numpy())
    assert split["r_between"] > 0.9, split
    assert abs(split["r_pooled"] - split["r_within"]) < 0.1, split


@pytest.mark.slow
def test_fast_dora_magnitude_turns_the_input_axis_negative(default_run):
    """The one knob that moved DoRA to the paper's sign: with its magnitude vector trained 10x
    faster, DoRA's r on q is negative on the input axis in 5 of 5 seeds (-0.24 … -0.64; with
    the default multiplier 1: +0.63 … +0.86). On the out axis it stays near zero."""
    _, metrics, mag10 = default_run
    fast = pooled_r(mag10, axis="in")["DoRA"]
    slow = pooled_r(metrics, axis="in")["DoRA"]
    assert fast < 0 < slow, (fast, slow)


# ---- the paper's signs that did not hold at this scale: strict expected failures -----------
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="paper: FT r < 0 on q; ours: positive in 5 of 5 seeds "
                   "(+0.28 … +0.51) and 16 of 17 FT runs tried (notebooks/LEARNING_PATTERN.md)")
def test_paper_ft_query_correlation_is_negative(q_out):
    assert q_out["FT"] < 0, q_out


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="paper: DoRA r < 0 on q; default setup: negative in 1 of "
                   "5 seeds only, positive (+0.37) in seed 0 (notebooks/LEARNING_PATTERN.md)")
def test_paper_dora_query_correlation_is_negative(q_out):
    assert q_out["DoRA"] < 0, q_out


# ---- the controlled test of the paper's capability claim (wda.train.controlled) ---------------------
# Seeds the test uses; seeds 2-9 of the same setup are reported in LEARNING_PATTERN.md only.
CONTROLLED_TEST_SEEDS = (0, 1)


@pytest.fixture(scope="module")
def controlled(tmp_path_factory, base_cache):
    """``python -m wda.train.controlled`` with its defaults (the default base, planted teacher,
    300 distillation steps per method) for the test seeds, two at once on the two cores."""
    from wda.train.controlled import ControlledConfig, run_many, seed_table

    tmp = tmp_path_factory.mktemp("controlled")
    cfgs = [ControlledConfig(out=str(tmp / f"seed{s}"), seed=s, cache_dir=base_cache)
            for s in CONTROLLED_TEST_SEEDS]
    return seed_table(run_many(cfgs, workers=2))


@pytest.mark.slow
@pytest.mark.parametrize("seed", CONTROLLED_TEST_SEEDS)
def test_controlled_task_gives_the_papers_signs(controlled, seed):
    """Paper: FT -0.62, LoRA +0.83, DoRA -0.31. On the planted task (magnitude-only changes in
    half the layers, direction-only in the others) the signs are the paper's in 10 of 10 seeds
    (notebooks/data/controlled_seeds.csv: FT -0.93 … -0.98, LoRA +0.89 … +1.00, DoRA -0.69 …
    -0.92); the thresholds leave a margin of about 0.3 to the weakest of the 10 seeds.
    This is a controlled test of the paper's capability claim, not its natural experiment."""
    r = controlled[controlled["seed"] == seed].set_index("method")["pearson_r"]
    assert r["FT"] < -0.6 and r["DoRA"] < -0.4 and r["LoRA"] > 0.6, r.to_dict()


@pytest.mark.slow
@pytest.mark.parametrize("seed", CONTROLLED_TEST_SEEDS)
def test_controlled_task_is_learned_as_planted(controlled, seed):
    """The design does what it should: every method makes the planted rotation (a rank-4
    update, within reach of rank 8) almost exactly; in the magnitude layers FT and DoRA get
    well below the distance no rank-8 update can beat (the rescaling has full rank), and LoRA
    stays at or above it (Eckart-Young: a check of the measurement, not of the training)."""
    t = controlled[controlled["seed"] == seed].set_index("method")
    assert (t["rel_error_dir"] < 0.05).all(), t["rel_error_dir"].to_dict()
    assert (t["cosine_dir"] > 0.99).all(), t["cosine_dir"].to_dict()
    floor = t["lowrank_floor_mag"].iloc[0]
    assert t.loc["FT", "rel_error_mag"] < 0.7 * floor and t.loc["DoRA", "rel_error_mag"] < 0.7 * floor, t.to_dict()
    assert t.loc["LoRA", "rel_error_mag"] >= floor * (1 - 1e-6), t.to_dict()


# ---- the write-up executes ---------------------------------------------------------------------
@pytest.mark.slow
def test_learning_pattern_notebook_executes(tmp_path, monkeypatch):
    """notebooks/learning_pattern.ipynb runs top to bottom under WDA_NOTEBOOK_SMALL=1
    (a tiny live sweep, then the committed results) and shows its seed table and figure."""
    from nbclient import NotebookClient

    monkeypatch.setenv("WDA_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel must import this checkout's wda, whatever another install points at.
    root = str(NOTEBOOK.parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "Figure 2 is missing"
    text = "".join(o.get("text", "") for o in outputs)
    assert "sign agreement with the paper over seeds" in text
