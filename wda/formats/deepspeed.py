"""DeepSpeed ZeRO checkpoints (``global_step<N>/`` with ``*_model_states.pt`` and
``*_optim_states.pt`` partitions, ``latest``, ``zero_to_fp32.py``): recognised, not read.
The weights are fp32 partitions of pickled DeepSpeed objects; DeepSpeed's own
``zero_to_fp32.py``, written beside them, turns them into full weights wda reads."""

from __future__ import annotations

from pathlib import Path

from wda.errors import WdaError
from wda.formats.base import Checkpoint
from wda.formats.tensors import present

ZERO_TO_FP32 = "zero_to_fp32.py"


def _partitions(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("global_step*")
                  if p.is_dir() and (any(p.glob("*_optim_states.pt")) or any(p.glob("*model_states.pt"))))


class DeepSpeedZero(Checkpoint):
    format = "DeepSpeed ZeRO"
    priority = 95  # only where no format wda reads found weights (ZeRO-3 may also save them)
    expects = ""  # not read: named by its own message

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_dir() and (present(path / ZERO_TO_FP32) or bool(_partitions(path)))

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        script = path / ZERO_TO_FP32
        raise WdaError(path, "is a DeepSpeed ZeRO checkpoint (partitioned fp32 states), which wda does not read",
                       f"convert it to full weights in place with DeepSpeed's {ZERO_TO_FP32}: "
                       f"python {script} {path} {path} --safe_serialization")


FORMAT = DeepSpeedZero
