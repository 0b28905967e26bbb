"""Progress of a grid: a line on stderr per finished cell, with cells done/total and an
estimate of the time left.

The estimate is the mean time between finished cells that did work, times the cells left (the
same rule for cells run one after another and in parallel): a cell found already scored in the
store takes no time, and counting it would make the estimate a promise it cannot keep.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

WORKED = 1.0  # seconds: a cell that finished sooner after the last was read, not run


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else \
        f"{minutes // 60} h {minutes % 60:02d} min"


def _to_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Progress:
    """Counts finished cells of `total`; `finished(label)` prints one line."""

    def __init__(self, total: int, write: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.done = total, 0
        self.clock = clock
        self.write = write or _to_stderr
        self.started = self.last = clock()
        self.worked: list[float] = []

    def left(self) -> float | None:
        """Seconds left by the mean time of the cells that ran; None before any ran."""
        if not self.worked:
            return None
        return sum(self.worked) / len(self.worked) * (self.total - self.done)

    def finished(self, label: str) -> None:
        now = self.clock()
        took, self.last = now - self.last, now
        self.done += 1
        if took >= WORKED:
            self.worked.append(took)
        left = self.left()
        estimate = "" if self.done == self.total or left is None else \
            f", about {duration(left)} left"
        self.write(f"[{self.done}/{self.total} cells] {label} done "
                   f"({duration(now - self.started)} so far{estimate})")
