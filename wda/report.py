"""``python -m wda.report CKPT_DIR``: the only place that writes a report.

OUT/metrics.csv, fits.csv, fits_per_step.csv, figure2_<matrix>.png/.pdf,
trajectories_<matrix>.png, report.md, manifest.json — written to a temporary folder and
moved into place only when complete, so a failed run never destroys an earlier report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

from wda.errors import WdaError

log = logging.getLogger("wda")

FIG_FORMATS = ("png", "pdf")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m wda.report",
        description="Weight-decomposition analysis (DoRA paper, Eqs. 2-4) of the fine-tuning runs in "
                    "CKPT_DIR: per layer and step, the magnitude change ΔM and direction change ΔD "
                    "against the pretrained weights, regression fits, Figure 2 and a report.",
        epilog="Layout: CKPT_DIR/base/ (W_0) and CKPT_DIR/<run>/checkpoint-<step>/ folders, or CKPT_DIR = one "
               "run (a Trainer output_dir holding checkpoint-<step>/ folders), or runs given with --run. "
               "Checkpoints hold full weights (model.safetensors, sharded, pytorch_model.bin, FSDP "
               "pytorch_model_fsdp_0/) or PEFT adapters. "
               "Exit status: 0 done, 2 bad input, 1 internal error, 130 interrupted.")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", nargs="?",
                   help="a folder of runs (with base/), or one run's folder of checkpoint-<step>/ folders "
                        "(a Trainer output_dir); optional with --run")
    p.add_argument("--run", metavar="NAME=PATH", action="append", default=[],
                   help="a run to analyse: a folder of checkpoint-<step>/ folders, anywhere (repeatable)")
    p.add_argument("--out", metavar="OUT", help="report folder (default: reports/<name of CKPT_DIR>)")
    p.add_argument("--modules", metavar="LIST",
                   help="comma-separated module-name suffixes (q_proj) or regular expressions "
                        "matching whole names; default: the modules the adapters target, else the "
                        "attention query/value projections")
    p.add_argument("--axis", choices=("out", "in"), default="out",
                   help="one magnitude per output feature (norm over dim=1 of an (out, in) weight, as "
                        "DoRA/PEFT/torchtune; default) or per input feature (LyCORIS dora_scale style)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="compute dtype, whatever the stored one (default float32)")
    p.add_argument("--base", metavar="PATH|ORG/NAME[@REV]",
                   help="pretrained weights W_0: a folder, a weights file, or a hub id found offline in the "
                        "local Hugging Face cache (default: CKPT_DIR/base, else the adapters' "
                        "base_model_name_or_path)")
    p.add_argument("--fan-in-fan-out", choices=("auto", "yes", "no"), default="auto",
                   help="weights stored (in, out) as GPT-2 Conv1D; auto: from adapter configs and "
                        "config.json")
    p.add_argument("--no-split", action="store_true",
                   help="measure fused attention projections (GPT-2 c_attn, query_key_value, qkv_proj, "
                        "Wqkv) whole instead of as their q, k, v parts")
    p.add_argument("--skip-broken", action="store_true",
                   help="skip broken checkpoints (listed in the report) instead of stopping")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be analysed (runs, steps, modules, shapes) and exit")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                   help="bootstrap resamples for the confidence interval of r (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--no-figures", action="store_true", help="tables and report.md only")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                     help="a progress bar even when stderr is not a terminal")
    bar.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                     help="no progress bar (default: one only when stderr is a terminal)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _options(args: argparse.Namespace):
    from wda.analysis import AnalysisOptions

    modules = None
    if args.modules is not None:
        modules = tuple(m.strip() for m in args.modules.split(",") if m.strip())
        if not modules:  # "--modules ''" must not quietly mean "the default modules"
            raise WdaError(None, f"--modules {args.modules!r} names no module",
                           "give comma-separated name suffixes (q_proj) or regular expressions")
    fifo = {"auto": None, "yes": True, "no": False}[args.fan_in_fan_out]
    return AnalysisOptions(modules=modules, axis=args.axis, device=args.device, dtype=args.dtype,
                           base=args.base, fan_in_fan_out=fifo, skip_broken=args.skip_broken,
                           split_fused=not args.no_split, progress=args.progress, runs=_runs(args))


def _runs(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """``--run NAME=PATH`` options as (name, path) pairs."""
    out = []
    for spec in args.run:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise WdaError(None, f"--run {spec!r} is not NAME=PATH", "e.g. --run lora=out/lora-r8")
        out.append((name.strip(), path.strip()))
    if args.ckpt_dir is None and not out:
        raise WdaError(None, "nothing to analyse", "give CKPT_DIR or --run NAME=PATH")
    return tuple(out)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("wda", "torch", "safetensors", "numpy", "pandas", "scipy", "matplotlib"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _manifest(result, args, timings: dict[str, float], figures: list[str]) -> dict:
    lay = result.layout
    m = result.metrics
    return {
        "command": "python -m wda.report " + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
        "ckpt_dir": str(lay.root),  # as given: report.md reads the same on every machine
        "ckpt_dir_resolved": str(lay.root.resolve()),
        "base": str(lay.base.resolve()),
        "runs": [{"name": r.name, "method": r.method, "steps": list(r.steps),
                  "path": str(r.path.resolve())} for r in lay.runs],
        "modules": [{"name": x.name, "layer": x.layer, "matrix": x.matrix, "out_features": x.out_features,
                     "in_features": x.in_features, "stored_transposed": x.transposed} for x in lay.modules],
        "axis": result.options.axis,
        "axis_meaning": ("one magnitude per output feature: norm over dim=1 of the (out, in) weight"
                         if result.options.axis == "out" else
                         "one magnitude per input feature: norm over dim=0 of the (out, in) weight"),
        "dtype": result.options.dtype,
        "device": result.device,
        "rows": int(len(m)),
        "excluded_zero_norm_vectors": {k: int(v) for k, v in
                                       m.groupby("module")["n_excluded"].max().items() if v > 0},
        "skipped": [{"path": p, "reason": r} for p, r in result.skipped],
        "notes": list(lay.notes),
        "bytes_read": int(result.bytes_read),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "figures": figures,
        "versions": _versions(),
    }


def _render(result, args, out_tmp: Path, t_start: float) -> None:
    """Fit, plot and write everything into ``out_tmp``."""
    from wda.attribution import drivers
    from wda.fit import fit_groups, fit_per_step
    from wda.markdown import render_report

    metrics = result.metrics
    timings = {"analysis": result.seconds}
    t = time.perf_counter()
    fits = fit_groups(metrics, n_boot=args.bootstrap, seed=args.seed)
    per_step = fit_per_step(metrics, n_boot=args.bootstrap, seed=args.seed)
    why = drivers(metrics)
    why_step = drivers(metrics, by=("run", "method", "matrix", "step"))
    timings["fits"] = time.perf_counter() - t
    metrics.to_csv(out_tmp / "metrics.csv", index=False)
    fits.to_csv(out_tmp / "fits.csv", index=False)
    per_step.to_csv(out_tmp / "fits_per_step.csv", index=False)
    why.to_csv(out_tmp / "drivers.csv", index=False)
    why_step.to_csv(out_tmp / "drivers_per_step.csv", index=False)

    t = time.perf_counter()
    figures: dict[str, str] = {}
    if not args.no_figures:
        figures = _write_figures(metrics, fits, why, out_tmp)
    timings["figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    manifest = _manifest(result, args, timings, sorted(figures.values()))
    (out_tmp / "report.md").write_text(render_report(metrics, fits, per_step, manifest, figures,
                                                              why, why_step))
    (out_tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _write_figures(metrics, fits, why, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    from wda.plot import drivers_figure, figure2, trajectories

    figures: dict[str, str] = {}
    paper_fig = {"q_proj": "Figure 2", "query": "Figure 2", "q": "Figure 2",
                 "v_proj": "Figure 6", "value": "Figure 6", "v": "Figure 6"}
    for matrix in sorted(metrics["matrix"].unique()):
        fig = figure2(metrics, fits, matrix=matrix)
        for fmt in FIG_FORMATS:
            # no timestamps in the files: same inputs, same bytes
            meta = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
            fig.savefig(out / f"figure2_{matrix}.{fmt}", dpi=200, metadata=meta, bbox_inches="tight")
        label = paper_fig.get(matrix.rsplit(".", 1)[-1], "Figure 2 layout")  # c_attn.q: a query
        figures[f"{matrix}: ΔM against ΔD per run (paper {label})"] = f"figure2_{matrix}.png"
        fig = trajectories(metrics, matrix=matrix)
        fig.savefig(out / f"trajectories_{matrix}.png", dpi=150, metadata={"Software": None},
                    bbox_inches="tight")
        figures[f"{matrix}: ΔM and ΔD against step, per layer"] = f"trajectories_{matrix}.png"
        if metrics.loc[metrics["matrix"] == matrix, "train_loss"].notna().any():  # trainer_state.json
            fig = trajectories(metrics, matrix=matrix, x="train_loss")
            fig.savefig(out / f"loss_{matrix}.png", dpi=150, metadata={"Software": None}, bbox_inches="tight")
            figures[f"{matrix}: ΔM and ΔD against the training loss, per layer"] = f"loss_{matrix}.png"
        if not why.empty:
            fig = drivers_figure(why, matrix=matrix)
            fig.savefig(out / f"drivers_{matrix}.png", dpi=150, metadata={"Software": None},
                        bbox_inches="tight")
            figures[f"{matrix}: what drives the correlation, per run"] = f"drivers_{matrix}.png"
    return figures


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp``; the old report survives any failure before,
    and is put back if the second rename fails (or is interrupted)."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    had_old = out.exists()
    if had_old:
        os.replace(out, old)  # POSIX cannot rename a folder onto a non-empty one: two steps
    try:
        os.replace(tmp, out)
    except BaseException:
        if had_old:
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _is_report(path: Path) -> bool:
    """A folder this tool wrote: it holds a manifest.json with our keys."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"ckpt_dir", "axis", "runs"} <= manifest.keys()


def _check_out(out: Path, inputs: list[Path]) -> None:
    """Refuse an OUT whose replacement would destroy anything but an earlier report."""
    resolved = out.resolve()
    for inp in inputs:
        inp = inp.resolve()
        if resolved == inp or resolved in inp.parents:
            raise WdaError(out, f"--out would replace {inp}, which holds the input", "choose another --out")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise WdaError(out, "exists and is not a folder; refusing to replace it", "choose another --out")
    if out.is_dir() and any(out.iterdir()) and not _is_report(out):
        raise WdaError(out, "exists and is not a wda report (no manifest.json of ours); refusing to "
                            "replace it", "choose another --out, or empty or remove this folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _clean_leftovers(out: Path) -> None:
    """Folders left by a run that was killed (SIGKILL, power loss) before its own cleanup:
    temp folders are removed; a previous report caught between the two renames of
    ``_swap_into_place`` is put back if ``out`` is missing, else removed."""
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.iterdir()):
        for kind in ("tmp", "old"):
            prefix = f".{out.name}.{kind}-"
            pid = p.name[len(prefix):]
            if not (p.name.startswith(prefix) and pid.isdigit()) or _pid_alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                os.replace(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _dry_run(args) -> int:
    """What would be measured (headers only), and what --skip-broken would set aside."""
    layout = _options(args).discover(args.ckpt_dir)
    pairs = layout.module_pairs()
    n = sum(len(r.steps) for _, r in pairs)
    print(f"{layout.root}: {len(layout.runs)} run(s), {len({m.name for m, _ in pairs})} module(s), "
          f"{n} matrices to measure; base {layout.base}")
    for run in layout.runs:
        print(f"  {run.name:<16} {run.method:<5} {run.path}  steps {', '.join(map(str, run.steps))}")
    for m in layout.modules:
        flag = "  (stored in, out)" if m.transposed else ""
        print(f"  {m.name}  (out={m.out_features}, in={m.in_features}){flag}")
    for path, reason in layout.skipped:
        print(f"  skipped: {reason}")
    return 0


def out_dir(args: argparse.Namespace) -> Path:
    """--out, else reports/<name of CKPT_DIR> (of the first --run without CKPT_DIR)."""
    if args.out:
        return Path(args.out)
    inp = args.ckpt_dir if args.ckpt_dir is not None else _runs(args)[0][1]
    return Path("reports") / Path(inp).resolve().name


def prepare_out(args: argparse.Namespace, out: Path, layout=None) -> None:
    """Before the long part: recover from a killed run, refuse an --out we must not replace
    (one holding any input: CKPT_DIR, the base, a run)."""
    _clean_leftovers(out)
    inputs = [Path(args.ckpt_dir)] if args.ckpt_dir is not None else []
    inputs += [Path(p) for _, p in _runs(args)]
    if layout is not None:
        inputs.append(layout.base)
    elif args.base and Path(args.base).exists():
        inputs.append(Path(args.base))
    _check_out(out, inputs)


def write_report(result, args: argparse.Namespace, out: Path, t_start: float) -> None:
    """Everything into a temporary folder, then swapped into place: all or nothing."""
    if result.metrics.empty:  # every checkpoint skipped while streaming: no picture, not an empty one
        first = f"first: {result.skipped[0][1]}" if result.skipped else ""
        raise WdaError(args.ckpt_dir, f"no valid checkpoint left to analyse ({len(result.skipped)} skipped "
                                      f"as broken)", first)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _render(result, args, tmp, t_start)
        _swap_into_place(tmp, out)
    except OSError as exc:  # disk full, permissions, a vanished folder: not a bug of ours
        raise WdaError(out, f"cannot write the report ({_one_line(exc.strerror or str(exc))})",
                       "check free space and permissions; an earlier report there is untouched") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def announce(result, out: Path, t_start: float) -> None:
    for _, reason in result.skipped:
        print(f"wda: skipped {reason}", file=sys.stderr)
    print(f"wda: {len(result.metrics)} rows from {len(result.layout.runs)} run(s) -> {out}/report.md "
          f"({time.perf_counter() - t_start:.1f} s on {result.device})")


def run(args: argparse.Namespace) -> int:
    from wda import distributed
    from wda.analysis import run_analysis

    if distributed.launched():  # under torchrun: modules split over the ranks, rank 0 writes
        return distributed.run_report(args)
    if args.dry_run:
        return _dry_run(args)
    t_start = time.perf_counter()
    out = out_dir(args)
    options = _options(args)
    _clean_leftovers(out)  # a killed run's earlier report is put back whatever happens next
    layout = options.discover(args.ckpt_dir)  # the input is checked before --out
    prepare_out(args, out, layout)
    result = run_analysis(args.ckpt_dir, options, layout=layout)
    write_report(result, args, out, t_start)
    announce(result, out, t_start)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="wda: %(levelname)s: %(message)s")
    try:
        return run(args)
    except WdaError as err:
        if args.debug:
            raise
        print(f"wda: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wda: interrupted; no report written, earlier reports untouched", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: still one line unless --debug
        if args.debug:
            raise
        print(f"wda: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
