"""Checkpoint steps: the placeholder for a step that nothing records, shared by the analysis
(``wda.analysis.layout``) and the report (tables, figures) without importing either."""

from __future__ import annotations

# The step of a run that is one checkpoint whose step nothing records (a final adapter saved
# with save_pretrained, the DoRA authors' released weights): -1, as ``layer`` is -1 for a
# module name without a block index.
UNKNOWN_STEP = -1


def step_text(step: object) -> str:
    """A step as the reports show it: the number, or "not recorded"."""
    return "not recorded" if step == UNKNOWN_STEP else str(step)
