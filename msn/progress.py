"""Progress for long loops, in a terminal and in a log file.

rich draws a live bar only on a terminal; redirected to a file (``nohup``, the reproduce driver's stage logs)
it prints nothing until the loop ends, so ``tail -f`` shows no sign of life for an hour. There we print one
plain line at most every ``every`` seconds instead.
"""

from __future__ import annotations

import time
from typing import Any


class LogProgress:
    """The part of ``rich.progress.Progress`` our loops use (one task), as throttled plain lines."""

    def __init__(self, label: str, file: Any, every: float = 30.0, fields: str = ""):
        self.label, self.file, self.every, self.fields = label, file, every, fields
        self.total: float | None = None
        self.completed = 0.0
        self.description = ""
        self.values: dict[str, Any] = {}
        self._start = self._last = time.monotonic()

    def __enter__(self) -> LogProgress:
        self._start = self._last = time.monotonic()
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        self.description, self.total, self.values = description, total, dict(fields)
        return 0

    def update(self, task: int, *, advance: float = 0, description: str | None = None, **fields: Any) -> None:
        self.completed += advance
        if description is not None:
            self.description = description
        self.values.update(fields)
        now = time.monotonic()
        if now - self._last >= self.every or (self.total is not None and self.completed >= self.total):
            self._last = now
            self.file.write(self.line(now) + "\n")
            self.file.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = int((now if now is not None else time.monotonic()) - self._start)
        total = "?" if self.total is None else f"{self.total:g}"
        extra = self.fields.format(**self.values) if self.fields else ""
        parts = [self.label, self.description, f"{self.completed:g}/{total}", f"{elapsed // 60}:{elapsed % 60:02d}", extra]
        return " ".join(p for p in parts if p)


def progress(label: str, *columns: Any, console: Any = None, enabled: bool = True, fields: str = "",
             every: float = 30.0):
    """A rich ``Progress`` on a terminal, a :class:`LogProgress` (lines every ``every`` s) elsewhere.

    ``label`` and ``fields`` (a format string over the task's fields) make the plain line; ``columns`` the bar.
    """
    from rich.console import Console
    from rich.progress import Progress

    console = console or Console(stderr=True)
    if enabled and not console.is_terminal:
        return LogProgress(label, console.file, every, fields)
    return Progress(*columns, console=console, disable=not enabled, transient=False)
