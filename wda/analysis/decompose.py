"""The math of the paper's weight decomposition (Eqs. 2-4): pure tensor functions.

Conventions (DESIGN.md, "The axis"):
- every weight is given in the ``(out, in)`` layout of ``nn.Linear`` (callers transpose
  Conv1D ``(in, out)`` weights before they get here);
- ``axis="out"`` means one magnitude per OUTPUT feature, ``norm(dim=1)`` -> ``(out,)``, as
  in the DoRA reference code, PEFT and torchtune; ``axis="in"`` means one per input
  feature, ``norm(dim=0)`` -> ``(in,)`` (LyCORIS/kohya ``dora_scale`` style).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from wda.analysis import gemm, kernels, scratch

Axis = Literal["out", "in"]
AXES: tuple[str, ...] = ("out", "in")


class NonFiniteWeights(ValueError):
    """A weight holds NaN or Inf: its ΔM / ΔD would be meaningless."""


def reduce_dim(axis: Axis) -> int:
    """The dim reduced to get one magnitude per vector of an (out, in) weight."""
    if axis == "out":
        return 1  # (out, in) -> (out,)
    if axis == "in":
        return 0  # (out, in) -> (in,)
    raise ValueError(f"axis must be 'out' or 'in', not {axis!r}")


def magnitude(weight: torch.Tensor, axis: Axis = "out") -> torch.Tensor:
    """Eq. 2: m = ||W|| per vector (L2 norm), in the weight's dtype."""
    return torch.linalg.vector_norm(weight, dim=reduce_dim(axis))


@dataclass(frozen=True)
class VectorChanges:
    """Per-vector changes of W_t against W_0 (one entry per magnitude vector)."""

    m0: torch.Tensor  # ||W_0^n||
    dm: torch.Tensor  # m_t^n - m_0^n (signed)
    dd: torch.Tensor  # 1 - cos(W_t^n, W_0^n), in [0, 2]
    valid: torch.Tensor  # bool: both norms > 0 (cosine defined)


def vector_changes(w0: torch.Tensor, wt: torch.Tensor, axis: Axis = "out",
                   dtype: torch.dtype = torch.float32) -> VectorChanges:
    """Magnitude and direction change of every vector of ``wt`` against ``w0``.

    Numerics: with u = W_0^n, v = W_t^n, δ = v - u (computed once, exact for nearby
    floats) and c = (|v| - |u|) / |u|,

        1 - cos(u, v) = 0.5 * || u/|u| - v/|v| ||^2 = 0.5 * || c·u - δ ||^2 / |v|^2
        |v| - |u|     = (2 u·δ + |δ|^2) / (|u| + |v|)

    Both forms avoid the cancellation of ``1 - cos`` (at θ = 1e-4 rad the true value is
    5e-9, below float32 resolution around 1) and of ``|v| - |u|``: every error stays
    relative to the size of the change itself, so float32 matches float64 at tiny angles.
    This is the reference form (several passes over the matrix); ``BaseWeight`` computes the
    same quantities in one pass per checkpoint.
    """
    if w0.shape != wt.shape:
        raise ValueError(f"shape mismatch: base {tuple(w0.shape)} vs checkpoint {tuple(wt.shape)}")
    if w0.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w0.shape)}")
    u = w0.to(dtype)
    v = wt.to(dtype)
    return _changes(u, v, v - u, reduce_dim(axis))


def _changes(u: torch.Tensor, v: torch.Tensor, delta: torch.Tensor, dim: int) -> VectorChanges:
    """The residual form of ``vector_changes`` given u, v and δ = v - u (δ may be more exact
    than ``v - u``: a low-rank update is known before it is added)."""
    n0 = torch.linalg.vector_norm(u, dim=dim)  # (out,) for axis "out"
    nt = torch.linalg.vector_norm(v, dim=dim)
    ud = (u * delta).sum(dim=dim)  # u·δ
    dd2 = (delta * delta).sum(dim=dim)  # |δ|^2
    if not (torch.isfinite(n0).all() and torch.isfinite(nt).all()):
        # A NaN row norm would otherwise fail the `> 0` test and be silently excluded.
        which = "base" if not torch.isfinite(n0).all() else "checkpoint"
        raise NonFiniteWeights(f"non-finite values (NaN/Inf) in the {which} weight")
    valid = (n0 > 0) & (nt > 0)
    safe_n0 = torch.where(valid, n0, torch.ones_like(n0))
    safe_nt = torch.where(valid, nt, torch.ones_like(nt))
    # |v| - |u| without cancellation; for invalid vectors fall back to the plain difference.
    dm = torch.where(valid, (2 * ud + dd2) / (safe_n0 + safe_nt), nt - n0)
    c = (dm / safe_n0).unsqueeze(dim)  # broadcast along the reduced dim
    resid = c * u - delta  # (out, in): |v|·(u/|u| - v/|v|), no cancellation
    dd = 0.5 * (resid * resid).sum(dim=dim) / (safe_nt * safe_nt)
    dd = torch.where(valid, dd.clamp(0.0, 2.0), torch.zeros_like(dd))
    return VectorChanges(m0=n0, dm=dm, dd=dd, valid=valid)


@dataclass(frozen=True)
class Measurement:
    """Eqs. 3-4 for one (checkpoint, module): means over the valid vectors, and what they
    are made of (``summarize`` says how each is computed)."""

    delta_m: float  # Eq. 3: mean_n |m_t^n - m_0^n|
    delta_d: float  # Eq. 4: mean_n (1 - cos(W_t^n, W_0^n))
    n_vectors: int  # vectors in the matrix along the chosen axis
    n_excluded: int  # zero-norm vectors (in W_0 or W_t) left out of both means
    m0_mean: float  # mean ||W_0^n|| over valid vectors (context for relative changes)
    # Diagnostics: per vector, u = W_0^n, δ = W_t^n - u.
    s_mean: float  # mean relative update size ||δ|| / ||u||
    align_mean: float  # mean signed alignment cos(δ, u) (0 for an unchanged vector)
    align_abs_mean: float  # mean |cos(δ, u)|
    delta_m_radial: float  # the part of delta_m that is first order: sign(Δm)·u·δ/||u||
    delta_m_tangential: float  # the rest, second order: sign(Δm)·||W_t^n||·(1 - cos)
    # ΔM relative to the base norm, delta_m / m0_mean: comparable across layers, models and
    # methods (the weight units cancel)
    delta_m_rel: float


# The measured fields, in output order (metrics.csv columns after the module's keys).
MEASUREMENT_FIELDS: tuple[str, ...] = tuple(Measurement.__dataclass_fields__)


def summarize(ch: VectorChanges) -> Measurement:
    """Eqs. 3-4 and the diagnostics from per-vector changes: means over the valid vectors.

    Every measuring path (full weights, adapters from their factors, magnitude-only DoRA;
    rows or columns; kernels or torch; CPU or GPU) ends in per-vector |u|, Δm = |v| - |u|
    and ΔD = 1 - cos(u, v) with v = W_t^n, and the diagnostics follow from those three
    exactly, without cancellation (|v| = |u| + Δm):

        ||δ||²  = Δm² + 2·|u|·|v|·ΔD                     (a sum of non-negative terms)
        u·δ/|u| = |v|·cos - |u| = Δm - |v|·ΔD            (the radial, first-order change)
        Δm      = u·δ/|u| + |v|·ΔD                        (radial + tangential, exactly)

    so ΔM = mean |Δm| = mean sign(Δm)·u·δ/|u| + mean sign(Δm)·|v|·ΔD, the two reported
    parts, sum to delta_m. For a small update |v|·ΔD ≈ ||δ_⊥||²/(2|u|): the part of ΔM
    that a rotation makes by itself. Sums in float64, one device sync.
    """
    n = ch.valid.numel()
    if kernels.available() and ch.dm.device.type == "cpu" and ch.dm.dtype in (torch.float32, torch.float64):
        k, *sums = kernels.vector_sums(ch.m0, ch.dm, ch.dd, ch.valid)  # one pass, no temporaries
    else:
        k, *sums = _vector_sums(ch)
    return _from_sums(n, k, sums)


def _from_sums(n: int, k: float, sums) -> Measurement:
    """The Measurement of ``n`` vectors from the sums over its ``k`` valid ones (the order of
    ``kernels.vector_sums``)."""
    k = int(k)
    if k == 0:
        nan = float("nan")
        return Measurement(nan, nan, n, n, nan, nan, nan, nan, nan, nan, nan)
    dm_s, dd_s, m0_s, s_s, a_s, aa_s, rad_s, tan_s = [float(v) / k for v in sums]
    rel = dm_s / m0_s if m0_s > 0 else float("nan")
    return Measurement(dm_s, dd_s, n, n - k, m0_s, s_s, a_s, aa_s, rad_s, tan_s, rel)


def _vector_sums(ch: VectorChanges) -> list[float]:
    """torch's form of ``kernels.vector_sums`` (GPUs, no numba): one device sync."""
    vm = ch.valid
    m0, dm, dd = (t[vm].to(torch.float64) for t in (ch.m0, ch.dm, ch.dd))
    nt = m0 + dm
    tangential = nt * dd
    radial = dm - tangential
    size = torch.sqrt(dm * dm + 2.0 * m0 * nt * dd)  # ||δ||
    align = torch.where(size > 0, radial / torch.where(size > 0, size, 1.0), 0.0).clamp(-1.0, 1.0)
    sign = torch.sign(dm)
    return torch.stack([vm.sum().to(torch.float64), dm.abs().sum(), dd.sum(), m0.sum(), (size / m0).sum(),
                        align.sum(), align.abs().sum(), (sign * radial).sum(),
                        (sign * tangential).sum()]).tolist()


def measure(w0: torch.Tensor, wt: torch.Tensor, axis: Axis = "out",
            dtype: torch.dtype = torch.float32) -> Measurement:
    """ΔM (Eq. 3) and ΔD (Eq. 4) of ``wt`` against ``w0``.

    Zero-norm vectors (real models have some) have no direction: they are excluded from
    both means and counted in ``n_excluded`` rather than turning the layer into NaN.
    """
    if w0.shape != wt.shape:
        raise ValueError(f"shape mismatch: base {tuple(w0.shape)} vs checkpoint {tuple(wt.shape)}")
    return BaseWeight(w0, axis=axis, dtype=dtype).measure(wt)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t`` (numpy's check on a CPU: a third of torch's ~30 µs per call)."""
    if t.device.type == "cpu":
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


# ---- one W_0, many checkpoints: the streaming form ---------------------------------------
# Rows whose change lies mostly along u, (u·δ)² > _ALONG·|u|²|δ|², take the residual form;
# elsewhere |δ_⊥|² = |δ|² - (u·δ)²/|u|² loses at most a bit to cancellation.
_ALONG = 0.5
# Low-rank |δ|² = s²·B_n (A Aᵀ) B_nᵀ: rows where that sum cancels by more than 1/_GRAM of its
# absolute terms (nearly dependent rows of A) are recomputed densely.
_GRAM = 1e-2
# Rows per block: this many elements per buffer and thread stay in L2 on a CPU (512 KiB in
# float32); on a GPU a block is a whole matrix up to this many elements.
CPU_BLOCK_ELEMENTS = 1 << 17
CUDA_BLOCK_ELEMENTS = 1 << 26


class BaseWeight:
    """W_0 of one matrix, prepared once for every checkpoint measured against it.

    ``measure(wt)`` gives ``measure(w0, wt)`` in one pass over ``wt``: on a CPU the fused
    kernels of ``wda.analysis.kernels`` (row kernels when each vector is a stored row: axis "out" of
    nn.Linear weights; column kernels when it is a stored column: axis "in", or GPT-2's
    Conv1D layout); elsewhere (GPUs) blocks of rows are converted to the compute dtype,
    differenced and reduced with torch ops while they sit in cache. With
    u = W_0^n, δ = W_t^n - u, a = u·δ/|u| (the change along u), |δ_⊥|² = |δ|² - a² (the
    change across u) and q = |u| + a, so that |v|² = q² + |δ_⊥|²:

        1 - cos(u, v) = (|v| - q) / |v| = |δ_⊥|² / (|v| (|v| + q))      (q > 0; else 1 - q/|v|)
        |v| - |u|     = (2 u·δ + |δ|²) / (|u| + |v|)

    Only u·δ and |δ|² are summed, and every error stays relative to the change itself, as in
    ``vector_changes``, except where |δ|² - a² cancels: δ lying along u (a pure rescaling,
    a sign flip). Those rows, and zero rows, are recomputed with the residual form of
    ``vector_changes``. ``measure_lowrank`` does the same for LoRA/DoRA adapters from the
    factors, without forming an (out, in) matrix.

    ``vecs`` is W_0 vector-major (one row per magnitude vector: the (out, in) weight for axis
    "out", its transpose for "in"): contiguous, or for the column kernels a transposed view
    of the stored matrix; in the stored dtype when the compute dtype holds it exactly
    (bf16 -> float32): half the memory traffic of a float32 copy.
    """

    def __init__(self, w0: torch.Tensor, axis: Axis = "out", dtype: torch.dtype = torch.float32,
                 block_rows: int | None = None) -> None:
        if w0.dim() != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(w0.shape)}")
        self.axis, self.dim, self.dtype = axis, reduce_dim(axis), dtype
        self.shape = tuple(w0.shape)
        vecs = w0 if self.dim == 1 else w0.t()  # (out, in) or (in, out): one row per vector
        if torch.promote_types(vecs.dtype, dtype) != dtype:  # not exact in dtype: convert once
            vecs = vecs.to(dtype)
        # CPU, float32/64 compute: the fused kernels. Vectors stored as rows take the row
        # kernels; vectors stored as columns (axis "in" of a contiguous weight, GPT-2's Conv1D
        # for axis "out") the column kernels, W_0 kept as stored; anything else torch's ops.
        self._kernels = dtype in (torch.float32, torch.float64) and vecs.device.type == "cpu" \
            and kernels.available()
        self._cols = self._kernels and not kernels.supports(vecs) and kernels.supports(vecs.t())
        self.vecs = vecs if self._cols else vecs.contiguous()
        self._rows = self._kernels and kernels.supports(self.vecs)
        rows, n = self.vecs.shape
        dev = self.vecs.device
        # on a CPU, one L2-sized slice of a block per thread
        budget = CUDA_BLOCK_ELEMENTS if dev.type == "cuda" else CPU_BLOCK_ELEMENTS * torch.get_num_threads()
        self.block = max(1, min(rows, block_rows or budget // max(n, 1)))
        self._converts = self.vecs.dtype != dtype  # W_0 rows are converted block by block
        self._bufs: tuple[torch.Tensor, ...] | None = None  # the torch path's block buffers
        self._w0_out: torch.Tensor | None = None  # see _base_out
        self._merged: torch.Tensor | None = None
        n0 = torch.empty(rows, dtype=dtype, device=dev)
        if self._rows:
            kernels.row_norms(self.vecs, n0)
        elif self._cols:
            kernels.col_norms(self.vecs.t(), n0)
        else:
            for r0, r1, u in self._blocks():
                torch.linalg.vector_norm(u, dim=1, out=n0[r0:r1])
        if not _all_finite(n0):
            raise NonFiniteWeights("non-finite values (NaN/Inf) in the base weight")
        self.n0 = n0  # |u| per vector
        self.n0sq = n0 * n0

    # -- full weights --
    def measure(self, wt: torch.Tensor) -> Measurement:
        """ΔM, ΔD of the full weight ``wt`` (same layout as W_0, any float dtype)."""
        return self.measure_many([wt])[0]

    def changes(self, wt: torch.Tensor) -> VectorChanges:
        return self.changes_many([wt])[0]

    def measure_many(self, wts: list[torch.Tensor]) -> list[Measurement]:
        """``measure`` of several checkpoints of this matrix, W_0 read once for all of them
        (CPU kernels; elsewhere one pass each). A checkpoint may also be a tensor still in its
        file (``wda.formats.tensors.StoredTensor``: ``shape``, ``dtype``, ``fd``, ``start``,
        ``load()``): the row kernel then reads it itself (``kernels.row_dots_read``), else it is
        loaded."""
        srcs, ud, dd2 = self._dots(wts)
        return self._measure_sums(ud, dd2, None, [self._dense(src) for src in srcs])

    def changes_many(self, wts: list[torch.Tensor]) -> list[VectorChanges]:
        srcs, ud, dd2 = self._dots(wts)
        return [self._finish(ud[k], dd2[k], self._dense(src)) for k, src in enumerate(srcs)]

    def _dots(self, wts: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(vector-major checkpoints, u·δ and |δ|² of each: (K, vectors))."""
        for wt in wts:
            if tuple(wt.shape) != self.shape:
                raise ValueError(f"shape mismatch: base {self.shape} vs checkpoint {tuple(wt.shape)}")
        rows = self.vecs.shape[0]
        ud = torch.empty(len(wts), rows, dtype=self.dtype, device=self.vecs.device)
        dd2 = torch.empty_like(ud)
        one_dtype = len({s.dtype for s in wts}) == 1
        in_files = [not isinstance(w, torch.Tensor) for w in wts]
        if any(in_files):
            if all(in_files) and self._rows and self.dim == 1 and one_dtype and kernels.readable(wts[0].dtype):
                failed = kernels.row_dots_read(self.vecs, [(w.fd, w.start) for w in wts], wts[0].dtype, ud, dd2)
                if failed < 0:
                    return wts, ud, dd2
                wts[failed].load()  # raises the error that stopped the kernel, naming the file
            wts = [w if isinstance(w, torch.Tensor) else w.load() for w in wts]  # read into memory
        srcs = [wt if self.dim == 1 else wt.t() for wt in wts]
        if self._rows and one_dtype and kernels.supports(*srcs):
            kernels.row_dots(self.vecs, srcs, ud, dd2)  # u·δ and |δ|², one fused pass
        elif self._cols and one_dtype and kernels.supports(*(s.t() for s in srcs)):
            kernels.col_dots(self.vecs.t(), [s.t() for s in srcs], ud, dd2)
        else:
            for k, src in enumerate(srcs):
                self._sums(src, ud[k], dd2[k])
        return srcs, ud, dd2

    def _measure_sums(self, ud: torch.Tensor, dd2: torch.Tensor, ok: torch.Tensor | None,
                      denses: list) -> list[Measurement]:
        """Measurements from the sums of K checkpoints (ud, dd2, ok: (K, vectors)). With the CPU
        kernels, one call gives every checkpoint's means when the closed form takes all its
        vectors (the usual case); the others, and every checkpoint elsewhere, go through
        ``_finish`` (per-vector changes, the residual form for the rest) and ``summarize``."""
        fast = self._fast_sums(ud, dd2, ok, None, every=False)
        return [fast[k] if fast[k] is not None else
                summarize(self._finish(ud[k], dd2[k], dense, None if ok is None else ok[k]))
                for k, dense in enumerate(denses)]

    def _fast_sums(self, ud: torch.Tensor, dd2: torch.Tensor, ok: torch.Tensor | None,
                   magnitude: torch.Tensor | None, every: bool = True,
                   with_magnitude: list[bool] | None = None) -> list | None:
        """Per checkpoint its Measurement straight from ``kernels.closed_sums``, or None where
        the closed form does not take every vector (or a value is not finite; or no kernels).
        ``every``: None unless all of them are measured so. ``with_magnitude``: which rows of
        ``magnitude`` are DoRA magnitudes (default: all of them, when it is given)."""
        if not self._kernels:
            return None if every else [None] * ud.shape[0]
        sums = kernels.closed_sums(ud, dd2, self.n0, ok, _ALONG, magnitude, with_magnitude).tolist()
        out = [_from_sums(ud.shape[1], s[0], s[1:9]) if s[9] == 0 and s[10] == 0 else None for s in sums]
        return None if every and any(m is None for m in out) else out

    def _dense(self, src: torch.Tensor):
        """The residual form for the rows ``idx`` of a full-weight checkpoint."""
        loaded: list[torch.Tensor] = []

        def dense(idx: torch.Tensor) -> VectorChanges:
            if not loaded:  # still in its file: read once, when a vector needs it
                loaded.append(src if isinstance(src, torch.Tensor) else src.load())
            u = self.vecs.index_select(0, idx).to(self.dtype)
            v = loaded[0].index_select(0, idx).to(self.dtype)
            return _changes(u, v, v - u, 1)
        return dense

    # -- adapters --
    def measure_lowrank(self, a: torch.Tensor, b: torch.Tensor, scaling: float,
                        magnitude: torch.Tensor | None = None,
                        projected: torch.Tensor | None = None) -> Measurement:
        """ΔM, ΔD of W_0 + s·B·A (Eq. 1), or with ``magnitude`` of DoRA's
        m · (W_0 + s·B·A) / ||W_0 + s·B·A|| (Eq. 5, norm per output row).
        ``projected``: this adapter's part of ``project``, if already made."""
        return self.measure_lowrank_many([(a, b, scaling, magnitude)],
                                         None if projected is None else [projected])[0]

    def measure_lowrank_many(self, adapters: list[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]],
                             projected: list[torch.Tensor] | None = None) -> list[Measurement]:
        """``measure_lowrank`` of several adapters ``(A, B, scaling, magnitude or None)`` of this
        matrix: one pass over W_0 for all of them (``project``), then on a CPU one kernel call
        for every adapter's sums and one for their means (``kernels.closed_sums``)."""
        with gemm.exact(self.vecs.device):
            return self._measure_lowrank_many(adapters, projected)

    def _measure_lowrank_many(self, adapters: list[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]],
                              projected: list[torch.Tensor] | None) -> list[Measurement]:
        out: list[Measurement | None] = [None] * len(adapters)
        summed = [k for k, (_, _, _, m) in enumerate(adapters)
                  if m is None or (self.dim == 1 and m.numel() == self.n0.numel())]
        if summed:
            stored = [self._factors(*adapters[k][:2]) for k in summed]
            # each side put together in its stored dtype, then converted once (not per adapter)
            a = _side_by_side([av for _, av in stored], 0, "lowrank_a").to(self.dtype)  # (Σr, n)
            b = _side_by_side([bv for bv, _ in stored], 1, "lowrank_b").to(self.dtype)  # (vectors, Σr)
            offs = np.cumsum([0] + [av.shape[0] for _, av in stored])
            if projected is None:
                p = self._project(a)
            else:
                p = _side_by_side([projected[k] for k in summed], 1)
            ud, dd2, ok = self._lowrank_sums(b, a, offs, [adapters[k][2] for k in summed], p)
            mags = [adapters[k][3] for k in summed]
            with_m = [m is not None for m in mags]
            m = torch.stack([self.n0 if v is None else v.reshape(-1) for v in mags]).to(self.dtype) \
                if any(with_m) else None
            fast = self._fast_sums(ud, dd2, ok, m, every=False, with_magnitude=with_m)
            for j, k in enumerate(summed):
                out[k] = fast[j] if fast[j] is not None else summarize(
                    self._lowrank_changes(ud[j], dd2[j], ok[j], b[:, offs[j]:offs[j + 1]], a[offs[j]:offs[j + 1]],
                                          adapters[k][2], mags[j]))
        for k, (a, b, s, m) in enumerate(adapters):
            if out[k] is None:  # DoRA on axis "in" (Eq. 5 rescales output rows): merged densely
                out[k] = summarize(self.changes_lowrank(a, b, s, m))
        return out

    def project(self, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """W_0 times the input factor of each adapter (A, B) in one pass over W_0: per vector
        n, the (vectors, r) products u_n · A_j that ``changes_lowrank`` needs."""
        avs = [self._factors(a, b)[1] for a, b in factors]
        if not avs:
            return []
        cat = _side_by_side(avs, 0, "project_a").to(self.dtype)  # converted once, not per adapter
        with gemm.exact(self.vecs.device):
            return list(torch.split(self._project(cat), [av.shape[0] for av in avs], dim=1))

    def _project(self, cat: torch.Tensor) -> torch.Tensor:
        """(vectors, Σr): W_0 catᵀ for the factors av_k stacked, cat = [av_1; …; av_K] (Σr, n):
        one GEMM for all of them, which reads W_0 once (``gemm.linear``: on the faster library;
        callers hold ``gemm.exact``)."""
        rows, n = self.vecs.shape
        if not self._converts:
            return gemm.linear(self.vecs, cat)  # (rows, n) @ (n, Σr)
        if self._cols:  # W_0 as stored, (n, rows): its stored rows a block at a time, summed
            stored = self.vecs.t()
            step = max(1, min(n, (1 << 21) // max(rows, 1)))
            out = torch.zeros(rows, cat.shape[0], dtype=self.dtype, device=self.vecs.device)
            for c0 in range(0, n, step):
                c1 = min(n, c0 + step)
                buf = scratch.buffer("w0_block", (c1 - c0, rows), self.dtype, self.vecs.device)
                kernels.widen(stored[c0:c1], buf)
                out.addmm_(buf.t(), cat[:, c0:c1].t())
            return out
        # convert W_0 a block of rows at a time: no float32 copy of the whole matrix
        step = max(self.block, min(rows, (1 << 21) // max(n, 1)))
        blocks = []
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            buf = scratch.buffer("w0_block", (r1 - r0, n), self.dtype, self.vecs.device)
            if self._rows:
                kernels.widen(self.vecs[r0:r1], buf)
            else:
                buf.copy_(self.vecs[r0:r1])
            blocks.append(gemm.linear(buf, cat))
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def _base_out(self) -> torch.Tensor:
        """W_0 as (out, in) in the compute dtype, kept once made: the dense forms of DoRA for
        axis "in" (Eq. 5 rescales output rows: per input column that is no longer low rank)."""
        if self._w0_out is None:
            self._w0_out = self.vecs.t().to(self.dtype, memory_format=torch.contiguous_format)
        return self._w0_out

    def changes_lowrank(self, a: torch.Tensor, b: torch.Tensor, scaling: float,
                        magnitude: torch.Tensor | None = None) -> VectorChanges:
        """A (r, in), B (out, r), m (out,): per vector, u·δ = s·B_n·(W_0 Aᵀ)_n and
        |δ|² = s²·B_n (A Aᵀ) B_nᵀ: O(out·in·r) flops, no (out, in) temporary."""
        with gemm.exact(self.vecs.device):
            return self._changes_lowrank(a, b, scaling, magnitude)

    def _changes_lowrank(self, a: torch.Tensor, b: torch.Tensor, scaling: float,
                         magnitude: torch.Tensor | None) -> VectorChanges:
        if magnitude is not None and self.dim == 0:  # merged densely (see _base_out)
            w0 = self._base_out()
            if self._merged is None:  # one (out, in) buffer for every checkpoint of this W_0
                self._merged = torch.empty_like(w0)
            v = torch.addmm(w0, b.to(self.dtype), a.to(self.dtype), alpha=scaling, out=self._merged)
            return self.changes(v.mul_(_rescale(magnitude, torch.linalg.vector_norm(v, dim=1)).unsqueeze(1)))
        bv, av = (t.to(self.dtype) for t in self._factors(a, b))
        ud, dd2, ok = self._lowrank_sums(bv, av, [0, av.shape[0]], [scaling], self._project(av))
        return self._lowrank_changes(ud[0], dd2[0], ok[0], bv, av, scaling, magnitude)

    def _with_magnitude(self, ch: VectorChanges, magnitude: torch.Tensor | None) -> VectorChanges:
        """The changes of V' = W_0 + s·B·A, or with DoRA's ``magnitude`` (per output row) of
        m · V' / |V'| (Eq. 5): norm |m_n| and the direction of ±V'_n."""
        if magnitude is None:
            return ch
        m = _finite_magnitude(magnitude, self.dtype)
        valid = ch.valid & (m != 0)
        dd = torch.where(m < 0, 2.0 - ch.dd, ch.dd)
        return VectorChanges(m0=self.n0, dm=m.abs() - self.n0, dd=torch.where(valid, dd, 0.0), valid=valid)

    def _lowrank_sums(self, b: torch.Tensor, a: torch.Tensor, offs: Sequence[int], scalings: list[float],
                      p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u·δ, |δ|², where those sums are exact enough), each (K, vectors), of the K adapters
        W_0 + s_k·bv_k·av_k with b = [bv_1 … bv_K] (vectors, Σr), a = [av_1; …; av_K] (Σr, n),
        adapter k owning columns (rows) ``offs[k]:offs[k+1]`` of b (a), and p = W_0 aᵀ
        (``_project``); all in the compute dtype."""
        rows = self.n0.shape[0]
        ud = torch.empty(len(scalings), rows, dtype=self.dtype, device=self.n0.device)
        dd2 = torch.empty_like(ud)
        ok = torch.empty(ud.shape, dtype=torch.bool, device=self.n0.device)
        if self._kernels:  # the three row sums of every adapter in one pass
            kernels.lowrank_sums(b.contiguous(), p, a.contiguous(), offs, scalings, _GRAM, ud, dd2, ok)
            return ud, dd2, ok
        for k, s in enumerate(scalings):
            bv, av, pk = b[:, offs[k]:offs[k + 1]], a[offs[k]:offs[k + 1]], p[:, offs[k]:offs[k + 1]]
            g = av @ av.t()  # (r, r) Gram matrix
            ud[k] = s * (bv * pk).sum(dim=1)  # u·δ
            dd2[k] = (s * s) * ((bv @ g) * bv).sum(dim=1)  # |δ|²
            bound = (s * s) * ((bv.abs() @ g.abs()) * bv.abs()).sum(dim=1)
            ok[k] = dd2[k] >= _GRAM * bound
        return ud, dd2, ok

    def _lowrank_changes(self, ud: torch.Tensor, dd2: torch.Tensor, ok: torch.Tensor, bv: torch.Tensor,
                         av: torch.Tensor, scaling: float, magnitude: torch.Tensor | None) -> VectorChanges:
        """Per-vector changes of W_0 + s·bv·av (with DoRA's ``magnitude``) from its sums (one
        adapter's row of ``_lowrank_sums``); the rows the closed form does not take are
        recomputed with the residual form."""
        def dense(idx: torch.Tensor) -> VectorChanges:
            uu = self.vecs.index_select(0, idx).to(self.dtype)
            delta = scaling * (bv.index_select(0, idx) @ av)  # (k, r) @ (r, n)
            return _changes(uu, uu + delta, delta, 1)
        return self._with_magnitude(self._finish(ud, dd2, dense, ok), magnitude)

    def _factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bv, av) with the update per vector δ = s · bv @ av, checked against the base's shape,
        in their stored dtype (callers convert them, many adapters' at once)."""
        out_f, in_f = self.shape
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or tuple(b.shape) != (out_f, r):
            raise ValueError(f"lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                             f"the base (out={out_f}, in={in_f})")
        return (b, a) if self.dim == 1 else (a.t(), b.t())  # axis "in": δᵀ = s · Aᵀ Bᵀ

    def measure_rescaled(self, magnitude: torch.Tensor) -> Measurement:
        """DoRA with a magnitude only (paper Table 6): W' = m · W_0 / ||W_0||, per output row."""
        m = _finite_magnitude(magnitude, self.dtype)
        if self.dim == 0:
            w0 = self._base_out()
            return self.measure(w0 * _rescale(m, torch.linalg.vector_norm(w0, dim=1)).unsqueeze(1))
        valid = (self.n0 > 0) & (m != 0)
        dd = torch.where(valid & (m < 0), 2.0, 0.0).to(self.dtype)
        return summarize(VectorChanges(m0=self.n0, dm=m.abs() - self.n0, dd=dd, valid=valid))

    # -- internals --
    def _sums(self, src: torch.Tensor, ud: torch.Tensor, dd2: torch.Tensor) -> None:
        """u·δ and |δ|² with torch ops, a block of rows at a time while it sits in cache
        (GPUs, strided checkpoints, dtypes the kernels do not read)."""
        dbuf, t = self._buffers()[:2]
        for r0, r1, u in self._blocks():
            d = dbuf[: r1 - r0]
            d.copy_(src[r0:r1])  # stored dtype -> compute dtype, in cache
            d.sub_(u)  # δ = v - u
            torch.linalg.vector_norm(d, dim=1, out=dd2[r0:r1])  # |δ|
            # u·δ; u's block is not needed after this, so its buffer may take the product
            torch.sum(torch.mul(u, d, out=t[: r1 - r0]), dim=1, out=ud[r0:r1])
        dd2.square_()

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(δ of one block, u ⊙ δ of one block, W_0 rows converted to the compute dtype),
        allocated on first use; the W_0 buffer doubles as the product's when it exists."""
        if self._bufs is None:
            d = torch.empty(self.block, self.vecs.shape[1], dtype=self.dtype, device=self.vecs.device)
            u = torch.empty_like(d) if self._converts else None
            self._bufs = (d, u if u is not None else torch.empty_like(d), u)
        return self._bufs

    def _blocks(self):
        """(r0, r1, rows r0:r1 of W_0 in the compute dtype)."""
        rows = self.vecs.shape[0]
        ubuf = self._buffers()[2]
        for r0 in range(0, rows, self.block):
            r1 = min(rows, r0 + self.block)
            u = self.vecs[r0:r1]
            if ubuf is not None:
                u = ubuf[: r1 - r0].copy_(u)
            yield r0, r1, u

    def _finish(self, ud: torch.Tensor, dd2: torch.Tensor, dense, ok: torch.Tensor | None = None
                ) -> VectorChanges:
        """Per-vector changes from u·δ and |δ|²; rows the closed form cannot take go to ``dense``."""
        if self._kernels:
            dm, dd = torch.empty_like(ud), torch.empty_like(ud)
            closed = torch.empty(ud.shape, dtype=torch.bool)
            finite = kernels.closed_form(ud, dd2, self.n0, ok, _ALONG, dm, dd, closed)
        else:
            finite, dm, dd, closed = self._closed_form(ud, dd2, ok)
        if not finite:
            raise NonFiniteWeights("non-finite values (NaN/Inf) in the checkpoint weight")
        valid = closed.clone()
        idx = torch.nonzero(~closed).squeeze(1)
        step = 8 * self.block
        for i in range(0, idx.numel(), step):  # residual form, a few blocks of rows at a time
            j = idx[i:i + step]
            ch = dense(j)
            dm[j], dd[j], valid[j] = ch.dm, ch.dd, ch.valid
        return VectorChanges(m0=self.n0, dm=dm, dd=torch.where(valid, dd, 0.0), valid=valid)

    def _closed_form(self, ud: torch.Tensor, dd2: torch.Tensor, ok: torch.Tensor | None):
        """(finite, dm, dd, closed): torch's form of ``kernels.closed_form`` (GPUs; no numba)."""
        if not bool(torch.isfinite(ud).all() & torch.isfinite(dd2).all()):
            return False, None, None, None
        n0 = self.n0
        pos = n0 > 0
        a = ud / torch.where(pos, n0, 1.0)  # change along u
        perp = (dd2 - a * a).clamp_min(0.0)  # |δ_⊥|²
        q = n0 + a  # v along u
        nt = torch.sqrt(q * q + perp)  # |v|
        closed = pos & (ud * ud <= _ALONG * self.n0sq * dd2)  # δ not mostly along u: nt > 0
        if ok is not None:
            closed &= ok
        nt = torch.where(closed, nt, 1.0)
        dm = (2.0 * ud + dd2) / (n0 + nt)
        dd = torch.where(q > 0, perp / (nt * (nt + q.abs())), 1.0 - q / nt).clamp(0.0, 2.0)
        return True, dm, dd, closed


def _side_by_side(ts: list[torch.Tensor], dim: int, name: str | None = None) -> torch.Tensor:
    """The tensors concatenated along ``dim``, contiguous (no copy for one contiguous tensor);
    with ``name``, into that ``scratch`` buffer (valid until the next use of the name)."""
    if len(ts) == 1:
        return ts[0].contiguous()
    if name is None:
        return torch.cat(ts, dim)
    shape = list(ts[0].shape)
    shape[dim] = sum(t.shape[dim] for t in ts)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in ts))  # torch.cat's own
    return torch.cat(ts, dim, out=scratch.buffer(name, shape, dtype, ts[0].device))


def _finite_magnitude(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = magnitude.reshape(-1).to(dtype)
    if not bool(torch.isfinite(m).all()):
        raise NonFiniteWeights("non-finite values (NaN/Inf) in the checkpoint's magnitude vector")
    return m


def _rescale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """m / ||V'|| per output row, 0 where ||V'|| = 0 (the row merges to zero)."""
    m = magnitude.reshape(-1).to(norm.dtype)
    ok = norm > 0
    return torch.where(ok, m / torch.where(ok, norm, 1.0), 0.0)
