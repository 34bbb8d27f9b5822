"""Measurement: ΔM and ΔD of every (run, checkpoint, module) against the base (paper Eqs. 3-4).

    engine.py       analyze() / plan(): discover a layout, read each tensor once, measure, rows
    layout.py       what is on disk: runs, checkpoints, base, modules (through wda.formats)
    decompose.py    the math: per-vector norms and cosines of W_t against W_0, one Measurement
    gemm.py         its GEMMs: true float32 whatever the process asked, on the faster library
    scratch.py      work buffers each thread keeps from matrix to matrix
    kernels.py      fused numba loops for decompose on the CPU (torch does the rest, and the GPU)
    prefetch.py     read-ahead of the next tensors while the current one is measured
    buffers.py      the reusable read buffers that keep memory flat
    distributed.py  the same measurement split over torchrun ranks
"""
