"""Find the base, the runs and their steps; pick and check modules.

    CKPT_DIR/base/                      W_0 (full weights), or --base (a folder, a file, a hub id)
    CKPT_DIR/<run>/checkpoint-<step>/   full weights or an adapter, any number of runs
    CKPT_DIR/<run>/                     or a run that is one adapter itself (a final adapter)
    CKPT_DIR/checkpoint-<step>/         or CKPT_DIR is one run (a Trainer output_dir)
    CKPT_DIR/ = one checkpoint          or CKPT_DIR is one checkpoint (save_pretrained output)
    --run NAME=PATH                     or runs given one by one (either kind)

A folder that is itself a checkpoint (adapter_config.json + adapter_model.*, full weights, ...)
is a run of one checkpoint: its step is the N of a ``checkpoint-N`` name, else the
``global_step`` of a trainer_state.json beside it, else not recorded (``UNKNOWN_STEP``).
Beside other runs in CKPT_DIR only adapter folders count so; a model's full weights there (a
teacher, a merged model) are a run only when given with ``--run``.

The method of a run is read from its files, never from its folder name. Everything here
reads headers only; no tensor data is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wda.formats import METHOD_ORDER, Checkpoint, TensorInfo, formats, open_checkpoint
from wda.formats.base import CONV1D_MODEL_TYPES, CONV1D_MODULE_NAMES, IN_PROJ, IN_PROJ_SUFFIX, MODEL_CONFIG
from wda.formats.peft import ADAPTER_CONFIG
from wda.errors import WdaError
from wda.formats import fused_mlp, fused_qkv
from wda.formats.tensors import listings, present
from wda.formats.hub import cached_snapshot, describe, parse_hub_id
from wda.names import matches
from wda.steps import UNKNOWN_STEP
from wda.formats.trainer_state import check_step, logged_near, read_state

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# What to do with a broken checkpoint (its folder, the error): raise, or set it aside.
Broken = Callable[[Path, WdaError], None]
# Attention query/value projections under their common names (Llama/BART/OPT, BERT/ViT, T5).
DEFAULT_TARGETS = ("q_proj", "v_proj", "query", "value", "q", "v")
GPT2_DEFAULT_TARGETS = ("c_attn",)  # GPT-2 fuses q, k, v in one Conv1D


@dataclass(frozen=True)
class ModuleInfo:
    """A matrix to analyse, named by its tensor name in base/ without ``.weight``."""

    name: str
    out_features: int
    in_features: int
    transposed: bool  # stored (in, out), GPT-2 Conv1D / PEFT fan_in_fan_out
    layer: int  # integer block index (-1 if the name has none)
    matrix: str  # short kind: last name component, e.g. "q_proj"
    stack: str  # the name before the block index, e.g. "model.encoder.layers"
    # q, k or v of a fused attention projection: ``name`` is then "<fused module>.<kind>",
    # the tensors are those of the fused module and the part is its rows ``part.rows``
    part: fused_qkv.FusedPart | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """Canonical (out, in) shape."""
        return (self.out_features, self.in_features)

    @property
    def tensor(self) -> str:
        """The stored module the tensors belong to (the fused one for a q/k/v part)."""
        return self.part.module if self.part is not None else self.name

    @property
    def stored_shape(self) -> tuple[int, int]:
        """Canonical (out, in) shape of the stored module's weight."""
        return (self.part.fused_out if self.part is not None else self.out_features, self.in_features)


@dataclass
class Run:
    name: str
    method: str
    path: Path
    steps: dict[int, Path]  # step -> checkpoint folder, sorted by step
    # base module -> the module's name inside this run's adapters (adapters only)
    adapter_names: dict[str, str] = field(default_factory=dict)
    # step -> train_loss / learning_rate / epoch logged nearest it (trainer_state.json)
    train_log: dict[int, dict[str, float | None]] = field(default_factory=dict)

    def adapts_fused(self, m: ModuleInfo) -> bool:
        """Whether this run's adapter of ``m``, a part of a fused projection, is on the whole fused
        module (its B and magnitude hold every row of it; ``m``'s rows are selected), not on the
        part alone (kohya's ``q_proj`` of an OpenCLIP ``in_proj``: they hold the part's rows only)."""
        return m.part is not None and m.part.module in self.adapter_names


@dataclass
class Layout:
    root: Path
    base: Path
    runs: list[Run]
    modules: list[ModuleInfo]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    notes: list[str] = field(default_factory=list)
    # the checkpoints discovery opened that keep only headers (not a loaded .bin), by path:
    # the engine reads from them instead of opening them again
    opened: dict[Path, Checkpoint] = field(default_factory=dict, repr=False, compare=False)

    def module_pairs(self) -> list[tuple[ModuleInfo, Run]]:
        """(module, run) pairs that are measured: adapter runs only for modules they target."""
        return [(m, r) for m in self.modules for r in self.runs
                if r.method == "FT" or m.name in r.adapter_names]


def parse_name(name: str) -> tuple[int, str, str]:
    """(layer, matrix, stack) of a module name such as ``model.layers.3.self_attn.q_proj``."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return int(p), parts[-1], ".".join(parts[:i])
    return -1, parts[-1], ""


def _steps_of(run_dir: Path) -> tuple[dict[int, Path], list[WdaError]]:
    """step -> folder, sorted as integers; and the folders whose name gives no single step
    (not an integer, or the same step twice: both are set aside, neither is guessed)."""
    found: dict[int, list[Path]] = {}
    problems: list[WdaError] = []
    for d in sorted(_listdir(run_dir)):
        if not (d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX)):
            continue
        raw = d.name[len(CHECKPOINT_PREFIX):]
        if not (raw.isascii() and raw.isdigit()):
            problems.append(WdaError(d, f"step {raw!r} is not an integer",
                                     "rename it checkpoint-<step> or move it out of the run"))
            continue
        found.setdefault(int(raw), []).append(d)
    steps: dict[int, Path] = {}
    for step, dirs in sorted(found.items()):
        if len(dirs) == 1:
            steps[step] = dirs[0]
            continue
        for d in dirs:
            others = ", ".join(o.name for o in dirs if o != d)
            problems.append(WdaError(d, f"duplicate step {step} (also {others})", "keep only one of them"))
    return steps, problems


def _listdir(d: Path) -> list[Path]:
    try:
        return list(d.iterdir())
    except OSError as exc:
        raise WdaError(d, f"cannot list this directory ({exc.strerror or exc})", "check its permissions") from None


def _holds_checkpoints(d: Path) -> bool:
    """``d`` is one run: ``checkpoint-<step>/`` folders directly inside (a Trainer output_dir)."""
    return any(c.name.startswith(CHECKPOINT_PREFIX) and c.is_dir() for c in _listdir(d))


RawRun = tuple[str, Path, dict[int, Path]]  # name, folder, step -> checkpoint folder


def _find_runs(root: Path, exclude: set[Path]) -> tuple[list[RawRun], list[str], list[WdaError]]:
    runs, notes, problems = [], [], []
    skip = {p.resolve() for p in exclude}
    for d in sorted(_listdir(root)):
        if not d.is_dir() or d.name.startswith(".") or d.resolve() in skip:
            continue
        steps, bad = _steps_of(d)
        problems += bad
        if steps:
            runs.append((d.name, d, steps))
        elif bad:
            continue
        elif is_checkpoint(d, adapters_only=True):  # a run that is one checkpoint (a final adapter)
            runs.append((d.name, d, {checkpoint_step(d): d}))
        elif is_checkpoint(d):  # a model beside the runs (a teacher, a merged model): not a run unless asked
            notes.append(f"{d}: ignored (full weights but no {CHECKPOINT_PREFIX}<step> folders; give it with "
                         f"--run NAME=PATH to analyse it as a run)")
        else:
            notes.append(f"{d}: ignored (no {CHECKPOINT_PREFIX}<step> folders, no checkpoint)")
    return runs, notes, problems


def is_checkpoint(d: Path, adapters_only: bool = False) -> bool:
    """``d`` holds one checkpoint's files itself: a format reads it (names only); with
    ``adapters_only``, an adapter format (full weights beside the runs are not a run)."""
    fmt = next((f for f in formats() if f.detect(d)), None)
    return fmt is not None and (fmt.adapter_format or not adapters_only)


def checkpoint_step(d: Path) -> int:
    """The step of a folder that is one checkpoint: N of a ``checkpoint-N`` name, else the
    ``global_step`` of its trainer_state.json, else ``UNKNOWN_STEP``. (A trainer_state.json
    that cannot be read is reported where the checkpoints are opened.)"""
    raw = d.name[len(CHECKPOINT_PREFIX):]
    if d.name.startswith(CHECKPOINT_PREFIX) and raw.isascii() and raw.isdigit():
        return int(raw)
    try:
        state = read_state(d)
    except WdaError:
        return UNKNOWN_STEP
    step = (state or {}).get("global_step")
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else UNKNOWN_STEP


_RUN_HINT = (f"--run NAME=PATH takes a run's folder of {CHECKPOINT_PREFIX}<step>/ folders (a Trainer output_dir) "
             "or one checkpoint's folder (adapter_config.json + adapter_model.*, or full weights)")


def _given_run(name: str, path: Path) -> tuple[dict[int, Path], list[WdaError]]:
    """The steps of a run given as ``--run NAME=PATH``: a folder of checkpoints, or a folder
    that is one checkpoint (``checkpoint-<step>/``, a final adapter)."""
    if not path.exists():
        raise WdaError(path, f"does not exist (--run {name}=...)", _RUN_HINT)
    if not path.is_dir():
        raise WdaError(path, f"is not a directory (--run {name}=...)", _RUN_HINT)
    if _holds_checkpoints(path):
        return _steps_of(path)
    raw = path.name[len(CHECKPOINT_PREFIX):]
    if path.name.startswith(CHECKPOINT_PREFIX) and raw.isascii() and raw.isdigit() or is_checkpoint(path):
        return {checkpoint_step(path): path}, []
    raise WdaError(path, f"holds no {CHECKPOINT_PREFIX}<step>/ folders and no checkpoint (--run {name}=...)",
                   _RUN_HINT)


def _gather_runs(ckpt_dir: str | Path | None, given: Sequence[tuple[str, str | Path]], base
                 ) -> tuple[Path, Path | None, list[RawRun], list[str], list[WdaError]]:
    """(root, root/base when CKPT_DIR is a folder of runs, runs, notes, problems): names only."""
    runs: list[RawRun] = []
    notes: list[str] = []
    problems: list[WdaError] = []
    root, base_dir = None, None
    if ckpt_dir is not None:
        root = Path(ckpt_dir)
        if not root.exists():
            raise WdaError(root, "does not exist", "check the CKPT_DIR path")
        if not root.is_dir():
            raise WdaError(root, "is not a directory",
                           f"CKPT_DIR is a folder of runs, or one run's folder of {CHECKPOINT_PREFIX}<step>/ folders")
        if base is None and not given and not any(_listdir(root)):
            raise WdaError(root, "is empty", f"expected base/ and <run>/{CHECKPOINT_PREFIX}<step>/ folders")
        if _holds_checkpoints(root):  # one run: a Trainer output_dir
            steps, problems = _steps_of(root)
            if steps:
                runs.append((root.resolve().name, root, steps))
        elif is_checkpoint(root):  # one checkpoint: save_pretrained / save_model output, a final adapter
            runs.append((_checkpoint_run_name(root), root, {checkpoint_step(root): root}))
            notes += [f"{d}: ignored (CKPT_DIR is itself a checkpoint; give this one with --run NAME=PATH)"
                      for d in sorted(_listdir(root)) if d.is_dir() and is_checkpoint(d)]
        else:
            base_dir = root / "base"
            exclude = {base_dir} | ({Path(base)} if base is not None and present(Path(base)) else set())
            runs, notes, problems = _find_runs(root, exclude)
    for name, path in given:
        steps, bad = _given_run(name, Path(path))
        if name in {r[0] for r in runs}:
            raise WdaError(None, f"--run {name}={path}: a run named {name!r} is already analysed",
                           "give each run its own name")
        problems += bad
        runs.append((name, Path(path), steps))
    if root is None:
        if not runs:
            raise WdaError(None, "nothing to analyse", "give CKPT_DIR or --run NAME=PATH")
        root = Path(os.path.commonpath([str(p.resolve()) for _, p, _ in runs]))
    return root, base_dir, runs, notes, problems


def _checkpoint_run_name(d: Path) -> str:
    """A run that is one checkpoint is named after its folder; a ``checkpoint-<step>``
    folder after the run folder (the Trainer output_dir) it is in."""
    d = d.resolve()
    return d.parent.name if d.name.startswith(CHECKPOINT_PREFIX) and d.parent.name else d.name


def _endpoint_notes(runs: list["Run"]) -> list[str]:
    """What a report of runs with one checkpoint each can and cannot show."""
    notes = []
    for run in runs:
        if len(run.steps) != 1:
            continue
        (step,) = run.steps
        when = (f"its step is not recorded: no checkpoint-<step> name, no trainer_state.json; metrics.csv "
                f"gives step {UNKNOWN_STEP}" if step == UNKNOWN_STEP else f"step {step}")
        notes.append(f"run {run.name!r} is one checkpoint, a single endpoint ({when}): one point per module, "
                     "no course over training; its fits are across layers only")
    return notes


_BASE_HINT = "put the pretrained model in CKPT_DIR/base/, or pass --base PATH or --base org/name[@revision] " \
             "(a model in the local Hugging Face cache)"


def resolve_base(base: str | Path | None, base_dir: Path | None, where: Path, runs: list[RawRun]) -> Path:
    """The base weights W_0: ``--base`` (a folder, a file, or a hub id found offline in the
    local Hugging Face cache), else ``CKPT_DIR/base/``, else the base the adapters name."""
    if base is not None:
        path = Path(base)
        if present(path):
            return path
        hub = parse_hub_id(str(base))
        if hub is None:
            raise WdaError(path, "no base weights (W_0) found", "check the --base path")
        snapshot = cached_snapshot(*hub)
        if snapshot is None:
            raise WdaError(path, f"--base is neither a folder nor a cached model: looked for {describe(*hub)}",
                           f"pass the folder of the pretrained weights, or download the model first "
                           f"(huggingface-cli download {hub[0]})")
        return snapshot
    if base_dir is not None and present(base_dir):
        return base_dir
    named = _named_bases(runs)
    if len({name for _, name in named}) > 1:
        listed = ", ".join(sorted({repr(name) for _, name in named}))
        raise WdaError(named[0][0], f"the adapters name different base models ({listed})",
                       "analyse one base at a time; pass --base")
    if named:
        cfg, name = named[0]
        if Path(name).expanduser().is_dir():
            return Path(name).expanduser()
        hub = parse_hub_id(name)
        snapshot = cached_snapshot(*hub) if hub else None
        if snapshot is not None:
            return snapshot
        looked = describe(*hub) if hub else "a folder of that name"
        raise WdaError(cfg, f"no base weights (W_0) found: the adapter names base_model_name_or_path {name!r}; "
                            f"looked for {looked}", _BASE_HINT)
    raise WdaError(base_dir if base_dir is not None else where, "no base weights (W_0) found", _BASE_HINT)


def _check_not_base(runs: list[RawRun], base: Path) -> None:
    """A checkpoint that is the base itself would be measured against itself (all zeros)."""
    folder = (base if base.is_dir() else base.parent).resolve()
    for name, _, steps in runs:
        for path in steps.values():
            if path.resolve() == folder:
                raise WdaError(path, f"is the base weights (W_0) itself, not a fine-tuned checkpoint (run {name!r})",
                               "give the run's own checkpoints, or pass the pretrained model as --base")


def _named_bases(runs: list[RawRun]) -> list[tuple[Path, str]]:
    """(config file, base_model_name_or_path) of the first readable adapter of each run."""
    out = []
    for _, _, steps in runs:
        for path in steps.values():
            try:
                ck = open_checkpoint(path)
            except WdaError:  # reported where the checkpoints are opened
                continue
            if ck.base_model:
                out.append((ck.method_file or ck.source, ck.base_model))
            break
    return out


def _train_log(steps: dict[int, Path], states: dict[Path, dict]) -> dict[int, dict[str, float | None]]:
    """step -> training loss / learning rate / epoch logged nearest it. Each checkpoint's
    trainer_state.json holds the log up to its step: merged over the run's checkpoints."""
    mine = {p: states[p] for p in steps.values() if p in states}
    if not mine:
        return {}
    history: dict[int, dict] = {}
    for state in mine.values():
        for entry in state.get("log_history", []):
            if isinstance(entry.get("step"), int) and "loss" in entry:
                history[entry["step"]] = entry
    return {s: logged_near(list(history.values()), s, mine.get(p, {}).get("epoch")) for s, p in steps.items()}


def _base_modules(base: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Every 2-D weight of the base, and every conv kernel (out, in, kh, kw) flattened to
    (out, in·kh·kw): module name (without .weight) -> stored (2-D) shape."""
    return {m: flat_shape(t.shape) for m, t in base.weights.items() if len(t.shape) in (2, 4)}


def flat_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A conv kernel's shape as the analysis sees it: one row per output channel."""
    return (shape[0], shape[1] * shape[2] * shape[3]) if len(shape) == 4 else tuple(shape)


def _map_adapter_module(amod: str, base_mods: dict, where: Path) -> str:
    """The base module an adapter module name refers to (prefixes may differ by a wrapper)."""
    if amod in base_mods:
        return amod
    cands = [b for b in base_mods if b.endswith("." + amod) or amod.endswith("." + b)]
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise WdaError(where, f"adapter module {amod!r} has no matching weight in the base checkpoint",
                       "was this adapter trained on another model?")
    raise WdaError(where, f"adapter module {amod!r} matches several base weights: {', '.join(cands[:3])}",
                   "save the adapter with full module names")


def discover(ckpt_dir: str | Path | None, base: str | Path | None = None,
             modules: list[str] | None = None, fan_in_fan_out: bool | None = None,
             skip_broken: bool = False, runs: Sequence[tuple[str, str | Path]] = (),
             split_fused: bool = True) -> Layout:
    """Find and check everything to analyse (headers only). Raises WdaError on bad input;
    with ``skip_broken`` a broken checkpoint is skipped and listed instead.

    ``ckpt_dir``: a folder of runs (``<run>/checkpoint-<step>/`` or ``<run>/`` that is one
    checkpoint, base in ``base/``), or one run (a Trainer ``output_dir`` holding
    ``checkpoint-<step>/``), or one checkpoint (a final adapter: one run of one checkpoint,
    its step ``checkpoint_step``), or None when every run is given in ``runs`` as (name,
    folder). ``base``: a folder, a weights file or a hub id
    (``org/name[@revision]``, looked up offline in the local Hugging Face cache); default
    ``CKPT_DIR/base/``, else the ``base_model_name_or_path`` the adapters name. ``split_fused``:
    fused attention projections (GPT-2 ``c_attn``, ``query_key_value``, ...) are measured as
    their q, k, v parts, laid out as the base's config.json says."""
    with listings():  # each folder listed once: the format probes ask for a dozen names each
        return _discover(ckpt_dir, base, modules, fan_in_fan_out, skip_broken, runs, split_fused)


def _discover(ckpt_dir, base, modules, fan_in_fan_out, skip_broken, runs, split_fused) -> Layout:
    root, base_dir, raw_runs, notes, problems = _gather_runs(ckpt_dir, runs, base)
    base_path = resolve_base(base, base_dir, root, raw_runs)
    base_ck = open_checkpoint(base_path)
    if base_ck.is_adapter:
        raise WdaError(base_path, "the base must hold full weights, not an adapter",
                       "put the pretrained model in base/ or pass --base PATH")
    _check_not_base(raw_runs, base_path)
    base_mods = _base_modules(base_ck)
    if not base_mods:
        raise WdaError(base_ck.source, "the base checkpoint holds no 2-D *.weight tensor to analyse",
                       "is this the pretrained model?")

    skipped: list[tuple[str, str]] = []

    def broken(path: Path, err: WdaError) -> None:
        """Stop at the first broken checkpoint, or set it aside with --skip-broken."""
        if not skip_broken:
            raise err.with_hint("--skip-broken analyses the rest") from None
        skipped.append((str(path), str(err)))

    for err in problems:
        broken(Path(err.path), err)
    if not raw_runs and skipped:
        raise WdaError(root, "no valid checkpoint left to analyse", "every checkpoint was skipped as broken")
    if not raw_runs:
        raise WdaError(root, "no runs found", f"expected <run>/{CHECKPOINT_PREFIX}<step>/ folders beside base/, "
                                              f"or {CHECKPOINT_PREFIX}<step>/ folders in CKPT_DIR itself")

    runs: list[Run] = []
    opened: dict[Path, Checkpoint] = {}
    base_names: dict[Path, dict[str, str]] = {}  # checkpoint -> {adapter module: base module}
    states: dict[Path, dict] = {}  # checkpoint -> its trainer_state.json
    for name, run_dir, steps in raw_runs:
        ok_steps: dict[int, Path] = {}
        for step, path in steps.items():
            try:
                ck = open_checkpoint(path)
                # adapter module names -> base modules (prefixes may differ by a wrapper;
                # formats with names of their own, kohya's, map them by their rule)
                renamed = ck.match_base(base_mods) if ck.adapters else {}
                names = {amod: renamed.get(amod) or _map_adapter_module(amod, base_mods, info.file)
                         for amod, info in ck.adapters.items()}
                state = read_state(path)
                if state is not None:
                    check_step(path, step, state)
                    states[path] = state
            except WdaError as err:
                broken(path, err)
                continue
            opened[path], base_names[path], ok_steps[step] = ck, names, path
        method = _run_method(run_dir, {s: opened[p] for s, p in ok_steps.items()}, broken)
        ok_steps = {s: p for s, p in ok_steps.items() if opened[p].method == method}
        if not ok_steps:
            notes.append(f"{run_dir}: no readable checkpoint left, run dropped")
            continue
        runs.append(Run(name, method, run_dir, ok_steps, train_log=_train_log(ok_steps, states)))

    for run in runs:
        for path in run.steps.values():
            for amod, bmod in base_names[path].items():
                run.adapter_names.setdefault(bmod, amod)

    transposed = _transposed_modules(base_ck, runs, opened, base_mods, fan_in_fan_out)
    config = base_ck.config() if split_fused else None  # tells how fused q/k/v are laid out
    in_proj = _in_proj_modules(base_ck, base_mods, runs, split_fused)
    infos = _select_modules(base_mods, runs, modules, base_ck, transposed, config, in_proj)
    base_folder = base_ck.path if base_ck.path.is_dir() else base_ck.path.parent
    infos = _split_fused(infos, config, base_folder / MODEL_CONFIG, modules, runs, in_proj)
    for m in infos:
        _check_dtype(base_ck.weights[m.tensor])
    kept = {p: ck for p, ck in {base_path: base_ck, **opened}.items() if not ck.holds_data}  # headers only
    layout = Layout(root, base_path, runs, infos, skipped, notes, kept)
    _validate(layout, opened, broken)
    layout.runs = sorted([r for r in layout.runs if r.steps], key=_run_order)
    layout.notes += _endpoint_notes(layout.runs)
    if not layout.runs:
        raise WdaError(root, "no valid checkpoint left to analyse", "every checkpoint was skipped as broken")
    if not layout.module_pairs():
        raise WdaError(root, "no run changes the selected modules", "check --modules")
    return layout


def _run_method(run_dir: Path, cks: dict[int, Checkpoint], broken: Broken) -> str | None:
    """The one method of a run. A checkpoint of another method than most of the run is
    the odd one out (a hand-edited use_dora, a folder copied into the wrong run)."""
    counts = Counter(ck.method for ck in cks.values())
    if not counts:
        return None
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        which = "; ".join(f"{m}: " + ", ".join(ck.path.name for ck in cks.values() if ck.method == m)
                          for m, _ in sorted(ranked))
        raise WdaError(run_dir, f"mixes checkpoints of different methods ({_short_list(which)})",
                       "keep one method per run folder")
    method = ranked[0][0]
    for step, ck in cks.items():
        if ck.method != method:
            what = ck.method_file or ck.source
            broken(ck.path, WdaError(what, f"makes this checkpoint {ck.method} but the other checkpoints "
                                           f"of run {run_dir.name!r} are {method}",
                                     "keep one method per run folder; check use_dora"))
    return method


def _short_list(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run_order(run: Run) -> tuple[int, str]:
    m = METHOD_ORDER.index(run.method) if run.method in METHOD_ORDER else len(METHOD_ORDER)
    return (m, run.name)


def _transposed_modules(base: Checkpoint, runs: list[Run], opened: dict[Path, Checkpoint],
                        base_mods: dict, override: bool | None) -> set[str]:
    """Modules stored (in, out): GPT-2 style Conv1D. Told by the user, by adapters with
    ``fan_in_fan_out`` in the same directory, or by the base's config.json model type."""
    if override is False:  # an adapter saved with fan_in_fan_out says its base is (in, out)
        for run in runs:
            for path in run.steps.values():
                if getattr(opened[path], "fan_in_fan_out", False):
                    cfg = path / ADAPTER_CONFIG
                    raise WdaError(cfg if cfg.is_file() else path, "says fan_in_fan_out: true (weights stored "
                                   "(in, out), GPT-2 Conv1D) but --fan-in-fan-out no says they are not",
                                   "the flag contradicts the adapter config: drop it (auto) or use yes")
    if override is not None:
        return set(base_mods) if override else set()
    out: set[str] = set()
    for run in runs:
        for path in run.steps.values():
            ck = opened[path]
            if ck.fan_in_fan_out:
                out.update(b for b, a in run.adapter_names.items() if a in ck.adapters)
    if base.model_type() in CONV1D_MODEL_TYPES:
        out.update(b for b in base_mods if parse_name(b)[1] in CONV1D_MODULE_NAMES)
    return out


def _in_proj_modules(base: Checkpoint, base_mods: dict, runs: list[Run], split: bool) -> dict[str, Path]:
    """The base's torch.nn.MultiheadAttention fused q/k/v (``<attn>.in_proj_weight``, the module
    ``<attn>.in_proj``) -> the file holding it: split by their own layout, no config needed. With
    ``split`` off only those whose parts are adapted (an adapter on a part has no whole to measure)."""
    out = {}
    for b in base_mods:
        if b.endswith(IN_PROJ) and base.weights[b].key.endswith(IN_PROJ_SUFFIX):
            if split or any(f"{b}.{k}" in r.adapter_names for r in runs for k in fused_qkv.PARTS):
                out[b] = base.weights[b].file
    return out


def _fused_kinds(config: dict | None, name: str, in_proj: Collection[str] = ()) -> tuple[str, ...]:
    """The parts a fused projection is split into: q, k, v (attention) or gate, up (MLP)."""
    if fused_qkv.is_fused(config, name) or name in in_proj:
        return fused_qkv.PARTS
    return fused_mlp.PARTS if fused_mlp.is_fused(config, name) else ()


def _fused_parts(config: dict | None, m: ModuleInfo, in_proj: Collection[str]) -> list[fused_qkv.FusedPart] | None:
    if m.name in in_proj:
        return fused_qkv.in_proj_parts(m.name, m.out_features, m.in_features)
    return (fused_qkv.fused_parts(config, m.name, m.out_features)
            or fused_mlp.fused_parts(config, m.name, m.out_features))


def _matches_module(name: str, pat: str, config: dict | None, in_proj: Collection[str] = ()) -> bool:
    """``pat`` names this module, or one of its parts if it is a fused projection."""
    if matches(name, pat):
        return True
    return any(matches(f"{name}.{k}", pat) for k in _fused_kinds(config, name, in_proj))


def _split_fused(infos: list[ModuleInfo], config: dict | None, config_path: Path,
                 patterns: list[str] | None, runs: list[Run], in_proj: dict[str, Path] | None = None
                 ) -> list[ModuleInfo]:
    """Fused projections replaced by their parts: attention ``c_attn`` -> ``c_attn.q``,
    ``c_attn.k``, ``c_attn.v`` (all three when asked for by name or adapted, else, the
    default query/value choice, q and v); gated MLP ``gate_up_proj`` -> ``gate_up_proj.gate``,
    ``gate_up_proj.up``; a MultiheadAttention ``in_proj`` -> ``in_proj.q``, ``.k``, ``.v``.
    Adapter runs of the fused module measure each part; adapters on parts alone, their parts."""
    out: list[ModuleInfo] = []
    in_proj = in_proj or {}
    adapted = {b for r in runs for b in r.adapter_names}
    for m in infos:
        try:
            parts = _fused_parts(config, m, in_proj)
        except fused_qkv.FusedLayoutError as exc:
            kinds = ", ".join(_fused_kinds(config, m.name, in_proj))
            if m.name in in_proj:
                raise WdaError(in_proj[m.name], f"cannot split {m.name!r} into {kinds}: {exc}",
                               "was it saved from an OpenCLIP / MultiheadAttention model? --no-split measures "
                               "it whole (not for adapters on its q, k, v)") from None
            raise WdaError(config_path, f"cannot split {m.name!r} into {kinds}: {exc}",
                           "fix config.json, or pass --no-split to measure the fused matrix whole") from None
        if parts is None:
            out.append(m)
            continue
        if patterns:
            parts = [p for p in parts if any(matches(m.name, pat) or matches(p.name, pat) for pat in patterns)]
        elif m.name not in adapted:
            # the parts adapted alone (kohya's q_proj / k_proj / v_proj of an in_proj), else the
            # default query/value choice: no keys
            parts = [p for p in parts if p.name in adapted] or [p for p in parts if p.kind != "k"]
        for p in parts:
            out.append(dataclasses.replace(m, name=p.name, out_features=len(p.rows),
                                           matrix=f"{m.matrix}.{p.kind}", part=p))
            for run in runs:
                if m.name in run.adapter_names:
                    run.adapter_names[p.name] = run.adapter_names[m.name]
    return sorted(out, key=lambda m: (m.matrix, m.stack, m.layer, m.name))


def _select_modules(base_mods: dict, runs: list[Run], patterns: list[str] | None,
                    base: Checkpoint, transposed: set[str], config: dict | None = None,
                    in_proj: Collection[str] = ()) -> list[ModuleInfo]:
    names: list[str]
    if patterns:
        names = []
        for pat in patterns:
            hit = [b for b in base_mods if _matches_module(b, pat, config, in_proj)]
            if not hit:
                raise _no_match(pat, base_mods, base.source)
            names += [h for h in hit if h not in names]
    else:
        # an adapter on a part of a fused in_proj (``<attn>.in_proj.q``) selects the fused module
        names = sorted({_fused_of(b, base_mods, in_proj) for r in runs for b in r.adapter_names})
        if not names:
            targets = GPT2_DEFAULT_TARGETS if base.model_type() in CONV1D_MODEL_TYPES else DEFAULT_TARGETS
            names = [b for b in base_mods if any(b.endswith("." + t) or b == t for t in targets)
                     or fused_qkv.is_fused(config, b)]
        if not names:
            raise WdaError(base.path, "found no attention query/value projections to analyse",
                           "choose modules with --modules")
    infos = []
    for n in names:
        rows, cols = base_mods[n]
        out_f, in_f = (cols, rows) if n in transposed else (rows, cols)
        layer, matrix, stack = parse_name(n)
        infos.append(ModuleInfo(n, out_f, in_f, n in transposed, layer, matrix, stack))
    return sorted(infos, key=lambda m: (m.matrix, m.stack, m.layer, m.name))


def _fused_of(name: str, base_mods: dict, in_proj: Collection[str]) -> str:
    """The base module an adapted name selects: itself, or for a part of a fused ``in_proj``
    (``<attn>.in_proj.q``) the fused module."""
    fused, _, kind = name.rpartition(".")
    return fused if name not in base_mods and fused in in_proj and kind in fused_qkv.PARTS else name


def _no_match(pat: str, base_mods: dict, where: Path) -> WdaError:
    """The error for a module pattern that matches nothing: the pattern as typed, and a form
    of it that does match (a regex searched inside the name must match it whole)."""
    problem = f"--modules '{pat}' matches no 2-D weight in the base checkpoint"
    try:
        re.compile(pat)
    except re.error as exc:
        return WdaError(where, f"{problem} and is not a valid regular expression ({exc})",
                        f"escape special characters, e.g. '{re.escape(pat)}'")
    for form in (f".*{pat}", f"{pat}.*", f".*{pat}.*"):
        hits = [b for b in base_mods if re.fullmatch(form, b)]
        if hits:
            return WdaError(where, problem, f"a regular expression must match the whole name: "
                                            f"'{form}' matches {len(hits)}, e.g. {hits[0]}")
    # an example from this model: an attention query/value inside a block, if any
    example = min(base_mods, key=lambda b: (parse_name(b)[1] not in DEFAULT_TARGETS,
                                            parse_name(b)[0] < 0, b))
    return WdaError(where, problem, f"give name suffixes such as '{parse_name(example)[1]}' or regular "
                                    f"expressions matching whole names such as '{re.escape(example)}'")


def _validate(layout: Layout, opened: dict[Path, Checkpoint], broken: Broken) -> None:
    """Check every (checkpoint, module) against the base, from headers only."""
    for run in layout.runs:
        targeted = {m.name for m in layout.modules if run.method == "FT" or m.name in run.adapter_names}
        checked = set()  # full-weight checkpoints with the header of one already checked pass too
        for step, path in list(run.steps.items()):
            same = opened[path].same_weights_key()
            if same is not None and same in checked:
                continue
            try:
                for m in layout.modules:
                    if m.name in targeted:
                        _check_module(opened[path], m, run)
            except WdaError as err:
                broken(path, err)
                del run.steps[step]
                continue
            if same is not None:
                checked.add(same)


def _check_dtype(t: TensorInfo) -> None:
    """Only real-valued tensors can be measured: integer or boolean data (quantised weights,
    a mislabelled header) would be cast to float and give a silent wrong picture."""
    if not t.floating:
        raise WdaError(t.file, f"{t.key} is stored as {t.dtype}, not as floating point",
                       "quantised or mislabelled weights cannot be measured; dequantise or re-save them")


def _part(t: TensorInfo, module: str) -> str:
    """What a tensor is within its module, as the file names it (``lora_A``, ``lora_magnitude_vector``)."""
    tail = t.key.rsplit(module + ".", 1)[-1]
    return tail.removesuffix(".weight") or t.key


def _check_module(ck: Checkpoint, m: ModuleInfo, run: Run) -> None:
    out_f, in_f = m.stored_shape
    if ck.is_adapter and m.part is not None and not run.adapts_fused(m):
        out_f = m.out_features  # an adapter on the part alone: its rows only
    if not ck.is_adapter:
        t = ck.weights.get(m.tensor)
        if t is None:
            raise WdaError(ck.source, f"module {m.tensor!r} is missing (it is in the base checkpoint)",
                           "was this checkpoint saved from another model, or only partly?")
        stored = (in_f, out_f) if m.transposed else (out_f, in_f)
        if flat_shape(t.shape) != stored:
            raise WdaError(t.file, f"{t.key} has shape {t.shape}, the base has {stored}",
                           "was this checkpoint saved from another model?")
        _check_dtype(t)
        return
    amod = run.adapter_names[m.name]
    info = ck.adapters.get(amod)
    if info is None:
        raise WdaError(ck.source, f"module {amod!r} is missing here but present in other checkpoints of run "
                                  f"{run.name!r}", "every checkpoint of a run must adapt the same modules")
    ck.check_module(amod)
    where = info.file
    resave = "the adapter weights and its config do not belong together; re-save it"
    if (info.a is None) != (info.b is None):
        raise WdaError(where, f"module {amod!r} has only one of its two low-rank factors",
                       "the adapter file is incomplete; re-save it")
    if info.a is not None:
        r = info.rank
        if info.a.shape != (r, in_f) or info.b.shape != (out_f, r):
            raise WdaError(where, f"module {amod!r}: {_part(info.a, amod)} {info.a.shape} / {_part(info.b, amod)} "
                                  f"{info.b.shape} do not fit rank {r} from the adapter config and base shape "
                                  f"(out={out_f}, in={in_f})", resave)
    if info.m is not None and info.magnitude_axis == "in":  # one per input channel (LyCORIS)
        n = math.prod(info.m.shape)
        if n == 0 or in_f % n:
            raise WdaError(where, f"module {amod!r}: {_part(info.m, amod)} has {n} entries, which do not fit "
                                  f"the {in_f} input features of the base", resave)
    elif info.m is not None and info.m.shape not in ((out_f,), (1, out_f), (out_f, 1)):
        raise WdaError(where, f"module {amod!r}: {_part(info.m, amod)} has shape {info.m.shape}, "
                              f"expected ({out_f},)", resave)
    for t in (info.a, info.b, info.m):
        if t is not None:
            _check_dtype(t)
