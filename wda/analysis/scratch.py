"""Work buffers kept from call to call: on a CPU a fresh tensor of a few MB is new pages to
fault in (the allocator hands such sizes back to the system when freed), which for the
matrices of a small model costs as much as the arithmetic done in them. Each thread keeps its
own buffers, by name: two analyses in two threads never share one. On other devices a buffer
is a fresh tensor: their caching allocators already reuse the memory.

A buffer's contents are whatever its last user left, and it is valid until the next call
with the same name in the same thread: callers use it within one step of their own and never
hand it out. ``release`` lets go of a thread's buffers (``engine.run_analysis`` does at its
end), so that nothing outlives the analysis that made it.
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

import torch

_LOCAL = threading.local()


def buffer(name: str, shape: Sequence[int], dtype: torch.dtype,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """A contiguous tensor of ``shape`` over the buffer this thread keeps under ``name``
    (grown as needed)."""
    if (device.type if isinstance(device, torch.device) else torch.device(device).type) != "cpu":
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    n = math.prod(shape)
    buf = getattr(_LOCAL, name, None)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        setattr(_LOCAL, name, buf)
    return buf[:n].view(tuple(shape))


def release() -> None:
    """Let go of this thread's buffers (an analysis, done: up to ~0.2 GB at 8192² widths)."""
    _LOCAL.__dict__.clear()
