"""Weights files read lazily: names, shapes and dtypes from the header, tensors one at a time.

Shared by the formats that store named tensors in safetensors or PyTorch ``.bin`` files,
alone or sharded behind an index (``weight_map``). Also the small JSON and message helpers
every format uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from wda.errors import WdaError

# Header dtypes that hold real numbers; anything else (I8, U8, BOOL, ...) is not a weight
# this analysis can measure (quantised or mislabelled data would give a silent wrong picture).
SAFETENSORS_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


# ---- tensor files ------------------------------------------------------------------------
class TensorFile:
    """One weights file (.safetensors or .bin): names and shapes from the header, tensors
    read one at a time. Safetensors are memory-mapped; .bin files are loaded with
    ``weights_only=True`` (and ``mmap=True`` where the format allows)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._st = None  # safetensors handle
        self._sd: dict[str, torch.Tensor] | None = None  # .bin state dict (mmap)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}  # stored dtype as written in the header
        self._floating: dict[str, bool] = {}
        self._open()

    def _open(self) -> None:
        if not self.path.is_file():
            raise WdaError(self.path, _not_a_file(self.path), "re-save or remove this checkpoint")
        if self.path.suffix == ".safetensors":
            self._open_safetensors()
        else:
            self._open_bin()
        self._size = _size_now(self.path)

    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        try:
            # safe_open checks the header against the file size: a truncated or padded file
            # fails here ("file not fully covered"), before any tensor is read.
            handle = safe_open(str(self.path), framework="pt", device="cpu")
            slices = {k: handle.get_slice(k) for k in handle.keys()}
            shapes = {k: tuple(sl.get_shape()) for k, sl in slices.items()}
            dtypes = {k: str(sl.get_dtype()) for k, sl in slices.items()}
        except Exception as exc:  # SafetensorError, OSError, ... : one clean line
            raise WdaError(self.path, f"not a readable safetensors file ({short(exc)})",
                           "re-save or remove this checkpoint") from None
        self._st, self._shapes = handle, shapes
        self._floating = {k: d in SAFETENSORS_FLOAT_DTYPES for k, d in dtypes.items()}
        self._dtypes = dtypes

    def _open_bin(self) -> None:
        sd = None
        for mmap in (True, False):  # legacy (non-zip) .bin files cannot be memory-mapped
            try:
                sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
                break
            except Exception as exc:
                err = exc
        if sd is None:
            raise WdaError(self.path, f"not a readable PyTorch weights file ({short(err)})",
                           "re-save or remove this checkpoint") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise WdaError(self.path, "does not hold a flat dict of tensors (a state dict)",
                           "save model.state_dict(), not the model or a training state")
        self._sd = sd
        self._shapes = {k: tuple(v.shape) for k, v in sd.items()}
        self._dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in sd.items()}
        self._floating = {k: v.dtype.is_floating_point for k, v in sd.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def dtype(self, name: str) -> str:
        """The stored dtype of ``name`` as the file names it (``F32``, ``bfloat16``, ...)."""
        return self._dtypes[name]

    def is_floating(self, name: str) -> bool:
        return self._floating[name]

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` on the CPU, in its stored dtype."""
        # Tensors are views of the memory-mapped file: touching pages past the end of a file
        # cut short after it was opened kills the process (SIGBUS), it raises nothing. A file
        # rewritten in place (a training job still saving) shows as a new size: stop here.
        size = _size_now(self.path)
        if size is not None and size != self._size:
            raise WdaError(self.path, f"changed on disk while being analysed ({self._size} -> {size} bytes)",
                           "is a training job still writing it? rerun once it is complete")
        try:
            if self._st is not None:
                return self._st.get_tensor(name)
            return self._sd[name]
        except KeyError:
            raise WdaError(self.path, f"tensor {name!r} is missing", "the file changed while it was read?") from None
        except Exception as exc:
            raise WdaError(self.path, f"cannot read tensor {name!r} ({short(exc)})",
                           "the file may be truncated or corrupt") from None


def _size_now(path: Path) -> int | None:
    """The file's size now; None once it is deleted (a mapped, unlinked file stays readable)."""
    try:
        return path.stat().st_size
    except OSError:
        return None


def present(path: Path) -> bool:
    """Something is there under this name (a file, a directory, even a broken link)."""
    return path.exists() or path.is_symlink()


def _not_a_file(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return f"is a broken link (to {short_text(str(path.readlink()))})"
    if path.is_dir():
        return "is a directory, not a weights file"
    if path.exists():
        return "is not a regular file"
    return "file is missing"


def short_text(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


def short_repr(value: Any) -> str:
    return short_text(repr(value))


def short(exc: BaseException) -> str:
    return short_text(str(exc)) or type(exc).__name__


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WdaError(path, "file is missing", "restore it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:  # IsADirectoryError is an OSError
        raise WdaError(path, f"not valid JSON ({short(exc)})", "restore or re-save this file") from None
    except RecursionError:
        raise WdaError(path, "not valid JSON (nested too deeply)", "restore or re-save this file") from None
    if not isinstance(data, dict):
        raise WdaError(path, f"expected a JSON object, found {type(data).__name__}", "restore or re-save this file")
    return data
