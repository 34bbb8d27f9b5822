"""wda.Tracker under FSDP2 on 2 CPU ranks (gloo): rank 0 alone writes, and its rows equal those
of a single-process tracker on the same training (full fine-tuning and DoRA adapters)."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from test_distributed import SPECS, LR, Toy, adapted_model, batches, spawn

pytestmark = pytest.mark.distributed


def _fsdp_tracker_worker(env, tmp: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from wda.analysis import distributed
    from wda.tracking.tracker import Tracker

    for tag in ("ft", "dora"):
        if tag == "ft":
            torch.manual_seed(10 + env.rank)  # different on purpose: the broadcast must win
            model = Toy().double()
        else:
            _, model = adapted_model(SPECS["dora"], seed=10 + env.rank)
        distributed.broadcast_parameters_(model)
        ref = copy.deepcopy(model)
        if tag == "ft":
            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
        else:
            distributed.shard_adapters(model, list(model.layers))
        assert all(isinstance(p, DTensor) for p in model.parameters())
        tracker = Tracker(model, every=1, out=Path(tmp, tag), run=tag)  # every rank; rank 0 writes
        assert tracker.write is env.is_main
        ref_tracker = Tracker(ref, every=1, out=Path(tmp, tag + ".single"), run=tag) if env.is_main else None
        for m in (model, ref):
            m._opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=LR)
        for step, ((x, y), (fx, fy)) in enumerate(zip(batches(env.rank), batches(None)), start=1):
            for m, (a, b) in ((model, (x, y)), (ref, (fx, fy))):
                m._opt.zero_grad()
                nn.functional.mse_loss(m(a), b).backward()
                m._opt.step()
            tracker.step(step)
            if ref_tracker is not None:
                ref_tracker.step(step)
        if env.is_main:
            assert tracker.w0_bytes > 0  # sharded W_0: gathered once, kept on rank 0


def test_fsdp2_tracker_rows_equal_a_single_process_tracker(tmp_path):
    spawn(_fsdp_tracker_worker, str(tmp_path), timeout=120)
    from test_tracker import assert_rows_equal

    for tag, n in (("ft", 4), ("dora", 6)):  # q, v (+ magnitude-only o for DoRA) x 2 layers
        got = pd.read_csv(tmp_path / tag / "metrics.csv")
        want = pd.read_csv(tmp_path / f"{tag}.single" / "metrics.csv")
        assert len(got) == n * 2  # 2 steps
        assert_rows_equal(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dora", "dora.single", "ft", "ft.single"]
