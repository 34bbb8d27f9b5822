"""Fuzz the loader: corrupted safetensors headers (and .bin files, adapter configs) must give
a clean WdaError naming the file, on one line, every time; never another exception. A file
that still loads must give tensors of the shapes its header declares."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from wda.formats import open_checkpoint
from wda.formats.peft import AdapterConfig
from wda.formats.tensors import TensorFile
from wda.errors import WdaError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

TENSORS = {
    "model.layers.0.q_proj.weight": torch.randn(6, 4),
    "model.layers.0.v_proj.weight": torch.randn(2, 4).to(torch.bfloat16),
    "model.norm.weight": torch.ones(4, dtype=torch.float16),
    "steps": torch.arange(3, dtype=torch.int64),
}


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[bytes, dict, bytes]:
    """(whole file, parsed header, data section) of a valid safetensors file."""
    p = tmp_path_factory.mktemp("valid") / "model.safetensors"
    save_file(TENSORS, p, metadata={"format": "pt"})
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw, json.loads(raw[8:8 + n]), raw[8 + n:]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def assert_loads_cleanly_or_names_the_file(path: Path) -> None:
    try:
        tf = TensorFile(path)
        for name, shape in tf.shapes.items():
            t = tf.read(name)
            assert tuple(t.shape) == shape
    except WdaError as err:
        text = str(err)
        assert text.startswith(f"{path}: "), text
        assert "\n" not in text and len(text) < 600, text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**65, 2**65) | st.just(10**400) | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=8)


def with_header(header: dict, data: bytes, pad: int = 0) -> bytes:
    raw = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + data


@FUZZ
@given(data=st.data())
def test_fuzzed_header_fields(valid, scratch, data):
    """One field of one entry (or the metadata) replaced by an arbitrary JSON value, or dropped."""
    _, header, body = valid
    h = json.loads(json.dumps(header))
    key = data.draw(st.sampled_from(sorted(h)))
    if key == "__metadata__" or data.draw(st.booleans()):
        h[key] = data.draw(json_values)
    else:
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if data.draw(st.booleans()):
            del h[key][field]
        else:
            h[key][field] = data.draw(st.one_of(
                json_values,
                st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3"]),
                st.lists(st.integers(-1, 2**64), max_size=4)))
    p = scratch / "fields.safetensors"
    p.write_bytes(with_header(h, body, pad=data.draw(st.integers(0, 7))))
    assert_loads_cleanly_or_names_the_file(p)


@FUZZ
@given(data=st.data())
def test_fuzzed_header_bytes(valid, scratch, data):
    """Random bytes overwritten in the length prefix or the JSON header."""
    raw, header, body = valid
    n_head = len(raw) - len(body)
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        b[data.draw(st.integers(0, n_head - 1))] = data.draw(st.integers(0, 255))
    p = scratch / "bytes.safetensors"
    p.write_bytes(bytes(b))
    assert_loads_cleanly_or_names_the_file(p)


@FUZZ
@given(data=st.data())
def test_fuzzed_length_prefix_truncation_and_padding(valid, scratch, data):
    raw, _, _ = valid
    how = data.draw(st.sampled_from(["prefix", "cut", "append"]))
    if how == "prefix":
        blob = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + raw[8:]
    elif how == "cut":
        blob = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        blob = raw + data.draw(st.binary(min_size=1, max_size=64))
    p = scratch / "length.safetensors"
    p.write_bytes(blob)
    assert_loads_cleanly_or_names_the_file(p)
    if how != "prefix":  # any size other than the header's is caught when the file is opened
        with pytest.raises(WdaError, match="not a readable safetensors file"):
            TensorFile(p)


@FUZZ
@given(data=st.data())
def test_fuzzed_checkpoint_folder(valid, scratch, data):
    """Through Checkpoint (what discovery opens): the same clean error, naming the file."""
    raw, header, body = valid
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        b[data.draw(st.integers(0, len(raw) - len(body) - 1))] = data.draw(st.integers(0, 255))
    folder = scratch / "checkpoint-1"
    folder.mkdir(exist_ok=True)
    p = folder / "model.safetensors"
    p.write_bytes(bytes(b))
    try:
        ck = open_checkpoint(folder)
        for name in ck.shapes:
            ck.read(name)
    except WdaError as err:
        assert str(err).startswith(f"{p}: ") and "\n" not in str(err)


@pytest.fixture(scope="module")
def valid_bin(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("bin") / "pytorch_model.bin"
    torch.save({k: v for k, v in TENSORS.items()}, p)
    return p.read_bytes()


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_fuzzed_bin_files(valid_bin, scratch, data):
    b = bytearray(valid_bin)
    if data.draw(st.booleans()):
        b = b[: data.draw(st.integers(0, len(b) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    p = scratch / "pytorch_model.bin"
    p.write_bytes(bytes(b))
    assert_loads_cleanly_or_names_the_file(p)


CONFIG_FIELDS = ["r", "lora_alpha", "use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern",
                 "alpha_pattern", "peft_type"]
# Values a hand-edited config plausibly holds, where a lenient parser goes wrong quietly.
edge_values = st.sampled_from([float("nan"), float("inf"), -float("inf"), 10**400, 0, -1, 4.5, 4.0, True,
                               "4", "false", None, [], {}, 2**70])
patterns = st.dictionaries(st.sampled_from(["q_proj", "q_proj(", "[", "*", "layers\\.0\\..*", ""]),
                           st.one_of(st.integers(1, 16), edge_values), min_size=1, max_size=2)


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_fuzzed_adapter_configs(scratch, data):
    """Arbitrary values in the fields that decide the merge: accepted only when they are
    what PEFT writes (a positive integer rank, finite alpha, real booleans), else a
    clean error naming adapter_config.json."""
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": False}
    for field in data.draw(st.lists(st.sampled_from(CONFIG_FIELDS), min_size=1, max_size=3, unique=True)):
        if data.draw(st.booleans()):
            cfg.pop(field, None)
        else:
            cfg[field] = data.draw(st.one_of(patterns, edge_values, json_values) if "pattern" in field
                                   else st.one_of(edge_values, json_values))
    p = scratch / "adapter_config.json"
    p.write_text(json.dumps(cfg) if data.draw(st.integers(0, 9)) else json.dumps(cfg)[:-3])
    try:
        got = AdapterConfig.from_file(p)
    except WdaError as err:
        assert str(err).startswith(f"{p}: ") and "\n" not in str(err)
        return
    assert isinstance(got.r, int) and not isinstance(got.r, bool) and got.r > 0
    assert isinstance(got.use_dora, bool) and got.lora_alpha == got.lora_alpha  # not NaN
    for module in ("model.layers.0.q_proj", "v_proj"):
        s = got.scaling(module)  # patterns were checked: no re.error, no ZeroDivisionError
        assert s == s and abs(s) != float("inf")


@settings(FUZZ, max_examples=100)
@given(rank_pattern=patterns, alpha_pattern=patterns, rslora=st.booleans())
def test_fuzzed_rank_and_alpha_patterns(scratch, rank_pattern, alpha_pattern, rslora):
    """Per-module patterns are regular expressions (PEFT's get_pattern_key): a bad one is a
    clean error when the config is read, never a re.error while measuring."""
    p = scratch / "adapter_config.json"
    p.write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": rslora,
                             "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}))
    try:
        got = AdapterConfig.from_file(p)
    except WdaError as err:
        assert str(err).startswith(f"{p}: ") and "\n" not in str(err)
        return
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "lm_head"):
        s = got.scaling(module)
        assert s == s and abs(s) != float("inf") and got.rank(module) > 0
