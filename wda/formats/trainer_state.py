"""``trainer_state.json`` of a Hugging Face Trainer checkpoint: the step it was saved at
(``global_step``) and the training log (``log_history``), read to put the training loss,
learning rate and epoch beside each checkpoint's ΔM and ΔD."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from wda.errors import WdaError
from wda.formats.tensors import read_json

TRAINER_STATE = "trainer_state.json"
LOG_COLUMNS = ("train_loss", "learning_rate", "epoch")


def read_state(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's trainer state, or None when it has none."""
    path = folder / TRAINER_STATE
    if not (path.exists() or path.is_symlink()):
        return None
    state = read_json(path)
    history = state.get("log_history", [])
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
        raise WdaError(path, "log_history is not a list of objects", "restore or re-save this file")
    return state


def check_step(folder: Path, step: int, state: dict[str, Any]) -> None:
    """The folder's step and the state's ``global_step`` must agree: a renamed or copied
    folder would put its weights at the wrong step."""
    g = state.get("global_step")
    if g is None:
        return
    if not (isinstance(g, int) and not isinstance(g, bool)):
        raise WdaError(folder / TRAINER_STATE, f"global_step is {g!r}, not an integer", "restore or re-save this file")
    if g != step:
        raise WdaError(folder / TRAINER_STATE, f"global_step {g} does not match the folder's step {step}",
                       f"was the folder renamed or copied? name it checkpoint-{g}")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def logged_near(history: list[dict[str, Any]], step: int, epoch: Any = None) -> dict[str, float | None]:
    """``train_loss`` and ``learning_rate`` of the training-log entry (one with a ``loss``)
    nearest ``step`` (the earlier one on a tie), and ``epoch``: the state's own epoch at
    the save when given, else that entry's. None where absent."""
    entries = [e for e in history if _number(e.get("loss")) is not None and isinstance(e.get("step"), int)]
    out: dict[str, float | None] = dict.fromkeys(LOG_COLUMNS)
    if entries:
        near = min(entries, key=lambda e: (abs(e["step"] - step), e["step"]))
        out.update(train_loss=_number(near["loss"]), learning_rate=_number(near.get("learning_rate")),
                   epoch=_number(near.get("epoch")))
    if _number(epoch) is not None:
        out["epoch"] = _number(epoch)
    return out
