"""``wda.analysis.scratch``: one buffer per (thread, name), reused and grown; the factors put
side by side into one are exactly ``torch.cat``'s."""

from __future__ import annotations

import threading

import torch

from wda.analysis import scratch
from wda.analysis.decompose import _side_by_side


def test_a_name_is_one_buffer_per_thread_reused_and_grown():
    a = scratch.buffer("t_reuse", (4, 8), torch.float32)
    b = scratch.buffer("t_reuse", (2, 16), torch.float32)  # the same 32 elements, another shape
    assert a.data_ptr() == b.data_ptr() and b.shape == (2, 16) and b.is_contiguous()
    c = scratch.buffer("t_reuse", (3, 3), torch.float32)  # smaller: a view of the same buffer
    assert c.data_ptr() == a.data_ptr()
    other = scratch.buffer("t_other", (4, 8), torch.float32)
    assert other.data_ptr() != a.data_ptr()
    big = scratch.buffer("t_reuse", (64, 64), torch.float32)  # grown
    assert big.shape == (64, 64) and scratch.buffer("t_reuse", (4, 8), torch.float32).data_ptr() == big.data_ptr()
    wide = scratch.buffer("t_reuse", (4, 8), torch.float64)  # another dtype: its own buffer
    assert wide.dtype == torch.float64
    seen = []
    t = threading.Thread(target=lambda: seen.append(scratch.buffer("t_reuse", (64, 64), torch.float64).data_ptr()))
    t.start()
    t.join()
    assert seen[0] != scratch.buffer("t_reuse", (64, 64), torch.float64).data_ptr()


def test_factors_side_by_side_in_a_buffer_equal_torch_cat():
    g = torch.Generator().manual_seed(0)
    for dim, shapes in ((0, [(3, 5), (4, 5), (1, 5)]), (1, [(5, 3), (5, 4), (5, 1)])):
        for dtypes in ((torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.bfloat16)):
            ts = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
            want = torch.cat(ts, dim)
            got = _side_by_side(ts, dim, "t_side")
            assert got.dtype == want.dtype and got.is_contiguous() and torch.equal(got, want)
            again = _side_by_side([t * 2 for t in ts], dim, "t_side")  # the buffer is reused
            assert again.data_ptr() == got.data_ptr() and torch.equal(again, 2 * want)
    one = torch.randn(3, 4, generator=g)
    assert _side_by_side([one], 0, "t_side") is one  # one contiguous tensor: no copy


def test_an_analysis_lets_its_buffers_go_and_measures_the_same_again(tmp_path):
    """The adapters' buffers (factors side by side, batched products) are let go when an
    analysis ends; the next one, making them afresh, gives the same table."""
    import wda
    from builders import qv_runs

    qv_runs(tmp_path)
    scratch.buffer("t_left", (4,), torch.float32)  # anything this thread held before
    first = wda.analyze(tmp_path, progress=False)
    assert not vars(scratch._LOCAL)
    again = wda.analyze(tmp_path, progress=False)
    assert (first["method"] != "FT").any() and first.equals(again)


def test_release_lets_go_of_this_threads_buffers_only():
    scratch.buffer("t_mine", (4,), torch.float32)
    held = []
    ready, done = threading.Event(), threading.Event()

    def other():
        scratch.buffer("t_theirs", (4,), torch.float32)
        ready.set()
        done.wait()
        held.append(sorted(vars(scratch._LOCAL)))

    t = threading.Thread(target=other)
    t.start()
    ready.wait()
    scratch.release()
    assert not vars(scratch._LOCAL)
    done.set()
    t.join()
    assert held == [["t_theirs"]]
