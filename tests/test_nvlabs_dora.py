"""The DoRA reference code's checkpoint format (NVlabs/DoRA's PEFT fork), written here from
its description (FORMATS.md §1: the fork itself does not install), measured against Eq. 5
merged in float64 by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import wda
from builders import NVLABS_R as R, dry_run_error, merge_eq5, nvlabs_run, plain_reference, save_full, tiny_llama


def check(df, run, base_sd, states, rel=1e-4) -> int:
    n = 0
    for step, merged in states.items():
        for mod, wt in merged.items():
            row = df[(df.run == run) & (df.step == step) & (df.module == mod)]
            assert len(row) == 1, (run, step, mod)
            dm, dd, _ = plain_reference(base_sd[mod + ".weight"], wt)
            assert row.delta_m.iloc[0] == pytest.approx(dm, rel=rel), (run, step, mod)
            assert row.delta_d.iloc[0] == pytest.approx(dd, rel=rel), (run, step, mod)
            n += 1
    return n


@pytest.fixture(scope="module")
def nvlabs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("nvlabs")
    model = tiny_llama(layers=2)
    save_full(model, d / "base")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    runs = {"dora_r4": nvlabs_run(d / "dora_r4", model),
            "llava": nvlabs_run(d / "llava", model, seed=5, llava=True,
                                config={"target_modules": r".*\.(q_proj|k_proj|v_proj)",
                                        "wdecompose_target_modules": r".*\.(o_proj|up_proj)"})}
    return d, base_sd, runs


def test_merged_exactly_eq5(nvlabs_dir):
    d, base_sd, runs = nvlabs_dir
    df = wda.analyze(d, progress=False)
    assert set(df.method) == {"DoRA"}
    assert set(df.matrix) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj"}
    n = sum(check(df, run, base_sd, states) for run, states in runs.items())
    assert n == len(df) == 2 * 2 * 5 * 2


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_bin(path: Path, fn) -> None:
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def _edit_config(path: Path, **kw) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(kw)
    path.write_text(json.dumps(cfg))


MAG = "base_model.model.model.layers.0.self_attn.q_proj.weight_m_wdecomp.weight"
LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("case", ["missing_magnitude", "magnitude_shape", "lora_a_shape", "unknown_peft_type",
                                  "alpha_null", "magnitude_only_not_named", "llava_without_trainables"])
def test_bad_variants_one_line(nvlabs_dir, tmp_path, capsys, case):
    src, _, _ = nvlabs_dir
    d = _copy(src, tmp_path / "d")
    ck = d / "dora_r4" / "checkpoint-10"
    if case == "missing_magnitude":
        _edit_bin(ck / "adapter_model.bin", lambda sd: sd.pop(MAG))
        words = ["adapter_model.bin", "q_proj", "weight_m_wdecomp"]
    elif case == "magnitude_shape":
        _edit_bin(ck / "adapter_model.bin", lambda sd: sd.__setitem__(MAG, torch.ones(48, 2)))
        words = ["adapter_model.bin", "weight_m_wdecomp", "(48, 2)"]
    elif case == "lora_a_shape":
        _edit_bin(ck / "adapter_model.bin", lambda sd: sd.__setitem__(LORA_A, torch.ones(R + 1, 48)))
        words = ["adapter_model.bin", "q_proj", "rank 4"]
    elif case == "unknown_peft_type":
        _edit_config(ck / "adapter_config.json", peft_type="ADALORA")
        words = ["adapter_config.json", "ADALORA", "DORA"]
    elif case == "alpha_null":
        _edit_config(ck / "adapter_config.json", lora_alpha=None)
        words = ["adapter_config.json", "lora_alpha"]
    elif case == "magnitude_only_not_named":
        _edit_config(ck / "adapter_config.json", Wdecompose_target_modules=["o_proj"])
        words = ["adapter_model.bin", "up_proj", "Wdecompose_target_modules"]
    else:
        ck = d / "llava" / "checkpoint-10"
        (ck / "non_lora_trainables.bin").unlink()
        words = ["adapter_model.bin", "weight_m_wdecomp", "non_lora_trainables.bin"]
    dry_run_error(capsys, d, *words)


def test_target_rules():
    from wda.formats.nvlabs_dora import targets

    assert targets(["q_proj"], "model.layers.0.self_attn.q_proj")
    assert targets(["proj"], "model.layers.0.self_attn.q_proj")  # endswith, no dot boundary
    assert not targets(["q_proj"], "model.layers.0.self_attn.q_proj_x")
    assert targets(r".*\.q_proj", "model.layers.0.self_attn.q_proj")
    assert not targets(r"q_proj", "model.layers.0.self_attn.q_proj")  # a string must fullmatch
    assert not targets(None, "q_proj")


# ---- fan_in_fan_out: the commonsense fork transposes the update only ----------------------------
def merge_fifo(w0: torch.Tensor, a, b, m: torch.Tensor, scaling: float) -> torch.Tensor:
    """The commonsense fork's ``Linear.train(False)`` with fan_in_fan_out, in float64:
    V = W + s·(B@A)ᵀ with W the nn.Linear weight as stored (out, in), then m · V / ||V|| over dim=1."""
    v = w0.double() + (b.double() @ a.double()).T * scaling
    return m.double() / torch.linalg.norm(v, dim=1).unsqueeze(1) * v


def test_fan_in_fan_out_transposes_the_update(tmp_path):
    from builders import NVLABS_ALPHA, write_nvlabs

    model = tiny_llama(layers=2)
    save_full(model, tmp_path / "base")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(11)
    mods = [k[:-7] for k in sd if k.endswith(("q_proj.weight", "o_proj.weight"))]  # square (48, 48)
    factors = {mod: (torch.randn(R, 48, generator=gen) * 0.05, torch.randn(48, R, generator=gen) * 0.05)
               for mod in mods}
    mags = {mod: sd[mod + ".weight"].norm(dim=1, keepdim=True) * (1 + 0.05 * torch.randn(48, 1, generator=gen))
            for mod in mods}
    write_nvlabs(tmp_path / "fifo" / "checkpoint-5", factors, mags,
                 {"target_modules": ["q_proj", "o_proj"], "fan_in_fan_out": True})
    df = wda.analyze(tmp_path, progress=False, dtype="float64")
    assert set(df.module) == set(mods)
    for row in df.itertuples():
        wt = merge_fifo(sd[row.module + ".weight"], *factors[row.module], mags[row.module], NVLABS_ALPHA / R)
        dm, dd, _ = plain_reference(sd[row.module + ".weight"], wt)
        assert row.delta_m == pytest.approx(dm, rel=1e-6) and row.delta_d == pytest.approx(dd, rel=1e-6)
        # and it is not the untransposed merge (the test tells the two apart)
        plain = merge_eq5(sd[row.module + ".weight"], *factors[row.module], mags[row.module], NVLABS_ALPHA / R)
        assert abs(plain_reference(sd[row.module + ".weight"], plain)[1] - dd) > 1e-3 * dd


def test_fan_in_fan_out_on_a_non_square_module_is_one_line(nvlabs_dir, tmp_path, capsys):
    d = _copy(nvlabs_dir[0], tmp_path / "d")
    ck = d / "dora_r4" / "checkpoint-10"
    _edit_config(ck / "adapter_config.json", fan_in_fan_out=True)  # k_proj / v_proj are (12, 48)
    dry_run_error(capsys, d, str(ck / "adapter_model.bin"), "k_proj", "not square", "fan_in_fan_out", "(48, 12)")
    _edit_config(ck / "adapter_config.json", fan_in_fan_out="yes")
    dry_run_error(capsys, d, str(ck / "adapter_config.json"), "fan_in_fan_out must be true or false")
