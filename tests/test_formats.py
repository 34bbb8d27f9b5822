"""The formats package: discovery of the format modules, FSDP sharded (DCP) checkpoints
written by torch.distributed.checkpoint itself, DeepSpeed ZeRO folders named with their
conversion, a base given as a single weights file."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

import wda
from builders import one_line_error, perturb_, plain_reference, tiny_llama
from wda.errors import WdaError
from wda.formats import formats, open_checkpoint
from wda.formats.base import Checkpoint
from wda.report.cli import main


def cli(capsys, *args: str) -> tuple[int, str]:
    rc = main([*args, "--no-progress", "--no-figures", "--bootstrap", "20"])
    return rc, capsys.readouterr().err


def test_every_module_with_FORMAT_is_a_format_in_priority_order():
    found = formats()
    names = [f.__module__.rsplit(".", 1)[1] for f in found]
    assert {"hf", "peft", "fsdp", "deepspeed"} <= set(names)
    assert "base" not in names and "tensors" not in names
    assert [f.priority for f in found] == sorted(f.priority for f in found)
    assert names.index("peft") < names.index("hf")  # an adapter folder may also hold a config.json
    for f in found:
        assert issubclass(f, Checkpoint) and f.format != Checkpoint.format


def test_no_weights_names_what_each_format_expects(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(WdaError) as info:
        open_checkpoint(tmp_path / "checkpoint-1")
    text = str(info.value)
    assert "no weights found" in text
    for f in formats():
        if f.expects:
            assert f.expects in text


# ---- FSDP sharded checkpoints (DCP) ------------------------------------------------------------
def dcp_run(model, run_dir: Path, steps=(1, 2), scale=0.01, seed=3, dtype=None) -> dict[int, dict]:
    """Checkpoints as accelerate writes them under FSDP SHARDED_STATE_DICT: a DCP folder
    ``checkpoint-N/pytorch_model_fsdp_0/`` of ``{"model": state_dict}`` (torch's own
    ``dcp.save``, one process) beside the model's config.json. Returns {step: state dict}."""
    import torch.distributed.checkpoint as dcp

    gen = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    out = {}
    for step in steps:
        perturb_([p for p in m.parameters() if p.dim() == 2], scale, gen)
        sd = {k: v.detach().clone() if dtype is None else v.detach().to(dtype) for k, v in m.state_dict().items()}
        ck = run_dir / f"checkpoint-{step}"
        dcp.save({"model": sd}, checkpoint_id=str(ck / "pytorch_model_fsdp_0"))
        m.config.save_pretrained(ck)
        out[step] = {k: v.double() for k, v in sd.items()}
    return out


@pytest.fixture(scope="module")
def fsdp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    model = tiny_llama(seed=6, layers=2)
    model.save_pretrained(d / "base")
    refs = {"fsdp": dcp_run(model, d / "fsdp"), "fsdp_bf16": dcp_run(model, d / "fsdp_bf16", seed=4,
                                                                       dtype=torch.bfloat16)}
    base_sd = {k: v.double() for k, v in model.state_dict().items()}
    return d, base_sd, refs


def test_fsdp_sharded_checkpoints_match_float64(fsdp_dir, monkeypatch):
    d, base_sd, refs = fsdp_dir
    assert sorted(p.name for p in (d / "fsdp" / "checkpoint-1" / "pytorch_model_fsdp_0").iterdir()) == [
        ".metadata", "__0_0.distcp"]
    from torch.distributed.checkpoint import FileSystemReader

    real, loads = FileSystemReader.read_data, []

    def spy(self, plan, planner):
        loads.append(sorted({item.dest_index.fqn for item in plan.items}))
        return real(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", spy)
    df = wda.analyze(d, modules=["q_proj", "v_proj", "down_proj"], progress=False)
    assert set(df["run"]) == {"fsdp", "fsdp_bf16"} and set(df["method"]) == {"FT"}
    for row in df.itertuples():
        key = row.module + ".weight"
        dm, dd, _ = plain_reference(base_sd[key], refs[row.run][row.step][key])
        assert row.delta_m == pytest.approx(dm, rel=1e-4) and row.delta_d == pytest.approx(dd, rel=1e-4)
    # tensor by tensor: each read is of one tensor's chunks, and only of the analysed ones
    assert loads and all(len(k) == 1 for k in loads)
    assert len(loads) == len(df)
    assert {k[0] for k in loads} == {"model." + m + ".weight" for m in df["module"]}


def test_fsdp_checkpoint_lists_modules_from_metadata_only(fsdp_dir, monkeypatch):
    d, base_sd, _ = fsdp_dir
    from torch.distributed.checkpoint import FileSystemReader

    monkeypatch.setattr(FileSystemReader, "read_data", lambda *a, **k: pytest.fail("opening read tensor data"))
    ck = open_checkpoint(d / "fsdp" / "checkpoint-1")
    assert ck.format.startswith("FSDP") and ck.method == "FT"
    assert {m: t.shape for m, t in ck.weights.items()} == {
        k[:-len(".weight")]: tuple(v.shape) for k, v in base_sd.items() if k.endswith(".weight")}


def test_fsdp_shard_missing_or_metadata_corrupt(fsdp_dir, tmp_path, capsys):
    d = fsdp_dir[0]
    root = tmp_path / "ck"
    shutil.copytree(d, root)
    dcp_dir = root / "fsdp" / "checkpoint-2" / "pytorch_model_fsdp_0"
    shard = dcp_dir / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # cut short: found when its tensors are read
    rc, err = cli(capsys, str(root), "--out", str(tmp_path / "o"))
    one_line_error(rc, err, str(dcp_dir), "cannot read tensor")
    shard.unlink()  # missing: found from the metadata, before anything is read
    rc, err = cli(capsys, str(root), "--out", str(tmp_path / "o"))
    one_line_error(rc, err, str(shard), "missing")
    (dcp_dir / ".metadata").write_bytes(b"not a pickle")
    rc, err = cli(capsys, str(root), "--out", str(tmp_path / "o"))
    one_line_error(rc, err, str(dcp_dir / ".metadata"), "metadata")


# ---- DeepSpeed ZeRO -----------------------------------------------------------------------------
def test_deepspeed_zero_folder_names_its_conversion(pristine, tmp_path, capsys):
    root = tmp_path / "ck"
    shutil.copytree(pristine, root, ignore=shutil.ignore_patterns("lora", "dora"))
    ck = root / "zero" / "checkpoint-5"
    (ck / "global_step5").mkdir(parents=True)
    torch.save({"module": None}, ck / "global_step5" / "mp_rank_00_model_states.pt")
    torch.save({}, ck / "global_step5" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (ck / "latest").write_text("global_step5")
    (ck / "zero_to_fp32.py").write_text("# DeepSpeed's converter\n")
    (ck / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rc, err = cli(capsys, str(root), "--out", str(tmp_path / "o"))
    one_line_error(rc, err, str(ck), "DeepSpeed ZeRO", str(ck / "zero_to_fp32.py"))


# ---- a base given as one file -------------------------------------------------------------------
def test_base_as_a_single_safetensors_file(pristine, tmp_path):
    root = tmp_path / "ck"
    shutil.copytree(pristine, root)
    base_file = tmp_path / "weights" / "pretrained.safetensors"
    base_file.parent.mkdir()
    shutil.move(root / "base" / "model.safetensors", base_file)
    shutil.rmtree(root / "base")
    got = wda.analyze(root, base=base_file, progress=False)
    want = wda.analyze(pristine, progress=False)
    assert got[["run", "step", "module"]].equals(want[["run", "step", "module"]])
    assert (got["delta_d"] - want["delta_d"]).abs().max() == 0.0


def test_unknown_peft_type_names_the_config(pristine, tmp_path, capsys):
    root = tmp_path / "ck"
    shutil.copytree(pristine, root)
    cfg = root / "lora" / "checkpoint-20" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "peft_type": "IA3"}))
    rc, err = cli(capsys, str(root), "--out", str(tmp_path / "o"))
    one_line_error(rc, err, str(cfg), "peft_type 'IA3' is not supported")


def test_present_answers_alike_from_a_folder_listing(tmp_path):
    """``present`` within ``listings()`` (one ``os.listdir`` per folder, as discovery uses it)
    says what the file system says name by name: a file, a folder, a broken link, a missing
    name, a name in a missing folder or under a file; outside it, nothing is cached."""
    from wda.formats.tensors import listings, present

    (tmp_path / "f.json").write_text("{}")
    (tmp_path / "d").mkdir()
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    names = [tmp_path / n for n in ("f.json", "d", "broken", "missing")] + [
        tmp_path / "nofolder" / "x", tmp_path / "f.json" / "x", tmp_path / "d" / ".."]
    plain = [present(p) for p in names]
    assert plain == [True, True, True, False, False, False, True]
    with listings():
        assert [present(p) for p in names] == plain
        (tmp_path / "late").write_text("")
        assert not present(tmp_path / "late")  # a snapshot of a folder already listed
        assert present(tmp_path / "d" / "..")  # not a name in a listing: asked directly
    assert present(tmp_path / "late")  # outside, the file system again
