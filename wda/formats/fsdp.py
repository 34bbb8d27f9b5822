"""FSDP sharded checkpoints: the ``pytorch_model_fsdp_0/`` folder accelerate (and so the
Trainer) writes with ``SHARDED_STATE_DICT``, a ``torch.distributed.checkpoint`` (DCP) folder
of ``.metadata`` + ``*.distcp`` files, keys nested under ``"model"``.

Read without a process group, tensor by tensor: names, shapes and dtypes from the metadata;
each tensor loaded alone (a state dict holding only it, loaded with ``no_dist=True`` as
torch's own ``dcp_to_torch_save`` does, its chunks assembled from whichever ranks' files
hold them), so memory stays a few matrices whatever the model size. A folder given directly
(``.metadata`` inside) is read the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wda.errors import WdaError
from wda.formats.base import FT, Checkpoint, TensorInfo
from wda.formats.tensors import present, short, short_text

FSDP_DIR = "pytorch_model_fsdp_0"
METADATA = ".metadata"
MODEL_KEY = "model."  # accelerate saves {"model": state_dict}


def _dcp_dir(path: Path) -> Path:
    return path if present(path / METADATA) else path / FSDP_DIR


class FsdpSharded(Checkpoint):
    format = "FSDP sharded (DCP)"
    priority = 92  # after full weights: a folder that also holds model.safetensors is read from that
    expects = f"{FSDP_DIR}/ (torch.distributed.checkpoint)"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_dir() and present(_dcp_dir(path) / METADATA)

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.method = FT
        self.dir = _dcp_dir(path)
        self.source = self.dir / METADATA
        self._reader = FileSystemReader(str(self.dir))
        try:
            metadata = self._reader.read_metadata()
            meta = metadata.state_dict_metadata
            files = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
        except Exception as exc:
            raise WdaError(self.source, f"not a readable torch.distributed.checkpoint metadata file ({short(exc)})",
                           "re-save or remove this checkpoint") from None
        for name in files:
            if not (self.dir / name).is_file():
                raise WdaError(self.dir / name, f"listed in {METADATA} but missing",
                               "copy every rank's .distcp file, or re-save this checkpoint")
        tensors = {k: v for k, v in meta.items() if isinstance(v, TensorStorageMetadata)}
        strip = MODEL_KEY if tensors and all(k.startswith(MODEL_KEY) for k in tensors) else ""
        self._meta: dict[str, TensorStorageMetadata] = tensors
        self._infos = {k: TensorInfo(k, tuple(v.size), str(v.properties.dtype).removeprefix("torch."),
                                     v.properties.dtype.is_floating_point, self.dir) for k, v in tensors.items()}
        self.weights = {k[len(strip):-len(".weight")]: info for k, info in self._infos.items()
                        if k.endswith(".weight")}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: info.shape for k, info in self._infos.items()}

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def read(self, key: str) -> torch.Tensor:
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        md = self._meta.get(key)
        if md is None:
            raise WdaError(self.source, f"tensor {key!r} is missing", "the checkpoint changed while it was read?")
        out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        try:
            # no process group, no collectives (also under torchrun); only this tensor's chunks
            _load_state_dict({key: out}, storage_reader=self._reader, planner=DefaultLoadPlanner(), no_dist=True)
        except (Exception, CheckpointException) as exc:  # a cut-short .distcp file, ...
            if isinstance(exc, CheckpointException) and exc.failures:  # the cause, not its traceback
                exc = next(iter(exc.failures.values()))[0]
            why = type(exc).__name__ + (f": {short_text(str(exc))}" if str(exc).strip() else "")
            raise WdaError(self.dir, f"cannot read tensor {key!r} ({why})",
                           "a .distcp file may be missing, truncated or corrupt") from None
        return out


FORMAT = FsdpSharded
