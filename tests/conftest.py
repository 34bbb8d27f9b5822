"""Fixtures shared by the CLI tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from builders import qv_runs


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
