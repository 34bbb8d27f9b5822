"""Offline byte-level corpora: text that ships with Python, or a generated task.

Every corpus is a deterministic function of its name, a seed and a byte budget: file
lists are sorted before they are shuffled with a seeded generator, so neither the file
system's listing order nor the machine's hash seed matters. The stdlib itself differs
between Python versions, so callers that cache anything trained on a corpus should key
the cache by :func:`Corpus.digest`, not by the name alone.

Corpora (``CORPORA``):

- ``stdlib``: Python standard-library source files (code), tests and site-packages left out.
- ``docstrings``: the docstrings of those files (technical English prose), via ``ast``.
- ``topics``: ``pydoc_data.topics``, the language reference text behind ``help()`` (prose).
- ``arith``: generated ``a+b=c`` lines, a different task rather than a different text.
- ``mix``: a multi-task mixture of ``topics``, ``docstrings`` and ``arith`` in equal shares,
  interleaved in 4 KiB blocks (the paper fine-tunes on several tasks at once).
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import random
import sysconfig
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """A byte corpus split into train and validation parts (uint8 tensors)."""

    name: str
    train: torch.Tensor
    val: torch.Tensor

    def digest(self) -> str:
        """SHA-256 of the bytes (train then val): what a cache key should include."""
        h = hashlib.sha256()
        h.update(self.train.numpy().tobytes())
        h.update(self.val.numpy().tobytes())
        return h.hexdigest()


_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]  # prune: site-packages is big
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    # Sort by the path relative to the stdlib root: independent of listing order and of
    # where Python is installed.
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def _take(chunks: list[Callable[[], bytes]], seed: int, max_bytes: int | None) -> bytes:
    """Shuffle the (sorted) chunk loaders with ``seed``; join chunks up to ``max_bytes``.

    Chunks are loaded lazily so that a small budget reads only a few files.
    """
    chunks = list(chunks)
    random.Random(seed).shuffle(chunks)
    out, n = [], 0
    for load in chunks:
        if max_bytes is not None and n >= max_bytes:
            break
        c = load()
        out.append(c)
        n += len(c)
    data = b"".join(out)
    return data if max_bytes is None else data[:max_bytes]


def stdlib_source(seed: int, max_bytes: int | None) -> bytes:
    """Python standard-library source code, one file after another."""
    return _take([p.read_bytes for p in _stdlib_files()], seed, max_bytes)


def _docstrings(path: Path) -> bytes:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):  # a few stdlib files are deliberately broken
        return b""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:  # one-liners like "Return x." carry little prose
                docs.append(doc.encode("utf-8", "replace") + b"\n\n")
    return b"".join(docs)


def stdlib_docstrings(seed: int, max_bytes: int | None) -> bytes:
    """Module, class and function docstrings of the standard library, file by file."""
    return _take([partial(_docstrings, p) for p in _stdlib_files()], seed, max_bytes)


def _topic(text: str) -> bytes:
    return text.encode("utf-8", "replace") + b"\n\n"


def pydoc_topics(seed: int, max_bytes: int | None) -> bytes:
    """The language-reference prose of ``pydoc_data.topics``, one topic after another."""
    from pydoc_data.topics import topics

    texts = [partial(_topic, topics[k]) for k in sorted(topics)]
    return _take(texts, seed, max_bytes)


def arithmetic(seed: int, max_bytes: int | None) -> bytes:
    """Generated addition problems ``a+b=c`` with up to 4-digit operands, one per line."""
    rng = random.Random(seed)
    budget = 1 << 20 if max_bytes is None else max_bytes
    lines, n = [], 0
    while n < budget:
        a, b = rng.randrange(10_000), rng.randrange(10_000)
        line = f"{a}+{b}={a + b}\n".encode()
        lines.append(line)
        n += len(line)
    return b"".join(lines)[:budget]


MIX_PARTS: tuple[str, ...] = ("topics", "docstrings", "arith")
MIX_BLOCK = 4096


def mixture(seed: int, max_bytes: int | None) -> bytes:
    """``MIX_PARTS`` in equal shares (a third of ``max_bytes`` each; all of ``topics`` and as
    much of the others when ``max_bytes`` is None), cut into ``MIX_BLOCK``-byte blocks that are
    shuffled together with ``seed``: every stretch of the corpus is one task, any batch mixes
    them."""
    k = len(MIX_PARTS)
    if max_bytes is None:
        shares = [len(pydoc_topics(seed, None))] * k
    else:  # the remainder to the first parts: the shares add up to max_bytes
        shares = [max_bytes // k + (i < max_bytes % k) for i in range(k)]
    blocks = []
    for name, share in zip(MIX_PARTS, shares):
        data = CORPORA[name](seed, share)[:share]
        blocks += [data[i:i + MIX_BLOCK] for i in range(0, len(data), MIX_BLOCK)]
    random.Random(seed).shuffle(blocks)
    return b"".join(blocks)


CORPORA: dict[str, Callable[[int, int | None], bytes]] = {
    "stdlib": stdlib_source,
    "docstrings": stdlib_docstrings,
    "topics": pydoc_topics,
    "arith": arithmetic,
    "mix": mixture,
}


def load_corpus(name: str, seed: int = 0, max_bytes: int | None = None,
                val_fraction: float = 0.05) -> Corpus:
    """Build corpus ``name``; the last ``val_fraction`` of its bytes is the validation part."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose from {sorted(CORPORA)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    data = CORPORA[name](seed, max_bytes)
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    n_val = max(1, int(len(t) * val_fraction))
    log.info("corpus %s: %d bytes (%d validation)", name, len(t), n_val)
    return Corpus(name, t[:-n_val].clone(), t[-n_val:].clone())


def random_batch(data: torch.Tensor, batch_size: int, seq_len: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: inputs and next-byte targets, each ``(b, seq_len)``."""
    if len(data) <= seq_len + 1:
        raise ValueError(f"corpus of {len(data)} bytes is too short for seq_len={seq_len}")
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)  # (b, seq_len + 1)
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]


def eval_windows(data: torch.Tensor, n_windows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed evaluation set: ``n_windows`` evenly spaced windows, no randomness."""
    span = len(data) - seq_len - 1
    if span <= 0:
        raise ValueError(f"corpus of {len(data)} bytes is too short for seq_len={seq_len}")
    starts = torch.linspace(0, span, n_windows).long()
    idx = starts[:, None] + torch.arange(seq_len + 1)
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]
