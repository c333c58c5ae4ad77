"""The one-line progress report of a long import or export on stderr."""

from __future__ import annotations

import io
import sys
import time
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    pass


class Progress:
    """One self-rewriting status line on stderr for a command that runs more than a moment, when stderr is
    a terminal; nothing at all otherwise (so captured output never changes)."""

    def __init__(self, stream: IO[str] | None = None, *, enabled: bool | None = None, delay: float = 1.0):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.delay = delay
        self.start = time.monotonic()
        self.label = ""
        self.shown = False
        self.drawn = 0.0
        self.width = 0

    def phase(self, label: str) -> None:
        if self.shown:
            self._finish_line()
        self.label = label
        self.update("")

    def update(self, status: str, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start < self.delay or (not force and now - self.drawn < 0.2):
            return
        line = f"{self.label} {status}".rstrip() + f"  [{now - self.start:.0f}s]"
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width, self.shown, self.drawn = len(line), True, now

    def _finish_line(self) -> None:
        self.update("done", force=True)
        self.stream.write("\n")
        self.stream.flush()
        self.shown, self.width = False, 0

    def close(self) -> None:
        if self.shown:
            self._finish_line()


QUIET = Progress(io.StringIO(), enabled=False)
