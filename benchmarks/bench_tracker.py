"""Cost of ``wda.Tracker`` per measured step, as a ratio to one training step, in one run.

The block: LLaMA-7B-shaped query and value projections (``--hidden 4096``, no bias), trained by
full fine-tuning (AdamW on both weights) or with wda's ``LoRALinear`` / ``DoRALinear`` (``--rank
16``, alpha 32) on ``--tokens`` tokens: loss = mean(q(x) * v(x)), forward + backward + AdamW
step. A real model's step also runs k, o, the MLP and the rest (about 10x the flops of q and v),
so the ratio to this block's step is an upper bound of the ratio to a real step.

A tracker step (``every=1``, so each call measures) on the same block: ΔM and ΔD of q and v
against W_0 (FT: W_0 copied to ``--w0-device``, the CPU by default; adapters: the frozen base
weight, nothing copied), appended to metrics.csv with fsync. Training and tracker steps
alternate within each repeat, so load from other processes hits both alike; medians of wall
time (``--clock cpu``: of the process's CPU time) after a warm-up.

    python benchmarks/bench_tracker.py --quick               # smoke run, seconds
    python benchmarks/bench_tracker.py                       # 4096², r 16, 2048 tokens, CPU
    python benchmarks/bench_tracker.py --device cuda         # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from wda.train.dora import DoRALinear, LoRALinear
from wda.tracking.tracker import Tracker


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.q_proj(x) * self.v_proj(x)).mean()


def make(method: str, hidden: int, rank: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    block = Block(hidden).to(device)
    if method == "ft":
        return block
    for name in ("q_proj", "v_proj"):
        base = getattr(block, name)
        layer = LoRALinear(base, rank, 2.0 * rank) if method == "lora" else DoRALinear(base, rank, 2.0 * rank)
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 1e-3)  # a trained adapter, not the B = 0 start
        setattr(block, name, layer)
    return block


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, clock: str) -> float:
    sync(device)
    t0 = time.process_time() if clock == "cpu" else time.perf_counter()
    fn()
    sync(device)
    return (time.process_time() if clock == "cpu" else time.perf_counter()) - t0


def bench(method: str, args, device: torch.device, tmp: Path) -> dict:
    block = make(method, args.hidden, args.rank, device)
    params = [p for p in block.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(args.tokens, args.hidden, device=device)
    w0_device = None if args.w0_device == "same" else args.w0_device
    tracker = Tracker(block, every=1, out=tmp / method, w0_device=w0_device)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        block(x).backward()
        opt.step()

    step = [0]

    def track_step() -> None:
        step[0] += 1
        tracker.step(step[0])

    for _ in range(args.warmup):
        train_step()
        track_step()
    train, track = [], []
    for _ in range(args.repeats):
        train.append(timed(train_step, device, args.clock))
        track.append(timed(track_step, device, args.clock))
    t_train, t_track = statistics.median(train), statistics.median(track)
    return {"method": method, "train_s": t_train, "track_s": t_track, "ratio": t_track / t_train,
            "w0_mib": tracker.w0_bytes / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--methods", default="ft,lora,dora")
    p.add_argument("--device", default="cpu")
    p.add_argument("--w0-device", default="cpu", help="where FT's W_0 copy lives: cpu or same (the weight's device)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--every", type=int, default=50, help="the overhead column: measuring every N steps")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--quick", action="store_true", help="hidden 256, rank 4, 128 tokens, 3 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.rank, args.tokens, args.repeats = 256, 4, 128, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"block: q, v {args.hidden}x{args.hidden}, r {args.rank}, {args.tokens} tokens, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.clock} clock, "
          f"median of {args.repeats}")
    print(f"| method | train step s | tracker step s | tracker / train | added at every {args.every} | W_0 copy MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        for method in args.methods.split(","):
            r = bench(method, args, device, Path(d))
            print(f"| {r['method']} | {r['train_s']:.4f} | {r['track_s']:.4f} | {r['ratio']:.4f} | "
                  f"{100 * r['ratio'] / args.every:.3f} % | {r['w0_mib']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
