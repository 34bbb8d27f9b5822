"""Hugging Face full weights: ``model.safetensors``, sharded ``model-0000i-of-0000N.safetensors``
+ ``model.safetensors.index.json``, ``pytorch_model.bin`` (+ its index), or one such file given
directly (``--base path/to/model.safetensors``); a diffusers model folder
(``diffusion_pytorch_model.safetensors``, e.g. a pipeline's ``unet/``)."""

from __future__ import annotations

from pathlib import Path

from wda.formats.base import FT, Checkpoint
from wda.formats.tensors import present

FULL_SAFETENSORS = "model.safetensors"
FULL_SAFETENSORS_INDEX = "model.safetensors.index.json"
FULL_BIN = "pytorch_model.bin"
FULL_BIN_INDEX = "pytorch_model.bin.index.json"
# a diffusers model folder (unet/, text_encoder/ of a pipeline)
DIFFUSERS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# in the order they are looked for; an index wins over a single file beside it
NAMES = (FULL_SAFETENSORS_INDEX, FULL_SAFETENSORS, FULL_BIN_INDEX, FULL_BIN,
         DIFFUSERS_SAFETENSORS_INDEX, DIFFUSERS_SAFETENSORS)
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class FullWeights(Checkpoint):
    format = "full weights"
    priority = 90  # the most general: last
    expects = f"{FULL_SAFETENSORS}, a sharded {FULL_SAFETENSORS_INDEX}, {FULL_BIN}"

    @classmethod
    def detect(cls, path: Path) -> bool:
        if path.is_file():
            return path.suffix in FILE_SUFFIXES
        return any(present(path / n) for n in NAMES)

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.method = FT
        if path.is_file():
            self._add_file(path)
        else:
            # present, not is_file: a directory or broken link under a weights name is
            # reported as such by TensorFile, not as "no weights found".
            name = next(n for n in NAMES if present(path / n))
            if name.endswith(".index.json"):
                self._add_sharded(path / name)
            else:
                self._add_file(path / name)
        self.weights = self._weights_from_keys()


FORMAT = FullWeights
