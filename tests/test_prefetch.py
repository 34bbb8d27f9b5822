"""The read-ahead (``wda.analysis.prefetch.prefetched``): items in order, never more read
ahead than its limits, errors handed over, and a reader that had to stop for room reads a
burst once half of it is free (not one item per item taken)."""

from __future__ import annotations

import threading
import time

import pytest

from wda.analysis.prefetch import prefetched
from wda.errors import WdaError


def _run(n: int, depth: int, size, pause: float = 0.004, read=None):
    taken = [0]
    ahead_at_read: list[int] = []
    lock = threading.Lock()

    def default_read(i):
        with lock:
            ahead_at_read.append(len(ahead_at_read) - taken[0])  # read before, not yet taken
        return i * 10

    out = []
    for it, data in prefetched(list(range(n)), read or default_read, depth, size):
        out.append((it, data))
        time.sleep(pause)  # a measuring side slower than the reader
        with lock:
            taken[0] += 1
    return out, ahead_at_read


@pytest.mark.parametrize("depth", [2, 4, 8])
def test_items_come_in_order_and_never_more_than_depth_ahead(depth):
    out, ahead = _run(40, depth, lambda i: 1 << 20)
    assert out == [(i, i * 10) for i in range(40)]
    assert max(ahead) < depth + 1  # at most ``depth`` read and not taken, this one included


def test_a_stopped_reader_starts_again_when_half_the_room_is_free():
    depth = 8
    _, ahead = _run(60, depth, lambda i: 1 << 20)
    later = ahead[depth:]  # once the queue has been full
    # it resumes with at most depth // 2 waiting (the one being taken still counted here),
    # then fills up again: a burst, not one read for each item taken (that would start every
    # read with the queue all but full)
    assert min(later) <= depth // 2
    assert sum(a >= depth - 1 for a in later) < len(later) // 2


def test_small_items_and_errors_are_handed_over():
    def read(i):
        if i == 3:
            raise WdaError(None, "bad item")
        return i

    out, _ = _run(10, 2, lambda i: 0, pause=0.0, read=read)
    assert [it for it, _ in out] == list(range(10))
    assert isinstance(out[3][1], WdaError) and [d for _, d in out if not isinstance(d, WdaError)] == \
        [0, 1, 2, 4, 5, 6, 7, 8, 9]
