"""The one exception type users see: a single line naming the file and the problem."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class WdaError(Exception):
    """Bad input or a failed check. ``str(err)`` is the one line the CLI prints."""

    def __init__(self, path: str | Path | None, problem: str, hint: str = "") -> None:
        self.path = str(path) if path is not None else None
        self.problem = problem
        self.hint = hint
        where = f"{self.path}: " if self.path else ""
        tail = f" ({hint})" if hint else ""
        super().__init__(f"{where}{problem}{tail}")

    def with_hint(self, extra: str) -> "WdaError":
        """The same error with ``extra`` added to what to do."""
        return WdaError(self.path, self.problem, f"{self.hint}; {extra}" if self.hint else extra)


# CLI flags in a message, and what a Python caller passes instead.
_FLAG_RE = re.compile(r"--([a-z][a-z0-9-]*)(?: PATH| (?=['\"]))?")
_SWITCHES = {"skip-broken": "skip_broken=True", "force": "force=True", "dry-run": "wda.plan()"}


def pythonic(text: str) -> str:
    """``text`` with CLI flags named as keyword arguments (--skip-broken -> skip_broken=True,
    --modules -> modules=, --base PATH -> base=)."""
    return _FLAG_RE.sub(lambda m: _SWITCHES.get(m[1], m[1].replace("-", "_") + "="), text)


@contextmanager
def pythonic_errors() -> Iterator[None]:
    """Re-raise a WdaError from the Python API with keyword arguments for CLI flags."""
    try:
        yield
    except WdaError as err:
        raise WdaError(err.path, pythonic(err.problem), pythonic(err.hint)) from None
