"""The one exception type users see: a single line naming the file and the problem."""

from __future__ import annotations

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
