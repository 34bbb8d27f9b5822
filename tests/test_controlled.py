"""wda.train.controlled: the planted changes are what they claim (closed forms, float64), the
distillation objective, and a tiny end-to-end run that ``wda.analyze`` reads.

The sign test itself (FT/DoRA < 0, LoRA > 0 over seeds) is in tests/test_learning_pattern.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from hypothesis import given, settings
from hypothesis import strategies as st

from wda.train import controlled as C
from wda.analysis.decompose import measure, vector_changes
from wda.train.model import ModelConfig, Transformer


def random_weight(seed: int, out: int = 12, inp: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g, dtype=torch.float64)


@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
@settings(max_examples=30, deadline=None)
def test_rescaling_changes_magnitude_only(seed, spread):
    w0 = random_weight(seed)
    g = torch.Generator().manual_seed(seed + 1)
    c = torch.exp(spread * torch.randn(w0.shape[0], generator=g, dtype=torch.float64))
    wt = C.rescale_rows(w0, c)
    ch = vector_changes(w0, wt, dtype=torch.float64)
    assert torch.allclose(ch.dm, (c - 1) * w0.norm(dim=1), rtol=1e-12, atol=1e-14)
    assert ch.dd.abs().max().item() < 1e-14
    planted = C.planted_changes(w0, "magnitude", factors=c)
    assert measure(w0, wt, dtype=torch.float64).delta_m == pytest.approx(planted["delta_m"], rel=1e-12)


@given(st.integers(0, 2**31 - 1), st.floats(0.0, 3.0), st.integers(1, 2))
@settings(max_examples=30, deadline=None)
def test_rotation_changes_direction_only_by_the_closed_form(seed, angle, planes):
    w0 = random_weight(seed)
    basis = C.top_input_basis(w0, planes)
    r = C.plane_rotation(basis, angle)
    assert torch.allclose(r @ r.T, torch.eye(r.shape[0], dtype=r.dtype), atol=1e-13)
    # R - I has exactly 2k singular values 2 sin(angle / 2) (a rank-2k update), the rest 0
    sv = torch.linalg.svdvals(r - torch.eye(r.shape[0], dtype=r.dtype))
    assert torch.allclose(sv[:2 * planes], torch.full((2 * planes,), 2 * math.sin(angle / 2),
                                                       dtype=sv.dtype), atol=1e-13)
    assert sv[2 * planes:].max().item() < 1e-13
    wt = C.rotate_inputs(w0, basis, angle)
    ch = vector_changes(w0, wt, dtype=torch.float64)
    assert ch.dm.abs().max().item() < 1e-12 * w0.norm(dim=1).max().item()
    # per row: 1 - cos = (1 - cos angle) * |P u|^2 / |u|^2, P the projection onto the planes
    share = (w0 @ basis).norm(dim=1) ** 2 / w0.norm(dim=1) ** 2
    assert torch.allclose(ch.dd, (1 - math.cos(angle)) * share, rtol=1e-9, atol=1e-14)
    planted = C.planted_changes(w0, "direction", basis=basis, angle=angle)
    assert measure(w0, wt, dtype=torch.float64).delta_d == pytest.approx(planted["delta_d"],
                                                                          rel=1e-9, abs=1e-15)


def test_plane_rotation_turns_the_plane_and_fixes_the_rest():
    basis = torch.eye(4, dtype=torch.float64)[:, :2]  # the (e0, e1) plane
    r = C.plane_rotation(basis, math.pi / 2)
    assert torch.allclose(torch.tensor([1.0, 0, 0, 0], dtype=torch.float64) @ r,
                          torch.tensor([0.0, 1, 0, 0], dtype=torch.float64), atol=1e-15)
    assert torch.equal(r[2:, 2:], torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="even"):
        C.plane_rotation(torch.eye(4, dtype=torch.float64)[:, :3], 0.1)


def test_layer_roles_are_half_and_half_and_seeded():
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    roles = C.layer_roles(8, g(3))
    assert roles.count("magnitude") == 4 and roles.count("direction") == 4
    assert roles == C.layer_roles(8, g(3))
    assert len({tuple(C.layer_roles(8, g(s))) for s in range(10)}) > 1


def test_plant_changes_only_the_query_projections_as_planned():
    torch.manual_seed(0)
    base = Transformer(ModelConfig(n_layers=4, d_model=32, n_heads=2, max_seq_len=16))
    cfg = C.ControlledConfig(n_layers=4, d_model=32, n_heads=2, seq_len=16, planes=2)
    teacher, plan = C.plant(base, cfg)
    sb, st_ = base.state_dict(), teacher.state_dict()
    changed = {k for k in sb if not torch.equal(sb[k], st_[k])}
    assert changed == {f"layers.{i}.attn.q_proj.weight" for i in range(4)}
    for p in plan:
        k = p["module"] + ".weight"
        got = measure(sb[k], st_[k], dtype=torch.float64)
        assert got.delta_m == pytest.approx(p["delta_m"], rel=1e-5, abs=1e-7)
        assert got.delta_d == pytest.approx(p["delta_d"], rel=1e-4, abs=1e-7)
        assert (p["delta_d"] == 0) == (p["role"] == "magnitude")


@pytest.mark.parametrize("objective", C.OBJECTIVES)
def test_distillation_loss_is_zero_at_the_teacher_and_positive_elsewhere(objective):
    torch.manual_seed(0)
    base = Transformer(ModelConfig(n_layers=2, d_model=32, n_heads=2, max_seq_len=16))
    with torch.no_grad():  # init-size q, k give near-uniform attention, which q barely moves
        for p in base.parameters():
            p.mul_(20.0 if p.dim() == 2 else 1.0)
    teacher, _ = C.plant(base, C.ControlledConfig(n_layers=2, d_model=32, n_heads=2, seq_len=16,
                                                  spread=1.0, angle=1.0))
    loss = C.distillation_loss(teacher, objective)
    x = torch.randint(0, 256, (3, 16))
    assert loss(teacher, x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(base, x, x).item() > 1e-3


def test_isotropic_objective_is_the_weight_space_distance():
    """E ||(W_S - W_T) h||^2 = ||W_S - W_T||_F^2 for h ~ N(0, I): the loss estimates the mean
    over layers of ||W_S - W_T||^2 / ||W_T||^2 (here from 16 * 2048 draws)."""
    torch.manual_seed(0)
    base = Transformer(ModelConfig(n_layers=2, d_model=32, n_heads=2, max_seq_len=16))
    teacher, _ = C.plant(base, C.ControlledConfig(n_layers=2, d_model=32, n_heads=2, seq_len=16,
                                                  spread=0.5, angle=0.5))
    loss = C.distillation_loss(teacher, "isotropic", seed=0)
    x = torch.zeros(128, 16, dtype=torch.long)
    est = torch.stack([loss(base, x, x) for _ in range(16)]).mean().item()
    exact = sum(((b.attn.q_proj.weight - t.attn.q_proj.weight).norm() ** 2
                 / t.attn.q_proj.weight.norm() ** 2).item()
                for b, t in zip(base.layers, teacher.layers)) / 2
    assert est == pytest.approx(exact, rel=0.03)


def test_tiny_run_is_a_wda_checkpoint_directory(tmp_path):
    cfg = C.ControlledConfig(out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                             n_layers=2, d_model=32, n_heads=2, seq_len=32, pretrain_steps=5,
                             pretrain_batch_size=4, pretrain_max_bytes=40_000, steps=8,
                             batch_size=4, checkpoints="2")
    out = C.run_controlled(cfg)
    metrics = C.query_metrics(out)
    assert set(metrics["method"]) == {"FT", "LoRA", "DoRA"}
    assert sorted(metrics["step"].unique()) == [4, 8]
    assert set(metrics["matrix"]) == {"q_proj"}
    plan = json.loads((out / "teacher" / "plan.json").read_text())
    assert [p["layer"] for p in plan] == [0, 1]
    log = json.loads((out / "controlled_log.json").read_text())
    assert all(min(h["train_loss"]) >= 0 for h in log["runs"].values())  # a KL
    # FT trains the query projections only: every other tensor is still the base's
    base = load_file(str(out / "base" / "model.safetensors"))
    ft = load_file(str(out / "ft" / "checkpoint-8" / "model.safetensors"))
    assert {k for k in base if not torch.equal(base[k], ft[k])} == {
        f"layers.{i}.attn.q_proj.weight" for i in range(2)}


def test_cli_rejects_bad_options(tmp_path, capsys):
    assert C.main(["--out", str(tmp_path / "x"), "--n-layers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "2 layers" in err


def test_predicted_r_is_pearson_over_the_plan():
    plan = [{"delta_d": 0.0, "delta_m": 1.0, "lowrank_fit_delta_d": 0.2, "lowrank_fit_delta_m": 0.8},
            {"delta_d": 0.1, "delta_m": 0.0, "lowrank_fit_delta_d": 0.1, "lowrank_fit_delta_m": 0.0},
            {"delta_d": 0.0, "delta_m": 2.0, "lowrank_fit_delta_d": 0.3, "lowrank_fit_delta_m": 1.5}]
    got = C.predicted_r(plan)
    assert got["exact"] == pytest.approx(np.corrcoef([0, 0.1, 0], [1, 0, 2])[0, 1], abs=1e-12)
    assert got["lowrank"] == pytest.approx(np.corrcoef([0.2, 0.1, 0.3], [0.8, 0, 1.5])[0, 1], abs=1e-12)
    assert got["exact"] < 0 < got["lowrank"]
