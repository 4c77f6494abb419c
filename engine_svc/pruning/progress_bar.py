"""A text progress bar on stderr: redrawn in place on a terminal, a line per tenth of the work otherwise (logs)."""
from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class ProgressBar:
    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total, self.label, self.done = max(total, 1), label, 0
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._last_tenth = -1
        self._t0 = time.perf_counter()

    def advance(self, note: str = "", steps: int = 1) -> None:
        self.done = min(self.done + steps, self.total)
        fill = WIDTH * self.done // self.total
        line = (f"[prune] {self.label} |{'#' * fill}{'-' * (WIDTH - fill)}| {self.done}/{self.total} "
                f"{time.perf_counter() - self._t0:.0f}s {note}")
        if self.live:
            self.stream.write("\r" + line.ljust(100)[:100])
            if self.done == self.total:
                self.stream.write("\n")
        elif self.done * 10 // self.total != self._last_tenth:
            self._last_tenth = self.done * 10 // self.total
            self.stream.write(line + "\n")
        self.stream.flush()
