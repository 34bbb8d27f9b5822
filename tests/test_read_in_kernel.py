"""Full-weight checkpoints left in their files and read by the row kernel itself
(``kernels.row_dots_read``, ``TensorFile.stored``): the same sums as the in-memory kernel, bit
for bit; Eqs. 3-4 end to end against float64; rows the closed form hands over read back;
an unreadable checkpoint is one error naming it; no descriptor left open."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import wda
from wda.analysis import engine, kernels
from wda.analysis.decompose import BaseWeight
from wda.errors import WdaError
from wda.formats.tensors import TensorFile, _cached_pages

from builders import plain_reference, save_full

pytestmark = pytest.mark.skipif(not kernels.available() or os.name != "posix",
                                reason="needs numba and pread")
_core_to_read_on = engine._core_to_read_on


@pytest.fixture(autouse=True)
def _kernel_reads(monkeypatch):
    """The row kernel reads the checkpoints itself, as when every core measures, whatever the
    threads of the machine running the tests (the test of the choice sets its own)."""
    monkeypatch.setattr(engine, "_core_to_read_on", lambda: False)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("base", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block", [None, 1, 5000])  # default; one row per read; an uneven block
def test_sums_read_from_files_equal_the_in_memory_kernel(tmp_path, monkeypatch, stored, base, threads, block):
    g = torch.Generator().manual_seed(1)
    rows, cols = 83, 300 + 17  # odd sizes: partial vectors and a partial last block
    u = torch.randn(rows, cols, generator=g).to(base)
    vs = [(u.double() + 0.01 * (k + 1) * torch.randn(rows, cols, generator=g, dtype=torch.float64)).to(stored)
          for k in range(5)]
    vs[2][7] = 0.0  # a zero row in a checkpoint
    p = tmp_path / "model.safetensors"
    save_file({f"v{k}": v for k, v in enumerate(vs)}, str(p))
    if block is not None:
        monkeypatch.setattr(kernels, "_READ_BLOCK_BYTES", block)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    tf = TensorFile(p)
    files = [(os.open(p, os.O_RDONLY), tf._entries[f"v{k}"][2]) for k in range(5)]
    try:
        for dtype in (torch.float32, torch.float64):
            ud, dd2 = torch.empty(5, rows, dtype=dtype), torch.empty(5, rows, dtype=dtype)
            assert kernels.row_dots_read(u, files, stored, ud, dd2) == -1
            ref_ud, ref_dd2 = torch.empty_like(ud), torch.empty_like(dd2)
            kernels.row_dots(u, vs, ref_ud, ref_dd2)
            assert torch.equal(ud, ref_ud) and torch.equal(dd2, ref_dd2)
            d = torch.stack(vs).double() - u.double()  # and the sums are the sums
            assert torch.allclose(dd2.double(), (d * d).sum(2), rtol=1e-5)
    finally:
        for fd, _ in files:
            os.close(fd)


def test_the_checkpoint_that_cannot_be_read_is_named(tmp_path):
    g = torch.Generator().manual_seed(2)
    u = torch.randn(40, 64, generator=g)
    p = tmp_path / "model.safetensors"
    save_file({"a": u + 1, "b": u - 1}, str(p))
    tf = TensorFile(p)
    fd = os.open(p, os.O_RDONLY)
    try:
        ud, dd2 = torch.empty(3, 40), torch.empty(3, 40)
        ok = [(fd, tf._entries["a"][2]), (fd, tf._entries["b"][2])]
        size = p.stat().st_size
        assert kernels.row_dots_read(u, ok + [(fd, size - 100)], torch.float32, ud, dd2) == 2  # runs past the end
        assert kernels.row_dots_read(u, [ok[0], (-1, 0), (-1, 0)], torch.float32, ud, dd2) == 1  # no such file
        assert kernels.row_dots_read(u, ok, torch.float32, ud[:2], dd2[:2]) == -1
    finally:
        os.close(fd)
    with pytest.raises(ValueError):
        kernels.row_dots_read(u, ok, torch.int8, ud, dd2)


def test_a_file_cut_short_under_the_kernel_is_one_error_naming_it(tmp_path):
    """The size checks fooled (the file cut after it was opened): the kernel's short read
    becomes the reader's own one-line error, never sums of missing bytes."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(300, 256, generator=g)
    p = tmp_path / "model.safetensors"
    save_file({"w": w0 + 0.1}, str(p))
    st = TensorFile(p).stored("w")
    os.truncate(p, p.stat().st_size - 1000)
    with pytest.raises(WdaError) as e:
        BaseWeight(w0).measure_many([st])
    assert str(p) in str(e.value) and "cut short" in str(e.value) and "\n" not in str(e.value)
    st.close()


def _wide_llama(seed: int):
    """q_proj 384x384 and v_proj 96x384: matrices of a real model's size in bytes (the suite reads
    every size the same way: ``MAPPED_MIN`` is 0 in conftest)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=384, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, vocab_size=32, max_position_embeddings=16)
    return LlamaForCausalLM(cfg).eval()


def _run(d: Path, dtype: torch.dtype, steps=(1, 2, 3, 4, 5)) -> dict:
    """base + an FT run; rows of q_proj that the closed form hands over to the residual form
    (rescaled, sign-flipped, zeroed, unchanged) at every step. Returns {step: state dict}."""
    model = _wide_llama(0).to(dtype)
    save_full(model, d / "base")
    g = torch.Generator().manual_seed(5)
    m, out = copy.deepcopy(model), {}
    with torch.no_grad():
        for step in steps:
            for n, p in m.named_parameters():
                if p.dim() == 2:
                    p.add_((0.01 * torch.randn(p.shape, generator=g)).to(dtype))
            w = m.model.layers[0].self_attn.q_proj.weight
            w0 = model.model.layers[0].self_attn.q_proj.weight
            w[1] = 1.5 * w0[1]
            w[2] = -2.0 * w0[2]
            w[3] = 0.0
            w[4] = w0[4]
            m.save_pretrained(d / "ft" / f"checkpoint-{step}")
            out[step] = {k: v.detach().clone() for k, v in m.state_dict().items()}
    return {"base": model.state_dict(), **out}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_analysis_read_in_the_kernel_matches_float64_and_the_in_memory_path(tmp_path, monkeypatch, dtype):
    states = _run(tmp_path, dtype)
    calls = []
    real = kernels.row_dots_read

    def spy(u, files, *a):
        calls.append(len(files))
        return real(u, files, *a)

    monkeypatch.setattr(kernels, "row_dots_read", spy)
    df = wda.analyze(tmp_path, progress=False)
    assert calls == [5] * 4  # q_proj and v_proj of both layers, every step, read by the kernel
    for row in df.itertuples():
        key = f"{row.module}.weight"
        dm, dd, excluded = plain_reference(states["base"][key], states[row.step][key])
        assert row.delta_m == pytest.approx(dm, rel=1e-5)
        assert row.delta_d == pytest.approx(dd, rel=1e-4, abs=1e-9)
        assert row.n_excluded == excluded
    # the same table from the tensors read into memory (mapped), exactly
    monkeypatch.setattr(TensorFile, "stored", lambda self, name, files=None: None)
    calls.clear()
    again = wda.analyze(tmp_path, progress=False)
    assert not calls
    cols = ["run", "step", "module", "delta_m", "delta_d", "n_vectors", "n_excluded"]
    assert df[cols].equals(again[cols])


@pytest.mark.parametrize("threads, cores, in_kernel", [(1, 2, False), (1, 1, True), (2, 2, True), (2, 8, True)])
def test_one_thread_measuring_beside_a_free_core_reads_ahead_instead_and_measures_the_same(
        tmp_path, monkeypatch, threads, cores, in_kernel):
    """With one measuring thread and a core free, the reader thread maps the checkpoints (the
    kernel reads none itself); otherwise the kernel reads them. The same table either way."""
    states = _run(tmp_path, torch.bfloat16, steps=(1, 2, 3))
    cols = ["run", "step", "module", "delta_m", "delta_d", "n_vectors", "n_excluded"]
    kernel_read = wda.analyze(tmp_path, progress=False)[cols]
    calls = []
    real = kernels.row_dots_read
    monkeypatch.setattr(kernels, "row_dots_read", lambda u, files, *a: (calls.append(len(files)), real(u, files, *a))[1])
    monkeypatch.setattr(engine, "_core_to_read_on", _core_to_read_on)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        df = wda.analyze(tmp_path, progress=False)
    finally:
        torch.set_num_threads(before)
    assert calls == ([3] * 4 if in_kernel else [])
    assert df[cols].equals(kernel_read)
    for row in df.itertuples():
        key = f"{row.module}.weight"
        dm, dd, excluded = plain_reference(states["base"][key], states[row.step][key])
        assert row.delta_m == pytest.approx(dm, rel=1e-5)
        assert row.delta_d == pytest.approx(dd, rel=1e-4, abs=1e-9)


def test_no_descriptor_is_left_open(tmp_path):
    _run(tmp_path, torch.float32, steps=(1, 2, 3))
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("no /proc/self/fd")
    wda.analyze(tmp_path, progress=False)  # warm (imports, caches)
    before = len(list(fd_dir.iterdir()))
    wda.analyze(tmp_path, progress=False)
    assert len(list(fd_dir.iterdir())) == before


def test_a_checkpoint_changed_after_discovery_is_skipped_and_named(tmp_path):
    _run(tmp_path, torch.float32, steps=(1, 2, 3))
    skip, stop = engine.AnalysisOptions(progress=False, skip_broken=True), engine.AnalysisOptions(progress=False)
    layouts = skip.discover(tmp_path), stop.discover(tmp_path)
    bad = tmp_path / "ft" / "checkpoint-2" / "model.safetensors"
    os.truncate(bad, bad.stat().st_size - 4096)
    result = engine.run_analysis(tmp_path, skip, layout=layouts[0])
    assert sorted(result.metrics.step.unique()) == [1, 3]
    (why,) = [w for p, w in result.skipped if "checkpoint-2" in str(p)]
    assert str(bad) in why and "\n" not in why
    with pytest.raises(WdaError) as e:
        engine.run_analysis(tmp_path, stop, layout=layouts[1])
    assert str(bad) in str(e.value)


def _resident(path: Path, *offsets: int) -> list[bool]:
    """Whether the pages holding these byte offsets of ``path`` are in the page cache
    (``mincore`` on a mapping that is never touched: unlike a read, it brings nothing in)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        anchor = ctypes.c_char.from_buffer(m)
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0:
                pytest.skip(f"mincore: {os.strerror(ctypes.get_errno())}")
            return [bool(vec[o // mmap.PAGESIZE] & 1) for o in offsets]
        finally:
            del anchor


def _watched_file(tmp_path, monkeypatch):
    """A 1 MB tensor in a file whose pages are all cached, and the read-ahead advice asked
    for it from now on: (path, TensorFile, start, end, asked, the real posix_fadvise)."""
    p = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(512, 512)}, str(p))
    tf = TensorFile(p)
    start, end = tf._entries["w"][2:]
    asked = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: (asked.append(advice), real(fd, off, n, advice)))
    p.read_bytes()  # every page cached
    return p, tf, start, end, asked, real


def test_pages_are_asked_for_ahead_only_when_they_are_not_cached(tmp_path, monkeypatch):
    p, tf, start, end, asked, real = _watched_file(tmp_path, monkeypatch)
    assert all(_resident(p, start, end - 1))
    tf.stored("w").close()
    assert asked == []
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)  # written back, so that its pages can go
        real(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # evicted, where the file system lets it
    finally:
        os.close(fd)
    if all(_resident(p, start, end - 1)):
        pytest.skip("this file system kept the pages: the cold case cannot be made here")
    fd = os.open(p, os.O_RDONLY)
    try:
        counted = _cached_pages(fd, start, end)
    finally:
        os.close(fd)
    if counted is None:  # the fallback probe may read the bytes it probes in before it answers
        pytest.skip("no cachestat in this kernel: whether the probe finds the pages is a race")
    tf.stored("w").close()
    assert asked == [os.POSIX_FADV_WILLNEED]


def test_a_tensor_whose_tail_is_not_cached_is_read_ahead(tmp_path, monkeypatch):
    """The page-cache check looks at a tensor's first and last pages: a cold tail (a file read
    in part) is asked for too."""
    p, tf, start, end, asked, real = _watched_file(tmp_path, monkeypatch)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
        real(fd, end - 8192, 0, os.POSIX_FADV_DONTNEED)  # the last pages only
        counted = _cached_pages(fd, start, end)
    finally:
        os.close(fd)
    if _resident(p, end - 1) != [False] or not _resident(p, start)[0]:
        pytest.skip("this file system kept (or dropped) other pages: the case cannot be made here")
    if counted is None:
        pytest.skip("no cachestat in this kernel")
    tf.stored("w").close()
    assert asked == [os.POSIX_FADV_WILLNEED]


def test_each_checkpoint_file_is_opened_once_per_analysis(tmp_path, monkeypatch):
    """Its descriptor is kept for the analysis (``OpenFiles``), each tensor left in it gets a
    duplicate: one open and size check per file, not per tensor; with room for one file at a
    time, the same table."""
    _run(tmp_path, torch.bfloat16, steps=(1, 2, 3))
    opened = []
    real = TensorFile._opened
    monkeypatch.setattr(TensorFile, "_opened", lambda self: (opened.append(self.path), real(self))[1])
    df = wda.analyze(tmp_path, progress=False)
    ft = [p for p in opened if "checkpoint-" in str(p)]
    assert sorted(ft) == sorted(set(ft)) and len(ft) == 3  # 4 matrices in each, opened once
    assert len(df) == 3 * 4
    import wda.formats.tensors as tensors

    monkeypatch.setattr(tensors, "_fd_budget", lambda: 1)  # every file in turn pushes the last one out
    opened.clear()
    again = wda.analyze(tmp_path, progress=False)
    assert len([p for p in opened if "checkpoint-" in str(p)]) == 3 * 4
    cols = ["run", "step", "module", "delta_m", "delta_d", "n_vectors", "n_excluded"]
    assert df[cols].equals(again[cols])


def test_each_adapter_file_is_opened_once_per_analysis(tmp_path, monkeypatch):
    """The factors of every adapted matrix of a checkpoint come from one descriptor kept for
    the analysis: one open per adapter file, not one per matrix; the table is the same when
    every matrix opens its file again (room for one file, two runs alternating)."""
    from builders import qv_runs

    qv_runs(tmp_path)
    opened = []
    real = TensorFile._opened
    monkeypatch.setattr(TensorFile, "_opened", lambda self: (opened.append(self.path), real(self))[1])
    df = wda.analyze(tmp_path, runs=["lora", "dora"], progress=False)
    adapters = [p for p in opened if p.name == "adapter_model.safetensors"]
    assert len(adapters) == 4 and sorted(adapters) == sorted(set(adapters))  # 2 runs x 2 steps, 4 matrices each
    import wda.formats.tensors as tensors

    monkeypatch.setattr(tensors, "_fd_budget", lambda: 1)
    opened.clear()
    again = wda.analyze(tmp_path, runs=["lora", "dora"], progress=False)
    assert len([p for p in opened if p.name == "adapter_model.safetensors"]) > 4
    cols = ["run", "step", "module", "delta_m", "delta_d", "n_vectors", "n_excluded"]
    assert len(df) == 2 * 2 * 4 and df[cols].equals(again[cols])


def test_no_descriptor_to_spare_is_one_error_naming_the_file(tmp_path, monkeypatch):
    import errno

    _run(tmp_path, torch.float32, steps=(1,))

    def no_room(fd):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "dup", no_room)
    with pytest.raises(WdaError) as e:
        wda.analyze(tmp_path, progress=False)
    assert "checkpoint-1" in str(e.value) and "ulimit" in str(e.value)
