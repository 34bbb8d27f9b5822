"""Forward+backward time and peak memory of DoRA vs LoRA layers, as ratios against wda LoRA.

Rows: one nn.Linear (out, in) (no bias unless ``--bias``, as in Llama's projections) wrapped as wda ``LoRALinear`` (the baseline), wda ``DoRALinear``
(detached norm, Sec. 4.3), and PEFT's ``lora.Linear`` without / with ``use_dora`` (through
``get_peft_model`` on a one-Linear module). Input ``x`` (batch, seq, in) requires grad, as a
hidden state inside a model does; the backward uses a fixed random output gradient, so no
loss function keeps ``y`` alive.

Time: median (``--stat min``: minimum) over ``--repeats`` after a warm-up, of wall-clock time, or
with ``--clock cpu`` of the process's CPU time: on a CPU shared with other jobs that counts the
work done rather than the time spent waiting for a core (use it with ``--threads 1``), the methods interleaved (order rotated) within each repeat so
that load from other processes hits them alike.

Peak memory: the largest amount of memory allocated during one forward+backward above what was
allocated before it (weights, input, output gradient; parameter gradients are cleared first),
so it counts activations kept for backward, temporaries and the gradients made. On CUDA that is
``torch.cuda.max_memory_allocated`` minus the starting ``memory_allocated``. On CPU there is no
allocator statistic, so the CPU allocator's own allocation/free events are recorded with
``torch.profiler(profile_memory=True)`` and the peak of their running sum is taken; this sees
every tensor allocation through c10's allocator (not Python objects or oneDNN scratch space
that bypasses it). Kineto logs a few lines to stderr while it records; the table is on stdout.

    python benchmarks/bench_layers.py --quick                       # smoke run, seconds
    python benchmarks/bench_layers.py --shapes 1024x1024 --ranks 8,16,64
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from wda.train.dora import DoRALinear, LoRALinear


@dataclass(frozen=True)
class Case:
    out_f: int
    in_f: int
    r: int
    dropout: float
    bias: bool = False


class _One(nn.Module):
    """A model with a single Linear, for ``get_peft_model``."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def build(case: Case, device: torch.device, dtype: torch.dtype, with_peft: bool) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Linear(case.in_f, case.out_f, bias=case.bias, device=device, dtype=dtype)
    alpha = 2.0 * case.r
    mods: dict[str, nn.Module] = {
        "wda LoRA": LoRALinear(copy.deepcopy(base), case.r, alpha, case.dropout),
        "wda DoRA": DoRALinear(copy.deepcopy(base), case.r, alpha, case.dropout),
    }
    if with_peft:
        from peft import LoraConfig, get_peft_model

        for use_dora in (False, True):
            cfg = LoraConfig(r=case.r, lora_alpha=alpha, lora_dropout=case.dropout,
                             target_modules=["lin"], use_dora=use_dora)
            # keep PEFT's adapter in the base dtype, as wda does
            m = get_peft_model(_One(copy.deepcopy(base)), cfg, autocast_adapter_dtype=False)
            mods["PEFT DoRA" if use_dora else "PEFT LoRA"] = m
    with torch.no_grad():  # B != 0, so no path can shortcut a zero update
        for m in mods.values():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
    return {k: v.train() for k, v in mods.items()}


def step(mod: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    mod(x).backward(grad_out)


def clear_grads(mod: nn.Module, x: torch.Tensor) -> None:
    for p in mod.parameters():
        p.grad = None
    x.grad = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(mod: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, device: torch.device) -> int:
    clear_grads(mod, x)
    if device.type == "cuda":
        sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(mod, x, grad_out)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(mod, x, grad_out)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def run_case(case: Case, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    mods = build(case, device, dtype, not args.no_peft)
    batch, seq = args.tokens
    x = torch.randn(batch, seq, case.in_f, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(batch, seq, case.out_f, device=device, dtype=dtype)
    times: dict[str, list[float]] = {k: [] for k in mods}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    names = list(mods)
    for rep in range(args.warmup + args.repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate the order
            mod = mods[name]
            clear_grads(mod, x)
            sync(device)
            t0 = clock()
            step(mod, x, grad_out)
            sync(device)
            if rep >= args.warmup:
                times[name].append(clock() - t0)
    mem = {name: peak_bytes(mod, x, grad_out, device) for name, mod in mods.items()}
    stat = min if args.stat == "min" else statistics.median
    return {name: (stat(times[name]), mem[name]) for name in mods}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1024x1024,4096x4096", help="OUTxIN,...")
    p.add_argument("--ranks", default="8,16,64")
    p.add_argument("--dropouts", default="0,0.05")
    p.add_argument("--tokens", default="8x256", help="BATCHxSEQ")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--stat", choices=("median", "min"), default="median")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time, insensitive to other processes (CPU device only)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), fp32, bf16")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--bias", action="store_true",
                   help="give the Linear a bias (default none, as in Llama's projections)")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT rows")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.ranks, args.tokens, args.repeats, args.warmup = "96x64", "4", "2x16", 2, 1
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.ranks = [int(v) for v in args.ranks.split(",")]
    args.dropouts = [float(v) for v in args.dropouts.split(",")]
    args.tokens = tuple(int(v) for v in args.tokens.split("x"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    dtype = dtypes[args.dtype] if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures host CPU time; use it with --device cpu")
    print(f"# device={device} dtype={dtype} threads={torch.get_num_threads()} "
          f"tokens={args.tokens[0]}x{args.tokens[1]} repeats={args.repeats} ({args.stat}, "
          f"{args.clock} clock) "
          f"bias={args.bias} torch={torch.__version__}", flush=True)
    print("# time and peak memory as ratios against wda LoRA in the same run; "
          "peak = extra bytes during one forward+backward")
    header = None
    for out_f, in_f in args.shapes:
        for r in args.ranks:
            for p in args.dropouts:
                res = run_case(Case(out_f, in_f, r, p, args.bias), args, device, dtype)
                t0, m0 = res["wda LoRA"]
                others = [k for k in res if k != "wda LoRA"]
                if header is None:
                    header = (["shape", "r", "drop", "LoRA ms", "LoRA MiB"]
                              + [f"{k} time" for k in others] + [f"{k} mem" for k in others])
                    print("| " + " | ".join(header) + " |")
                    print("|" + "---|" * len(header))
                row = ([f"{out_f}x{in_f}", str(r), f"{p:g}", f"{1e3 * t0:.1f}", f"{m0 / 2**20:.1f}"]
                       + [f"{res[k][0] / t0:.2f}x" for k in others]
                       + [f"{res[k][1] / m0:.2f}x" for k in others])
                print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
