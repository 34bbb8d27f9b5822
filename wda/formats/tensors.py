"""Weights files read lazily: names, shapes and dtypes from the header, tensors one at a time.

Shared by the formats that store named tensors in safetensors or PyTorch ``.bin`` files,
alone or sharded behind an index (``weight_map``). Also the small JSON and message helpers
every format uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from wda.errors import WdaError

# Header dtypes that hold real numbers; anything else (I8, U8, BOOL, ...) is not a weight
# this analysis can measure (quantised or mislabelled data would give a silent wrong picture).
SAFETENSORS_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


# ---- tensor files ------------------------------------------------------------------------
# The safetensors format (https://huggingface.co/docs/safetensors): an 8-byte little-endian
# header length N, N bytes of JSON ({name: {"dtype", "shape", "data_offsets": [begin, end]}},
# "__metadata__": {str: str}), then the data; offsets are relative to the end of the header.
# Bits per element of every dtype the format defines (what its validation checks sizes with).
SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8,
                    "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
                    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
                    "C64": 64, "F64": 64, "I64": 64, "U64": 64}
SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own limit
_TORCH_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
    ("BOOL", "bool"), ("C64", "complex64"), ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu")) if hasattr(torch, attr)}
_U64 = 2**64 - 1
# Parsed headers by their bytes: the checkpoints of a run usually have the same header
# (same names, shapes, dtypes, offsets), so it is parsed and checked once and its tables are
# shared (read only) by every file that has it.
_HEADERS: dict[bytes, tuple] = {}
_HEADERS_KEPT = 64
_HEADER_CACHED_MAX = 1 << 20  # bytes of one header kept (a large model's is ~50 KB)
_INTS = frozenset({int})

# Allocates the bytes one tensor is read into: ``alloc(nbytes) -> uint8 tensor`` of exactly
# ``nbytes`` (a pooled buffer, pinned memory for CUDA). The default: a new tensor.
Alloc = Callable[[int], torch.Tensor]


def _new_buffer(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


# ``read_many(mapped=True)``: tensors at least this large are views of their own mapping of
# the file (smaller ones are copied: a mapping costs more than copying a few pages).
MAPPED_MIN = 256 * 1024
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14
_can_map = sys.platform.startswith("linux")
_libc = None


def populate_read(addr: int, nbytes: int) -> int:
    """Fault the mapped pages of ``[addr, addr + nbytes)`` in, reading them from the file if
    needed (MADV_POPULATE_READ, the GIL released meanwhile). Returns 0, or the errno: EFAULT
    or EIO where a page cannot be read (an I/O error, a file truncated under the mapping:
    touching it would raise SIGBUS instead), EINVAL where the kernel lacks the advice, ENOSYS
    off Linux."""
    global _libc
    page = mmap.PAGESIZE
    start = addr // page * page
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        while _libc.madvise(start, addr + nbytes - start, _MADV_POPULATE_READ) != 0:
            err = ctypes.get_errno()
            if err != errno.EINTR:  # interrupted by a signal: the pages read so far stay
                return err
        return 0
    except (AttributeError, OSError):  # no libc madvise
        return errno.ENOSYS


class TensorFile:
    """One weights file (.safetensors or .bin): names and shapes from the header, tensors
    read one at a time. Safetensors: the header is parsed once, each tensor is read with
    ``os.preadv`` of exactly its byte range into a buffer the caller may supply, or is a view
    of its own mapping of that range (``read_many(mapped=True)``), which goes with the tensor;
    nothing else stays mapped and nothing stays open. .bin files are loaded with
    ``weights_only=True`` (and ``mmap=True`` where the format allows): they hold their mapping
    until dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sd: dict[str, torch.Tensor] | None = None  # .bin state dict (mmap)
        # safetensors: name -> (dtype, shape, start, end), offsets from the start of the file
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}  # stored dtype as written in the header
        self._floating: dict[str, bool] = {}
        self._open()

    @property
    def holds_data(self) -> bool:
        """Whether this object keeps file data (a mapped or loaded .bin) rather than a header."""
        return self._sd is not None

    def _open(self) -> None:
        if not self.path.is_file():
            raise WdaError(self.path, _not_a_file(self.path), "re-save or remove this checkpoint")
        if self.path.suffix == ".safetensors":
            self._open_safetensors()
        else:
            self._open_bin()
            self._size = _size_now(self.path)

    def _open_safetensors(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise self._bad(short(exc)) from None
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 8, 0)
            if len(head) < 8:
                raise self._bad("shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > SAFETENSORS_MAX_HEADER:
                raise self._bad(f"header length {n} is over the format's limit")
            if 8 + n > size:
                raise self._bad(f"header length {n} runs past the end of the file ({size} bytes)")
            raw = os.pread(fd, n, 8)
        except OSError as exc:
            raise self._bad(short(exc)) from None
        finally:
            os.close(fd)
        if len(raw) < n:
            raise self._bad(f"cut short inside the header ({8 + len(raw)} of {8 + n} bytes)")
        self._size = size
        parsed = _HEADERS.get(raw)
        if parsed is None:
            parsed = self._parse_header(raw, 8 + n)
            if len(raw) <= _HEADER_CACHED_MAX:
                if len(_HEADERS) >= _HEADERS_KEPT:  # oldest out (safe from two threads: pop, default)
                    _HEADERS.pop(next(iter(_HEADERS), None), None)
                _HEADERS[raw] = parsed
        self._entries, self._shapes, self._dtypes, self._floating, end = parsed
        if end != size:
            raise self._bad(f"the header covers {end} bytes, the file has {size}")

    def _bad(self, why: str) -> WdaError:
        return WdaError(self.path, f"not a readable safetensors file ({why})", "re-save or remove this checkpoint")

    def _parse_header(self, raw: bytes, data_start: int) -> tuple:
        """The checks of the safetensors format's own validation: a JSON object of entries
        with a known dtype, a shape of non-negative integers and offsets that tile the data
        section exactly (no gap, no overlap; that nothing follows the last tensor is checked
        against the file's size by the caller). Returns (entries, shapes, dtypes, floating,
        where the data ends)."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._bad("header is not UTF-8") from None
        try:
            header = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise self._bad(f"header is not valid JSON: {short(exc)}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise self._bad("__metadata__ is not a map of strings")
        # (begin, end, name, dtype, shape): sorts by offsets. The common case is checked
        # with builtins only (a few hundred thousand entries in a large run's headers);
        # anything unusual goes through ``_entry`` for the precise message.
        rows = []
        bits_of, ints = SAFETENSORS_BITS, _INTS
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
                ok = (type(dtype) is str and dtype in bits_of and type(shape) is list
                      and ints.issuperset(map(type, shape)) and min(shape, default=0) >= 0
                      and max(shape, default=0) <= _U64 and type(begin) is int and type(end) is int
                      and 0 <= begin and end <= _U64 and type(info["data_offsets"]) is list)
            except (TypeError, KeyError, ValueError, IndexError):
                ok = False
            if not ok:
                dtype, shape, begin, end = self._entry(name, info)
            rows.append((begin, end, name, dtype, tuple(shape)))
        rows.sort()
        at = 0
        for begin, end, name, dtype, shape in rows:
            if begin != at or end < begin:
                raise self._bad(f"tensor {short_repr(name)}: data_offsets [{begin}, {end}] do not follow "
                                f"the previous tensor (at {at})")
            bits = math.prod(shape) * bits_of[dtype]
            if bits % 8 or bits // 8 != end - begin:
                raise self._bad(f"tensor {short_repr(name)}: {end - begin} bytes for shape "
                                f"{list(shape)} of {dtype}")
            at = end
        floats = SAFETENSORS_FLOAT_DTYPES
        entries = {name: (dtype, shape, data_start + begin, data_start + end)
                   for begin, end, name, dtype, shape in rows}
        return (entries, {name: shape for _, _, name, _, shape in rows},
                {name: dtype for _, _, name, dtype, _ in rows},
                {name: dtype in floats for _, _, name, dtype, _ in rows}, data_start + at)

    def _entry(self, name: str, info: Any) -> tuple[str, tuple[int, ...], int, int]:
        if isinstance(info, list) and len(info) == 3:  # a struct may also be written as a sequence
            info = dict(zip(("dtype", "shape", "data_offsets"), info))
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise self._bad(f"tensor {short_repr(name)}: entry is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
            raise self._bad(f"tensor {short_repr(name)}: unknown dtype {short_repr(dtype)}")
        if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
            raise self._bad(f"tensor {short_repr(name)}: shape {short_repr(shape)} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(o) for o in offsets)):
            raise self._bad(f"tensor {short_repr(name)}: data_offsets {short_repr(offsets)} are not [begin, end]")
        return dtype, tuple(shape), offsets[0], offsets[1]

    def _open_bin(self) -> None:
        sd = None
        for mapped in (True, False):  # legacy (non-zip) .bin files cannot be memory-mapped
            try:
                sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mapped)
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

    def read(self, name: str, alloc: Alloc | None = None) -> torch.Tensor:
        """The tensor ``name`` on the CPU, in its stored dtype."""
        return self.read_many([name], alloc)[name]

    def read_many(self, names: list[str], alloc: Alloc | None = None, mapped: bool = False,
                  files: OpenFiles | None = None) -> dict[str, torch.Tensor]:
        """Several tensors of this file, the file opened once (``files``: through the descriptor
        kept there, opened once per analysis). Safetensors: each into a buffer from ``alloc``
        (default: a new one), or with ``mapped`` each large one a view of its own private
        mapping of its byte range, its pages faulted in here: no copy, and the mapping goes
        with the tensor's last view. .bin: views of the loaded state dict."""
        missing = [n for n in names if n not in self._shapes]
        if missing:
            raise WdaError(self.path, f"tensor {missing[0]!r} is missing", "the file changed while it was read?")
        if self._sd is not None:
            self._check_size(_size_now(self.path))
            return {n: self._sd[n] for n in names}
        alloc = alloc or _new_buffer
        fd = files.fd(self) if files is not None else self._opened()
        try:
            return {n: self._map(fd, n) if mapped and _can_map and self._nbytes(n) >= max(MAPPED_MIN, 1)
                    else self._pread(fd, n, alloc) for n in names}
        finally:
            if files is None:
                os.close(fd)

    def stored(self, name: str, files: OpenFiles | None = None) -> StoredTensor | None:
        """The tensor ``name`` left in this file, for a kernel that reads it itself
        (``wda.analysis.kernels.row_dots_read``): the file opened (or its descriptor in
        ``files`` duplicated), its size checked and the kernel asked to read the tensor's
        pages ahead (from the disk when they are not cached, while earlier tensors are
        measured). None where it is not a safetensors tensor of at least ``MAPPED_MIN``
        bytes, or off POSIX."""
        if self._sd is not None or not hasattr(os, "posix_fadvise") or self._nbytes(name) < max(MAPPED_MIN, 1):
            return None
        stored, shape, start, end = self._entries[name]
        dtype = self._torch_dtype(name, stored)
        fd = files.dup(self) if files is not None else self._opened()
        try:
            if not _cached(fd, start, end):
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
        except BaseException:
            os.close(fd)
            raise
        return StoredTensor(self, name, fd, start, shape, dtype)

    def _opened(self) -> int:
        """A descriptor of this file (the caller closes it), its size checked against the header's."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise WdaError(self.path, f"not a readable safetensors file ({short(exc)})",
                           "re-save or remove this checkpoint") from None
        try:
            self._check_size(os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _nbytes(self, name: str) -> int:
        _, _, start, end = self._entries[name]
        return end - start

    def _torch_dtype(self, name: str, stored: str) -> torch.dtype:
        dtype = _TORCH_DTYPES.get(stored)
        if dtype is None:
            raise WdaError(self.path, f"tensor {name!r} is stored as {stored}, which torch {torch.__version__} "
                                      "cannot hold", "convert the checkpoint to a supported dtype")
        return dtype

    def _map(self, fd: int, name: str) -> torch.Tensor:
        """The tensor as a view of a private (copy-on-write) mapping of its pages, read in now
        with MADV_POPULATE_READ: an I/O error or a truncated file is an error here, not a
        SIGBUS later. Where the kernel lacks it (Linux < 5.14), ``_pread`` from then on."""
        global _can_map
        stored, shape, start, end = self._entries[name]
        dtype = self._torch_dtype(name, stored)
        at = start // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        try:
            m = mmap.mmap(fd, end - at, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=at)
        except (OSError, ValueError) as exc:
            raise WdaError(self.path, f"cannot map tensor {name!r} ({short(exc)})",
                           "the file may be truncated or on a failing disk") from None
        t = torch.frombuffer(m, dtype=torch.uint8, count=end - start, offset=start - at)
        err = populate_read(t.data_ptr(), end - start)
        if err:
            del t
            m.close()
            if err in (errno.EINVAL, errno.ENOSYS):  # the advice is not known here
                _can_map = False
                return self._pread(fd, name, _new_buffer)
            raise WdaError(self.path, f"cannot read tensor {name!r} ({os.strerror(err)})",
                           "the file may be truncated or on a failing disk")
        return t.view(dtype).reshape(shape)

    def _pread(self, fd: int, name: str, alloc: Alloc) -> torch.Tensor:
        stored, shape, start, end = self._entries[name]
        dtype = self._torch_dtype(name, stored)
        n = end - start
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        buf = alloc(n)
        view, done = memoryview(buf.numpy()), 0
        try:
            while done < n:
                got = os.preadv(fd, [view[done:]], start + done)
                if got == 0:
                    raise WdaError(self.path, f"cut short: tensor {name!r} ends at byte {end}, the file "
                                              f"ends at {start + done}", "the file may be truncated")
                done += got
        except OSError as exc:
            raise WdaError(self.path, f"cannot read tensor {name!r} ({short(exc)})",
                           "the file may be truncated or on a failing disk") from None
        finally:
            view.release()
        return buf.view(dtype).reshape(shape)

    def _check_size(self, size: int | None) -> None:
        # A file rewritten in place (a training job still saving) shows as a new size: stop
        # here rather than read a mix of two versions.
        if size is not None and size != self._size:
            raise WdaError(self.path, f"changed on disk while being analysed ({self._size} -> {size} bytes)",
                           "is a training job still writing it? rerun once it is complete")


_PROBE = bytearray(1)
_CACHESTAT = 451  # cachestat(2), Linux >= 6.5: the same number on every architecture
_has_cachestat = sys.platform.startswith("linux")
_syscall = None  # libc's syscall(), typed for cachestat


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted",
                                               "nr_recently_evicted")]


def _cached_pages(fd: int, start: int, end: int) -> int | None:
    """How many pages of ``[start, end)`` are in the page cache (``cachestat``: it reads
    nothing), or None where the kernel cannot say."""
    global _syscall, _has_cachestat
    if not _has_cachestat:
        return None
    try:
        if _syscall is None:
            call = ctypes.CDLL(None, use_errno=True).syscall
            call.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
            call.restype = ctypes.c_long
            _syscall = call
        stat = _Cachestat()
        if _syscall(_CACHESTAT, fd, ctypes.byref(_CachestatRange(start, end - start)), ctypes.byref(stat), 0) == 0:
            return stat.nr_cache
    except (AttributeError, OSError):  # no libc syscall()
        pass
    _has_cachestat = False  # ENOSYS (an older kernel) and the like: not asked again
    return None


def _cached(fd: int, start: int, end: int) -> bool:
    """Whether ``[start, end)`` is in the page cache, judged by its first and last pages (a
    cold file is read in order; a range cached at both ends but not between is read by the
    kernel's own ``pread``, only slower). Asking for it to be read ahead anyway costs ~20 µs a
    768² matrix even when every page is cached, and counting all its pages ~14 µs (the kernel
    measures one in ~100 µs); two one-page counts ~6 µs. ``cachestat`` where the kernel has it;
    elsewhere whether those bytes can be read without waiting (``RWF_NOWAIT``; such a read
    may itself start reading them in). False where neither is available."""
    last = (end - 1) // mmap.PAGESIZE * mmap.PAGESIZE  # where the last page starts
    first = _cached_pages(fd, start, start + 1)
    if first is not None:
        return first == 1 and (last <= start or _cached_pages(fd, last, last + 1) == 1)
    try:
        return all(os.preadv(fd, [_PROBE], at, os.RWF_NOWAIT) == 1 for at in (start, end - 1))
    except (OSError, AttributeError):  # not cached (EAGAIN), or no such read here
        return False


class OpenFiles:
    """Descriptors of safetensors files kept open while tensor after tensor is read from them
    (``TensorFile.stored``, ``TensorFile.read_many``): each file is opened and its size checked
    once, then each tensor left in its file gets a duplicate of its descriptor (~1 µs against
    ~5 µs to open it again), which it owns; tensors read at once use the descriptor itself.
    At most ``limit`` files at a time (least recently used out; default: a quarter of the
    process's limit on open files, at most 256); ``close()`` closes them all.
    One thread at a time."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = max(1, limit if limit is not None else _fd_budget())
        self._fds: dict[Path, int] = {}  # in order of use, the most recent last

    def fd(self, tf: TensorFile) -> int:
        """The file's descriptor, opened (and its size checked) the first time: lent, not given;
        valid until the next call or ``close()``."""
        fd = self._fds.pop(tf.path, None)
        if fd is None:
            fd = tf._opened()
            while len(self._fds) >= self.limit:
                os.close(self._fds.pop(next(iter(self._fds))))
        self._fds[tf.path] = fd
        return fd

    def dup(self, tf: TensorFile) -> int:
        """A duplicate of the file's descriptor (``fd``), which the caller owns."""
        fd = self.fd(tf)
        try:
            return os.dup(fd)
        except OSError as exc:  # EMFILE: the process's other descriptors took the room
            raise WdaError(tf.path, f"cannot be opened once more ({short(exc)})",
                           "raise the limit on open files (ulimit -n)") from None

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def _fd_budget() -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 64
    return 256 if soft == resource.RLIM_INFINITY else max(4, min(256, soft // 4))


class StoredTensor:
    """A tensor still in its safetensors file (``TensorFile.stored``): an open descriptor and
    the offset of its bytes, its shape and dtype. ``load()`` reads it into memory (an I/O error
    or a file cut short is a ``WdaError`` naming the file). It owns the descriptor: ``close()``,
    or when the object goes."""

    __slots__ = ("file", "name", "fd", "start", "shape", "dtype", "nbytes", "__weakref__")

    def __init__(self, file: TensorFile, name: str, fd: int, start: int, shape: tuple[int, ...],
                 dtype: torch.dtype) -> None:
        self.file, self.name, self.fd, self.start = file, name, fd, start
        self.shape, self.dtype = torch.Size(shape), dtype
        self.nbytes = file._nbytes(name)

    @property
    def path(self) -> Path:
        return self.file.path

    def load(self) -> torch.Tensor:
        if self.fd < 0:
            raise ValueError(f"{self.path}: {self.name!r} was closed")
        return self.file._pread(self.fd, self.name, _new_buffer)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit ``os`` may already be gone
            pass

    def __repr__(self) -> str:
        return f"StoredTensor({str(self.path)!r}, {self.name!r}, {tuple(self.shape)}, {self.dtype})"


def _is_u64(v: Any) -> bool:
    return type(v) is int and 0 <= v <= _U64


def _size_now(path: Path) -> int | None:
    """The file's size now; None once it is deleted (a mapped, unlinked file stays readable)."""
    try:
        return path.stat().st_size
    except OSError:
        return None


def present(path: Path) -> bool:
    """Something is there under this name (a file, a directory, even a broken link). Within
    ``listings()``, answered from one listing of its folder."""
    names = _listing(path)
    if names is not None:
        return path.name in names
    return path.exists() or path.is_symlink()


_LISTINGS = threading.local()


@contextlib.contextmanager
def listings() -> Iterator[None]:
    """Within it (in this thread), ``present`` reads each folder once (``os.listdir``) instead
    of one ``stat`` per name: discovery probes a dozen names in each checkpoint folder. The
    listing is a snapshot: a file made meanwhile in a folder already listed is not seen."""
    outer = getattr(_LISTINGS, "cache", None)
    if outer is None:
        _LISTINGS.cache = {}
    try:
        yield
    finally:
        if outer is None:
            _LISTINGS.cache = None


def _listing(path: Path) -> frozenset[str] | None:
    cache = getattr(_LISTINGS, "cache", None)
    if cache is None or path.name in ("", ".", ".."):
        return None
    folder = os.fspath(path.parent)
    if folder not in cache:
        try:
            cache[folder] = frozenset(os.listdir(folder))
        except OSError:  # not a folder, or not readable: ask the file system name by name
            cache[folder] = None
    return cache[folder]


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
