"""The rows a training-time ``wda.Tracker`` wrote, as the analysis result the report renders.

    DIR/tracker.json + DIR/metrics.csv           one tracked run
    DIR/<run>/tracker/  or  DIR/<run>/           several runs (``--trackers``)

No weights are read: the rows were measured while training ran, with the engine's own code.
The result carries the same columns and sort as ``run_analysis`` (``wda.analysis.engine._table``),
a layout built from the trackers' settings, and ``source`` (what the manifest records).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from wda.formats.tensors import read_json
from wda.errors import WdaError
from wda.analysis.layout import ModuleInfo, Layout, Run, parse_name
from wda.names import matches
from wda.tracking.tracker import FORMAT, METRICS_NAME, SETTINGS_NAME

if TYPE_CHECKING:
    from wda.analysis.engine import AnalysisOptions, AnalysisResult

_INTS = ("step", "layer", "n_vectors", "n_excluded")
_TEXT = ("run", "method", "module", "matrix", "axis", "stack")  # every other column is a number


def holds_tracker(root: str | Path) -> bool:
    """True if ``root`` is a tracker's folder (a folder of several needs ``--trackers``: a
    Trainer output_dir may hold both checkpoints and a tracker)."""
    return (Path(root) / SETTINGS_NAME).is_file()


def find(root: str | Path) -> list[Path]:
    """The tracker folders under ``root``: itself, or ``root/<run>/tracker`` and ``root/<run>``."""
    root = Path(root)
    if (root / SETTINGS_NAME).is_file():
        return [root]
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for cand in (d / "tracker", d):
            if (cand / SETTINGS_NAME).is_file():
                out.append(cand)
                break
    return out


def load(root: str | Path, options: AnalysisOptions) -> AnalysisResult:
    """The trackers' rows under ``root`` as an ``AnalysisResult`` for ``wda.report``."""
    import time

    from wda.analysis.engine import AnalysisResult, _table

    t0 = time.perf_counter()
    root = Path(root)
    if not root.exists():
        raise WdaError(root, "does not exist", "check the path")
    dirs = find(root)
    if not dirs:
        raise WdaError(root, f"holds no tracker output ({SETTINGS_NAME} and {METRICS_NAME})",
                       "point at the folder given to wda.Tracker(out=...), or at a folder of <run>/tracker/")
    runs, modules, rows, notes, sources, nbytes = [], {}, [], [], [], 0
    seen: dict[tuple, Path] = {}
    for d in dirs:
        settings = _settings(d)
        df, note, size = _metrics(d / METRICS_NAME)
        nbytes += size
        if note:
            notes.append(note)
        _check_options(d, settings, options)
        if options.modules:
            keep = df["module"].map(lambda n: any(matches(n, p) for p in options.modules))
            df = df[keep]
        if df.empty:
            notes.append(f"{d}: no rows recorded" + (" for the selected modules" if options.modules else ""))
            continue
        for key in zip(df["run"], df["step"], df["module"]):
            if key in seen:
                raise WdaError(d / METRICS_NAME, f"run {key[0]!r} step {key[1]} module {key[2]!r} is recorded "
                                                 f"twice (also in {seen[key]})", "give each tracked run its own name")
            seen[key] = d / METRICS_NAME
        for name, method in dict(zip(df["run"], df["method"])).items():
            steps = sorted(set(df.loc[df["run"] == name, "step"].astype(int)))
            runs.append(Run(str(name), str(method), d, {s: d / METRICS_NAME for s in steps}))
        recorded = set(df["module"])
        for m in settings["modules"]:
            if m["name"] in recorded and m["name"] not in modules:
                layer, matrix, stack = parse_name(m["name"])
                modules[m["name"]] = ModuleInfo(m["name"], int(m["out_features"]), int(m["in_features"]),
                                                bool(m["stored_transposed"]), layer, matrix, stack)
        rows += df.assign(_path=str(d / METRICS_NAME)).to_dict("records")
        schedule = f"every {settings['every']} steps" if settings.get("every") else \
            f"at steps {', '.join(map(str, settings.get('steps') or []))}"
        notes.append(f"rows measured during training by wda.Tracker, no checkpoints: run "
                     f"{settings['run']!r} ({settings['method']}), {schedule}, "
                     f"{df['step'].nunique()} steps recorded")
        sources.append({"path": str(d), "settings": settings})
    if options.modules:
        for pat in options.modules:
            if not any(matches(n, pat) for n in _modules_of(rows)):
                raise WdaError(root, f"--modules {pat!r} matches no tracked module",
                               f"tracked: {', '.join(sorted(_modules_of(rows))[:4]) or 'none'}")
    if not rows:
        raise WdaError(root, "the tracker has recorded no step yet", "let training reach a measured step")
    order = {"FT": 0, "LoRA": 1, "DoRA": 2}
    runs.sort(key=lambda r: (order.get(r.method, 3), r.name))
    layout = Layout(root, root, runs, sorted(modules.values(), key=lambda m: (m.matrix, m.stack, m.layer, m.name)),
                    [], notes)
    devices = sorted({dev for s in sources for dev in s["settings"].get("devices") or []})
    result = AnalysisResult(_table(rows), layout, ", ".join(devices) or "not recorded", options,
                            time.perf_counter() - t0, nbytes, [])
    result.source = {"kind": "tracker", "trackers": sources}
    return result


def _modules_of(rows: list[dict]) -> set[str]:
    return {r["module"] for r in rows}


def _settings(d: Path) -> dict:
    path = d / SETTINGS_NAME
    s = read_json(path)
    if s.get("format") != FORMAT:
        raise WdaError(path, f"format {s.get('format')!r} is not {FORMAT!r}", "written by another wda version?")
    for key in ("run", "method", "axis", "dtype", "modules"):
        if key not in s:
            raise WdaError(path, f"{key!r} is missing", "restore the file the tracker wrote")
    return s


def _metrics(path: Path):
    """(rows, note about a torn last line or None, bytes) of one tracker's metrics.csv."""
    import pandas as pd

    from wda.tracking.tracker import metric_columns

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise WdaError(path, "file is missing", "the tracker writes it when it is created") from None
    except OSError as exc:
        raise WdaError(path, f"cannot read it ({exc.strerror})") from None
    note = None
    if raw and not raw.endswith(b"\n"):  # a write cut short by a crash: keep the whole steps
        raw = raw[: raw.rfind(b"\n") + 1]
        note = f"{path}: an incomplete last line was left out (the run stopped while writing it)"
    try:
        text = raw.decode()
        df = pd.read_csv(io.StringIO(text), keep_default_na=False, dtype=str)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise WdaError(path, f"not a readable metrics.csv ({' '.join(str(exc).split())[:160]})",
                       "restore the file the tracker wrote") from None
    missing = [c for c in metric_columns() if c not in df.columns]
    if missing:
        raise WdaError(path, f"columns {', '.join(missing)} are missing", "restore the file the tracker wrote")
    for col in [c for c in df.columns if c not in _TEXT]:
        num = pd.to_numeric(df[col].mask(df[col] == ""), errors="coerce")
        bad = num.isna() | (num % 1 != 0) if col in _INTS else num.isna() & (df[col] != "")
        if bad.any():
            line = int(bad.to_numpy().nonzero()[0][0]) + 2
            raise WdaError(path, f"line {line}: {col} {df[col][bad].iloc[0]!r} is not a number",
                           "restore the file the tracker wrote")
        df[col] = num.astype("int64") if col in _INTS else num.astype("float64")
    return df, note, len(raw)


def _check_options(d: Path, settings: dict, options) -> None:
    """The tracker measured with its own axis and dtype; a report cannot change them."""
    for key, flag in (("axis", "--axis"), ("dtype", "--dtype")):
        if getattr(options, key) != settings[key]:
            raise WdaError(d / SETTINGS_NAME, f"the tracker measured with {key} {settings[key]!r}, not "
                                              f"{getattr(options, key)!r}", f"pass {flag} {settings[key]}")
