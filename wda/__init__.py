"""wda: weight-decomposition analysis of fine-tuning runs (after Liu et al., DoRA, ICML 2024)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["analyze", "plan", "make_report", "Tracker", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import wda` stays cheap (no pandas / scipy until needed).
    if name in ("analyze", "plan"):
        from wda.analysis import engine as analysis

        return getattr(analysis, name)
    if name == "Tracker":
        from wda.tracking.tracker import Tracker

        return Tracker
    if name == "make_report":
        from wda.report.cli import make_report

        return make_report
    raise AttributeError(f"module 'wda' has no attribute {name!r}")
