"""Reusable byte buffers for the tensors the analysis reads.

A tensor read from a file needs memory; allocating it anew for each (matrix, checkpoint)
costs a page fault per 4 KiB on first touch (as much as the copy itself for small matrices)
and lets the allocator's footprint drift. ``BufferPool.take(nbytes)`` hands out a tensor
backed by a pooled buffer instead. A buffer is free again once nothing refers to it: the
tensors handed out (and every view of them) hold it through their storage, so a buffer is
never reused while anything can still see its bytes, and the pool never holds more buffers
than were alive at once (plus ``keep`` spare ones).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

POOLED_MIN = 64 * 1024  # smaller tensors come from the ordinary allocator (no page faults to save)
_ROUND = 4096


def _refs(buffers: list[np.ndarray], i: int) -> int:
    return sys.getrefcount(buffers[i])


class BufferPool:
    """Byte buffers reused across reads: ``take(n)`` returns a uint8 CPU tensor of ``n`` bytes."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep  # free buffers kept beyond those in use
        self._bufs: list[np.ndarray] = []
        probe = [np.empty(0, np.uint8)]
        self._idle = _refs(probe, 0)  # the count of a buffer only the pool refers to
        self.allocated = 0  # buffers created (a measure of reuse)

    def __len__(self) -> int:
        return len(self._bufs)

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes < POOLED_MIN or nbytes == 0:
            return torch.empty(nbytes, dtype=torch.uint8)
        best, free = -1, []
        for i in range(len(self._bufs)):  # (no local name for a buffer: it would count as a use)
            if _refs(self._bufs, i) == self._idle:
                free.append(i)
                size = self._bufs[i].nbytes
                # a buffer at most twice the size: a small tensor does not take a large one
                if nbytes <= size <= 2 * nbytes + _ROUND and (best < 0 or size < self._bufs[best].nbytes):
                    best = i
        if best < 0:
            if len(free) >= self.keep:  # make room: drop the smallest spare buffer
                del self._bufs[min(free, key=lambda i: self._bufs[i].nbytes)]
            self._bufs.append(np.empty(-(-nbytes // _ROUND) * _ROUND, np.uint8))
            self.allocated += 1
            best = len(self._bufs) - 1
        # a new storage over the buffer: it holds the array until its last view is gone
        return torch.from_numpy(self._bufs[best])[:nbytes]

    def in_use(self) -> int:
        """Buffers something still refers to."""
        return sum(_refs(self._bufs, i) != self._idle for i in range(len(self._bufs)))
