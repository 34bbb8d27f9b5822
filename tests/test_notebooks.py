"""The notebooks execute top to bottom (tiny settings via WDA_NOTEBOOK_SMALL=1), so they cannot rot."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
# executed, with checks of what they show, by their own tests
DEDICATED = {"learning_pattern.ipynb": "tests/test_learning_pattern.py"}
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if p.name not in DEDICATED)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("WDA_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel must import this checkout's wda, whatever an editable install points at
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError with the failing cell on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the notebook should show its figures"


def test_explore_demo_is_committed_with_its_outputs():
    """Readable on GitHub without running it: every code cell ran, in order, without error,
    and the figures are there; small enough to keep in the repository."""
    path = ROOT / "notebooks" / "explore_demo.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert all(c.outputs for c in code)
    assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.outputs) >= 4
    assert path.stat().st_size < 1_500_000
    text = "".join(c.source for c in nb.cells)
    assert "What it trains" in text and "get_peft_model" in text
