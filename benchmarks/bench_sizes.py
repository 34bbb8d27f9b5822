"""Benchmark: wda / floor at every model size, and time against bytes rather than tensors.

    python benchmarks/bench_sizes.py --quick            # smoke run (~2 min): 768² and 1024², small sets
    OMP_WAIT_POLICY=passive python benchmarks/bench_sizes.py          # the full tables (idle machine)
    python benchmarks/bench_sizes.py --big              # also 8192² (11 GB more on disk)
    python benchmarks/bench_sizes.py --discover-only    # discover/plan on 500 checkpoints x 200 modules

Uses the data, workers and timing of ``bench_analysis.py`` (each measurement in a fresh
subprocess, interleaved rounds, medians): for each width (768, 1024, 2048, 4096; 8192 with
``--big``) one synthetic directory of ``q_proj``/``v_proj`` pairs in bf16 with 40 checkpoints
per run (FT, LoRA, DoRA), of which views (symlinks) select 4 or 40 checkpoints and one run.

Tables:

1. **Sweep**: wda / floor for each width x {4, 40} checkpoints x {FT, LoRA, DoRA} x threads,
   warm cache (and cold with ``--cold``); for adapter runs also wda / (floor + the one GEMM
   per matrix their exact analysis needs).
2. **Bytes, not tensors**: FT sets of (nearly) the same bytes, 640 MiB, as 4 checkpoints of
   two 4096² layers, made of ever more, ever smaller tensors (down to 576 tensors of 768²):
   if the cost is per byte, the time is the same on every row.
3. **Discovery**: ``wda.analysis.layout.discover`` and ``wda.plan`` (headers only) on 500 checkpoints
   x 200 modules of tiny tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_analysis as ba  # noqa: E402

# layers per width: a few hundred MB to a few GB per 40-checkpoint FT run
LAYERS = {768: 12, 1024: 8, 2048: 4, 4096: 2, 8192: 1}
STEPS = 40
# sets of the same bytes (layers, steps): (4 + 1) x 4 matrices of 4096² = 640 MiB
SAME_BYTES = {8192: (1, 1), 4096: (2, 4), 2048: (2, 19), 1024: (4, 39), 768: (8, 35)}


def dataset(data: Path, hidden: int, layers: int, steps: int, rank: int) -> Path:
    return ba.make_dataset(data / f"L{layers}_S{steps}_H{hidden}_r{rank}", layers, steps, hidden, rank)


def view(src: Path, steps: int, run: str, full_steps: int) -> Path:
    """base + one run of ``src`` with its first ``steps`` checkpoints (symlinks)."""
    return ba._runs_view(src if steps == full_steps else ba._steps_view(src, steps), run)


def set_bytes(root: Path, layers: int | None) -> tuple[int, int]:
    todo = ba.analysed_tensors(root, layers)
    return len(todo), sum(ba._tensor_nbytes(f, k) for f, k in todo)


def measure(root: Path, layers: int | None, threads: list[int], caches: list[str], repeats: int,
            log, st: bool = False, gemm: bool = False) -> dict:
    """``st``: also what a plain script does (safetensors + widening to float32); ``gemm``: also
    the floor plus the one GEMM per matrix that adapters need (``bench_analysis.worker_gemm``),
    on each thread count."""
    modes = [("floor", "cpu", 1)] + ([("st", "cpu", 1)] if st else []) \
        + ([("gemm", "cpu", t) for t in threads] if gemm else []) + [("wda", "cpu", t) for t in threads]
    return ba.summarize(ba.measure_set(root, modes, caches, repeats, layers=layers, log=log))


def sweep(args, widths: list[int], threads: list[int], caches: list[str], log) -> list[str]:
    lines = [f"### wda / floor by width ({args.repeats} rounds, medians; CPU)", "",
             "For adapter runs, *floor+GEMM* is the floor plus the arithmetic an exact analysis of an "
             "adapter cannot avoid: one float32 GEMM W_0·[A_1; …; A_T]ᵀ per matrix, on as many threads "
             "(full weights: the floor).", "",
             "| width | layers | checkpoints | run | tensors | GB | cache | floor s | safetensors+float s | "
             + " | ".join(f"wda s ({t} thr) | wda / floor ({t} thr) | wda / st+float ({t} thr) | "
                          f"floor+GEMM s ({t} thr) | wda / floor+GEMM ({t} thr)" for t in threads)
             + " |", "|---" * (9 + 5 * len(threads)) + "|"]
    for h in widths:
        layers = args.layers or LAYERS[h]
        src = dataset(Path(args.data), h, layers, args.steps, args.rank)
        for steps in args.step_counts:
            for run in args.runs:
                root = view(src, steps, run, args.steps)
                n, nbytes = set_bytes(root, None)
                adapters = run != "ft"
                res = measure(root, None, threads, caches, args.repeats, log, st=True, gemm=adapters)
                for cache in caches:
                    fl, st = res[(cache, "floor", "cpu", 1)], res[(cache, "st", "cpu", 1)]
                    cells = []
                    for t in threads:
                        w = res[(cache, "wda", "cpu", t)]
                        g = res[(cache, "gemm", "cpu", t)] if adapters else fl
                        cells.append(f"{w['median']:.3f} | **{w['median'] / fl['median']:.2f}** | "
                                     f"{w['median'] / st['median']:.2f} | "
                                     + (f"{g['median']:.3f} | **{w['median'] / g['median']:.2f}**" if adapters
                                        else "- | -"))
                    lines.append(f"| {h}² | {layers} | {steps} | {run} | {n} | {nbytes / 1e9:.2f} | {cache} | "
                                 f"{fl['median']:.3f} | {st['median']:.3f} | " + " | ".join(cells) + " |")
                    print(lines[-1], flush=True)
    return lines


def same_bytes(args, widths: list[int], threads: list[int], log) -> list[str]:
    t = threads[0]
    lines = [f"### Time follows bytes, not tensors (FT, warm cache, {t} thread(s), {args.repeats} rounds)", "",
             "| width | layers | checkpoints | tensors | MiB | floor s | wda s | wda / floor | "
             "wda s per GiB | wda µs per tensor |", "|---|---|---|---|---|---|---|---|---|---|"]
    for h in widths:
        if h not in SAME_BYTES:
            continue
        layers, steps = SAME_BYTES[h]
        src = dataset(Path(args.data), h, args.layers or LAYERS[h], args.steps, args.rank)
        layers = min(layers, args.layers or LAYERS[h])
        root = view(src, min(steps, args.steps), "ft", args.steps)
        n, nbytes = set_bytes(root, layers)
        res = measure(root, layers, [t], ["warm"], args.repeats, log)
        fl, w = res[("warm", "floor", "cpu", 1)], res[("warm", "wda", "cpu", t)]
        lines.append(f"| {h}² | {layers} | {min(steps, args.steps)} | {n} | {nbytes / 2**20:.0f} | "
                     f"{fl['median']:.3f} | {w['median']:.3f} | {w['median'] / fl['median']:.2f} | "
                     f"{w['median'] / (nbytes / 2**30):.3f} | {w['median'] / n * 1e6:.0f} |")
        print(lines[-1], flush=True)
    return lines


# ---- discovery on many checkpoints ------------------------------------------------------------
def make_many(root: Path, checkpoints: int, modules: int) -> Path:
    """base + one FT run of ``checkpoints`` checkpoints, each ``modules`` 4x4 bf16 weights."""
    marker = root / "many_meta.json"
    meta = {"checkpoints": checkpoints, "modules": modules}
    if marker.is_file() and json.loads(marker.read_text()) == meta:
        return root
    import torch
    from safetensors.torch import save_file

    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w_extra"]
    names = [f"model.layers.{i // 8}.{'self_attn' if i % 8 < 4 else 'mlp'}.{kinds[i % 8]}.weight"
             for i in range(modules)]
    t = {n: torch.zeros(4, 4, dtype=torch.bfloat16) for n in names}
    for d in ["base"] + [f"ft/checkpoint-{s}" for s in range(1, checkpoints + 1)]:
        (root / d).mkdir(parents=True, exist_ok=True)
        save_file(t, str(root / d / "model.safetensors"), metadata={"format": "pt"})
        (root / d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    marker.write_text(json.dumps(meta))
    return root


def discovery(args) -> list[str]:
    root = make_many(Path(args.data) / f"many_{args.many[0]}x{args.many[1]}", *args.many)
    code = (
        "import json, sys, time\n"
        "import wda\n"
        "from wda.analysis.layout import discover\n"
        f"root = {str(root)!r}\n"
        "out = {}\n"
        "for label, fn in (('discover, default modules', lambda: discover(root)),\n"
        "                  ('plan, default modules', lambda: wda.plan(root)),\n"
        "                  ('discover, every module', lambda: discover(root, modules=['.*'])),\n"
        "                  ('plan, every module', lambda: wda.plan(root, modules=['.*']))):\n"
        "    ts = []\n"
        f"    for _ in range({max(args.repeats, 2)}):\n"
        "        t0 = time.perf_counter(); r = fn(); ts.append(time.perf_counter() - t0)\n"
        "    rows = len(r) if hasattr(r, 'shape') else sum(len(x.steps) for x in r.runs) * len(r.modules)\n"
        "    out[label] = (ts[0], sorted(ts[1:] or ts)[len(ts[1:] or ts) // 2], rows)\n"
        "print('RESULT ' + json.dumps(out))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # each in a fresh process (first call: cold imports and a cold header cache)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        raise SystemExit(p.stderr[-3000:])
    res = json.loads(line[0][7:])
    lines = [f"### Discovery: {args.many[0]} checkpoints x {args.many[1]} modules (headers only; "
             f"{max(args.repeats, 2)} calls each, in one fresh process)", "",
             "| call | (checkpoint, module) pairs | first call s | median of the others s |", "|---|---|---|---|"]
    lines += [f"| {k} | {rows} | {first:.3f} | {med:.3f} |" for k, (first, med, rows) in res.items()]
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/wda-sizes", help="where the synthetic checkpoints live (reused)")
    p.add_argument("--widths", default="768,1024,2048,4096", help="comma-separated hidden sizes")
    p.add_argument("--big", action="store_true", help="also 8192² (1 layer; 11 GB on disk)")
    p.add_argument("--threads", default="1,2", help="torch threads for wda, comma-separated")
    p.add_argument("--cold", action="store_true", help="cold cache beside warm in the sweep")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--runs", default="ft,lora,dora")
    p.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=STEPS, help=argparse.SUPPRESS)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-bytes", action="store_true")
    p.add_argument("--no-discover", action="store_true")
    p.add_argument("--discover-only", action="store_true")
    p.add_argument("--many", default="500,200", help="checkpoints,modules for the discovery table")
    p.add_argument("--quick", action="store_true", help="smoke run: 768² and 1024², 2 layers, 4/8 "
                   "checkpoints, 1 round, warm, FT and LoRA, 1 thread, 50 x 200 discovery")
    p.add_argument("--out", help="also write the tables to this markdown file")
    args = p.parse_args(argv)
    args.many = [int(x) for x in args.many.split(",")]
    widths = [int(w) for w in args.widths.split(",")] + ([8192] if args.big else [])
    threads = [int(t) for t in args.threads.split(",")]
    args.runs = args.runs.split(",")
    args.step_counts = [4, args.steps]
    if args.quick:
        widths, threads, args.repeats, args.layers, args.steps = [768, 1024], [1], 1, 2, 8
        args.step_counts, args.runs, args.cold, args.many = [4, 8], ["ft", "lora"], False, [50, 200]
        args.data = args.data.rstrip("/") + "-quick"
    if args.discover_only:
        args.no_sweep = args.no_bytes = True
    caches = ["warm", "cold"] if args.cold else ["warm"]
    t0 = time.perf_counter()
    log = (lambda s: print(s, flush=True)) if not args.out else (lambda s: print(s, file=sys.stderr, flush=True))
    out = [ba._machine_line(threads, ["cpu"]),
           f"command: python benchmarks/bench_sizes.py {' '.join(argv if argv is not None else sys.argv[1:])}"]
    print("\n".join("# " + ln for ln in out), flush=True)
    if not args.no_sweep:
        out += [""] + sweep(args, widths, threads, caches, log)
    if not args.no_bytes:
        out += [""] + same_bytes(args, widths, threads, log)
    if not args.no_discover:
        out += [""] + discovery(args)
    out += ["", f"load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores); "
                f"{time.perf_counter() - t0:.0f} s in all"]
    text = "\n".join(out)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
