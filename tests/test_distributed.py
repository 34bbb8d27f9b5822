"""torch.distributed with 2 CPU ranks (gloo): the sharded report against the single-process
report, byte for byte; LoRA/DoRA training steps under DDP and FSDP2 against a plain
single-process step on the same global batch; PEFT adapters saved from sharded models.

Every reference is computed in one process without any torch.distributed code.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import datetime
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from wda.train.adapt import AdapterSpec, adapter_parameters, add_adapters, load_adapter, save_adapter

pytestmark = pytest.mark.distributed

WORLD = 2
Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
REPORT_ARGS = ["--no-progress", "--no-figures", "--bootstrap", "50"]
TABLES = ("metrics.csv", "fits.csv", "fits_per_step.csv")


# ---- launching ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, *args) -> None:
    """One rank: torchrun's environment, the process group, then ``fn(env, *args)``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from wda.analysis import distributed

    env = distributed.init_distributed("gloo", "cpu", timeout=datetime.timedelta(seconds=60))
    fn(env, *args)  # on failure the rank exits with the error and spawn() stops the other
    gc.collect()  # DDP reducers and FSDP state go before the group they use
    distributed.shutdown()


def spawn(fn, *args, timeout: float = 90.0) -> None:
    """Run ``fn`` on 2 ranks; a failure on any rank fails the test, a hang is killed. The free
    port can be taken by another process between the probe and the bind: then try again."""
    for attempt in range(3):
        try:
            return _spawn_once(fn, args, timeout)
        except mp.ProcessRaisedException as exc:
            if "Address already in use" not in str(exc) or attempt == 2:
                raise


def _spawn_once(fn, args: tuple, timeout: float) -> None:
    ctx = mp.start_processes(_entry, args=(fn, _free_port(), *args), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):  # raises if a rank failed (and stops the other)
        if time.monotonic() > deadline:
            for p in ctx.processes:  # only the processes this test started
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{fn.__name__} did not finish within {timeout} s (hung collective?)")


# ---- checkpoint directories ------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """tiny Llama (2 layers): base, ft (full weights), lora and dora (PEFT) runs."""
    from builders import qv_runs

    d = tmp_path_factory.mktemp("dist") / "ck"
    return qv_runs(d)


@pytest.fixture(scope="module")
def ckpt_nan(ckpt) -> Path:
    """The same with a NaN in ft/checkpoint-20 in layer 1's q_proj: a module on rank 1
    (modules are sorted q_proj L0, q_proj L1, v_proj L0, v_proj L1 and dealt round robin)."""
    from safetensors.torch import load_file, save_file

    d = ckpt.parent / "ck_nan"
    shutil.copytree(ckpt, d)
    f = d / "ft" / "checkpoint-20" / "model.safetensors"
    tensors = load_file(f)
    tensors[Q1 + ".weight"][0, 0] = float("nan")
    save_file(tensors, f, metadata={"format": "pt"})
    return d


def single_report(ckpt_dir: Path, out: Path, *extra: str) -> tuple[int, str]:
    """The ordinary single-process CLI, in this process, on one thread like each rank
    (CPU BLAS results may in principle depend on the thread count)."""
    from wda.report.cli import main

    err, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main([str(ckpt_dir), "--out", str(out), *REPORT_ARGS, *extra])
    finally:
        torch.set_num_threads(threads)
    return rc, err.getvalue()


def assert_same_report(single: Path, multi: Path) -> None:
    for name in TABLES:
        assert (multi / name).read_bytes() == (single / name).read_bytes(), name
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (single, multi))
    for key in ("runs", "modules", "rows", "skipped", "axis", "dtype"):
        assert b[key] == a[key], key
    if not a["skipped"]:  # a skipped checkpoint is found by one rank while others read it
        assert b["bytes_read"] == a["bytes_read"]
    assert b["timings_s"].keys() == a["timings_s"].keys()
    assert "2 ranks" in b["device"]


# ---- sharded analysis ------------------------------------------------------------------------
def test_exact_pattern_selects_that_module_only():
    """A rank's share is passed as --modules patterns: each must select one name, never a
    longer name it is a dotted suffix of, nor one that its dots match as wildcards."""
    from wda.analysis.distributed import exact_pattern
    from wda.analysis.layout import matches

    names = ["lm_head", "model.lm_head", "model.layers.1.q_proj", "model.layers.11.q_proj",
             "model.layers.1xq_proj", "odd(name)+.w"]
    for n in names:
        assert [m for m in names if matches(m, exact_pattern(n))] == [n]


def test_torchrun_report_equals_single_process(ckpt_nan, tmp_path):
    """The real launcher: ``torchrun -m wda.report`` writes the single-process tables.

    With --skip-broken the NaN matrix is met on rank 1 only, yet the single process drops
    every row of that checkpoint, rank 0's modules included: the ranks' skips are merged."""
    rc, _ = single_report(ckpt_nan, tmp_path / "single", "--skip-broken")
    assert rc == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "wda.report", str(ckpt_nan), "--out", str(tmp_path / "multi"), *REPORT_ARGS,
           "--skip-broken"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_report(tmp_path / "single", tmp_path / "multi")
    import pandas as pd

    metrics = pd.read_csv(tmp_path / "multi" / "metrics.csv")
    assert not ((metrics.run == "ft") & (metrics.step == 20)).any()  # the merge did drop rows
    assert {Q0, Q1} <= set(metrics.module) and len(metrics) == 20
    assert p.stdout.count("rows from") == 1  # rank 0 alone reports


def _cli_cases(env, ckpt: str, ckpt_nan: str, out: str) -> None:
    """Several CLI runs in one process group; each rank writes down what it printed."""
    from wda.report.cli import main

    cases = {"one_module": [ckpt, "--modules", Q0],  # rank 1's share is empty
             "error_on_rank1": [ckpt_nan]}  # NaN met by rank 1 only, no --skip-broken
    for name, argv in cases.items():
        err, std = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            rc = main([*argv, "--out", str(Path(out) / name), *REPORT_ARGS])
        Path(out, f"{name}.rank{env.rank}.json").write_text(
            json.dumps({"rc": rc, "stderr": err.getvalue(), "stdout": std.getvalue()}))


def test_empty_share_and_error_on_one_rank(ckpt, ckpt_nan, tmp_path):
    out = tmp_path / "multi"
    out.mkdir()
    spawn(_cli_cases, str(ckpt), str(ckpt_nan), str(out), timeout=90)
    res = {(case, r): json.loads((out / f"{case}.rank{r}.json").read_text())
           for case in ("one_module", "error_on_rank1") for r in range(WORLD)}

    # a rank with nothing to measure takes part and adds nothing
    rc, _ = single_report(ckpt, tmp_path / "single", "--modules", Q0)
    assert rc == 0 and [res["one_module", r]["rc"] for r in range(WORLD)] == [0, 0]
    assert_same_report(tmp_path / "single", out / "one_module")

    # an error on rank 1: every rank stops with the same status, rank 0 prints the one line
    # the single process prints, and no report (nor temporary folder) is left behind
    rc, single_err = single_report(ckpt_nan, tmp_path / "single_err")
    assert rc == 2 and len(single_err.strip().splitlines()) == 1
    runs = [res["error_on_rank1", r] for r in range(WORLD)]
    assert [r["rc"] for r in runs] == [2, 2]
    assert runs[0]["stderr"] == single_err and runs[1]["stderr"] == ""
    assert "Traceback" not in runs[0]["stderr"] and Q1 in single_err
    assert not (out / "error_on_rank1").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".error_on_rank1")]


# ---- adapters under DDP / FSDP2 --------------------------------------------------------------
class Block(nn.Module):
    """Non-square projections with odd sizes: 9 output rows shard 5 + 4 over 2 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.v_proj, self.o_proj = nn.Linear(12, 9), nn.Linear(9, 12), nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.o_proj(torch.tanh(self.v_proj(torch.tanh(self.q_proj(x)))))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


SPECS = {
    "lora": AdapterSpec("lora", r=3, alpha=6.0),
    "dora": AdapterSpec("dora", r=3, alpha=6.0, magnitude_only=("o_proj",)),  # + Table 6 modules
    "dora_full_grad": AdapterSpec("dora", r=2, alpha=3.0, use_rslora=True, detach_norm=False),
}
GLOBAL_BATCH, STEPS, LR = 8, 2, 0.2


def adapted_model(spec: AdapterSpec, seed: int) -> tuple[nn.Module, nn.Module]:
    """(plain float64 Toy, the same with adapters); B is made non-zero so every factor has a
    gradient and DoRA's norm differs from ||W_0||. ``seed`` differs per rank on purpose."""
    torch.manual_seed(seed)
    plain = Toy().double()
    model = copy.deepcopy(plain)
    add_adapters(model, spec)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return plain, model


def batches(rank: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same global batches everywhere; rank r takes rows r::WORLD (None: all rows)."""
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 12, generator=g, dtype=torch.float64)
        y = torch.randn(GLOBAL_BATCH, 5, generator=g, dtype=torch.float64)
        out.append((x, y) if rank is None else (x[rank::WORLD], y[rank::WORLD]))
    return out


def train(model: nn.Module, params: dict, data) -> list[dict[str, torch.Tensor]]:
    """SGD steps on mean-squared error (a mean over the batch, so DDP/FSDP's average over
    ranks equals the mean over the global batch). Returns the gradients of every step."""
    opt = torch.optim.SGD(list(params.values()), lr=LR)  # update ∝ gradient: errors show
    grads = []
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads.append({n: p.grad.detach().clone() for n, p in params.items()})
        opt.step()
    return grads


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def check_training(model: nn.Module, ref: nn.Module, rank: int, tag: str) -> None:
    """Sharded/replicated steps on each rank's half == single-process steps on the batch."""
    from wda.analysis.distributed import unwrap

    params = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}  # no DDP prefix
    ref_params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert sorted(params) == sorted(ref_params) and params
    got, want = train(model, params, batches(rank)), train(ref, ref_params, batches(None))
    for step, (g, w) in enumerate(zip(got, want)):
        for n in sorted(w):  # the same order on every rank: full() is a collective
            close(full(g[n]), w[n], f"{tag} grad {n} step {step}")
    for n in sorted(ref_params):
        close(full(params[n].detach()), ref_params[n].detach(), f"{tag} param {n}")


def same_adapter(a: Path, b: Path) -> None:
    """Identical adapters: the config byte for byte; the same tensors bit for bit and the same
    metadata (not the file's bytes: safetensors writes its metadata map in hash order)."""
    from safetensors import safe_open

    assert (a / "adapter_config.json").read_bytes() == (b / "adapter_config.json").read_bytes()
    with safe_open(str(a / "adapter_model.safetensors"), "pt") as fa, \
            safe_open(str(b / "adapter_model.safetensors"), "pt") as fb:
        assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
        for k in fb.keys():
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), k


def check_saved(spec: AdapterSpec, plain: nn.Module, ref: nn.Module, saved: Path, single: Path) -> None:
    """The adapter saved from the sharded model is the single process's adapter (same keys,
    tensors to rounding), and loads back into a plain model that computes what ``ref`` does."""
    from safetensors.torch import load_file

    save_adapter(ref, single, spec)
    a, b = load_file(saved / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(k.startswith("base_model.model.layers.") for k in a)
    for k in sorted(b):
        close(a[k], b[k], f"saved {k}")
    assert json.loads((saved / "adapter_config.json").read_text()) == \
        json.loads((single / "adapter_config.json").read_text())
    loaded = copy.deepcopy(plain)
    assert load_adapter(loaded, saved) == spec
    x = torch.randn(4, 12, dtype=torch.float64)
    with torch.no_grad():
        close(loaded(x), ref(x), "forward of the loaded adapter")


def _ddp_worker(env, tmp: str) -> None:
    from wda.analysis import distributed

    for tag, spec in SPECS.items():
        plain, model = adapted_model(spec, seed=10 + env.rank)
        ddp = distributed.wrap_ddp(model, env)  # broadcasts rank 0's weights
        ref = copy.deepcopy(model)  # now rank 0's initial state on every rank
        check_training(ddp, ref, env.rank, f"ddp/{tag}")
        out = Path(tmp, f"{tag}.ddp")
        distributed.save_adapter_distributed(ddp, out, spec)
        if env.is_main:
            check_saved(spec, plain, ref, out, Path(tmp, f"{tag}.single"))


def test_ddp_step_matches_single_process(tmp_path):
    spawn(_ddp_worker, str(tmp_path), timeout=90)
    assert {p.name for p in tmp_path.iterdir()} >= {f"{t}.ddp" for t in SPECS}


def _fsdp_worker(env, tmp: str) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    from wda.analysis import distributed
    from wda.train.adapt import adapter_modules

    for tag, spec in SPECS.items():
        for units in ("adapters", "blocks"):
            plain, model = adapted_model(spec, seed=10 + env.rank)
            distributed.broadcast_parameters_(model)  # FSDP2 does not sync at wrap time
            ref = copy.deepcopy(model)
            x = torch.randn(3, 12, dtype=torch.float64)
            with torch.no_grad():  # no stale ||W_0||² of this rank's own init left in DoRA
                close(model(x), ref(x), f"{tag}: forward after the broadcast")
            init = copy.deepcopy(model)
            distributed.shard_adapters(model, None if units == "adapters" else list(model.layers))
            # per-adapter units turn the wrapper's class into FSDP<cls> (save_adapter's exact
            # type check would refuse it; the distributed save must not care)
            wrapper = adapter_modules(model)["layers.0.q_proj"]
            assert isinstance(model, FSDPModule)
            assert isinstance(wrapper, FSDPModule) == (units == "adapters")
            # everything, magnitude (out,), A (r, in), B (out, r) and frozen W_0, is sharded on dim 0
            for n, p in model.named_parameters():
                assert isinstance(p, DTensor) and p.placements == (Shard(0),), n
                chunk = -(-p.shape[0] // WORLD)  # torch.chunk sizes: 9 rows -> 5 + 4
                assert p.to_local().shape[0] == max(0, min(chunk, p.shape[0] - env.rank * chunk)), n
                assert p.requires_grad == ("lora_" in n), n
            name = f"{tag}.{units}"
            # saved right after sharding: exactly the single process's adapter
            distributed.save_adapter_distributed(model, Path(tmp, name + ".init"), spec)
            if env.is_main:
                save_adapter(init, Path(tmp, name + ".init_single"), spec)
                same_adapter(Path(tmp, name + ".init"), Path(tmp, name + ".init_single"))
            check_training(model, ref, env.rank, f"fsdp/{name}")
            assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)
            distributed.save_adapter_distributed(model, Path(tmp, name), spec)
            if env.is_main:
                check_saved(spec, plain, ref, Path(tmp, name), Path(tmp, name + ".single"))
    # a unit inside an adapter would hand DoRA's norm a shard: refused before any collective
    _, model = adapted_model(SPECS["dora"], seed=0)
    with pytest.raises(ValueError, match="inside the adapter"):
        distributed.shard_adapters(model, [model.layers[0].q_proj.lora_A])


def test_fsdp2_step_and_saved_adapter_match_single_process(tmp_path):
    spawn(_fsdp_worker, str(tmp_path), timeout=90)
    assert {p.name for p in tmp_path.iterdir()} >= {f"{t}.{u}" for t in SPECS for u in ("adapters", "blocks")}
