"""Bad input through the real CLI: every case exits non-zero with ONE line that names the
offending file (or folder) and the problem, prints no traceback and writes no report.

Each case corrupts a fresh copy of one small real-format directory (transformers + PEFT):

    base/                 tiny Llama, full weights
    ft/checkpoint-{10,20}     full weights
    lora/checkpoint-{10,20}   PEFT LoRA adapter (q_proj, v_proj)
    dora/checkpoint-{10,20}   PEFT DoRA adapter (q_proj, v_proj)
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wda.errors import WdaError
from wda.report.cli import main

Q0 = "model.layers.0.self_attn.q_proj"
PEFT = "base_model.model."


def cli(capsys, ckpt_dir: Path, *extra: str, out: Path | None = None) -> tuple[int, str, Path]:
    out = out or ckpt_dir.parent / "out"
    rc = main([str(ckpt_dir), "--out", str(out), "--no-progress", "--no-figures", "--bootstrap", "50",
               *extra])
    return rc, capsys.readouterr().err, out


def assert_one_line_error(rc: int, err: str, out: Path, names: Path | str, *problem: str) -> str:
    """Exit 2, one line naming ``names`` and every word of ``problem``, no traceback, no report."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("wda: error: "), line
    assert str(names) in line, f"the message does not name {names}: {line}"
    for word in problem:
        assert word.lower() in line.lower(), f"{word!r} missing from: {line}"
    assert not out.exists(), "a failed run left a report behind"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temp folder left"
    return line


# ---- helpers that corrupt real files ---------------------------------------------------------
def edit_tensors(path: Path, fn) -> None:
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


def edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            del cfg[k]
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def truncate(path: Path, keep: float | int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else len(data) + keep])


def set_header_dtype(path: Path, key: str, dtype: str) -> None:
    """Rewrite one dtype in a safetensors header in place (same length: offsets stay valid)."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    assert len(header[key]["dtype"]) == len(dtype)
    header[key]["dtype"] = dtype
    raw = json.dumps(header, separators=(",", ":")).encode()
    data[8:8 + n] = raw.ljust(n)
    path.write_bytes(bytes(data))


def ft20(d: Path) -> Path:
    return d / "ft" / "checkpoint-20" / "model.safetensors"


def lora20(d: Path, name: str = "adapter_model.safetensors") -> Path:
    return d / "lora" / "checkpoint-20" / name


def dora20(d: Path, name: str = "adapter_model.safetensors") -> Path:
    return d / "dora" / "checkpoint-20" / name


def nan_at(key: str, value: float = float("nan")):
    def fn(sd):
        sd[key].view(-1)[3] = value
    return fn


def bin_checkpoint(d: Path) -> Path:
    """ft/checkpoint-20 as a legacy pytorch_model.bin instead of safetensors."""
    sd = load_file(ft20(d))
    ft20(d).unlink()
    path = d / "ft" / "checkpoint-20" / "pytorch_model.bin"
    torch.save(sd, path)
    return path


def shard(d: Path) -> Path:
    """ft/checkpoint-20 as two safetensors shards plus model.safetensors.index.json."""
    sd = load_file(ft20(d))
    ft20(d).unlink()
    names = sorted(sd)
    half = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    ckpt = ft20(d).parent
    for fname, keys in half.items():
        save_file({k: sd[k] for k in keys}, ckpt / fname, metadata={"format": "pt"})
    index = ckpt / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in half.items() for k in ks}}))
    return index


# ---- the cases: (id, corrupt(d) -> (path the message must name, words of the problem, extra argv))
def _missing_dir(d):
    return d / "nope", ["does not exist"], [], d / "nope"


def _empty_dir(d):
    e = d.parent / "empty"
    e.mkdir()
    return e, ["is empty"], [], e


def _no_base(d):
    shutil.rmtree(d / "base")
    return d / "base", ["no base weights"], []


def _base_without_weights(d):
    (d / "base" / "model.safetensors").unlink()
    return d / "base", ["no weights found"], []


def _base_is_adapter(d):
    return d / "lora" / "checkpoint-10", ["base must hold full weights"], ["--base", str(d / "lora" / "checkpoint-10")]


def _weights_file_is_a_directory(d):
    ft20(d).unlink()
    ft20(d).mkdir()
    return ft20(d), ["is a directory"], []


def _weights_file_is_a_broken_link(d):
    ft20(d).unlink()
    ft20(d).symlink_to(d / "gone.safetensors")
    return ft20(d), ["broken link"], []


def _safetensors_garbage(d):
    ft20(d).write_bytes(b"this is not a safetensors file" * 20)
    return ft20(d), ["not a readable safetensors file"], []


def _safetensors_empty(d):
    ft20(d).write_bytes(b"")
    return ft20(d), ["not a readable safetensors file"], []


def _safetensors_cut_in_half(d):
    truncate(ft20(d), 0.5)
    return ft20(d), ["not a readable safetensors file"], []


def _safetensors_cut_inside_data(d):
    truncate(ft20(d), -7)  # header intact, the last tensor 7 bytes short
    return ft20(d), ["not a readable safetensors file"], []


def _safetensors_trailing_bytes(d):
    ft20(d).write_bytes(ft20(d).read_bytes() + b"\0" * 16)
    return ft20(d), ["not a readable safetensors file"], []


def _base_truncated(d):
    p = d / "base" / "model.safetensors"
    truncate(p, 0.5)
    return p, ["not a readable safetensors file"], []


def _adapter_truncated(d):
    truncate(dora20(d), -100)
    return dora20(d), ["not a readable safetensors file"], []


def _integer_dtype_in_header(d):
    set_header_dtype(ft20(d), Q0 + ".weight", "I32")  # same size as F32: only the dtype lies
    return ft20(d), [Q0, "I32", "not as floating point"], []


def _bin_garbage(d):
    p = bin_checkpoint(d)
    p.write_bytes(b"PK\x03\x04 not a zip" * 30)
    return p, ["not a readable PyTorch weights file"], []


def _bin_truncated(d):
    p = bin_checkpoint(d)
    truncate(p, 0.5)
    return p, ["not a readable PyTorch weights file"], []


def _bin_not_a_state_dict(d):
    p = bin_checkpoint(d)
    torch.save([torch.zeros(2)], p)
    return p, ["state dict"], []


def _shard_missing(d):
    index = shard(d)
    (index.parent / "model-00002-of-00002.safetensors").unlink()
    return index.parent / "model-00002-of-00002.safetensors", ["shard", "missing"], []


def _shard_index_lists_absent_tensor(d):
    index = shard(d)
    cfg = json.loads(index.read_text())
    cfg["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(cfg))
    return index.parent / "model-00001-of-00002.safetensors", ["model.extra.weight", "missing"], []


def _shard_index_not_json(d):
    index = shard(d)
    index.write_text('{"weight_map": {')
    return index, ["not valid JSON"], []


def _config_not_json(d):
    lora20(d, "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    return lora20(d, "adapter_config.json"), ["not valid JSON"], []


def _config_empty(d):
    lora20(d, "adapter_config.json").write_text("")
    return lora20(d, "adapter_config.json"), ["not valid JSON"], []


def _config_not_an_object(d):
    lora20(d, "adapter_config.json").write_text("[4, 8]")
    return lora20(d, "adapter_config.json"), ["JSON object"], []


def _config_without_r(d):
    edit_json(lora20(d, "adapter_config.json"), r=...)
    return lora20(d, "adapter_config.json"), ["'r' is missing"], []


def _config_without_alpha(d):
    edit_json(lora20(d, "adapter_config.json"), lora_alpha=...)
    return lora20(d, "adapter_config.json"), ["'lora_alpha' is missing"], []


def _config_rank_not_an_integer(d):
    edit_json(lora20(d, "adapter_config.json"), r=4.5)  # int() would quietly make it 4
    return lora20(d, "adapter_config.json"), ["r must be a positive integer", "4.5"], []


def _config_rank_a_string(d):
    edit_json(lora20(d, "adapter_config.json"), r="four")
    return lora20(d, "adapter_config.json"), ["r must be a positive integer", "four"], []


def _config_alpha_nan(d):
    edit_json(lora20(d, "adapter_config.json"), lora_alpha=float("nan"))  # json writes NaN
    return lora20(d, "adapter_config.json"), ["lora_alpha must be a finite number"], []


def _config_use_dora_a_string(d):
    edit_json(lora20(d, "adapter_config.json"), use_dora="false")  # bool("false") is True
    return lora20(d, "adapter_config.json"), ["use_dora must be true or false"], []


def _config_rank_pattern_bad_regex(d):
    edit_json(lora20(d, "adapter_config.json"), rank_pattern={"q_proj(": 2})
    return lora20(d, "adapter_config.json"), ["rank_pattern", "q_proj(", "regular expression"], []


def _adapter_weights_missing(d):
    lora20(d).unlink()
    return lora20(d).parent, ["no adapter_model.safetensors"], []


def _lora_b_missing(d):
    edit_tensors(lora20(d), lambda sd: sd.pop(f"{PEFT}{Q0}.lora_B.weight"))
    return lora20(d), [Q0, "no lora_B"], []


def _lora_a_missing(d):
    edit_tensors(lora20(d), lambda sd: sd.pop(f"{PEFT}{Q0}.lora_A.weight"))
    return lora20(d), [Q0, "no lora_A"], []


def _dora_without_magnitude(d):
    edit_tensors(dora20(d), lambda sd: sd.pop(f"{PEFT}{Q0}.lora_magnitude_vector"))
    return dora20(d), [Q0, "without lora_magnitude_vector"], []


def _magnitude_without_use_dora(d):
    for step in (10, 20):
        edit_json(d / "dora" / f"checkpoint-{step}" / "adapter_config.json", use_dora=False)
    return d / "dora" / "checkpoint-10" / "adapter_model.safetensors", ["lora_magnitude_vector but use_dora is false"], []


def _one_checkpoint_of_another_method(d):
    shutil.copytree(dora20(d).parent, d / "dora" / "checkpoint-30")
    edit_json(dora20(d, "adapter_config.json"), use_dora=False)  # 2 DoRA, 1 LoRA
    return dora20(d, "adapter_config.json"), ["makes this checkpoint LoRA", "run 'dora' are DoRA"], []


def _magnitude_wrong_length(d):
    edit_tensors(dora20(d), lambda sd: sd.__setitem__(f"{PEFT}{Q0}.lora_magnitude_vector", torch.ones(47)))
    return dora20(d), [Q0, "lora_magnitude_vector has shape (47,)"], []


def _rank_in_config_does_not_match_tensors(d):
    edit_json(lora20(d, "adapter_config.json"), r=8)
    return lora20(d), [Q0, "rank 8", "(4, 48)"], []


def _rank_of_one_tensor_wrong(d):
    edit_tensors(lora20(d), lambda sd: sd.__setitem__(f"{PEFT}{Q0}.lora_A.weight", torch.zeros(3, 48)))
    return lora20(d), [Q0, "(3, 48)", "rank 4"], []


def _adapter_out_features_wrong(d):
    edit_tensors(lora20(d), lambda sd: sd.__setitem__(f"{PEFT}{Q0}.lora_B.weight", torch.zeros(40, 4)))
    return lora20(d), [Q0, "(40, 4)", "out=48"], []


def _full_weight_shape_wrong(d):
    edit_tensors(ft20(d), lambda sd: sd.__setitem__(Q0 + ".weight", torch.zeros(48, 40)))
    return ft20(d), [Q0, "(48, 40)", "(48, 48)"], []


def _full_weight_module_missing(d):
    edit_tensors(ft20(d), lambda sd: sd.pop(Q0 + ".weight"))
    return ft20(d), [Q0, "missing"], []


def _adapter_module_missing_in_one_step(d):
    def drop(sd):
        for k in [k for k in sd if f"{Q0}." in k]:
            del sd[k]
    edit_tensors(lora20(d), drop)
    return lora20(d), [Q0, "missing here but present in other checkpoints"], []


def _adapter_module_unknown_to_base(d):
    def rename(sd):
        for k in [k for k in sd if f"{Q0}." in k]:
            sd[k.replace("q_proj", "z_proj")] = sd.pop(k)
    edit_tensors(lora20(d), rename)
    return lora20(d), ["z_proj", "no matching weight in the base"], []


def _nan_in_full_weights(d):
    edit_tensors(ft20(d), nan_at(Q0 + ".weight"))
    return ft20(d).parent, [Q0, "NaN"], []


def _inf_in_lora_b(d):
    edit_tensors(lora20(d), nan_at(f"{PEFT}{Q0}.lora_B.weight", float("inf")))
    return lora20(d).parent, [Q0, "NaN/Inf"], []


def _nan_in_dora_magnitude(d):
    edit_tensors(dora20(d), nan_at(f"{PEFT}{Q0}.lora_magnitude_vector"))
    return dora20(d).parent, [Q0, "NaN"], []


def _nan_in_dora_magnitude_axis_in(d):
    edit_tensors(dora20(d), nan_at(f"{PEFT}{Q0}.lora_magnitude_vector"))  # the dense Eq. 5 path
    return dora20(d).parent, [Q0, "NaN"], ["--axis", "in"]


def _nan_in_base(d):
    edit_tensors(d / "base" / "model.safetensors", nan_at(Q0 + ".weight"))
    return d / "base", [Q0, "NaN"], []


def _duplicate_step(d):
    shutil.copytree(d / "ft" / "checkpoint-10", d / "ft" / "checkpoint-010")
    return d / "ft" / "checkpoint-010", ["duplicate step 10", "checkpoint-10"], []


def _step_not_an_integer(d):
    shutil.copytree(d / "ft" / "checkpoint-10", d / "ft" / "checkpoint-best")
    return d / "ft" / "checkpoint-best", ["'best' is not an integer"], []


def _run_mixes_methods(d):
    shutil.copytree(d / "lora" / "checkpoint-10", d / "ft" / "checkpoint-30")
    shutil.copytree(d / "lora" / "checkpoint-20", d / "ft" / "checkpoint-40")  # 2 FT, 2 LoRA
    return d / "ft", ["mixes checkpoints of different methods",
                      "FT: checkpoint-10, checkpoint-20; LoRA: checkpoint-30, checkpoint-40"], []


def _checkpoint_copied_into_another_run(d):
    shutil.copytree(d / "lora" / "checkpoint-10", d / "ft" / "checkpoint-30")
    return d / "ft" / "checkpoint-30" / "adapter_config.json", ["LoRA", "run 'ft' are FT"], []


def _modules_match_nothing(d):
    return d / "base" / "model.safetensors", ["--modules 'k_projx' matches no", "q_proj"], ["--modules", "k_projx"]


def _modules_bad_regex(d):
    return (d / "base" / "model.safetensors", ["'q_proj(' matches no", "not a valid regular expression"],
            ["--modules", "q_proj("])


def _modules_empty(d):
    return "--modules", ["names no module"], ["--modules", " , "]


def _modules_no_run_changes(d):
    shutil.rmtree(d / "ft")  # adapters touch q_proj and v_proj only
    return d, ["no run changes the selected modules"], ["--modules", "o_proj"]


CASES = {f.__name__[1:]: f for f in [
    _missing_dir, _empty_dir, _no_base, _base_without_weights, _base_is_adapter,
    _weights_file_is_a_directory, _weights_file_is_a_broken_link,
    _safetensors_garbage, _safetensors_empty, _safetensors_cut_in_half, _safetensors_cut_inside_data,
    _safetensors_trailing_bytes, _base_truncated, _adapter_truncated, _integer_dtype_in_header,
    _bin_garbage, _bin_truncated, _bin_not_a_state_dict,
    _shard_missing, _shard_index_lists_absent_tensor, _shard_index_not_json,
    _config_not_json, _config_empty, _config_not_an_object, _config_without_r, _config_without_alpha,
    _config_rank_not_an_integer, _config_rank_a_string, _config_alpha_nan, _config_use_dora_a_string,
    _config_rank_pattern_bad_regex, _adapter_weights_missing,
    _lora_b_missing, _lora_a_missing, _dora_without_magnitude, _magnitude_without_use_dora,
    _one_checkpoint_of_another_method,
    _magnitude_wrong_length, _rank_in_config_does_not_match_tensors, _rank_of_one_tensor_wrong,
    _adapter_out_features_wrong, _full_weight_shape_wrong,
    _full_weight_module_missing, _adapter_module_missing_in_one_step, _adapter_module_unknown_to_base,
    _nan_in_full_weights, _inf_in_lora_b, _nan_in_dora_magnitude, _nan_in_dora_magnitude_axis_in,
    _nan_in_base,
    _duplicate_step, _step_not_an_integer, _run_mixes_methods, _checkpoint_copied_into_another_run,
    _modules_match_nothing, _modules_bad_regex, _modules_empty, _modules_no_run_changes,
]}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_naming_the_file(case, ck, capsys):
    names, problem, extra, *target = CASES[case](ck)
    rc, err, out = cli(capsys, target[0] if target else ck, *extra)
    assert_one_line_error(rc, err, out, names, *problem)


def test_unreadable_file(ck, capsys, monkeypatch):
    """A file the user may not read names the file. Root reads anything, so there the OS
    refusal is simulated at the open call."""
    if os.geteuid() != 0:
        ft20(ck).chmod(0)
    else:
        real = os.open

        def refuse(path, *a, **kw):
            if Path(path) == ft20(ck):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *a, **kw)

        monkeypatch.setattr(os, "open", refuse)
    try:
        rc, err, out = cli(capsys, ck)
    finally:
        ft20(ck).chmod(0o644)
    assert_one_line_error(rc, err, out, ft20(ck), "not a readable safetensors file", "permission denied")


def test_stops_at_the_first_broken_checkpoint_in_order(ck, capsys):
    """Two broken checkpoints: the message names the first in discovery order (runs by
    name, steps as integers), not the second, and nothing is analysed."""
    truncate(ck / "ft" / "checkpoint-10" / "model.safetensors", 0.5)
    truncate(ft20(ck), 0.5)
    rc, err, out = cli(capsys, ck)
    line = assert_one_line_error(rc, err, out, ck / "ft" / "checkpoint-10" / "model.safetensors")
    assert "checkpoint-20" not in line
    assert "--skip-broken" in line  # says what to do


def test_debug_shows_the_traceback(ck, capsys):
    truncate(ft20(ck), 0.5)
    with pytest.raises(WdaError, match="not a readable safetensors file"):
        main([str(ck), "--out", str(ck.parent / "out"), "--no-progress", "--debug"])


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # warnings would show, if any were emitted
    return subprocess.run([sys.executable, "-m", "wda.report", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_real_process_bad_file_exit_status_and_no_traceback(ck):
    """The real program: status 2, stderr exactly one line naming the file, nothing on stdout."""
    truncate(dora20(ck), 0.5)
    p = _subprocess([str(ck), "--out", str(ck.parent / "out"), "--no-progress"], ck.parent)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(dora20(ck)) in lines[0], p.stderr
    assert p.stdout == ""
    assert not (ck.parent / "out").exists()


def test_real_process_error_raised_during_analysis(ck):
    """An error found while streaming (NaN, past header validation) also ends in one line."""
    edit_tensors(ft20(ck), nan_at(Q0 + ".weight"))
    p = _subprocess([str(ck), "--out", str(ck.parent / "out"), "--no-progress"], ck.parent)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(ft20(ck).parent) in lines[0] and "NaN" in lines[0], p.stderr


def test_file_rewritten_after_discovery_names_the_file(ck, capsys, monkeypatch):
    """Headers are checked first; a file cut short afterwards (a job still saving) is caught
    when the engine reads from it, in the reader thread (its size is not the one discovery
    saw), and named."""
    import wda.analysis.engine

    real = wda.analysis.engine.discover

    def discover_then_truncate(*a, **kw):
        layout = real(*a, **kw)
        truncate(ft20(ck), 0.5)
        return layout

    monkeypatch.setattr(wda.analysis.engine, "discover", discover_then_truncate)
    rc, err, out = cli(capsys, ck)
    assert_one_line_error(rc, err, out, ft20(ck), "changed on disk while being analysed")


def test_file_cut_short_while_open_is_an_error_not_a_crash(ck):
    """A memory-mapped file cut short under an open handle would kill the process with
    SIGBUS on the first touch of a tensor. Run in a child process so a regression fails
    this test instead of killing the test run."""
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from wda.formats import open_checkpoint\n"
        "from wda.errors import WdaError\n"
        f"ck = open_checkpoint(Path({str(ft20(ck).parent)!r}))\n"
        f"os.truncate({str(ft20(ck))!r}, 4096)\n"
        "try:\n"
        "    print(float(ck.read_weight('model.layers.0.self_attn.q_proj').double().sum()))\n"
        "except WdaError as err:\n"
        "    print('WdaError:', err)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.returncode, p.stderr)  # -7: SIGBUS
    assert p.stdout.startswith(f"WdaError: {ft20(ck)}: changed on disk"), p.stdout
