"""Read-ahead for the streaming engine: the next matrices' tensors are made ready in a
background thread while the current ones are measured.

The thread reads the tensors (``pread`` into buffers, or for a memory-mapped file it faults
the pages in: the disk read happens there, with the GIL released); for CUDA it copies them
from pinned memory onto the device on its own stream and records an event the measuring
side waits on.
"""

from __future__ import annotations

import errno
import mmap
import queue
import threading
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from wda.errors import WdaError
from wda.formats.tensors import populate_read

T = TypeVar("T")
# Small items (size 0: adapter factors) read ahead beyond the large ones: about one batch of a
# matrix's adapters (the engine measures up to 1024 factor columns together, 64 checkpoints of
# rank 16), so that reading the next batch overlaps this one's GEMM. (16 left the measuring
# side waiting a fifth of a 768² LoRA run.)
ADAPTERS_AHEAD = 64
LARGE_AHEAD_MAX = 32  # large items read ahead at most, however small they are


def prefetched(items: Sequence[T], read: Callable[[T], object], depth: int,
               size: Callable[[T], int], budget: int = 0) -> Iterator[tuple[T, object]]:
    """Yield ``(item, read(item))`` in order, reading ahead in a thread. Large items (``size``:
    their bytes, > 0) are read ahead while fewer than ``depth`` are waiting, and beyond that
    (up to ``LARGE_AHEAD_MAX``) while the bytes waiting stay within ``budget``; small ones
    (size 0) up to ``ADAPTERS_AHEAD``; a reader that had to stop for room starts again once
    half of it is free. A ``WdaError`` raised by ``read`` is yielded in place of
    the data (the caller decides whether to skip); any other exception is re-raised in the
    caller's thread, so a bug stays a bug."""
    if depth <= 0:
        for it in items:
            try:
                yield it, read(it)
            except WdaError as err:
                yield it, err
        return
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    room = threading.Condition()
    waiting = [0, 0, 0]  # large items, their bytes, small items: read (or being read), not yet taken
    blocked: list[int | None] = [None]  # the size of the item the reader waits to have room for

    def fits(n: int, half: bool = False) -> bool:
        """Room for an item of ``n`` bytes; with ``half``, while no more than half the limits
        are used (a reader that had to stop starts again only then, and reads a burst: one
        wake-up, and one hand-over of the GIL, per half-full queue instead of per item)."""
        share = 2 if half else 1
        if n == 0:
            return waiting[2] < ADAPTERS_AHEAD // share
        return waiting[0] < max(1, depth // share) or (
            waiting[0] < LARGE_AHEAD_MAX // share and waiting[1] + n <= budget // share)

    def count(n: int, sign: int) -> None:
        if n:
            waiting[0] += sign
            waiting[1] += sign * n
        else:
            waiting[2] += sign

    def reader() -> None:
        for it in items:
            n = size(it)
            with room:
                if not fits(n):
                    blocked[0] = n
                    while not fits(n, half=True):
                        if stop.is_set():
                            return
                        room.wait(0.05)
                    blocked[0] = None
                count(n, 1)
            if stop.is_set():
                return
            try:
                data = read(it)
            except WdaError as err:
                data = err
            except BaseException as exc:  # hand it over: never leave the consumer waiting
                data = _Crash(exc)
            q.put((it, data))

    t = threading.Thread(target=reader, daemon=True, name="wda-reader")
    t.start()
    try:
        for _ in items:
            it, data = q.get()
            with room:
                count(size(it), -1)
                if blocked[0] is not None and fits(blocked[0], half=True):
                    room.notify()
            if isinstance(data, _Crash):
                raise data.exc
            yield it, data
    finally:
        stop.set()
        t.join()


class _Crash:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def stage(tensors: dict[str, torch.Tensor], dev: torch.device, stream=None, mapped: bool = True):
    """Tensors ready to measure: pages resident (CPU), or copied to ``dev`` on ``stream``.
    ``mapped``: the tensors may be views of a memory-mapped file (their pages are faulted in
    here); tensors read into memory need nothing. Returns ``(tensors, event)``; the event
    (CUDA only) marks the end of the copies."""
    if mapped:
        for v in tensors.values():
            populate(v)
    if dev.type != "cuda":
        return tensors, None
    stream = stream or torch.cuda.current_stream(dev)
    with torch.cuda.device(dev), torch.cuda.stream(stream):
        # pinned staging (the caching host allocator reuses these blocks once the copy is
        # done), then an asynchronous host-to-device copy on the reader's stream
        tensors = {k: v.pin_memory().to(dev, non_blocking=True) for k, v in tensors.items()}
        ready = torch.cuda.Event()
        ready.record(stream)
    return tensors, ready


def populate(t: torch.Tensor) -> None:
    """Bring the pages under ``t`` into memory now. For a memory-mapped tensor this is where
    the file is read; for one already in memory it costs nothing. Never changes data.
    Raises OSError when the pages cannot be read (I/O error, file truncated under us):
    touching them instead would kill the process with SIGBUS."""
    n = t.numel() * t.element_size()
    if n == 0 or t.device.type != "cpu":
        return
    err = populate_read(t.data_ptr(), n)
    if err in (errno.EFAULT, errno.EIO):
        raise OSError(err, "cannot read the mapped pages")
    if err and t.is_contiguous():  # older kernel (EINVAL), not Linux: touch one byte per page
        t.reshape(-1).view(torch.uint8)[::mmap.PAGESIZE].max()
