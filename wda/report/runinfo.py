"""What was run: per run its adapter settings, training length and learning rate, and which
of the selected modules it covers; and the commands that reproduce a report.

Reads small JSON files only (adapter_config.json, trainer_state.json, train_log.json); a
missing or unreadable file means "not recorded", never an error.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd

ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"  # Hugging Face Trainer, in each checkpoint folder
TRAIN_LOG = "train_log.json"  # python -m wda.train, in CKPT_DIR
# adapter_config.json fields shown per run (PEFT names)
ADAPTER_FIELDS = ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "lora_dropout",
                  "fan_in_fan_out")
# wda.train's learning rate of each method
TRAIN_LR = {"FT": "ft_lr", "LoRA": "lora_lr", "DoRA": "dora_lr"}
# wda.train options that say where or how fast, not what was trained
_NOT_REPRODUCED = {"out", "overwrite", "cache_dir", "use_cache", "threads"}


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def adapter_settings(checkpoint: Path) -> dict[str, Any]:
    """The PEFT fields of a checkpoint's adapter_config.json (empty for full weights); a
    ``checkpoint-<step>/`` saved without one is read with its run folder's."""
    raw = _json(checkpoint / ADAPTER_CONFIG)
    if raw is None and checkpoint.name.startswith("checkpoint-"):
        raw = _json(checkpoint.parent / ADAPTER_CONFIG)
    raw = raw or {}
    out = {k: raw[k] for k in ADAPTER_FIELDS if k in raw}
    if isinstance(out.get("target_modules"), list):
        out["target_modules"] = sorted(out["target_modules"])
    return out


def training_settings(root: Path, run_name: str, method: str, last_checkpoint: Path) -> dict[str, Any]:
    """Learning rate and steps, from the last checkpoint's trainer_state.json or from the
    train_log.json of ``python -m wda.train`` in CKPT_DIR; empty when neither says."""
    state = _json(last_checkpoint / TRAINER_STATE)
    if state is not None:
        lrs = [e["learning_rate"] for e in state.get("log_history") or []
               if isinstance(e, dict) and isinstance(e.get("learning_rate"), (int, float))]
        out: dict[str, Any] = {"source": TRAINER_STATE}
        if state.get("max_steps") is not None:
            out["steps"] = state["max_steps"]
        if lrs:
            out["lr_peak_logged"] = max(lrs)
        return out
    log = _json(root / TRAIN_LOG)
    cfg = (log or {}).get("config")
    if not isinstance(cfg, dict) or run_name not in ((log or {}).get("runs") or {}):
        return {}
    out = {"source": TRAIN_LOG, "steps": cfg.get("steps"), "lr": cfg.get(TRAIN_LR.get(method, ""))}
    if cfg.get("schedule"):
        out["schedule"] = cfg["schedule"]
    if method == "DoRA" and cfg.get("dora_magnitude_lr_mult", 1.0) != 1.0:
        out["magnitude_lr_mult"] = cfg["dora_magnitude_lr_mult"]
    return {k: v for k, v in out.items() if v is not None}


def describe_runs(layout, metrics: pd.DataFrame) -> list[dict[str, Any]]:
    """One dict per run of the layout: name, method, steps, path, adapter and training
    settings, and the selected modules and layers it covers (none: an empty list)."""
    covered: dict[str, list] = {r.name: [] for r in layout.runs}
    for m, r in layout.module_pairs():
        covered[r.name].append(m)
    out = []
    for run in layout.runs:
        last = run.steps[max(run.steps)] if run.steps else run.path
        mods = covered[run.name]
        out.append({
            "name": run.name, "method": run.method, "steps": list(run.steps),
            "path": str(run.path.resolve()),
            "adapter": adapter_settings(last),
            "training": training_settings(layout.root, run.name, run.method, last),
            "modules": len(mods), "layers": sorted({m.layer for m in mods}),
            "matrices": sorted({m.matrix for m in mods}),
        })
    return out


# ---- how to reproduce ---------------------------------------------------------------------
def _git_top(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if (d / ".git").exists():
            return d
    return None


def _abs(path: str | Path) -> Path:
    """Absolute, ".." folded, symlinks kept as given (the path a user typed still reads)."""
    return Path(os.path.abspath(path))


def _rooted(path: str | Path, top: Path | None) -> str:
    p = _abs(path)
    if top is not None and (p == top or top in p.parents):
        return str(p.relative_to(top)) if p != top else "."
    return str(p)


def _rewrite(argv: list[str], ckpt: str, top: Path | None, out: Path) -> list[str]:
    """``argv`` with CKPT_DIR, --out and --base as rooted paths, and --out made explicit."""
    res, i, seen_pos, has_out = [], 0, False, False
    while i < len(argv):
        tok = argv[i]
        flag, eq, val = tok.partition("=")
        if flag in ("--out", "--base"):
            has_out |= flag == "--out"
            if eq:
                res.append(f"{flag}={_rooted(val, top)}")
            else:
                res += [flag] + ([_rooted(argv[i + 1], top)] if i + 1 < len(argv) else [])
                i += 1
        elif not seen_pos and not tok.startswith("-") and Path(tok) == Path(ckpt):
            res.append(_rooted(tok, top))
            seen_pos = True
        else:
            res.append(tok)
        i += 1
    if not has_out:
        res += ["--out", _rooted(out, top)]
    return res


def train_command(root: Path, top: Path | None) -> str | None:
    """``python -m wda.train`` with the options recorded in CKPT_DIR/train_log.json."""
    cfg = ((_json(root / TRAIN_LOG) or {}).get("config"))
    if not isinstance(cfg, dict):
        return None
    from wda.train.cli import TrainConfig

    defaults = TrainConfig()
    argv = ["python", "-m", "wda.train", "--out", _rooted(root, top)]
    for f in fields(TrainConfig):
        if f.name in _NOT_REPRODUCED or f.name not in cfg:
            continue
        value, default = cfg[f.name], getattr(defaults, f.name)
        if isinstance(default, tuple):
            default = list(default)
        if value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, "none" if value is None else str(value)]
    return shlex.join(argv)


def reproduce_commands(root: Path, argv: tuple[str, ...] | list[str], out: Path,
                       base: Path | None = None) -> list[str]:
    """Shell lines that remake this report from any directory: inside a git checkout they
    start with a ``cd`` to its top and use paths from there, elsewhere absolute paths; the
    ``wda.train`` step comes first when CKPT_DIR was made by it."""
    top = _git_top(_abs(Path.cwd()))
    if top is not None and top not in _abs(root).parents:
        top = None  # the data is not in this checkout: absolute paths
    lines = ['cd "$(git rev-parse --show-toplevel)"  # paths below are relative to the '
             "repository root"] if top is not None else []
    train = train_command(root, top)
    if train:
        lines.append(train)
    lines.append(shlex.join(["python", "-m", "wda.report",
                             *_rewrite(list(argv), str(root), top, out)]))
    return lines
