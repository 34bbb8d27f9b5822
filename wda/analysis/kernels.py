"""Fused CPU kernels for the hot loop of the analysis (numba): one pass over a checkpoint.

``row_dots(u, [v...])`` gives, per row n and checkpoint k, u_n·δ_kn and |δ_kn|² with
δ_k = v_k - u: everything the closed form of ``BaseWeight`` needs from a full-weight
checkpoint. The torch form of the same sums makes five passes over each block (convert,
subtract, norm, multiply, sum); here a block of u's rows is widened once into an L2-sized
buffer for all the checkpoints of a batch, each checkpoint's rows then stream past it (one
sequential stream at a time), its bf16 elements widened in registers, and the sums are made
there (vectorised): one pass over each checkpoint's bytes (benchmarks/README.md).
``row_dots_read`` gives the same sums for checkpoints still in their files: it reads each
block of rows itself (``pread``, the GIL released) into a buffer that stays in cache.

``col_dots`` and ``col_norms`` do the same for vectors stored as columns (axis "in", GPT-2's
Conv1D layout), reading rows in order. ``lowrank_sums`` gives the same two sums for the LoRA/DoRA
updates of a matrix from their factors (all its adapter checkpoints in one call), and
``closed_form`` / ``closed_sums`` turn the sums into |v| - |u| and 1 - cos per vector and their
means: the per-checkpoint tail of the analysis in a call or two instead of ~25 small torch ops.

Stored dtypes read directly: float32, float64, bfloat16 and float16 (both decoded from their
bits: numba has no 16-bit floats). Rows must be contiguous; callers fall back to torch for
anything else (other strides or dtypes, GPUs) -- ``supports`` says which. Rows (columns for
the column kernels) are split over ``torch.get_num_threads()`` threads inside one call
(numba's ``prange``: the GIL is taken once per matrix, not per thread); every vector is summed
by one thread in a fixed order, so the result does not depend on the number of threads.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from wda.analysis import scratch

try:  # numba is a dependency; without it (an unsupported Python) the torch path is used
    import numba
    from numba import types
    from numba.extending import intrinsic, overload
    from llvmlite import ir
except ImportError:  # pragma: no cover - exercised only where numba cannot be installed
    numba = None

_CODES = {torch.bfloat16: np.uint16, torch.float16: np.int16,  # bit patterns (see _widen)
          torch.float32: np.float32, torch.float64: np.float64}
# Reassociation (vectorised sums) and contraction (FMA) only: NaN and Inf must survive, as
# the caller's finiteness check is how a broken checkpoint is caught.
_FASTMATH = {"reassoc", "contract", "nsz"}
_MIN_PARALLEL = 1 << 16  # elements: below this, one thread (a thread hand-off costs ~50 us)
# ``row_dots`` widens a block of W_0's rows this large (it stays in L2), then streams the same
# rows of each checkpoint past it: one sequential stream at a time, which the hardware
# prefetcher follows even across the 4 KiB pages of a memory-mapped file (four interleaved
# streams, one row of each in turn, ran 1.4x slower on mapped page-cache pages).
_ROW_BLOCK_BYTES = 192 * 1024
# ``row_dots_read`` reads a checkpoint's rows this many bytes at a time (with W_0's same rows,
# when they are widened to float32 for it): each ``pread`` costs ~3 us beside its copy, so
# fewer, larger reads win even past the L2 size (768² x 40 checkpoints, one thread: 172, 155,
# 133 us a matrix with 256 KiB, 1 MiB, 4 MiB).
_READ_BLOCK_BYTES = 4 << 20


def available() -> bool:
    return numba is not None and os.environ.get("WDA_NO_KERNELS", "") in ("", "0")


def supports(*tensors: torch.Tensor) -> bool:
    """True when ``row_dots``/``row_norms`` can take these tensors as they are."""
    return available() and all(
        t.device.type == "cpu" and t.dim() == 2 and t.dtype in _CODES
        and (t.stride(1) == 1 or t.shape[1] <= 1) for t in tensors)


# 16-bit floats viewed as the integers of their bits, in one step where torch has the type
_BITS = {torch.bfloat16: getattr(torch, "uint16", None), torch.float16: torch.int16}


def _array(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (16-bit floats as their bit patterns: no copy)."""
    if t.dtype in _BITS:
        bits = _BITS[t.dtype]
        return t.view(bits).numpy() if bits is not None else t.view(torch.int16).numpy().view(_CODES[t.dtype])
    return t.numpy()


def _launch(serial, parallel, rows: int, work: int, *args) -> None:
    """``serial(*args, r0, r1)`` over ``rows`` rows, or ``parallel(*args, chunks)``: one
    contiguous range of rows per thread (torch's thread setting; fewer when ``work``, the
    elements touched, is small)."""
    chunks = max(1, min(torch.get_num_threads(), rows, work // _MIN_PARALLEL))
    chunks = min(chunks, numba.config.NUMBA_NUM_THREADS)
    if chunks == 1:
        serial(*args, 0, rows)
    else:
        numba.set_num_threads(chunks)
        parallel(*args, chunks)


def _check_alike(name: str, u: torch.Tensor, vs: Sequence[torch.Tensor]) -> None:
    if any(v.shape != u.shape for v in vs) or len({v.dtype for v in vs}) > 1:
        raise ValueError(f"{name} takes checkpoints of one dtype and u's shape {tuple(u.shape)}")


def row_dots(u: torch.Tensor, vs: Sequence[torch.Tensor], ud: torch.Tensor, dd2: torch.Tensor) -> None:
    """For each checkpoint k: ud[k, n] = u_n·(v_kn - u_n), dd2[k, n] = |v_kn - u_n|², computed
    and summed in the dtype of ``ud``/``dd2`` ((k, rows), float32 or float64). ``vs``: 2-D CPU
    tensors of u's shape and one dtype (``supports`` must hold); each block of u's rows is
    widened once for all of them."""
    _check_alike("row_dots", u, vs)
    block = max(1, _ROW_BLOCK_BYTES // max(1, u.shape[1] * ud.element_size()))
    _launch(_row_dots, _row_dots_parallel, u.shape[0], u.numel(), _array(u), tuple(_array(v) for v in vs),
            ud.numpy(), dd2.numpy(), block)


def row_dots_read(u: torch.Tensor, files: Sequence[tuple[int, int]], dtype: torch.dtype,
                  ud: torch.Tensor, dd2: torch.Tensor) -> int:
    """``row_dots`` for checkpoints still in their files: ``files[k] = (fd, offset)`` of a
    C-contiguous tensor of u's shape stored as ``dtype`` (``readable`` must hold). Each block of
    checkpoint k's rows is read with ``pread`` into a buffer that stays in cache, the GIL
    released, and summed there: one copy out of the page cache and no mapping (mapping a
    768² matrix, faulting its pages in and unmapping it cost more than the sums). Same sums, in
    the same order, as ``row_dots``. Returns -1, or the index of a checkpoint whose bytes could
    not all be read (an I/O error, a file cut short: its sums are then meaningless; the caller
    reads it again to name the error)."""
    if not readable(dtype) or any(n < 0 for n in u.shape):
        raise ValueError(f"row_dots_read cannot read {dtype}")
    # rows per read: the checkpoint's block and W_0's (widened to the compute dtype unless
    # both are bf16 and the sums float32) together _READ_BLOCK_BYTES
    like = np.empty(0, _CODES[dtype])  # the stored dtype, as the kernel reads its bits
    widened = not (u.dtype == dtype == torch.bfloat16 and ud.dtype == torch.float32)
    per_row = u.shape[1] * (like.itemsize + (ud.element_size() if widened else 2))
    block = max(1, _READ_BLOCK_BYTES // max(1, per_row))
    fds = np.asarray([f for f, _ in files], np.int64)
    offs = np.asarray([o for _, o in files], np.int64)
    failed = np.full(numba.config.NUMBA_NUM_THREADS, -1, np.int64)  # one per range of rows
    _launch(_row_dots_read, _row_dots_read_parallel, u.shape[0], u.numel(), _array(u),
            fds, offs, like, ud.numpy(), dd2.numpy(), block, widened, failed)
    bad = failed[failed >= 0]
    return int(bad.min()) if bad.size else -1


def readable(dtype: torch.dtype) -> bool:
    """True when ``row_dots_read`` can read checkpoints stored as ``dtype`` (POSIX ``pread``)."""
    return available() and os.name == "posix" and dtype in _CODES


def col_dots(u: torch.Tensor, vs: Sequence[torch.Tensor], ud: torch.Tensor, dd2: torch.Tensor) -> None:
    """``row_dots`` for vectors stored as the COLUMNS of u and of each v (axis "in", GPT-2's
    Conv1D layout): ud[k, j] = u_:j·(v_k:j - u_:j), dd2[k, j] = |v_k:j - u_:j|². Rows are read
    in order (contiguous), each thread owning a range of columns; the sums over rows are
    carried in float64, then stored in the dtype of ``ud``/``dd2``."""
    _check_alike("col_dots", u, vs)
    _launch(_col_dots, _col_dots_parallel, u.shape[1], u.numel(), _array(u), tuple(_array(v) for v in vs),
            ud.numpy(), dd2.numpy())


def col_norms(u: torch.Tensor, out: torch.Tensor) -> None:
    """out[j] = |u_:j| (column norms, sums in float64) in the dtype of ``out``."""
    _launch(_col_norms, _col_norms_parallel, u.shape[1], u.numel(), _array(u), out.numpy())


def row_norms(u: torch.Tensor, out: torch.Tensor) -> None:
    """out[n] = |u_n| in the dtype of ``out`` (``supports(u)`` must hold)."""
    _launch(_row_norms, _row_norms_parallel, u.shape[0], u.numel(), _array(u), out.numpy())


def lowrank_sums(b: torch.Tensor, p: torch.Tensor, a: torch.Tensor, offsets: Sequence[int],
                 scalings: Sequence[float], cancel: float, ud: torch.Tensor, dd2: torch.Tensor,
                 ok: torch.Tensor) -> None:
    """The sums of K adapters of one matrix from their small factors, δ_kn = s_k·bv_kn·av_k
    per vector n: adapter k owns columns ``offsets[k]:offsets[k+1]`` of b = [bv_1 … bv_K]
    (vectors, Σr) and of p = W_0 aᵀ (``BaseWeight.project``), and those rows of
    a = [av_1; …; av_K] (Σr, n). Its Gram matrix g_k = av_k av_kᵀ is made here, then
    ud[k, n] = u_n·δ_kn = s_k·bv_kn·p_kn, dd2[k, n] = |δ_kn|² = s_k²·bv_kn g_k bv_knᵀ, and
    ok[k, n] = False where that sum cancels to less than ``cancel`` times the sum of its
    absolute terms, |bv_kn| |g_k| |bv_kn|ᵀ (the row is then recomputed densely). The products
    bv_k g_k and |bv_k| |g_k| of all adapters are two batched GEMMs (torch's ``bmm``, ranks
    below the largest padded with zeros), the row sums one kernel call. Contiguous CPU tensors
    in the compute dtype, ``ok`` bool; ud, dd2, ok (K, vectors)."""
    rows = b.shape[0]
    offs = np.asarray(offsets, np.int64)
    ranks = np.diff(offs)
    k_, rmax = len(ranks), int(ranks.max(initial=0))
    g = np.zeros((k_, rmax, rmax), ud.numpy().dtype)  # zeros: a lower rank's padding adds nothing
    pairs = int((ranks * (ranks + 1) // 2).sum())
    _launch(_grams, _grams_parallel, k_, pairs * a.shape[1], a.numpy(), offs, g)
    if (ranks == rmax).all():  # (K, vectors, r): a view of b
        b3 = b.view(rows, k_, rmax).transpose(0, 1)
    else:
        b3 = b.new_zeros(k_, rows, rmax)
        for k, (o, r) in enumerate(zip(offs[:-1], ranks)):
            b3[k, :, :r] = b[:, o:o + r]
    gt = torch.from_numpy(g)
    # (K, vectors, rmax) products into this thread's kept buffers (fresh ones of a few MB cost
    # more in page faults, on two threads, than the products)
    bg = torch.bmm(b3, gt, out=scratch.buffer("bg", (k_, rows, rmax), b.dtype))
    b3_abs = torch.abs(b3, out=scratch.buffer("b_abs", b3.shape, b.dtype))
    bg_abs = torch.bmm(b3_abs, gt.abs(), out=scratch.buffer("bg_abs", (k_, rows, rmax), b.dtype))
    _launch(_lowrank_rows, _lowrank_rows_parallel, rows, rows * int(offs[-1]), b.numpy(), p.numpy(),
            bg.numpy(), bg_abs.numpy(), offs, np.asarray(scalings, np.float64), cancel,
            ud.numpy(), dd2.numpy(), ok.numpy())


def closed_form(ud: torch.Tensor, dd2: torch.Tensor, n0: torch.Tensor, ok: torch.Tensor | None,
                along: float, dm: torch.Tensor, dd: torch.Tensor, closed: torch.Tensor) -> bool:
    """Per vector, |v| - |u| and 1 - cos(u, v) from u·δ, |δ|² and |u| (the closed form of
    ``BaseWeight``, formulas there): ``closed[n]`` False where it does not apply (|u| = 0,
    δ mostly along u: (u·δ)² > along·|u|²|δ|², or ``ok[n]`` False); dm and dd are then 0.
    Returns False when a sum is NaN or Inf (nothing else is then meaningful)."""
    rows = ud.shape[0]
    ok_ = ok.numpy() if ok is not None else np.ones(rows, np.bool_)
    flags = np.zeros(numba.config.NUMBA_NUM_THREADS, np.bool_)  # one per range of rows
    _launch(_closed_form, _closed_form_parallel, rows, rows, ud.numpy(), dd2.numpy(), n0.numpy(),
            ok_, along, dm.numpy(), dd.numpy(), closed.numpy(), flags)
    return not flags.any()


def vector_sums(m0: torch.Tensor, dm: torch.Tensor, dd: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """The sums behind ``wda.analysis.decompose.summarize`` over the valid vectors, in float64, in one
    pass: [count, Σ|Δm|, ΣΔD, Σ|u|, Σ‖δ‖/|u|, Σ cos(δ, u), Σ|cos(δ, u)|, Σ sign(Δm)·radial,
    Σ sign(Δm)·tangential] (formulas in ``summarize``)."""
    out = np.zeros(9)
    _vector_sums(m0.numpy(), dm.numpy(), dd.numpy(), valid.numpy(), out)
    return out.tolist()


def closed_sums(ud: torch.Tensor, dd2: torch.Tensor, n0: torch.Tensor, ok: torch.Tensor | None,
                along: float, magnitude: torch.Tensor | None = None,
                with_magnitude: Sequence[bool] | None = None) -> np.ndarray:
    """``closed_form`` and ``vector_sums`` in one call for K checkpoints of one matrix (ud, dd2:
    (K, vectors), ``ok`` the same shape or None): row k holds the nine sums of ``vector_sums``
    over the vectors the closed form takes, then [9] how many it does not take (those need the
    residual form: the caller then takes the per-vector path) and [10] 1 when a sum (or a
    magnitude) is NaN or Inf. With ``magnitude`` ((K, vectors), DoRA's m per output row) the
    vector is m·V'/|V'|: Δm = |m| - |u|, ΔD of ±V', and m = 0 leaves the vector out;
    ``with_magnitude`` (K bools, default all) says which checkpoints have one (LoRA and DoRA
    adapters of one matrix in one call). No per-vector tensor is made: the per-checkpoint
    tail of adapter and full-weight checkpoints in one call."""
    k = ud.shape[0]
    out = np.zeros((k, 11))
    ok_ = ok.numpy() if ok is not None else np.ones(ud.shape, np.bool_)
    mag = magnitude.numpy() if magnitude is not None else np.ones(ud.shape, ud.numpy().dtype)
    use = np.full(k, magnitude is not None) if with_magnitude is None else np.asarray(with_magnitude, np.bool_)
    if magnitude is None and use.any():
        raise ValueError("with_magnitude needs a magnitude")
    _closed_sums(ud.numpy(), dd2.numpy(), n0.numpy(), ok_, mag, use, along, out)
    return out


def widen(u: torch.Tensor, out: torch.Tensor) -> None:
    """out[:] = u in the (float32/64) dtype of ``out``: rows of the same shape, exact."""
    if u.shape != out.shape or not out.is_contiguous():
        raise ValueError(f"cannot widen {tuple(u.shape)} into {tuple(out.shape)}")
    _launch(_widen_rows, _widen_rows_parallel, u.shape[0], u.numel(), _array(u), out.numpy())


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

    @intrinsic
    def _f32_bits(typingctx, bits):
        """The float32 whose bit pattern is the low 32 bits of the integer ``bits``."""
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            v = args[0]
            if bits.bitwidth > 32:
                v = builder.trunc(v, ir.IntType(32))
            elif bits.bitwidth < 32:
                v = builder.zext(v, ir.IntType(32))
            return builder.bitcast(v, ir.FloatType())
        return types.float32(bits), codegen

    def _row_sums(x, vr, fv, zero):  # (x·(v - x), |v - x|²) of one row; stub for numba
        raise NotImplementedError

    @overload(_row_sums, jit_options={"fastmath": _FASTMATH})
    def _row_sums_impl(x, vr, fv, zero):
        if vr.dtype == types.uint16:  # bfloat16: widened in registers, no pass through fv
            def bf16(x, vr, fv, zero):
                s1 = zero
                s2 = zero
                for j in range(x.shape[0]):
                    d = _f32_bits(np.uint32(vr[j]) << np.uint32(16)) - x[j]
                    s1 += x[j] * d
                    s2 += d * d
                return s1, s2
            return bf16

        def other(x, vr, fv, zero):
            _widen(vr, fv)
            s1 = zero
            s2 = zero
            for j in range(x.shape[0]):
                d = fv[j] - x[j]
                s1 += x[j] * d
                s2 += d * d
            return s1, s2
        return other

    @numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
    def _row_dots(u, vs, ud, dd2, block, r0, r1):
        """Sums in the dtype of ``ud`` (float32: vectorised, eight partial sums per row;
        float64 for --dtype float64). ``block`` rows of u are widened at a time (see
        _ROW_BLOCK_BYTES); each row is summed the same way whatever the block or thread."""
        cols = u.shape[1]
        fu = np.empty((min(block, max(r1 - r0, 1)), cols), ud.dtype)
        fv = np.empty(cols, ud.dtype)
        zero = np.zeros(1, ud.dtype)[0]
        for b0 in range(r0, r1, block):
            b1 = min(r1, b0 + block)
            for i in range(b0, b1):
                _widen(u[i], fu[i - b0])
            for k in range(len(vs)):
                v = vs[k]
                for i in range(b0, b1):
                    ud[k, i], dd2[k, i] = _row_sums(fu[i - b0], v[i], fv, zero)

    # ssize_t pread(int fd, void *buf, size_t count, off_t offset), the pointer passed as an
    # integer (same width and register as a pointer on every 64-bit POSIX ABI); resolved by
    # name when the kernel is linked, so the compiled kernel can be cached (a ctypes pointer
    # could not be)
    _pread = types.ExternalFunction("pread", types.intp(types.intc, types.intp, types.uintp, types.int64))

    @numba.njit(nogil=True, cache=True)
    def _read_exactly(fd, buf, nbytes, offset):
        """True when ``nbytes`` bytes at ``offset`` of ``fd`` are now at the start of ``buf``."""
        done = 0
        addr = buf.ctypes.data
        while done < nbytes:
            got = _pread(np.intc(fd), addr + done, nbytes - done, offset + done)
            if got <= 0:  # end of file, or an error (EINTR included: the caller reads it again)
                return False
            done += got
        return True

    def _pair_sums(ur, fu, vr, fv, zero):  # _row_sums(fu, vr, ...) where fu holds ur widened
        raise NotImplementedError

    @overload(_pair_sums, jit_options={"fastmath": _FASTMATH})
    def _pair_sums_impl(ur, fu, vr, fv, zero):
        if ur.dtype == types.uint16 and vr.dtype == types.uint16 and fu.dtype == types.float32:  # in registers
            def bf16(ur, fu, vr, fv, zero):
                s1 = zero
                s2 = zero
                for j in range(ur.shape[0]):
                    x = _f32_bits(np.uint32(ur[j]) << np.uint32(16))
                    d = _f32_bits(np.uint32(vr[j]) << np.uint32(16)) - x
                    s1 += x * d
                    s2 += d * d
                return s1, s2
            return bf16

        def other(ur, fu, vr, fv, zero):
            return _row_sums(fu, vr, fv, zero)
        return other

    @numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
    def _row_dots_read(u, fds, offs, like, ud, dd2, block, widened, failed, r0, r1):
        """``_row_dots`` with each block of a checkpoint's rows read into ``buf`` first (see
        ``row_dots_read``); ``failed[0]``: the first checkpoint that could not be read.
        ``widened``: False when u's rows are widened in registers (bf16 u and checkpoints: no
        float32 copy of the block in cache, twice as many rows per read)."""
        cols = u.shape[1]
        nb = min(block, max(r1 - r0, 1))
        fu = np.empty((nb if widened else 1, cols), ud.dtype)
        buf = np.empty((nb, cols), like.dtype)
        fv = np.empty(cols, ud.dtype)
        zero = np.zeros(1, ud.dtype)[0]
        size = like.itemsize
        for b0 in range(r0, r1, block):
            b1 = min(r1, b0 + block)
            if widened:
                for i in range(b0, b1):
                    _widen(u[i], fu[i - b0])
            for k in range(len(fds)):
                if not _read_exactly(fds[k], buf, (b1 - b0) * cols * size, offs[k] + b0 * cols * size):
                    failed[0] = k if failed[0] < 0 else min(failed[0], k)
                    continue
                for i in range(b0, b1):
                    ud[k, i], dd2[k, i] = _pair_sums(u[i], fu[i - b0 if widened else 0], buf[i - b0], fv, zero)

    @numba.njit(nogil=True, cache=True, parallel=True)
    def _row_dots_read_parallel(u, fds, offs, like, ud, dd2, block, widened, failed, chunks):
        rows = u.shape[0]
        for c in numba.prange(chunks):
            _row_dots_read(u, fds, offs, like, ud, dd2, block, widened, failed[c:c + 1],
                           rows * c // chunks, rows * (c + 1) // chunks)

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
    def _row_dots_parallel(u, vs, ud, dd2, block, chunks):
        rows = u.shape[0]
        for c in numba.prange(chunks):  # one contiguous range of rows per thread
            _row_dots(u, vs, ud, dd2, block, rows * c // chunks, rows * (c + 1) // chunks)

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

    @numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
    def _grams(a, offs, g, k0, k1):
        """g[k] = av_k av_kᵀ (top-left r_k x r_k) for adapters k0:k1, av_k = a[offs[k]:offs[k+1]]."""
        zero = np.zeros(1, g.dtype)[0]
        for k in range(k0, k1):
            o = offs[k]
            r = offs[k + 1] - o
            for j in range(r):
                for l in range(j, r):
                    s = zero
                    for c in range(a.shape[1]):
                        s += a[o + j, c] * a[o + l, c]
                    g[k, j, l] = s
                    g[k, l, j] = s

    @numba.njit(nogil=True, cache=True, parallel=True)
    def _grams_parallel(a, offs, g, chunks):
        n = len(offs) - 1
        for c in numba.prange(chunks):
            _grams(a, offs, g, n * c // chunks, n * (c + 1) // chunks)

    @numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
    def _lowrank_rows(b, p, bg, bg_abs, offs, scal, cancel, ud, dd2, ok, r0, r1):
        """Rows r0:r1 of every adapter (see ``lowrank_sums``): per row n and adapter k, the
        three sums over its r columns bv_kn·p_kn, bv_kn·(bv_k g_k)_n and |bv_kn|·(|bv_k| |g_k|)_n."""
        zero = np.zeros(1, ud.dtype)[0]
        for k in range(len(offs) - 1):
            o = offs[k]
            r = offs[k + 1] - o
            s = scal[k]
            for i in range(r0, r1):
                bk = b[i, o:o + r]
                pk = p[i, o:o + r]
                yk = bg[k, i, :r]
                ak = bg_abs[k, i, :r]
                s1 = zero
                s2 = zero
                s3 = zero
                for c in range(r):
                    x = bk[c]
                    s1 += x * pk[c]
                    s2 += x * yk[c]
                    s3 += abs(x) * ak[c]
                ud[k, i] = s * s1
                dd2[k, i] = (s * s) * s2
                ok[k, i] = s2 >= cancel * s3

    @numba.njit(nogil=True, cache=True, parallel=True)
    def _lowrank_rows_parallel(b, p, bg, bg_abs, offs, scal, cancel, ud, dd2, ok, chunks):
        rows = b.shape[0]
        for c in numba.prange(chunks):
            _lowrank_rows(b, p, bg, bg_abs, offs, scal, cancel, ud, dd2, ok,
                          rows * c // chunks, rows * (c + 1) // chunks)

    @numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
    def _col_dots(u, vs, ud, dd2, c0, c1):
        """Columns c0:c1: two rows at a time are widened (as in ``_row_dots``: δ in the dtype
        of ``ud``), their products summed in registers and added to per-column float64 sums."""
        w = c1 - c0
        nv = len(vs)
        s1 = np.zeros((nv, w))
        s2 = np.zeros((nv, w))
        fu = np.empty(w, ud.dtype)
        fv = np.empty(w, ud.dtype)
        gu = np.empty(w, ud.dtype)
        gv = np.empty(w, ud.dtype)
        rows = u.shape[0]
        for i in range(0, rows - 1, 2):
            _widen(u[i, c0:c1], fu)
            _widen(u[i + 1, c0:c1], gu)
            for k in range(nv):
                _widen(vs[k][i, c0:c1], fv)
                _widen(vs[k][i + 1, c0:c1], gv)
                a1 = s1[k]
                a2 = s2[k]
                for j in range(w):
                    d = fv[j] - fu[j]
                    e = gv[j] - gu[j]
                    a1[j] += fu[j] * d + gu[j] * e
                    a2[j] += d * d + e * e
        if rows % 2:
            _widen(u[rows - 1, c0:c1], fu)
            for k in range(nv):
                _widen(vs[k][rows - 1, c0:c1], fv)
                for j in range(w):
                    d = fv[j] - fu[j]
                    s1[k, j] += fu[j] * d
                    s2[k, j] += d * d
        for k in range(nv):
            for j in range(w):
                ud[k, c0 + j] = s1[k, j]
                dd2[k, c0 + j] = s2[k, j]

    @numba.njit(nogil=True, cache=True, parallel=True)
    def _col_dots_parallel(u, vs, ud, dd2, chunks):
        cols = u.shape[1]
        for c in numba.prange(chunks):  # one contiguous range of columns per thread
            _col_dots(u, vs, ud, dd2, cols * c // chunks, cols * (c + 1) // chunks)

    @numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
    def _col_norms(u, out, c0, c1):
        w = c1 - c0
        s = np.zeros(w)
        fu = np.empty(w, out.dtype)
        for i in range(u.shape[0]):
            _widen(u[i, c0:c1], fu)
            for j in range(w):
                s[j] += fu[j] * fu[j]
        for j in range(w):
            out[c0 + j] = np.sqrt(s[j])

    @numba.njit(nogil=True, cache=True, parallel=True)
    def _col_norms_parallel(u, out, chunks):
        cols = u.shape[1]
        for c in numba.prange(chunks):
            _col_norms(u, out, cols * c // chunks, cols * (c + 1) // chunks)

    @numba.njit(nogil=True, cache=True)
    def _accumulate(out, m0, dm, dd):
        """Adds one valid vector (|u|, Δm, ΔD) to the nine sums of ``vector_sums``, in float64."""
        u = np.float64(m0)
        d = np.float64(dm)
        c = np.float64(dd)
        tangential = (u + d) * c
        radial = d - tangential
        size = np.sqrt(d * d + 2.0 * u * (u + d) * c)
        align = min(1.0, max(-1.0, radial / size)) if size > 0 else 0.0
        sign = 1.0 if d > 0 else (-1.0 if d < 0 else 0.0)
        out[0] += 1.0
        out[1] += abs(d)
        out[2] += c
        out[3] += u
        out[4] += size / u
        out[5] += align
        out[6] += abs(align)
        out[7] += sign * radial
        out[8] += sign * tangential

    @numba.njit(nogil=True, cache=True)
    def _vector_sums(m0, dm, dd, valid, out):
        for n in range(m0.shape[0]):
            if valid[n]:
                _accumulate(out, m0[n], dm[n], dd[n])

    # ``closed_sums`` in three passes over each checkpoint's vectors, each straight-line code
    # (no branch, no conditional load, a vector left out masked by selects) with few enough
    # running sums that LLVM vectorises it; error_model "numpy": a division by zero in a
    # masked lane gives Inf/NaN instead of a Python exception check that stops vectorising.
    # The per-vector arithmetic is strict IEEE, without contraction or reassociation, and
    # ``closed_form`` is the same first pass: the fast path and the per-vector path give the
    # same Δm and ΔD.
    @numba.njit(nogil=True, cache=True, error_model="numpy")
    def _closed_vectors(x_, y_, n_, ok_, m_, use_mag, along, u_, d_, c_, w_):
        """Per vector of one checkpoint, from x = u·δ, y = |δ|² and n = |u|, the closed form of
        ``BaseWeight`` into u_ = |u|, d_ = Δm, c_ = ΔD (all three in the compute dtype) and
        w_ = 1 where it is taken (else u_ = 1, d_ = c_ = w_ = 0: terms that add nothing). It is
        not taken where |u| = 0, where δ lies mostly along u ((u·δ)² > along·|u|²|δ|²), or where
        ``ok_`` is False. Returns (vectors not taken, non-finite inputs)."""
        zero = np.zeros(1, x_.dtype)[0]
        one = np.ones(1, x_.dtype)[0]  # (zero + 1 would be a float64)
        two = zero + 2
        nomag = not use_mag
        missed = bad = 0
        for i in range(x_.shape[0]):
            x = x_[i]
            y = y_[i]
            n = n_[i]
            m = m_[i]
            finite = np.isfinite(x) & np.isfinite(y) & (np.isfinite(m) | nomag)
            take = (n > 0) & (x * x <= along * (n * n) * y) & ok_[i]
            # every lane is computed (one not taken may hold NaN: masked below)
            nn = n if n > 0 else one
            a = x / nn  # change along u
            perp = max(y - a * a, zero)  # |δ_⊥|²
            q = nn + a
            nt = np.sqrt(q * q + perp)  # |v|
            e = perp / (nt * (nt + abs(q))) if q > 0 else 1 - q / nt
            dm = (2 * x + y) / (nn + nt)
            dd = min(max(e, zero), two)
            # Eq. 5: norm |m|, direction ±V' (see BaseWeight.changes_lowrank); m = 0: a zero
            # row, excluded as a zero-norm vector
            keep = take & ((m != 0) | nomag)
            dm = abs(m) - n if use_mag else dm
            missed += 0 if take else 1
            bad += 0 if finite else 1
            u_[i] = n if keep else one
            d_[i] = dm if keep else zero
            c_[i] = dd if keep else zero
            # -V': ΔD of the stored (rounded) value, as the per-vector path flips it
            c_[i] = two - c_[i] if keep & use_mag & (m < 0) else c_[i]
            w_[i] = 1.0 if keep else 0.0
        return missed, bad

    @numba.njit(nogil=True, cache=True)
    def _closed_form(ud, dd2, n0, ok, along, dm, dd, closed, flags, r0, r1):
        """``closed_form`` of rows r0:r1: the first pass of ``closed_sums``, kept per vector."""
        n = r1 - r0
        u_ = np.empty(n, ud.dtype)
        w_ = np.empty(n)
        no_magnitude = np.ones(n, ud.dtype)
        _, bad = _closed_vectors(ud[r0:r1], dd2[r0:r1], n0[r0:r1], ok[r0:r1], no_magnitude, False,
                                 along, u_, dm[r0:r1], dd[r0:r1], w_)
        for i in range(n):
            closed[r0 + i] = w_[i] > 0
        if bad:
            flags[0] = True

    @numba.njit(nogil=True, cache=True, parallel=True)
    def _closed_form_parallel(ud, dd2, n0, ok, along, dm, dd, closed, flags, chunks):
        rows = ud.shape[0]
        for c in numba.prange(chunks):
            _closed_form(ud, dd2, n0, ok, along, dm, dd, closed, flags[c:c + 1],
                         rows * c // chunks, rows * (c + 1) // chunks)

    @numba.njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
    def _plain_sums(u_, d_, c_, w_):
        """[0:4] of ``vector_sums``: count, Σ|Δm|, ΣΔD, Σ|u| over the vectors taken."""
        s0 = s1 = s2 = s3 = 0.0
        for i in range(u_.shape[0]):
            s0 += w_[i]
            s1 += abs(np.float64(d_[i]))
            s2 += np.float64(c_[i])
            s3 += w_[i] * np.float64(u_[i])
        return s0, s1, s2, s3

    @numba.njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
    def _diagnostic_sums(u_, d_, c_):
        """[4:9] of ``vector_sums`` (formulas in ``_accumulate``); a vector not taken adds 0."""
        s4 = s5 = s6 = s7 = s8 = 0.0
        for i in range(u_.shape[0]):
            u = np.float64(u_[i])
            d = np.float64(d_[i])
            c = np.float64(c_[i])
            tangential = (u + d) * c
            radial = d - tangential
            size = np.sqrt(d * d + 2.0 * u * (u + d) * c)
            align = min(1.0, max(-1.0, radial / size)) if size > 0 else 0.0
            sign = 1.0 if d > 0 else (-1.0 if d < 0 else 0.0)
            s4 += size / u
            s5 += align
            s6 += abs(align)
            s7 += sign * radial
            s8 += sign * tangential
        return s4, s5, s6, s7, s8

    @numba.njit(nogil=True, cache=True)
    def _closed_sums(ud, dd2, n0, ok, mag, use_mag, along, out):
        rows = ud.shape[1]
        u_ = np.empty(rows, ud.dtype)
        d_ = np.empty(rows, ud.dtype)
        c_ = np.empty(rows, ud.dtype)
        w_ = np.empty(rows)
        for k in range(ud.shape[0]):
            missed, bad = _closed_vectors(ud[k], dd2[k], n0, ok[k], mag[k], use_mag[k], along, u_, d_, c_, w_)
            out[k, 0], out[k, 1], out[k, 2], out[k, 3] = _plain_sums(u_, d_, c_, w_)
            out[k, 4], out[k, 5], out[k, 6], out[k, 7], out[k, 8] = _diagnostic_sums(u_, d_, c_)
            out[k, 9] = missed
            out[k, 10] = 1.0 if bad > 0 else 0.0
