"""Fused CPU kernels for the hot loop of the analysis (numba): one pass over a checkpoint.

``row_dots(u, [v...])`` gives, per row n and checkpoint k, u_n·δ_kn and |δ_kn|² with
δ_k = v_k - u: everything the closed form of ``BaseWeight`` needs from a full-weight
checkpoint. The torch form of the same sums makes five passes over each block (convert,
subtract, norm, multiply, sum); here each row of u is loaded once for up to a few checkpoints,
every element is widened in registers to the compute dtype (float32 by default, float64 on
request) and summed there (vectorised), so a 4096 x 4096 bf16 checkpoint takes about a third
of the time (benchmarks/README.md).

Stored dtypes read directly: float32, float64, bfloat16 and float16 (both decoded from their
bits: numba has no 16-bit floats). Rows must be contiguous; callers fall back to torch for
anything else (strided views, other dtypes, GPUs) -- ``supports`` says which. Rows are split
over ``torch.get_num_threads()`` threads inside one call (numba's ``prange``: the GIL is taken
once per matrix, not per thread); every row is summed by one thread in a fixed order, so the
result does not depend on the number of threads.
"""

from __future__ import annotations

import os
from typing import Sequence

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


def _launch(serial, parallel, u: np.ndarray, *args) -> None:
    """``serial(u, *args, r0, r1)`` over all rows of u, or ``parallel(u, *args, chunks)``: one
    contiguous range of rows per thread (torch's thread setting, fewer for small matrices)."""
    rows, cols = u.shape
    chunks = max(1, min(torch.get_num_threads(), rows, rows * cols // _MIN_PARALLEL))
    chunks = min(chunks, numba.config.NUMBA_NUM_THREADS)
    if chunks == 1:
        serial(u, *args, 0, rows)
    else:
        numba.set_num_threads(chunks)
        parallel(u, *args, chunks)


def row_dots(u: torch.Tensor, vs: Sequence[torch.Tensor], ud: torch.Tensor, dd2: torch.Tensor) -> None:
    """For each checkpoint k: ud[k, n] = u_n·(v_kn - u_n), dd2[k, n] = |v_kn - u_n|², computed
    and summed in the dtype of ``ud``/``dd2`` ((k, rows), float32 or float64). ``vs``: 2-D CPU
    tensors of u's shape and one dtype (``supports`` must hold); each row of u is loaded once
    for all of them."""
    if any(v.shape != u.shape for v in vs) or len({v.dtype for v in vs}) > 1:
        raise ValueError(f"row_dots takes checkpoints of one dtype and u's shape {tuple(u.shape)}")
    _launch(_row_dots, _row_dots_parallel, _array(u), tuple(_array(v) for v in vs), ud.numpy(), dd2.numpy())


def row_norms(u: torch.Tensor, out: torch.Tensor) -> None:
    """out[n] = |u_n| in the dtype of ``out`` (``supports(u)`` must hold)."""
    _launch(_row_norms, _row_norms_parallel, _array(u), out.numpy())


def widen(u: torch.Tensor, out: torch.Tensor) -> None:
    """out[:] = u in the (float32/64) dtype of ``out``: rows of the same shape, exact."""
    if u.shape != out.shape or not out.is_contiguous():
        raise ValueError(f"cannot widen {tuple(u.shape)} into {tuple(out.shape)}")
    _launch(_widen_rows, _widen_rows_parallel, _array(u), out.numpy())


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
    def _row_dots(u, vs, ud, dd2, r0, r1):
        """Sums in the dtype of ``ud`` (float32: vectorised over 16 lanes, 256 terms per lane
        for a 4096 row; float64 for --dtype float64)."""
        cols = u.shape[1]
        fu = np.empty(cols, ud.dtype)
        fv = np.empty(cols, ud.dtype)
        zero = np.zeros(1, ud.dtype)[0]
        for i in range(r0, r1):
            _widen(u[i], fu)  # stays in L1 for every checkpoint
            for k in range(len(vs)):
                _widen(vs[k][i], fv)
                s1 = zero
                s2 = zero
                for j in range(cols):
                    d = fv[j] - fu[j]
                    s1 += fu[j] * d
                    s2 += d * d
                ud[k, i] = s1
                dd2[k, i] = s2

    @numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
    def _row_norms(u, out, r0, r1):
        cols = u.shape[1]
        fu = np.empty(cols, out.dtype)
        zero = np.zeros(1, out.dtype)[0]
        for i in range(r0, r1):
            _widen(u[i], fu)
            s = zero
            for j in range(cols):
                s += fu[j] * fu[j]
            out[i] = np.sqrt(s)

    @numba.njit(nogil=True, cache=True, parallel=True)
    def _row_dots_parallel(u, vs, ud, dd2, chunks):
        rows = u.shape[0]
        for c in numba.prange(chunks):  # one contiguous range of rows per thread
            _row_dots(u, vs, ud, dd2, rows * c // chunks, rows * (c + 1) // chunks)

    @numba.njit(nogil=True, cache=True, parallel=True)
    def _row_norms_parallel(u, out, chunks):
        rows = u.shape[0]
        for c in numba.prange(chunks):
            _row_norms(u, out, rows * c // chunks, rows * (c + 1) // chunks)

    @numba.njit(nogil=True, cache=True)
    def _widen_rows(u, out, r0, r1):
        for i in range(r0, r1):
            _widen(u[i], out[i])

    @numba.njit(nogil=True, cache=True, parallel=True)
    def _widen_rows_parallel(u, out, chunks):
        rows = u.shape[0]
        for c in numba.prange(chunks):
            _widen_rows(u, out, rows * c // chunks, rows * (c + 1) // chunks)
