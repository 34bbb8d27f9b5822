"""Fused CPU kernels for the hot loop of the analysis (numba): one pass over a checkpoint.

``row_dots(u, v)`` gives, per row n, u_n·δ_n and |δ_n|² with δ = v - u: everything the
closed form of ``BaseWeight`` needs from a full-weight checkpoint. The torch form of the same
sums makes five passes over each block (convert, subtract, norm, multiply, sum); here every
element is loaded once, widened to float64 in registers and summed in float64, so a
4096 x 4096 bf16 checkpoint takes about a quarter of the time (benchmarks/README.md) and the
sums carry no float32 rounding of their own.

Stored dtypes read directly: float32, float64, bfloat16 and float16 (both decoded from their
bits: numba has no 16-bit floats). Rows must be contiguous; callers fall back to torch for
anything else (strided views, other dtypes, GPUs) -- ``supports`` says which. Rows are split
over ``torch.get_num_threads()`` threads (the kernels release the GIL); every row is summed by
one thread in a fixed order, so the result does not depend on the number of threads.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:  # numba is a dependency; without it (an unsupported Python) the torch path is used
    import numba
    from numba import types
    from numba.extending import overload
except ImportError:  # pragma: no cover - exercised only where numba cannot be installed
    numba = None

_CODES = {torch.bfloat16: np.uint16, torch.float16: np.int16,  # bit patterns (see _widen)
          torch.float32: np.float32, torch.float64: np.float64}
# Reassociation (vectorised sums) and contraction (FMA) only: NaN and Inf must survive, as
# the caller's finiteness check is how a broken checkpoint is caught.
_FASTMATH = {"reassoc", "contract", "nsz"}
_MIN_PARALLEL = 1 << 16  # elements: below this, one thread (a thread hand-off costs ~50 us)
_pool: ThreadPoolExecutor | None = None
_pool_threads = 0


def available() -> bool:
    return numba is not None and os.environ.get("WDA_NO_KERNELS", "") in ("", "0")


def supports(*tensors: torch.Tensor) -> bool:
    """True when ``row_dots``/``row_norms`` can take these tensors as they are."""
    return available() and all(
        t.device.type == "cpu" and t.dim() == 2 and t.dtype in _CODES
        and (t.stride(1) == 1 or t.shape[1] <= 1) for t in tensors)


def _array(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (16-bit floats as their bit patterns: no copy)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().view(_CODES[t.dtype])
    return t.numpy()


def _split(rows: int, cols: int, fn) -> None:
    """fn(r0, r1) over row ranges, one per thread."""
    global _pool, _pool_threads
    threads = max(1, min(torch.get_num_threads(), rows, rows * cols // _MIN_PARALLEL))
    if threads == 1:
        fn(0, rows)
        return
    if _pool is None or _pool_threads != threads:
        if _pool is not None:
            _pool.shutdown()
        _pool, _pool_threads = ThreadPoolExecutor(threads, thread_name_prefix="wda-kernel"), threads
    bounds = np.linspace(0, rows, threads + 1).astype(int)
    for f in [_pool.submit(fn, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]:
        f.result()


def row_dots(u: torch.Tensor, v: torch.Tensor, ud: torch.Tensor, dd2: torch.Tensor) -> None:
    """ud[n] = u_n·(v_n - u_n), dd2[n] = |v_n - u_n|², computed and summed in the dtype of
    ``ud``/``dd2`` (1-D float32 or float64) for rows of 2-D CPU tensors of the same shape
    (``supports(u, v)`` must hold)."""
    if u.shape != v.shape:
        raise ValueError(f"shape mismatch: {tuple(u.shape)} vs {tuple(v.shape)}")
    a, b, o1, o2 = _array(u), _array(v), ud.numpy(), dd2.numpy()
    _split(*a.shape, lambda r0, r1: _row_dots(a, b, r0, r1, o1, o2))


def row_norms(u: torch.Tensor, out: torch.Tensor) -> None:
    """out[n] = |u_n| in the dtype of ``out`` (``supports(u)`` must hold)."""
    a, o = _array(u), out.numpy()
    _split(*a.shape, lambda r0, r1: _row_norms(a, r0, r1, o))


if numba is not None:
    def _widen(src, dst):  # dst[:] = src as float (dst: float32 or float64); stub for numba
        raise NotImplementedError

    @overload(_widen, jit_options={"fastmath": _FASTMATH})
    def _widen_impl(src, dst):
        wide = dst.dtype == types.float64
        if src.dtype == types.uint16 and not wide:  # bfloat16: the top half of a float32
            def bf16(src, dst):
                bits = dst.view(np.uint32)
                for j in range(src.shape[0]):
                    bits[j] = np.uint32(src[j]) << np.uint32(16)
            return bf16
        if src.dtype == types.uint16:
            def bf16_wide(src, dst):
                half = dst.shape[0]
                bits = dst.view(np.uint32)[half:]  # second half of dst's bytes as scratch
                for j in range(src.shape[0]):
                    bits[j] = np.uint32(src[j]) << np.uint32(16)
                f = bits.view(np.float32)
                for j in range(src.shape[0]):  # forward: never overwrites an unread entry
                    dst[j] = f[j]
            return bf16_wide
        if src.dtype == types.int16:  # float16 from its bits (IEEE binary16)
            def f16(src, dst):
                for j in range(src.shape[0]):
                    h = np.uint32(np.uint16(src[j]))
                    e = (h >> np.uint32(10)) & np.uint32(0x1F)
                    m = h & np.uint32(0x3FF)
                    if e == 0:  # zero or subnormal: m * 2**-24, exact
                        mag = np.float64(m) * 5.960464477539063e-08
                    elif e == 31:  # Inf / NaN
                        mag = np.inf if m == 0 else np.nan
                    else:  # (1 + m/1024) * 2**(e-15), exact
                        mag = np.float64(m + np.uint32(1024)) * 2.0 ** (np.int64(e) - 25)
                    dst[j] = -mag if h & np.uint32(0x8000) else mag
            return f16
        if isinstance(src.dtype, types.Float):
            def flt(src, dst):
                for j in range(src.shape[0]):
                    dst[j] = src[j]
            return flt
        return None

    @numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
    def _row_dots(u, v, r0, r1, ud, dd2):
        """Sums in the dtype of ``ud`` (float32: vectorised over 16 lanes, 256 terms per lane
        for a 4096 row; float64 for --dtype float64)."""
        cols = u.shape[1]
        fu = np.empty(cols, ud.dtype)
        fv = np.empty(cols, ud.dtype)
        zero = np.zeros(1, ud.dtype)[0]
        for i in range(r0, r1):
            _widen(u[i], fu)
            _widen(v[i], fv)
            s1 = zero
            s2 = zero
            for j in range(cols):
                d = fv[j] - fu[j]
                s1 += fu[j] * d
                s2 += d * d
            ud[i] = s1
            dd2[i] = s2

    @numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
    def _row_norms(u, r0, r1, out):
        cols = u.shape[1]
        fu = np.empty(cols, out.dtype)
        zero = np.zeros(1, out.dtype)[0]
        for i in range(r0, r1):
            _widen(u[i], fu)
            s = zero
            for j in range(cols):
                s += fu[j] * fu[j]
            out[i] = np.sqrt(s)
