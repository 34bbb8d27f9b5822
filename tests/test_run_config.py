"""Adapter checkpoints saved without an adapter_config.json: a ``checkpoint-<step>/`` takes
the run folder's own (what ``save_pretrained`` wrote into output_dir at the end) when the
modules agree with the run folder's final adapter. PEFT fixtures are written by PEFT, the
reference code's (its commonsense script: adapter keys in ``pytorch_model.bin``, FORMATS.md
§1) by the test builders; references are PEFT's merge_and_unload in float64 and Eq. 5 in
float64."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import wda
from builders import (Q_V, dry_run_error, nvlabs_run, peft_checkpoints, plain_reference, save_full,
                      tiny_llama)


def _strip_configs(run: Path, last: int, weights: str, rename: str | None = None) -> None:
    """The run's checkpoints lose their adapter_config.json (the last one's goes to the run
    folder, with its weights: the final save); ``rename``: the weights file's name in them."""
    shutil.copy(run / f"checkpoint-{last}" / "adapter_config.json", run / "adapter_config.json")
    shutil.copy(run / f"checkpoint-{last}" / weights, run / weights)
    for ck in run.glob("checkpoint-*"):
        (ck / "adapter_config.json").unlink()
        if rename:
            (ck / weights).rename(ck / rename)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from peft import LoraConfig

    d = tmp_path_factory.mktemp("runcfg")
    model = tiny_llama(layers=2)
    save_full(model, d / "base")
    base_sd = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    peft = peft_checkpoints(model, d / "dora", LoraConfig(r=4, lora_alpha=8, target_modules=Q_V, use_dora=True))
    _strip_configs(d / "dora", 20, "adapter_model.safetensors")
    nv = nvlabs_run(d / "nvlabs", model, steps=(10, 20))
    # the commonsense script: model.state_dict is the adapter's, the Trainer saves it as pytorch_model.bin
    _strip_configs(d / "nvlabs", 20, "adapter_model.bin", rename="pytorch_model.bin")
    return d, base_sd, {"dora": peft, "nvlabs": nv}


def test_checkpoints_take_the_run_folders_config(runs):
    d, base_sd, refs = runs
    df = wda.analyze(d, progress=False)
    assert set(df["run"]) == {"dora", "nvlabs"} and set(df["method"]) == {"DoRA"}
    n = 0
    for row in df.itertuples():
        ref = refs[row.run][row.step]
        wt = ref[row.module + ".weight"] if row.run == "dora" else ref[row.module]
        dm, dd, _ = plain_reference(base_sd[row.module + ".weight"], wt)
        assert row.delta_m == pytest.approx(dm, rel=1e-4) and row.delta_d == pytest.approx(dd, rel=1e-4)
        n += 1
    assert n == len(df) == 2 * 2 * 2 + 2 * 2 * 5
    assert set(df[df.run == "nvlabs"]["step"]) == {10, 20}


def test_the_report_shows_the_run_folders_settings(runs, tmp_path):
    from wda.report.cli import main

    d = runs[0]
    rc = main([str(d), "--out", str(tmp_path / "r"), "--no-figures", "--bootstrap", "0", "--no-progress",
               "--only-runs", "dora"])
    assert rc == 0
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["runs"][0]["adapter"]["r"] == 4 and manifest["runs"][0]["adapter"]["use_dora"] is True


# ---- bad variants: one line naming the checkpoint, exit 2 --------------------------------------
def test_no_config_anywhere(runs, tmp_path, capsys):
    d = shutil.copytree(runs[0], tmp_path / "d")
    (d / "dora" / "adapter_config.json").unlink()
    ck = d / "dora" / "checkpoint-10"
    dry_run_error(capsys, d, str(ck), "adapter_model.safetensors but no adapter_config.json",
                  f"nor has the run folder {d / 'dora'} one")


def test_a_bare_adapter_without_config(runs, tmp_path, capsys):
    d = runs[0]
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(d / "dora" / "checkpoint-10" / "adapter_model.safetensors", bare)
    from wda.report.cli import main

    rc = main([str(bare), "--base", str(d / "base"), "--dry-run"])
    from builders import one_line_error

    one_line_error(rc, capsys.readouterr().err, str(bare), "no adapter_config.json")


def test_the_run_folders_config_belongs_to_other_modules(runs, tmp_path, capsys):
    """The run's final adapter adapts q_proj and v_proj; a checkpoint adapting only q_proj
    is not described by its config."""
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(runs[0], tmp_path / "d")
    f = d / "dora" / "checkpoint-10" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if "v_proj" not in k}, f)
    dry_run_error(capsys, d, str(f), "no adapter_config.json of its own", "other modules", "v_proj",
                  "only in adapter_model.safetensors")


def test_nvlabs_checkpoint_rank_does_not_fit_the_run_config(runs, tmp_path, capsys):
    """Without the run folder's final weights to compare with, the config's rank is checked
    against the checkpoint's shapes."""
    d = shutil.copytree(runs[0], tmp_path / "d")
    run = d / "nvlabs"
    (run / "adapter_model.bin").unlink()
    cfg = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    dry_run_error(capsys, d, str(run / "checkpoint-10" / "pytorch_model.bin"), "rank 8")


def test_pytorch_model_bin_of_full_weights_in_an_adapter_run(runs, tmp_path, capsys):
    d = shutil.copytree(runs[0], tmp_path / "d")
    ck = d / "nvlabs" / "checkpoint-10"
    torch.save(tiny_llama(layers=2).state_dict(), ck / "pytorch_model.bin")
    dry_run_error(capsys, d, str(ck / "pytorch_model.bin"), "lora_A / lora_B / weight_m_wdecomp")
