"""Benchmark: wda's analysis against the floor (reading the analysed tensors) and a naive peer.

    python benchmarks/bench_analysis.py                 # default: a few GB, CPU (+ CUDA if present)
    python benchmarks/bench_analysis.py --quick         # sub-minute smoke run
    python benchmarks/bench_analysis.py --layers 32 --steps 8 --data /nvme/wda-bench   # 7B-sized

It writes (once, then reuses) a synthetic checkpoint directory shaped like LLaMA-7B's
attention: per layer ``q_proj`` and ``v_proj`` of ``hidden x hidden`` in bf16, a base, an FT
run, a LoRA and a DoRA run (PEFT layout, rank ``--rank``), then times, each in a fresh
subprocess (so peak memory is the analysis' own), interleaved over ``--repeats`` rounds:

1. floor      reading exactly the analysed tensors (byte ranges from the safetensors
              headers, ``os.preadv`` into one reused buffer): no compute, no library;
2. wda        ``wda.analysis.engine.run_analysis`` on the same directory (CPU, and CUDA if present);
3. naive      a straightforward peer: ``safetensors.torch.load_file`` per checkpoint, merge
              adapters with plain torch, then norms and ``cosine_similarity`` per matrix.

Page cache: with ``--cache cold`` (default ``both``) every file of the directory is evicted
with ``posix_fadvise(DONTNEED)`` before each timed run (targeted: no global drop_caches on a
shared machine); ``warm`` reads it once first. Memory: peak RSS and peak anonymous RSS of the
worker over its baseline after imports (see README, "Benchmarks", for what each one means).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
FORMAT_VERSION = 1


# ---- synthetic data ----------------------------------------------------------------------
def module_names(layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.{m}" for i in range(layers) for m in ("q_proj", "v_proj")]


def _write_full(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))


def _write_adapter(path: Path, tensors: dict, rank: int, alpha: float, dora: bool) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_dora": dora,
           "use_rslora": False, "fan_in_fan_out": False, "target_modules": ["q_proj", "v_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def make_dataset(root: Path, layers: int, steps: int, hidden: int, rank: int, seed: int = 0,
                 quiet: bool = False) -> Path:
    """Write base + ft/lora/dora runs (``steps`` checkpoints each) unless already there."""
    import torch

    meta = {"version": FORMAT_VERSION, "layers": layers, "steps": steps, "hidden": hidden,
            "rank": rank, "seed": seed}
    marker = root / "bench_meta.json"
    if marker.is_file() and json.loads(marker.read_text()) == meta:
        return root
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} exists with other contents; remove it or choose another --data")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    mods = module_names(layers)
    std = hidden ** -0.5
    base = {m: torch.randn(hidden, hidden, generator=gen) * std for m in mods}  # fp32 master copy
    _write_full(root / "base", {m + ".weight": w.bfloat16() for m, w in base.items()})
    cur = dict(base)
    for s in range(1, steps + 1):  # FT: a random walk, a few bf16 ulps per step
        cur = {m: w + torch.randn(w.shape, generator=gen) * (0.02 * std) for m, w in cur.items()}
        _write_full(root / "ft" / f"checkpoint-{100 * s}", {m + ".weight": w.bfloat16() for m, w in cur.items()})
    prefix = "base_model.model."
    for run, dora in (("lora", False), ("dora", True)):
        a = {m: torch.empty(rank, hidden).uniform_(-std, std, generator=gen) for m in mods}
        b = {m: torch.zeros(hidden, rank) for m in mods}
        mag = {m: w.bfloat16().float().norm(dim=1) for m, w in base.items()}
        for s in range(1, steps + 1):
            t = {}
            for m in mods:
                a[m] = a[m] + torch.randn(a[m].shape, generator=gen) * (0.05 * std)
                b[m] = b[m] + torch.randn(b[m].shape, generator=gen) * (0.05 * std)
                t[f"{prefix}{m}.lora_A.weight"] = a[m].contiguous()
                t[f"{prefix}{m}.lora_B.weight"] = b[m].contiguous()
                if dora:
                    mag[m] = mag[m] * (1 + 0.01 * torch.randn(hidden, generator=gen))
                    t[f"{prefix}{m}.lora_magnitude_vector"] = mag[m].contiguous()
            _write_adapter(root / run / f"checkpoint-{100 * s}", t, rank, 2.0 * rank, dora)
    os.sync()
    marker.write_text(json.dumps(meta))
    if not quiet:
        print(f"# wrote {root} ({_du(root) / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
    return root


def _files(root: Path) -> list[Path]:
    """Every file under root, following symlinked folders (the step views), each once."""
    seen = {}
    for d, _, names in os.walk(root, followlinks=True):
        for n in names:
            p = Path(d) / n
            seen.setdefault(p.resolve(), p)
    return sorted(seen)


def _du(root: Path) -> int:
    return sum(p.stat().st_size for p in _files(root))


def evict(root: Path) -> None:
    """Drop this directory's files from the page cache (clean pages; ours are synced)."""
    for p in _files(root):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(root: Path) -> None:
    buf = bytearray(1 << 24)
    for p in _files(root):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# ---- what is analysed: (file, key) in wda's order ---------------------------------------
def analysed_tensors(root: Path, layers: int | None = None) -> list[tuple[Path, str]]:
    """Exactly the tensors the analysis reads, module-major (base, then each checkpoint)."""
    import wda

    plan = wda.plan(root, modules=_module_filter(layers))
    out: list[tuple[Path, str]] = []
    prefix = "base_model.model."
    for mod in plan["module"].drop_duplicates():
        out.append((root / "base" / "model.safetensors", mod + ".weight"))
        for row in plan[plan.module == mod].itertuples():
            p = Path(row.path)
            if row.method == "FT":
                out.append((p / "model.safetensors", mod + ".weight"))
            else:
                f = p / "adapter_model.safetensors"
                out += [(f, f"{prefix}{mod}.lora_A.weight"), (f, f"{prefix}{mod}.lora_B.weight")]
                if row.method == "DoRA":
                    out.append((f, f"{prefix}{mod}.lora_magnitude_vector"))
    return out


def _module_filter(layers: int | None):
    if layers is None:
        return None
    return [rf"model\.layers\.({'|'.join(map(str, range(layers)))})\.self_attn\.(q_proj|v_proj)"]


def _headers(todo: list[tuple[Path, str]]) -> tuple[dict[Path, tuple[int, dict]], int]:
    """Each file's (data start, header), read once, and the largest tensor's bytes."""
    headers: dict[Path, tuple[int, dict]] = {}
    biggest = 0
    for f, key in todo:
        if f not in headers:
            headers[f] = _header(f)
        s, e = headers[f][1][key]["data_offsets"]
        biggest = max(biggest, e - s)
    return headers, biggest


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


# ---- workers (each in a fresh process) ----------------------------------------------------
def _cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class MemSampler:
    """Peak RSS (kernel high-water mark) and sampled peak anonymous / file RSS, in bytes.
    Every 10 ms: the sampler is a Python thread beside the one measured, and reading
    /proc/self/status every 2 ms cost wda's two-thread engine ~4% at 768²."""

    def __init__(self, every: float = 0.01) -> None:
        self.every = every
        self.base = self._read()
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _read() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._update()

    def _update(self) -> None:
        now = self._read()
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)

    def __enter__(self) -> "MemSampler":
        self._cpu0 = _cpu_seconds()
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu = _cpu_seconds() - self._cpu0  # all threads, the sampler's own share is tiny
        self._stop.set()
        self._t.join()
        self._update()

    def report(self) -> dict[str, int]:
        return {"cpu": self.cpu, "peak_rss": self.peak["VmHWM"] - self.base["VmRSS"],
                "peak_anon": self.peak["RssAnon"] - self.base["RssAnon"],
                "peak_file": self.peak["RssFile"] - self.base["RssFile"]}


def worker_floor(root: Path, layers: int | None, device: str, out_csv: str | None = None, axis: str = "out") -> dict:
    """Read exactly the analysed byte ranges into one reused buffer (to the device if CUDA).
    The bytes are the same for either ``axis``."""
    import torch

    todo = analysed_tensors(root, layers)
    headers, biggest = _headers(todo)
    cuda = device.startswith("cuda")
    nbuf = 2 if cuda else 1
    bufs = [torch.empty(biggest, dtype=torch.uint8, pin_memory=cuda) for _ in range(nbuf)]
    for b in bufs:
        b.fill_(0)  # fault the pages in before the clock starts
    dev_buf = torch.empty(biggest, dtype=torch.uint8, device=device) if cuda else None
    events = [None] * nbuf
    stream = torch.cuda.Stream() if cuda else None
    with MemSampler() as mem:
        t0 = time.perf_counter()
        nbytes = 0
        fds: dict[Path, int] = {}
        for i, (f, key) in enumerate(todo):
            off, hdr = headers[f]
            s, e = hdr[key]["data_offsets"]
            fd = fds.get(f)
            if fd is None:
                fd = fds[f] = os.open(f, os.O_RDONLY)
            k = i % nbuf
            if events[k] is not None:
                events[k].synchronize()
            view = bufs[k][: e - s]
            got = os.preadv(fd, [view.numpy()], off + s)
            assert got == e - s, (f, key)
            nbytes += got
            if cuda:
                with torch.cuda.stream(stream):
                    dev_buf[: e - s].copy_(view, non_blocking=True)
                    events[k] = torch.cuda.Event()
                    events[k].record(stream)
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        for fd in fds.values():
            os.close(fd)
    return {"seconds": secs, "bytes": nbytes, **mem.report()}


_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def worker_gemm(root: Path, layers: int | None, device: str, out_csv: str | None = None, axis: str = "out") -> dict:
    """The floor plus the arithmetic that no exact analysis of an adapter can avoid (CPU):
    the same byte ranges read the same way, and per module W_0 widened to float32 once and ONE
    GEMM W_0 [A_1; …; A_T]ᵀ for all its adapter checkpoints (torch's matmul, the worker's
    threads): u_n·δ_n = s·B_n·(W_0 Aᵀ)_n needs every entry of W_0 Aᵀ. For full weights it is
    the floor. (wda does more per adapter, O(vectors·r²): the sums from B and the Gram matrix.)"""
    import torch

    todo = analysed_tensors(root, layers)
    headers, biggest = _headers(todo)
    buf = torch.empty(biggest, dtype=torch.uint8)
    buf.fill_(0)

    def read(fd: int, f: Path, key: str, keep: bool = False) -> torch.Tensor:
        """The tensor, in the reused buffer (or, ``keep``, in a new one of its own)."""
        off, hdr = headers[f]
        s, e = hdr[key]["data_offsets"]
        view = torch.empty(e - s, dtype=torch.uint8) if keep else buf[: e - s]
        got = os.preadv(fd, [view.numpy()], off + s)
        assert got == e - s, (f, key)
        return view.view(getattr(torch, _DTYPES[hdr[key]["dtype"]])).reshape(hdr[key]["shape"])

    with MemSampler() as mem:
        t0 = time.perf_counter()
        nbytes, w0, factors = 0, None, []

        def project() -> None:
            if factors:
                torch.mm(w0, torch.cat(factors).t())
                factors.clear()

        for f, key in todo:
            fd = os.open(f, os.O_RDONLY)
            try:
                t = read(fd, f, key, keep=key.endswith("lora_A.weight"))
            finally:
                os.close(fd)
            nbytes += t.numel() * t.element_size()
            if f.parent.name == "base":
                project()
                w0 = t.float()  # a copy: the buffer is reused
            elif key.endswith("lora_A.weight"):
                factors.append(t)
        project()
        secs = time.perf_counter() - t0
    return {"seconds": secs, "bytes": nbytes, **mem.report()}


def worker_st(root: Path, layers: int | None, device: str, out_csv: str | None = None, axis: str = "out") -> dict:
    """What a plain script does: each analysed tensor read with the ``safetensors``
    package (``safe_open``, one file open at a time, tensors in the same order as the
    floor) and widened to float32; no compute."""
    from safetensors import safe_open

    todo = analysed_tensors(root, layers)
    with MemSampler() as mem:
        t0 = time.perf_counter()
        nbytes = 0
        for f, key in todo:
            with safe_open(str(f), framework="pt") as h:
                stored = h.get_tensor(key)
                wide = stored.float()
            nbytes += stored.numel() * stored.element_size()
            del stored, wide
        secs = time.perf_counter() - t0
    return {"seconds": secs, "bytes": nbytes, **mem.report()}


def worker_wda(root: Path, layers: int | None, device: str, out_csv: str | None, axis: str = "out") -> dict:
    import tqdm.auto  # noqa: F401  (imported by the analysis; not part of its memory)
    from wda.analysis.engine import AnalysisOptions, run_analysis

    opts = AnalysisOptions(modules=tuple(_module_filter(layers) or ()) or None, device=device, axis=axis,
                           progress=False)
    with MemSampler() as mem:
        t0 = time.perf_counter()
        res = run_analysis(root, opts)
        if device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    if out_csv:
        res.metrics.to_csv(out_csv, index=False)
    return {"seconds": secs, "bytes": res.bytes_read, "rows": len(res.metrics), **mem.report()}


def worker_naive(root: Path, layers: int | None, device: str, out_csv: str | None, axis: str = "out") -> dict:
    """What one writes without thinking about memory or passes: whole state dicts, plain torch."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    if axis != "out":
        raise SystemExit("the naive peer measures axis 'out' only")

    mods = set(module_names(layers)) if layers is not None else None
    rows = []
    with MemSampler() as mem:
        t0 = time.perf_counter()
        base = load_file(str(root / "base" / "model.safetensors"), device=device)
        names = sorted(k[:-7] for k in base if k.endswith(".weight") and (mods is None or k[:-7] in mods))
        w0 = {n: base[n + ".weight"].float() for n in names}
        for run in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "base"):
            for ck in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
                step = int(ck.name.split("-")[1])
                if (ck / "adapter_config.json").is_file():
                    cfg = json.loads((ck / "adapter_config.json").read_text())
                    sd = load_file(str(ck / "adapter_model.safetensors"), device=device)
                    s = cfg["lora_alpha"] / cfg["r"]
                    merged = {}
                    for n in names:
                        p = f"base_model.model.{n}."
                        a, b = sd[p + "lora_A.weight"].float(), sd[p + "lora_B.weight"].float()
                        v = w0[n] + s * (b @ a)
                        if cfg.get("use_dora"):
                            v = sd[p + "lora_magnitude_vector"].float()[:, None] * v / v.norm(dim=1, keepdim=True)
                        merged[n] = v
                else:
                    sd = load_file(str(ck / "model.safetensors"), device=device)
                    merged = {n: sd[n + ".weight"].float() for n in names}
                for n in names:
                    m0, mt = w0[n].norm(dim=1), merged[n].norm(dim=1)
                    cos = F.cosine_similarity(w0[n], merged[n], dim=1)
                    rows.append({"run": run.name, "step": step, "module": n,
                                 "delta_m": float((mt - m0).abs().mean()), "delta_d": float((1 - cos).mean())})
                del sd, merged
        secs = time.perf_counter() - t0
    if out_csv:
        import pandas as pd
        pd.DataFrame(rows).to_csv(out_csv, index=False)
    return {"seconds": secs, "bytes": None, "rows": len(rows), **mem.report()}


def _worker_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.dir)
    fn = {"floor": worker_floor, "gemm": worker_gemm, "st": worker_st, "wda": worker_wda,
          "naive": worker_naive}[args.worker]
    # Warm-up on one layer: lazy imports, library code pages, allocator pools. Otherwise the
    # first run pays them and its "peak memory" counts libtorch pages touched for the first time.
    fn(root, 1, args.device, None, args.axis)
    if args.cache == "cold":
        evict(root)  # what the warm-up read must come from the disk again
    _reset_peak_rss()
    res = fn(root, args.layers_filter, args.device, args.csv, args.axis)
    res["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(res), flush=True)


def _reset_peak_rss() -> None:
    """Reset VmHWM (Linux: 5 > /proc/self/clear_refs), so the peak is this run's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_worker(kind: str, root: Path, device: str, threads: int, cache: str,
               layers: int | None = None, csv: str | None = None, axis: str = "out") -> dict:
    if cache == "cold":
        evict(root)
    elif cache == "warm":
        warm(root)
    cmd = [sys.executable, str(HERE), "--_worker", kind, "--_dir", str(root), "--device", device,
           "--threads", str(threads), "--_cache", cache, "--_axis", axis]
    if layers is not None:
        cmd += ["--_layers", str(layers)]
    if csv:
        cmd += ["--_csv", csv]
    load0 = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker {kind} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["load"] = load0
    return res


# ---- driver -------------------------------------------------------------------------------
def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def measure_set(root: Path, modes: list[tuple[str, str, int]], caches: list[str], repeats: int,
                layers: int | None = None, naive_repeats: int | None = None, csv_dir: str | None = None,
                axis: str = "out", log=print) -> dict:
    """Interleaved rounds: every (cache, mode) once per round, in a rotating order. The naive
    peer (20x slower) runs in the first ``naive_repeats`` rounds only. With ``csv_dir``, the
    first wda and naive runs also write their tables there (for ``cross_check``)."""
    results: dict[tuple[str, str, str, int], list[dict]] = {}
    combos = [(c, k, d, t) for c in caches for (k, d, t) in modes]
    for r in range(repeats):
        order = combos[r % len(combos):] + combos[: r % len(combos)]
        for cache, kind, dev, threads in order:
            if kind == "naive" and naive_repeats is not None and r >= naive_repeats:
                continue
            key = (cache, kind, dev, threads)
            csv = None
            if csv_dir and kind in ("wda", "naive") and key not in results:
                csv = os.path.join(csv_dir, f"{kind}-{dev}-{cache}-{threads}.csv")
            res = run_worker(kind, root, dev, threads, cache, layers, csv=csv, axis=axis)
            results.setdefault(key, []).append(res)
            log(f"#   round {r + 1}/{repeats} {cache:4s} {kind:5s} {dev:4s} t={threads}: "
                f"{res['seconds']:7.2f} s wall {res['cpu']:7.2f} s CPU, peak RSS "
                f"{res['peak_rss'] / 2**20:5.0f} MB, anon {res['peak_anon'] / 2**20:5.0f} MB (load {res['load']:.1f})")
    return results


def summarize(results: dict) -> dict:
    out = {}
    for key, rs in results.items():
        secs = [r["seconds"] for r in rs]
        out[key] = {"median": _med(secs), "min": min(secs), "max": max(secs), "n": len(secs),
                    "cpu": _med([r["cpu"] for r in rs]),
                    "bytes": rs[0]["bytes"], "peak_rss": _med([r["peak_rss"] for r in rs]),
                    "peak_anon": _med([r["peak_anon"] for r in rs]),
                    "peak_file": _med([r["peak_file"] for r in rs]), "load": _med([r["load"] for r in rs])}
    return out


def _floor(summary: dict, cache: str, dev: str = "cpu") -> dict | None:
    return summary.get((cache, "floor", dev, 1))


def print_table(summary: dict, floor_bytes: int, title: str) -> list[str]:
    lines = [f"### {title}", "",
             "| cache | what | device | threads | wall s: median [min-max], n | CPU s | GB/s | "
             "peak RSS MB | peak anon MB | wall / floor | CPU / floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    gb = floor_bytes / 1e9
    for key in sorted(summary, key=lambda k: (("cold", "warm").index(k[0]), k[2],
                                              ("floor", "wda", "naive").index(k[1]), k[3])):
        v = summary[key]
        fl = _floor(summary, key[0], key[2]) or _floor(summary, key[0])
        ratio = f"{v['median'] / fl['median']:.2f}" if fl else "-"
        cratio = f"{v['cpu'] / fl['cpu']:.2f}" if fl else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {v['median']:.2f} "
                     f"[{v['min']:.2f}-{v['max']:.2f}], {v['n']} | {v['cpu']:.2f} | {gb / v['median']:.2f} | "
                     f"{v['peak_rss'] / 2**20:.0f} | {v['peak_anon'] / 2**20:.0f} | {ratio} | {cratio} |")
    return lines


def ratio_lines(summary: dict) -> list[str]:
    lines = []
    for key, v in sorted(summary.items()):
        if key[1] != "wda":
            continue
        cache, _, dev, threads = key
        fl = _floor(summary, cache, dev) or _floor(summary, cache)
        nv = summary.get((cache, "naive", dev, threads))
        parts = []
        if fl:
            parts.append(f"wda/floor = {v['median'] / fl['median']:.2f} wall, {v['cpu'] / fl['cpu']:.2f} CPU")
        if nv:
            parts.append(f"naive/wda = {nv['median'] / v['median']:.1f} wall, "
                         f"{nv['peak_rss'] / max(v['peak_rss'], 1):.0f}x the peak RSS")
        lines.append(f"  {cache:4s} {dev:4s} threads={threads}:  " + ";  ".join(parts))
    return lines


def reference64(root: Path, module: str) -> "pd.DataFrame":
    """Eqs. 3-4 of one module in float64 with plain formulas (accurate at these sizes of change)."""
    import pandas as pd
    import torch
    from safetensors import safe_open

    def read(path: Path, key: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key).double()

    w0 = read(root / "base" / "model.safetensors", module + ".weight")
    m0 = w0.norm(dim=1)
    rows = []
    for run in ("ft", "lora", "dora"):
        for ck in sorted((root / run).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
            if run == "ft":
                w = read(ck / "model.safetensors", module + ".weight")
            else:
                cfg = json.loads((ck / "adapter_config.json").read_text())
                f, pre = ck / "adapter_model.safetensors", f"base_model.model.{module}."
                v = w0 + cfg["lora_alpha"] / cfg["r"] * read(f, pre + "lora_B.weight") @ read(f, pre + "lora_A.weight")
                w = v if run == "lora" else read(f, pre + "lora_magnitude_vector")[:, None] * v / v.norm(dim=1, keepdim=True)
            mt = w.norm(dim=1)
            cos = (w0 * w).sum(dim=1) / (m0 * mt)
            rows.append({"run": run, "step": int(ck.name.split("-")[1]), "module": module,
                         "delta_m": float((mt - m0).abs().mean()), "delta_d": float((1 - cos).mean())})
    return pd.DataFrame(rows)


def cross_check(root: Path, csv_dir: str) -> list[str]:
    """wda and the naive peer against a float64 reference on one module (all runs and steps)."""
    import pandas as pd

    module = module_names(1)[0]
    ref = reference64(root, module)
    out = []
    for name in ("wda", "naive"):
        files = sorted(Path(csv_dir).glob(f"{name}-cpu-*.csv"))
        if not files:
            continue
        got = pd.read_csv(files[0])
        m = ref.merge(got[got.module == module], on=["run", "step", "module"], suffixes=("", "_got"))
        rel_m = ((m.delta_m_got - m.delta_m).abs() / m.delta_m).max()
        rel_d = ((m.delta_d_got - m.delta_d).abs() / m.delta_d).max()
        out.append(f"  accuracy of {name} against float64 on {module} ({len(m)} checkpoints): "
                   f"max relative error ΔM {rel_m:.1e}, ΔD {rel_d:.1e}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/wda-bench", help="where the synthetic checkpoints live (reused)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (q_proj, v_proj each; LLaMA-7B: 32)")
    p.add_argument("--steps", type=int, default=4, help="checkpoints per run (FT, LoRA, DoRA)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (LLaMA-7B: 4096)")
    p.add_argument("--rank", type=int, default=16, help="LoRA/DoRA rank")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--naive-repeats", type=int, default=1, help="rounds that include the (slow) naive peer")
    p.add_argument("--threads", default="1", help="torch threads for wda and naive, comma-separated (e.g. 1,2)")
    p.add_argument("--cache", choices=("cold", "warm", "both"), default="both")
    p.add_argument("--device", default="auto", help="auto: cpu, plus cuda when present; or cpu / cuda")
    p.add_argument("--no-naive", action="store_true", help="skip the naive peer")
    p.add_argument("--growth", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure 2x layers, 2x and 10x steps (smaller sets, warm cache)")
    p.add_argument("--by-method", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure each run alone with the base (warm cache)")
    p.add_argument("--growth-layers", type=int, default=2)
    p.add_argument("--growth-steps", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="tiny sizes, warm cache, 1 round: a smoke run")
    p.add_argument("--_worker", choices=("floor", "gemm", "st", "wda", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--_dir", help=argparse.SUPPRESS)
    p.add_argument("--_layers", dest="layers_filter", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_csv", dest="csv", help=argparse.SUPPRESS)
    p.add_argument("--_cache", default="none", help=argparse.SUPPRESS)
    p.add_argument("--_axis", dest="axis", default="out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        args.worker, args.dir, args.cache = args._worker, args._dir, args._cache
        args.threads = int(args.threads)
        _worker_main(args)
        return
    if args.quick:
        args.layers, args.steps, args.hidden, args.repeats, args.cache = 2, 2, 1024, 1, "warm"
        args.growth_layers, args.growth_steps = 1, 1
        args.data = args.data.rstrip("/") + "-quick"
    import tempfile

    import torch

    threads = [int(t) for t in args.threads.split(",")]
    devices = ["cpu"]
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices = ["cpu", "cuda"] if args.device == "auto" else ["cuda"]
    elif args.device == "cuda":
        raise SystemExit("--device cuda: no CUDA device")
    caches = ["cold", "warm"] if args.cache == "both" else [args.cache]
    data = Path(args.data)
    main_dir = make_dataset(data / f"L{args.layers}_S{args.steps}_H{args.hidden}_r{args.rank}",
                            args.layers, args.steps, args.hidden, args.rank)
    todo = analysed_tensors(main_dir)
    floor_bytes = sum(_tensor_nbytes(f, k) for f, k in todo)
    out: list[str] = [
        _machine_line(threads, devices),
        f"data: {args.layers} layers x (q_proj, v_proj) {args.hidden}x{args.hidden} bf16; base + FT "
        f"{args.steps} steps + LoRA {args.steps} + DoRA {args.steps} (r={args.rank}, fp32 factors); "
        f"{len(todo)} tensors analysed = {floor_bytes / 1e9:.2f} GB (on disk {_du(main_dir) / 1e9:.2f} GB)",
        f"command: python benchmarks/bench_analysis.py {' '.join(argv if argv is not None else sys.argv[1:])}"]
    print("\n".join("# " + ln for ln in out), flush=True)
    modes = [("floor", dev, 1) for dev in devices]
    for dev in devices:
        for t in threads:
            modes.append(("wda", dev, t))
            if not args.no_naive and t == threads[0]:  # the naive peer at the first thread count only
                modes.append(("naive", dev, t))
    with tempfile.TemporaryDirectory() as csv_dir:
        res = summarize(measure_set(main_dir, modes, caches, args.repeats, naive_repeats=args.naive_repeats,
                                    csv_dir=csv_dir))
        check = cross_check(main_dir, csv_dir)
    out += ["", *print_table(res, floor_bytes, "Floor, wda and naive peer"), "", *ratio_lines(res), *check]
    if "cuda" in devices:
        out.append(f"  host-to-device bandwidth (pinned, 256 MB): {_h2d_bandwidth():.1f} GB/s")
    if args.by_method:
        out += [""] + by_method(args, main_dir, threads, devices)
    if args.growth:
        out += [""] + growth(args, data, threads[0], devices)
    out += ["", f"load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)"]
    print("\n".join(out))


def growth(args, data: Path, threads: int, devices: list[str]) -> list[str]:
    """Time and peak memory of wda (and the floor) when layers or steps grow."""
    L, S = args.growth_layers, args.growth_steps
    # two directories hold them all: (2L layers, S steps) and (L layers, 10S steps); the
    # others are views: fewer layers through --modules, fewer steps through symlinked steps.
    wide = make_dataset(data / f"L{2 * L}_S{S}_H{args.hidden}_r{args.rank}", 2 * L, S, args.hidden, args.rank)
    long = make_dataset(data / f"L{L}_S{10 * S}_H{args.hidden}_r{args.rank}", L, 10 * S, args.hidden, args.rank)
    sets = {"base": (_steps_view(long, S), L, S), "2x layers": (wide, 2 * L, S),
            "2x steps": (_steps_view(long, 2 * S), L, 2 * S), "10x steps": (long, L, 10 * S)}
    lines = [f"### Growth (warm cache, {args.repeats} rounds, threads={threads}; "
             f"base = {L} layers x {S} steps per run)", "",
             "| set | layers | steps/run | floor s | wda s | wda / floor | wda time / base | "
             "wda peak RSS MB | / base | wda peak anon MB | / base |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    got = {}
    for name, (d, layers, _) in sets.items():
        modes = [("floor", "cpu", 1)] + [("wda", dev, threads) for dev in devices]
        got[name] = summarize(measure_set(d, modes, ["warm"], args.repeats, layers=layers))
    for dev in devices:
        b = got["base"][("warm", "wda", dev, threads)]
        for name, (d, layers, steps) in sets.items():
            r = got[name]
            w, f = r[("warm", "wda", dev, threads)], r[("warm", "floor", "cpu", 1)]
            lines.append(f"| {name}{'' if dev == 'cpu' else ' (' + dev + ')'} | {layers} | {steps} | "
                         f"{f['median']:.2f} | {w['median']:.2f} | {w['median'] / f['median']:.2f} | "
                         f"{w['median'] / b['median']:.2f} | {w['peak_rss'] / 2**20:.0f} | "
                         f"{w['peak_rss'] / b['peak_rss']:.2f} | {w['peak_anon'] / 2**20:.0f} | "
                         f"{_ratio(w['peak_anon'], b['peak_anon'])} |")
    return lines


def by_method(args, main_dir: Path, threads: list[int], devices: list[str]) -> list[str]:
    """wda / floor for each run alone (base + that run): where the time goes. The FT run is
    also measured with ``--axis in`` (one magnitude per input column: the column kernels)."""
    lines = [f"### By method (warm cache, {args.repeats} rounds; each set = base + one run)", "",
             "| run | axis | device | threads | floor s | wda s | wda / floor | wda CPU s |",
             "|---|---|---|---|---|---|---|---|"]
    for run, axis in (("ft", "out"), ("ft", "in"), ("lora", "out"), ("dora", "out")):
        view = _runs_view(main_dir, run)
        modes = [("floor", "cpu", 1)] + [("wda", dev, t) for dev in devices for t in threads]
        r = summarize(measure_set(view, modes, ["warm"], args.repeats, axis=axis))
        f = r[("warm", "floor", "cpu", 1)]
        for dev in devices:
            for t in threads:
                w = r[("warm", "wda", dev, t)]
                lines.append(f"| {run} | {axis} | {dev} | {t} | {f['median']:.2f} | {w['median']:.2f} | "
                             f"{w['median'] / f['median']:.2f} | {w['cpu']:.2f} |")
    return lines


def _runs_view(src: Path, run: str) -> Path:
    """A directory with the base and one run of ``src`` (symlinks)."""
    dst = src.parent / f"{src.name}-{run}"
    dst.mkdir(exist_ok=True)
    for name in ("base", run):
        if not (dst / name).exists():
            (dst / name).symlink_to(src / name)
    return dst


def _ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}" if base >= 2**20 else "-"  # below 1 MiB a ratio says nothing


def _steps_view(src: Path, steps: int) -> Path:
    """A directory whose runs hold the first ``steps`` checkpoints of ``src`` (symlinks)."""
    dst = src.parent / f"{src.name}-first{steps}"
    if (dst / "ok").is_file():
        return dst
    (dst).mkdir(exist_ok=True)
    for run in ("base", "ft", "lora", "dora"):
        if run == "base":
            if not (dst / "base").exists():
                (dst / "base").symlink_to(src / "base")
            continue
        (dst / run).mkdir(exist_ok=True)
        for s in range(1, steps + 1):
            link = dst / run / f"checkpoint-{100 * s}"
            if not link.exists():
                link.symlink_to(src / run / f"checkpoint-{100 * s}")
    (dst / "ok").write_text("")
    return dst


def _tensor_nbytes(f: Path, key: str) -> int:
    s, e = _header(f)[1][key]["data_offsets"]
    return e - s


def _h2d_bandwidth() -> float:
    import torch

    x = torch.empty(256 * 2**20, dtype=torch.uint8, pin_memory=True)
    y = torch.empty_like(x, device="cuda")
    y.copy_(x)
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x, non_blocking=True)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return x.numel() / min(ts) / 1e9


def _machine_line(threads: list[int], devices: list[str]) -> str:
    import torch

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from wda.analysis import kernels

    gpu = f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else ", no GPU"
    numba = f"numba {kernels.numba.__version__}" if kernels.available() else "no CPU kernels"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"machine: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB{gpu}; torch {torch.__version__}, {numba}, "
            f"python {platform.python_version()}; threads tried {threads}; OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}; load avg at start {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
