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
from dataclasses import dataclass
from pathlib import Path

from wda.errors import WdaError
from wda.steps import step_text

log = logging.getLogger("wda")

FIG_FORMATS = ("png", "pdf")


def _prog() -> str:
    """How this command was invoked: ``wda-report`` as the console script, else the module."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name and not name.endswith(".py") and name != "-c" else "python -m wda.report"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=_prog(),
        description="Weight-decomposition analysis (DoRA paper, Eqs. 2-4) of the fine-tuning runs in "
                    "CKPT_DIR: per layer and step, the magnitude change ΔM and direction change ΔD "
                    "against the pretrained weights, regression fits, Figure 2 and a report.",
        epilog="Layout: CKPT_DIR/base/ (W_0) and CKPT_DIR/<run>/checkpoint-<step>/ folders, or CKPT_DIR = one "
               "run (a Trainer output_dir holding checkpoint-<step>/ folders), or one checkpoint (a final "
               "adapter, save_pretrained output: one run of one checkpoint), or runs given with --run. "
               "Checkpoints hold full weights (model.safetensors, sharded, pytorch_model.bin, FSDP "
               "pytorch_model_fsdp_0/) or PEFT adapters. "
               "Exit status: 0 done, 2 bad input, 1 internal error, 130 interrupted.")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", nargs="?",
                   help="a folder of runs (with base/), or one run's folder of checkpoint-<step>/ folders "
                        "(a Trainer output_dir), or one checkpoint's folder; optional with --run")
    p.add_argument("--run", metavar="NAME=PATH", action="append", default=[],
                   help="a run to analyse: a folder of checkpoint-<step>/ folders, or one checkpoint's "
                        "folder (a final adapter), anywhere (repeatable)")
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
    p.add_argument("--trackers", action="store_true",
                   help="render the rows wda.Tracker wrote during training (CKPT_DIR/<run>/tracker/) "
                        "instead of measuring checkpoints; automatic when CKPT_DIR is a tracker's folder")
    p.add_argument("--no-split", action="store_true",
                   help="measure fused projections whole: attention (GPT-2 c_attn, query_key_value, qkv_proj, "
                        "Wqkv) instead of as q, k, v; gated MLP (gate_up_proj, dense_h_to_4h) instead of as gate, up")
    p.add_argument("--skip-broken", action="store_true",
                   help="skip broken checkpoints (listed in the report) instead of stopping")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be analysed (runs, steps, modules, shapes) and exit")
    p.add_argument("--only-runs", metavar="LIST", help="of the runs found, only these (comma-separated names)")
    p.add_argument("--only-steps", metavar="LIST", help="only these steps (comma-separated integers)")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                   help="bootstrap resamples over layers for the CIs of r and of the slope "
                        "(default 2000; 0: no CI)")
    p.add_argument("--permutations", type=int, default=9999, metavar="N",
                   help="permutations of layers for the p-value of r (default 9999; exact when "
                        "the layers have fewer orderings; 0: no p)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and permutations (default 0)")
    p.add_argument("--relative-dm", action="store_true",
                   help="figures show the relative magnitude change ΔM / mean ||m_0|| (delta_m_rel) "
                        "instead of ΔM in weight units")
    p.add_argument("--force", action="store_true",
                   help="replace an --out that holds the report of another input")
    p.add_argument("--no-figures", action="store_true", help="tables and report.md only")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                     help="a progress bar even when stderr is not a terminal")
    bar.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                     help="no progress bar (default: one only when stderr is a terminal)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _options(args: argparse.Namespace):
    from wda.analysis.engine import AnalysisOptions

    fifo = {"auto": None, "yes": True, "no": False}[args.fan_in_fan_out]
    return AnalysisOptions(modules=args.modules, axis=args.axis, device=args.device, dtype=args.dtype,
                           base=args.base, fan_in_fan_out=fifo, skip_broken=args.skip_broken,
                           split_fused=not args.no_split, progress=args.progress, runs=_runs(args),
                           only_runs=getattr(args, "only_runs", None),
                           only_steps=getattr(args, "only_steps", None))


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


@dataclass(frozen=True)
class ReportSettings:
    """How the tables and figures are made from the measurements."""

    n_boot: int = 2000  # bootstrap resamples over layers (0: no CI)
    n_perm: int = 9999  # permutations of layers (0: no p)
    seed: int = 0
    figures: bool = True
    relative_dm: bool = False  # figures show delta_m_rel instead of delta_m
    force: bool = False  # replace a report of another input
    command: tuple[str, ...] = ()  # the CLI arguments that reproduce this report

    def __post_init__(self) -> None:
        for flag, value in (("--bootstrap", self.n_boot), ("--permutations", self.n_perm)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise WdaError(None, f"{flag} must be a whole number >= 0 (0: none), not {value!r}")


def _settings(args: argparse.Namespace) -> ReportSettings:
    argv = sys.argv[1:] if getattr(args, "argv", None) is None else list(args.argv)
    return ReportSettings(n_boot=args.bootstrap, n_perm=getattr(args, "permutations", 9999),
                          seed=args.seed, figures=not args.no_figures,
                          relative_dm=getattr(args, "relative_dm", False),
                          force=getattr(args, "force", False), command=tuple(argv))


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("wda", "torch", "safetensors", "numpy", "pandas", "scipy", "matplotlib"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _manifest(result, settings: ReportSettings, out: Path, timings: dict[str, float],
              figures: list[str]) -> dict:
    from wda.report.runinfo import describe_runs, reproduce_commands

    lay = result.layout
    m = result.metrics
    return {
        "command": "python -m wda.report " + shlex.join(settings.command),
        "reproduce": reproduce_commands(lay.root, settings.command, out, lay.base),
        "ckpt_dir": str(lay.root),  # as given: report.md reads the same on every machine
        "ckpt_dir_resolved": str(lay.root.resolve()),
        "base": str(lay.base.resolve()),
        "runs": describe_runs(lay, m),
        "modules": [{"name": x.name, "layer": x.layer, "matrix": x.matrix, "out_features": x.out_features,
                     "in_features": x.in_features, "stored_transposed": x.transposed} for x in lay.modules],
        "axis": result.options.axis,
        "axis_meaning": ("one magnitude per output feature: norm over dim=1 of the (out, in) weight"
                         if result.options.axis == "out" else
                         "one magnitude per input feature: norm over dim=0 of the (out, in) weight"),
        "dtype": result.options.dtype,
        "statistics": {"bootstrap_resamples": settings.n_boot, "permutations": settings.n_perm,
                       "seed": settings.seed, "resampling_unit": "layer (module)"},
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
    } | ({"source": result.source} if getattr(result, "source", None) else {})


def _render(result, settings: ReportSettings, out_tmp: Path, out: Path, t_start: float) -> None:
    """Fit, plot and write everything into ``out_tmp``."""
    from wda.report.attribution import drivers
    from wda.report.fit import fit_groups, fit_per_step
    from wda.report.markdown import render_report

    metrics = result.metrics
    timings = {"analysis": result.seconds}
    t = time.perf_counter()
    by = ("run", "method", "matrix", "axis")
    kw = dict(by=by, n_boot=settings.n_boot, n_perm=settings.n_perm, seed=settings.seed)
    fits = fit_groups(metrics, **kw)
    per_step = fit_per_step(metrics, **kw)
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
    files: list[str] = []
    if settings.figures:
        figures, files = _write_figures(metrics, fits, why, out_tmp, settings.relative_dm)
    timings["figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    manifest = _manifest(result, settings, out, timings, sorted(files))
    (out_tmp / "report.md").write_text(render_report(metrics, fits, per_step, manifest, figures,
                                                     why, why_step))
    (out_tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def figure_name(kind: str, matrix: str, axis: str, relative_dm: bool = False) -> str:
    """File stem of a figure: ``figure2_q_proj``; the axis is named when not the default."""
    tail = ("" if axis == "out" else f"_axis-{axis}") + ("_relative" if relative_dm else "")
    return f"{kind}_{matrix}{tail}"


def _write_figures(metrics, fits, why, out: Path, relative_dm: bool = False
                   ) -> tuple[dict[str, str], list[str]]:
    """Figures into ``out``: (title -> PNG shown in report.md, every file written)."""
    import matplotlib

    matplotlib.use("Agg")
    from wda.report.plot import drivers_figure, figure2, trajectories

    y = "delta_m_rel" if relative_dm else "delta_m"
    figures: dict[str, str] = {}
    files: list[str] = []
    paper_fig = {"q_proj": "Figure 2", "query": "Figure 2", "q": "Figure 2",
                 "v_proj": "Figure 6", "value": "Figure 6", "v": "Figure 6"}
    for axis in sorted(metrics["axis"].unique()):
        sub = metrics[metrics["axis"] == axis]
        for matrix in sorted(sub["matrix"].unique()):
            # the fit line of a relative figure is the fit of what it shows
            fig = figure2(sub, None if relative_dm else fits[fits["axis"] == axis],
                          matrix=matrix, y=y)
            stem = figure_name("figure2", matrix, axis, relative_dm)
            for fmt in FIG_FORMATS:
                # no timestamps in the files: same inputs, same bytes
                meta = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
                fig.savefig(out / f"{stem}.{fmt}", dpi=200, metadata=meta, bbox_inches="tight")
                files.append(f"{stem}.{fmt}")
            label = paper_fig.get(matrix.rsplit(".", 1)[-1], "Figure 2 layout")  # c_attn.q: a query
            what = "ΔM / mean ||m_0||" if relative_dm else "ΔM"
            figures[f"{matrix}: {what} against ΔD per run, axis {axis} (paper {label})"] = f"{stem}.png"
            if sub[sub["matrix"] == matrix].groupby("run")["step"].nunique().max() > 1:
                # a course over training: not for runs that are single endpoints (one checkpoint each)
                fig = trajectories(sub, matrix=matrix, y=y)
                stem = figure_name("trajectories", matrix, axis, relative_dm)
                fig.savefig(out / f"{stem}.png", dpi=150, metadata={"Software": None}, bbox_inches="tight")
                files.append(f"{stem}.png")
                figures[f"{matrix}: {what} and ΔD against step, per layer, axis {axis}"] = f"{stem}.png"
            if sub.loc[sub["matrix"] == matrix, "train_loss"].notna().any():  # trainer_state.json
                fig = trajectories(sub, matrix=matrix, y=y, x="train_loss")
                stem = figure_name("loss", matrix, axis, relative_dm)
                fig.savefig(out / f"{stem}.png", dpi=150, metadata={"Software": None}, bbox_inches="tight")
                files.append(f"{stem}.png")
                figures[f"{matrix}: {what} and ΔD against the training loss, per layer, axis {axis}"] = f"{stem}.png"
            if not why.empty and matrix in set(why["matrix"]):
                fig = drivers_figure(why, matrix=matrix)
                stem = figure_name("drivers", matrix, axis)
                fig.savefig(out / f"{stem}.png", dpi=150, metadata={"Software": None},
                            bbox_inches="tight")
                files.append(f"{stem}.png")
                figures[f"{matrix}: what drives the correlation, per run, axis {axis}"] = f"{stem}.png"
    return figures, files


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


def _report_manifest(path: Path) -> dict | None:
    """The manifest of a folder this tool wrote (a manifest.json with our keys), else None."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and {"ckpt_dir", "axis", "runs"} <= manifest.keys()
    return manifest if ok else None


def _is_report(path: Path) -> bool:
    return _report_manifest(path) is not None


def _check_out(out: Path, inputs: list[Path], force: bool = False) -> None:
    """Refuse an OUT whose replacement would destroy anything but an earlier report of the
    same input (another input's report only with ``force``), or that lies inside the input."""
    resolved = out.resolve()
    for inp in inputs:
        inp = inp.resolve()
        if resolved == inp or resolved in inp.parents:
            raise WdaError(out, f"--out would replace {inp}, which holds the input", "choose another --out")
        if inp in resolved.parents:
            raise WdaError(out, f"is inside the input {inp}; the report must not be written into it",
                           f"choose an --out outside it, e.g. --out {inp.parent / 'reports' / inp.name}")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise WdaError(out, "exists and is not a folder; refusing to replace it", "choose another --out")
    if not (out.is_dir() and any(out.iterdir())):
        return
    manifest = _report_manifest(out)
    if manifest is None:
        raise WdaError(out, "exists and is not a wda report (no manifest.json of ours); refusing to "
                            "replace it", "choose another --out, or empty or remove this folder")
    other = manifest.get("ckpt_dir_resolved")
    if (not force and other and Path(other) != inputs[0].resolve()
            and not _moved_with_it(manifest, out, inputs[0])):
        raise WdaError(out, f"holds the report of another input ({other}); refusing to replace it",
                       "pass --force to replace it, or choose another --out")


def _moved_with_it(manifest: dict, out: Path, inp: Path) -> bool:
    """Whether the report in ``out`` is of ``inp`` though its recorded absolute path differs:
    the folder holding both was moved or cloned (a repository's committed report). True when
    the command it records gave the input and --out as relative paths and the input lay where
    ``inp`` lies now, relative to the report folder."""
    given = manifest.get("ckpt_dir")
    try:
        argv = shlex.split(str(manifest.get("command", "")))
    except ValueError:
        return False
    outs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"]
    outs += [a.split("=", 1)[1] for a in argv if a.startswith("--out=")]
    if not isinstance(given, str) or len(outs) != 1 or Path(given).is_absolute() or Path(outs[0]).is_absolute():
        return False
    then = os.path.normpath(os.path.relpath(given, outs[0]))  # both relative to one working directory
    return then == os.path.normpath(os.path.relpath(inp.resolve(), out.resolve()))


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
    from wda.analysis.engine import discover_selected, measurement_count, resolve_device

    opts = _options(args)
    _settings(args)  # bad --bootstrap / --permutations fail here as in a real run
    layout = discover_selected(args.ckpt_dir, opts)
    dev = resolve_device(opts.device)  # --device cuda without a GPU fails here, not later
    pairs = layout.module_pairs()
    print(f"{layout.root}: {len(layout.runs)} run(s), {len({m.name for m, _ in pairs})} module(s), "
          f"{measurement_count(layout)} matrices to measure (each against its base matrix) on {dev}; "
          f"base {layout.base}")
    covered = {r.name for _, r in pairs}
    for run in layout.runs:
        none = "  (covers none of the selected modules)" if run.name not in covered else ""
        print(f"  {run.name:<16} {run.method:<5} {run.path}  steps {', '.join(map(step_text, run.steps))}{none}")
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
    (one holding any input: CKPT_DIR, the base, a run; another input's report without --force)."""
    inputs = [Path(args.ckpt_dir)] if args.ckpt_dir is not None else []
    inputs += [Path(p) for _, p in _runs(args)]
    if layout is None and args.base and Path(args.base).exists():
        inputs.append(Path(args.base))
    _prepare(out, inputs, layout, getattr(args, "force", False))


def _prepare(out: Path, inputs: list[Path], layout, force: bool) -> None:
    _clean_leftovers(out)
    if layout is not None:
        inputs = [layout.root, *inputs, layout.base]
    _check_out(out, inputs, force)


def write_report(result, args: argparse.Namespace, out: Path, t_start: float) -> None:
    """The CLI's report: ``write`` with the settings of the command-line arguments."""
    write(result, _settings(args), out, t_start)


def write(result, settings: ReportSettings, out: Path, t_start: float | None = None) -> None:
    """Everything into a temporary folder, then swapped into place: all or nothing."""
    t_start = time.perf_counter() - result.seconds if t_start is None else t_start
    if result.metrics.empty:  # every checkpoint skipped while streaming: no picture, not an empty one
        first = f"first: {result.skipped[0][1]}" if result.skipped else ""
        raise WdaError(result.layout.root, f"no valid checkpoint left to analyse ({len(result.skipped)} skipped "
                                      f"as broken)", first)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _render(result, settings, tmp, out, t_start)
        _swap_into_place(tmp, out)
    except OSError as exc:  # disk full, permissions, a vanished folder: not a bug of ours
        raise WdaError(out, f"cannot write the report ({_one_line(exc.strerror or str(exc))})",
                       "check free space and permissions; an earlier report there is untouched") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def announce(result, out: Path, t_start: float) -> None:
    for _, reason in result.skipped:
        print(f"wda: skipped {reason}", file=sys.stderr)
    covered = {r.name for _, r in result.layout.module_pairs()}
    idle = [r.name for r in result.layout.runs if r.name not in covered]
    tail = f" ({', '.join(idle)}: none of the selected modules)" if idle else ""
    print(f"wda: {len(result.metrics)} rows from {len(result.layout.runs)} run(s){tail} -> {out}/report.md "
          f"({time.perf_counter() - t_start:.1f} s on {result.device})")


def _dry_run_tracked(result) -> int:
    """What a tracker report would hold (the rows are already measured)."""
    for run in result.layout.runs:
        print(f"  {run.name:<16} {run.method:<5} steps {len(run.steps)} ({min(run.steps)}-{max(run.steps)}), "
              f"from {run.path}")
    for m in result.layout.modules:
        print(f"  {m.name}  (out={m.out_features}, in={m.in_features})")
    return 0


def make_report(ckpt_dir: str | Path, out: str | Path | None = None, *,
                modules: str | list[str] | None = None, runs: str | list[str] | None = None,
                steps: int | list[int] | None = None, axis: str = "out", device: str = "auto",
                dtype: str = "float32", base: str | Path | None = None,
                fan_in_fan_out: bool | None = None, skip_broken: bool = False,
                bootstrap: int = 2000, permutations: int = 9999, seed: int = 0,
                figures: bool = True, relative_dm: bool = False, force: bool = False,
                progress: bool = True) -> Path:
    """Analyse ``ckpt_dir`` and write the whole report (as ``python -m wda.report``) into
    ``out`` (default ``reports/<name of ckpt_dir>``); returns the folder. Keywords as the
    CLI options (``runs`` / ``steps``: only these, as --only-runs / --only-steps); bad input
    raises ``WdaError``."""
    from wda.analysis.engine import AnalysisOptions, run_analysis
    from wda.errors import pythonic_errors

    t_start = time.perf_counter()
    argv = _argv(ckpt_dir, out, modules=modules, only_runs=runs, only_steps=steps, axis=axis,
                 device=device, dtype=dtype, base=base, fan_in_fan_out=fan_in_fan_out,
                 skip_broken=skip_broken, bootstrap=bootstrap, permutations=permutations, seed=seed,
                 figures=figures, relative_dm=relative_dm, force=force)
    with pythonic_errors():
        settings = ReportSettings(n_boot=bootstrap, n_perm=permutations, seed=seed, figures=figures,
                                  relative_dm=relative_dm, force=force, command=tuple(argv))
        options = AnalysisOptions(modules=modules, axis=axis, device=device, dtype=dtype,
                                  base=str(base) if base is not None else None,
                                  fan_in_fan_out=fan_in_fan_out, skip_broken=skip_broken,
                                  progress=progress, only_runs=runs, only_steps=steps)
        out = Path(out) if out is not None else Path("reports") / Path(ckpt_dir).resolve().name
        _clean_leftovers(out)
        layout = options.discover(ckpt_dir)  # the input is checked before the output
        _prepare(out, [Path(ckpt_dir)], layout, force)
        result = run_analysis(ckpt_dir, options, layout=layout)
        write(result, settings, out, t_start)
    return out


def _argv(ckpt_dir, out, **kw) -> list[str]:
    """The CLI arguments equivalent to ``make_report``'s keywords (defaults left out)."""
    argv = [str(ckpt_dir)] + (["--out", str(out)] if out is not None else [])
    defaults = {"axis": "out", "device": "auto", "dtype": "float32", "bootstrap": 2000,
                "permutations": 9999, "seed": 0}
    if kw.pop("figures") is False:
        argv.append("--no-figures")
    fifo = kw.pop("fan_in_fan_out")
    if fifo is not None:
        argv += ["--fan-in-fan-out", "yes" if fifo else "no"]
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False or defaults.get(key) == value:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def run(args: argparse.Namespace) -> int:
    from wda.analysis import distributed
    from wda.tracking import tracked
    from wda.analysis.engine import run_analysis

    if args.trackers and args.ckpt_dir is None:
        raise WdaError(None, "--trackers needs CKPT_DIR", "give the folder holding <run>/tracker/")
    from_tracker = args.trackers or (args.ckpt_dir is not None and tracked.holds_tracker(args.ckpt_dir))
    if distributed.launched():  # under torchrun: modules split over the ranks, rank 0 writes
        if not from_tracker:
            return distributed.run_report(args)
        if os.environ.get("RANK", "0") != "0":  # tracker rows: nothing to share, rank 0 renders
            return 0
    if args.dry_run and not from_tracker:
        return _dry_run(args)
    t_start = time.perf_counter()
    out = out_dir(args)
    options = _options(args)
    if args.dry_run:  # tracker rows (checkpoints went to _dry_run above)
        return _dry_run_tracked(tracked.load(args.ckpt_dir, options))
    _settings(args)  # bad --bootstrap / --permutations: before the long part
    _clean_leftovers(out)  # a killed run's earlier report is put back whatever happens next
    if from_tracker:
        result = tracked.load(args.ckpt_dir, options)  # the input is checked before --out
        prepare_out(args, out)
    else:
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
