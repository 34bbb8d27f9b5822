"""How the analysis runs its GEMMs: true float32 whatever the process asked torch for, and on
the library that is the faster on this CPU.

Precision. torch lets a process trade float32 GEMM precision for speed (``torch.set_float32_
matmul_precision("high" / "medium")``, ``torch.backends.cuda.matmul.allow_tf32 = True``: TF32 on
a GPU, bf16 operands on a CPU with AMX). A training script that measures while it trains often
sets that; W_0·Aᵀ with TF32 or bf16 operands is off by ~1e-3. Within ``exact`` every float32
GEMM is a true float32 one ("ieee"); the setting is put back after. (Raising precision for a
moment cannot hurt another thread's results.)

Speed. torch's float32 GEMM on a CPU is MKL's, which on AMD processors takes its AVX2 code even
where the CPU has AVX-512 (Zen 4, Zen 5); oneDNN, which torch also ships, picks its kernels by
instruction set. On such a CPU ``linear`` runs oneDNN's float32 kernel: the same float32
products and sums, about 2.2x faster (one or two cores, 768²-4096²; benchmarks/README.md).
Elsewhere, and wherever that kernel is missing, it is ``torch.mm``. The choice depends on the
CPU only, so a machine gives the same values run after run.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch

_BACKENDS = {"cpu": "mkldnn", "cuda": "cuda"}


def _setting(device: torch.device):
    """torch's per-backend matmul precision (``fp32_precision``: "none", "ieee", "tf32",
    "bf16"), or None for a device without one or a torch without the setting (< 2.9)."""
    backend = getattr(torch.backends, _BACKENDS.get(device.type, ""), None)
    matmul = getattr(backend, "matmul", None)
    try:
        matmul.fp32_precision  # noqa: B018 (raises on a torch without it)
    except (AttributeError, RuntimeError):
        return None
    return matmul


@contextlib.contextmanager
def exact(device: torch.device) -> Iterator[None]:
    """Within: float32 GEMMs on ``device`` are true float32 ones (no TF32, no bf16 operands)."""
    matmul = _setting(device)
    if matmul is None:
        with _legacy_highest(device):
            yield
        return
    now = matmul.fp32_precision
    if now in ("ieee", "none"):  # "none": nothing lowered it
        yield
        return
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = now


@contextlib.contextmanager
def _legacy_highest(device: torch.device) -> Iterator[None]:
    """torch < 2.9: float32_matmul_precision "highest" (and no TF32 on a GPU) for the block."""
    before = torch.get_float32_matmul_precision()
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    if before != "highest":
        torch.set_float32_matmul_precision("highest")
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        if before != "highest":
            torch.set_float32_matmul_precision(before)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ wᵀ for 2-D float32 tensors (x (m, k), w (n, k)), float32 products and sums."""
    if x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and _onednn_faster() \
            and x.is_contiguous() and w.is_contiguous():
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return torch.mm(x, w.t())


@functools.cache
def _onednn_faster() -> bool:
    """An AMD CPU with AVX-512 (MKL's float32 GEMM runs its AVX2 code there) and oneDNN's
    float32 linear at hand, giving x @ wᵀ on a probe."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")
    if capability() != "AVX512" or _vendor() != "AuthenticAMD" or not torch.backends.mkldnn.is_available():
        return False
    x, w = torch.arange(6.0).reshape(2, 3), torch.arange(12.0).reshape(4, 3)
    try:
        got = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return got.shape == (2, 4) and bool(torch.equal(got, x @ w.t()))


def _vendor() -> str:
    """The CPU's vendor id (Linux; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
