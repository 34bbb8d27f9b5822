"""The DoRA reference code's checkpoint format (NVlabs/DoRA's PEFT fork), written here from
its description (FORMATS.md §1: the fork itself does not install), measured against Eq. 5
merged in float64 by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import wda
from builders import dry_run_error, plain_reference, save_full, tiny_llama

R, ALPHA = 4, 8


def write_nvlabs(ck: Path, factors: dict, magnitudes: dict, config: dict, llava: bool = False) -> None:
    """One checkpoint as the fork saves it: ``adapter_config.json`` (sorted keys, indent 2),
    ``adapter_model.bin`` (torch pickle) keyed ``base_model.model.<module>.lora_A.weight`` etc.
    ``llava``: the magnitudes go to ``non_lora_trainables.bin`` under ``.default`` names, as the
    LLaVA script's filter (it keeps "weight_g_wdecomp", not the parameter's real name) leaves them."""
    ck.mkdir(parents=True)
    cfg = {"peft_type": "DORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.05,
           "dora_simple": True, "merge_weights": False, "fan_in_fan_out": False, "enable_lora": None,
           "bias": "none", "modules_to_save": None, "inference_mode": True,
           "base_model_name_or_path": "yahma/llama-7b-hf", **config}
    (ck / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    sd, extra = {}, {}
    for mod, (a, b) in factors.items():
        sd[f"base_model.model.{mod}.lora_A.weight"] = a
        sd[f"base_model.model.{mod}.lora_B.weight"] = b
    for mod, m in magnitudes.items():
        if llava:
            extra[f"base_model.model.{mod}.weight_m_wdecomp.default.weight"] = m
        else:
            sd[f"base_model.model.{mod}.weight_m_wdecomp.weight"] = m
    torch.save(sd, ck / "adapter_model.bin")
    if llava:
        extra["base_model.model.model.mm_projector.0.weight"] = torch.zeros(3, 3)  # other trainables
        torch.save(extra, ck / "non_lora_trainables.bin")


def merge_eq5(w0: torch.Tensor, a, b, m: torch.Tensor, scaling: float) -> torch.Tensor:
    """Eq. 5 of the paper in float64: m · V / ||V|| per output row, V = W_0 + s·B·A (or W_0)."""
    v = w0.double() if a is None else w0.double() + scaling * (b.double() @ a.double())
    return m.double().reshape(-1, 1) * v / torch.linalg.vector_norm(v, dim=1, keepdim=True)


def nvlabs_run(d: Path, model, steps=(10, 20), seed=4, llava=False, config=None, scale=0.05):
    """A run of DoRA on q/k/v and magnitude-only o_proj/up_proj (the paper's qkv script's
    split), with trained-looking A, B and m. Returns {step: {module: merged float64 weight}}."""
    config = config or {"target_modules": ["q_proj", "k_proj", "v_proj"],
                        "Wdecompose_target_modules": ["o_proj", "up_proj"]}
    gen = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    mods = [k[:-7] for k in sd if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]
    mag_only = [k[:-7] for k in sd if k.endswith(("o_proj.weight", "up_proj.weight"))]
    out = {}
    for step in steps:
        factors = {mod: (torch.randn(R, sd[mod + ".weight"].shape[1], generator=gen) * scale,
                         torch.randn(sd[mod + ".weight"].shape[0], R, generator=gen) * scale) for mod in mods}
        mags = {}
        for mod in mods + mag_only:
            w0 = sd[mod + ".weight"]
            mags[mod] = (w0.norm(dim=1, keepdim=True) * (1 + 0.05 * torch.randn(w0.shape[0], 1, generator=gen)))
        write_nvlabs(d / f"checkpoint-{step}", factors, mags, config, llava=llava)
        out[step] = {mod: merge_eq5(sd[mod + ".weight"], *factors.get(mod, (None, None)), mags[mod], ALPHA / R)
                     for mod in mods + mag_only}
    return out


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
