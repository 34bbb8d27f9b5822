"""The safetensors reader (header parsed by wda, tensors read with ``pread`` or mapped)
returns exactly the bytes the ``safetensors`` package returns, for every dtype, sharded
files and edge shapes; bad or truncated files give one WdaError line naming the file; read
buffers are pooled and never reused while something still refers to them; a mapped tensor's
mapping goes with its last view."""

from __future__ import annotations

import errno
import gc
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import wda.analysis.buffers
import wda.formats.tensors
from wda.analysis.buffers import BufferPool
from wda.errors import WdaError
from wda.formats import HandleCache, open_checkpoint
from wda.formats.tensors import SAFETENSORS_BITS, TensorFile

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.uint16, torch.uint32,
          torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2]


def _random(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bits of ``dtype`` (every bit pattern of the format, NaN payloads included)."""
    n = 1
    for d in shape:
        n *= d
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))


def _reference(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory) -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t.{str(d).removeprefix('torch.')}": _random((3, 5), d, gen) for d in DTYPES}
    tensors["zero.rows"] = torch.empty(0, 7)
    tensors["scalar"] = torch.tensor(2.5)
    tensors["z.last"] = _random((17,), torch.bfloat16, gen)  # odd length, at the end of the file
    p = tmp_path_factory.mktemp("dtypes") / "model.safetensors"
    save_file(tensors, str(p), metadata={"format": "pt"})
    return p


def test_every_dtype_reads_the_bytes_safetensors_reads(every_dtype):
    ref = _reference(every_dtype)
    tf = TensorFile(every_dtype)
    assert tf.shapes == {k: tuple(v.shape) for k, v in ref.items()}
    with safe_open(str(every_dtype), framework="pt") as f:
        assert {k: tf.dtype(k) for k in ref} == {k: f.get_slice(k).get_dtype() for k in ref}
    got = tf.read_many(list(ref))
    for k, v in ref.items():
        assert _same_bytes(got[k], v), k
        assert _same_bytes(tf.read(k), v), k


def _mappings_of(path: Path) -> int:
    with open("/proc/self/maps") as f:
        return sum(line.rstrip().endswith(str(path.resolve())) for line in f)


needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux only")


@needs_proc_maps
def test_mapped_reads_give_the_bytes_and_let_go_of_the_pages(every_dtype):
    ref, tf = _reference(every_dtype), TensorFile(every_dtype)
    before = _mappings_of(every_dtype)  # (the reference's own, if any)
    got = tf.read_many(list(ref), mapped=True)
    for k, v in ref.items():
        assert _same_bytes(got[k], v), k
    assert _mappings_of(every_dtype) - before == sum(v.numel() > 0 for v in ref.values())  # one each
    view = got["t.bfloat16"][1:].t()  # a view keeps its mapping, and only its own
    del got
    gc.collect()
    assert _mappings_of(every_dtype) - before == 1
    assert _same_bytes(view, ref["t.bfloat16"][1:].t())
    del view
    gc.collect()
    assert _mappings_of(every_dtype) == before


def test_a_page_that_cannot_be_read_is_one_error_line(every_dtype, monkeypatch):
    """MADV_POPULATE_READ failing (an I/O error, a file cut short under the mapping) is a
    WdaError naming the file and the tensor, never a SIGBUS on first touch."""
    monkeypatch.setattr(wda.formats.tensors, "populate_read", lambda addr, n: errno.EIO)
    with pytest.raises(WdaError) as err:
        TensorFile(every_dtype).read_many(["t.float32"], mapped=True)
    assert str(every_dtype) in str(err.value) and "t.float32" in str(err.value)


def test_without_the_advice_reads_fall_back_to_pread(every_dtype, monkeypatch):
    """A kernel without MADV_POPULATE_READ (EINVAL, Linux < 5.14): the same bytes, copied."""
    monkeypatch.setattr(wda.formats.tensors, "populate_read", lambda addr, n: errno.EINVAL)
    monkeypatch.setattr(wda.formats.tensors, "_can_map", True)
    ref = _reference(every_dtype)
    got = TensorFile(every_dtype).read_many(list(ref), mapped=True)
    assert all(_same_bytes(got[k], v) for k, v in ref.items())
    assert wda.formats.tensors._can_map is False


def test_the_tensor_at_the_end_of_the_file(every_dtype):
    tf = TensorFile(every_dtype)
    last = max(tf._entries, key=lambda k: tf._entries[k][3])
    assert tf._entries[last][3] == every_dtype.stat().st_size
    assert _same_bytes(tf.read(last), _reference(every_dtype)[last])


def test_pooled_reads_give_the_same_bytes(every_dtype, monkeypatch):
    monkeypatch.setattr(wda.analysis.buffers, "POOLED_MIN", 0)
    ref, pool, counts = _reference(every_dtype), BufferPool(keep=len(_reference(every_dtype))), []
    for _ in range(3):  # the same buffers again and again
        got = TensorFile(every_dtype).read_many(list(ref), pool.take)
        for k, v in ref.items():
            assert _same_bytes(got[k], v), k
        del got
        counts.append(pool.allocated)
    assert counts[0] <= len(ref) and counts == [counts[0]] * 3


def test_sharded_checkpoint_reads_every_shard(tmp_path):
    gen = torch.Generator().manual_seed(1)
    shards = {"model-00001-of-00002.safetensors": {"a.weight": _random((4, 6), torch.bfloat16, gen)},
              "model-00002-of-00002.safetensors": {"b.weight": _random((6, 4), torch.float32, gen),
                                                   "c.weight": _random((2, 2), torch.float16, gen)}}
    for name, t in shards.items():
        save_file(t, str(tmp_path / name))
    index = {"weight_map": {k: name for name, t in shards.items() for k in t}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ck = open_checkpoint(tmp_path)
    got = ck.read_many(["c.weight", "a.weight", "b.weight"])
    assert list(got) == ["c.weight", "a.weight", "b.weight"]  # in the order asked
    for name, t in shards.items():
        for k, v in _reference(tmp_path / name).items():
            assert _same_bytes(got[k], v) and _same_bytes(ck.read_weight(k[: -len(".weight")]), v)


def test_bin_still_reads(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(2, 2).bfloat16()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ck = open_checkpoint(tmp_path)
    assert ck.holds_data  # a mapped .bin: not kept open by the analysis' cache
    for k, v in sd.items():
        assert _same_bytes(ck.read_many([k])[k], v)


# ---- bad files ------------------------------------------------------------------------------
def _one_line(err: WdaError, path: Path, *words: str) -> None:
    text = str(err)
    assert text.startswith(f"{path}: ") and "\n" not in text, text
    for w in words:
        assert w in text, text


@pytest.mark.parametrize("cut", [0, 4, 8, 20, -1, -7])
def test_truncated_file_is_one_line_naming_it(every_dtype, tmp_path, cut):
    raw = every_dtype.read_bytes()
    p = tmp_path / "model.safetensors"
    p.write_bytes(raw[:cut] if cut >= 0 else raw[:len(raw) + cut])
    with pytest.raises(WdaError) as e:
        TensorFile(p)
    _one_line(e.value, p, "not a readable safetensors file")
    with pytest.raises(Exception) as ref:  # the package refuses it too
        safe_open(str(p), framework="pt")
    assert ref.value is not None


def test_file_cut_short_after_opening_is_one_line(every_dtype, tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(every_dtype.read_bytes())
    tf = TensorFile(p)
    os.truncate(p, p.stat().st_size - 3)
    with pytest.raises(WdaError) as e:
        tf.read("z.last")
    _one_line(e.value, p, "changed on disk")


def test_file_cut_short_under_a_stale_size_is_one_line(every_dtype, tmp_path):
    """Even if the size check were fooled (a file cut, then grown back elsewhere), a short
    read is an error, never stale buffer bytes."""
    p = tmp_path / "model.safetensors"
    p.write_bytes(every_dtype.read_bytes())
    tf = TensorFile(p)
    last = max(tf._entries, key=lambda k: tf._entries[k][3])
    os.truncate(p, tf._entries[last][2] + 1)
    tf._size = p.stat().st_size
    with pytest.raises(WdaError) as e:
        tf.read(last)
    _one_line(e.value, p, "cut short", repr(last))


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize("change", ["gap", "overlap", "size", "dtype", "shape", "offsets", "meta"])
def test_header_checks_agree_with_the_package(every_dtype, tmp_path, change):
    raw = every_dtype.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    k = "t.float32"
    b, e = header[k]["data_offsets"]
    if change == "gap":
        header = {**header, k: {**header[k], "data_offsets": [b + 1, e]}}
    elif change == "overlap":
        header = {**header, k: {**header[k], "data_offsets": [b, e + 4]}}
    elif change == "size":
        header = {**header, k: {**header[k], "shape": [3, 4]}}
    elif change == "dtype":
        header = {**header, k: {**header[k], "dtype": "F33"}}
    elif change == "shape":
        header = {**header, k: {**header[k], "shape": [3, -5]}}
    elif change == "offsets":
        header = {**header, k: {**header[k], "data_offsets": [b]}}
    else:
        header = {**header, "__metadata__": {"format": 1}}
    p = tmp_path / "model.safetensors"
    p.write_bytes(_with_header(header, body))
    with pytest.raises(WdaError) as err:
        TensorFile(p)
    _one_line(err.value, p, "not a readable safetensors file")
    with pytest.raises(Exception):
        safe_open(str(p), framework="pt")


def test_every_dtype_of_the_format_is_sized():
    for name, bits in SAFETENSORS_BITS.items():
        assert bits in (4, 6, 8, 16, 32, 64), name


# ---- buffer pool ------------------------------------------------------------------------------
def test_pool_reuses_a_buffer_once_nothing_refers_to_it(monkeypatch):
    monkeypatch.setattr(wda.analysis.buffers, "POOLED_MIN", 0)
    pool = BufferPool()
    a = pool.take(1000)
    ptr = a.data_ptr()
    view = a.view(torch.int16)[3:].reshape(-1, 1)  # a view keeps it in use
    del a
    b = pool.take(1000)
    assert b.data_ptr() != ptr and pool.allocated == 2
    del view
    c = pool.take(900)  # same buffer, now free
    assert c.data_ptr() == ptr and pool.allocated == 2 and pool.in_use() == 2
    del b, c
    assert pool.in_use() == 0


def test_pool_does_not_hand_a_big_buffer_to_a_small_tensor(monkeypatch):
    monkeypatch.setattr(wda.analysis.buffers, "POOLED_MIN", 0)
    pool = BufferPool()
    big = pool.take(1 << 20)
    ptr = big.data_ptr()
    del big
    small = pool.take(1000)
    assert small.data_ptr() != ptr
    assert pool.take(1 << 20).data_ptr() == ptr


def test_pool_keeps_a_bounded_number_of_spare_buffers(monkeypatch):
    monkeypatch.setattr(wda.analysis.buffers, "POOLED_MIN", 0)
    pool = BufferPool(keep=3)
    for size in range(1, 40):  # ever larger sizes: none fits the previous ones
        pool.take(size * 10_000)
    assert len(pool) <= 4 and pool.in_use() == 0


def test_handle_cache_keeps_headers_not_mappings(every_dtype, tmp_path):
    """Safetensors checkpoints stay open (headers only); .bin ones (mapped) at most ``size``."""
    bins = [tmp_path / "b1", tmp_path / "b2"]
    for b in bins:
        b.mkdir()
        torch.save({"w.weight": torch.randn(2, 2)}, b / "pytorch_model.bin")
    cache = HandleCache(size=1)
    st = cache.get(every_dtype.parent)
    b1 = cache.get(bins[0])
    assert cache.get(bins[0]) is b1
    cache.get(bins[1])  # evicts b1
    assert cache.get(bins[0]) is not b1
    assert cache.get(every_dtype.parent) is st


# ---- headers: parsed and checked once per distinct header ---------------------------------------
def test_a_runs_shared_header_is_parsed_and_checked_once(tmp_path, monkeypatch):
    """Checkpoints with the same header share one parse and one round of header checks; a
    checkpoint with another header (here a wrong shape) is still checked and named."""
    import wda.formats.tensors as tensors
    import wda.analysis.layout as layout

    def save(d: Path, shape=(8, 8), seed=0):
        d.mkdir(parents=True)
        g = torch.Generator().manual_seed(seed)
        save_file({f"model.layers.{i}.self_attn.{m}.weight": torch.randn(*shape, generator=g)
                   for i in range(2) for m in ("q_proj", "v_proj")}, str(d / "model.safetensors"))

    save(tmp_path / "base")
    for s in range(1, 7):
        save(tmp_path / "ft" / f"checkpoint-{s}", seed=s)
    parsed, checked = [], []
    real_parse, real_check = TensorFile._parse_header, layout._check_module
    monkeypatch.setattr(TensorFile, "_parse_header", lambda self, *a: parsed.append(self.path) or real_parse(self, *a))
    monkeypatch.setattr(layout, "_check_module", lambda ck, m, run: checked.append(ck.path) or real_check(ck, m, run))
    tensors._HEADERS.clear()
    lay = layout.discover(tmp_path)
    assert sum(len(r.steps) for r in lay.runs) == 6
    assert len(parsed) == 1  # base and the six checkpoints: one header
    assert len(checked) == len(lay.modules)  # the first checkpoint's modules; the rest share its header
    (tmp_path / "ft" / "checkpoint-4" / "model.safetensors").unlink()
    (tmp_path / "ft" / "checkpoint-4").rmdir()
    save(tmp_path / "ft" / "checkpoint-4", shape=(8, 4))
    with pytest.raises(WdaError) as e:
        layout.discover(tmp_path)
    _one_line(e.value, tmp_path / "ft" / "checkpoint-4" / "model.safetensors", "has shape (8, 4)")
