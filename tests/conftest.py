"""Fixtures shared by the CLI tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import wda.formats.tensors
from builders import qv_runs


@pytest.fixture(autouse=True)
def mapped_reads(monkeypatch):
    """Every full weight the engine reads in-process is left in its file for the row kernel
    (or, where that kernel does not apply, is a view of the file's pages), as for a real
    model's matrices (the tests' tiny ones would otherwise be copied with ``pread``, which
    the subprocess tests and CUDA take)."""
    monkeypatch.setattr(wda.formats.tensors, "MAPPED_MIN", 0)


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> Path:
    """A complete small directory (base, ft, lora, dora), built once; never modify it."""
    return qv_runs(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def ck(pristine, tmp_path) -> Path:
    """A private copy of ``pristine`` that a test may corrupt."""
    d = tmp_path / "ck"
    shutil.copytree(pristine, d)
    return d


def pytest_collection_modifyitems(config, items):
    """Files with training (``slow``) first: with one worker per core (pytest-xdist,
    ``--dist loadfile``) their minutes overlap the rest of the suite instead of following it."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: file order kept otherwise
