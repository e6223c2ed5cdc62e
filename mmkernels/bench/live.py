"""Results as they come: each case's row when it finishes, and a progress line with an ETA.

On a terminal the progress line sits under the rows and is redrawn in place (plain ANSI: carriage
return and erase-line); when the output is piped, rows go to stdout and one plain progress line per
case goes to stderr, so a log reads top to bottom.

The ETA comes from per-case cost estimates (a previous run's measured cost of the same case where
one is saved, else a model of the case's contenders), scaled by how the finished cases compared with
their own estimates.
"""
from __future__ import annotations

import sys
import time


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, estimates: list[float], out=None, err=None):
        self.estimates, self.done, self.t0 = estimates, 0, time.perf_counter()
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.tty = self.err.isatty() and self.out.isatty()
        self.status = ""

    def eta(self) -> float:
        """Seconds left: the remaining estimates, scaled by measured / estimated so far."""
        elapsed = time.perf_counter() - self.t0
        spent_estimate = sum(self.estimates[: self.done])
        scale = min(4.0, max(0.25, elapsed / spent_estimate)) if self.done and spent_estimate > 0 else 1.0
        return scale * sum(self.estimates[self.done:])

    def line(self, text: str) -> None:
        """A finished row (or a header): printed above the progress line."""
        if self.tty and self.status:
            self.err.write("\r\x1b[K")
            self.err.flush()
        self.out.write(text + "\n")
        self.out.flush()
        if self.tty and self.status:
            self.err.write(self.status)
            self.err.flush()

    def start(self, label: str) -> None:
        total = len(self.estimates)
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            width = 20
            filled = width * self.done // max(1, total)
            self.status = (f"[{'#' * filled}{'-' * (width - filled)}] {self.done}/{total}  "
                           f"{duration(elapsed)} elapsed, ~{duration(self.eta())} left  running: {label}")
            self.err.write("\r\x1b[K" + self.status[:200])
        else:
            self.err.write(f"[{self.done + 1}/{total}] {label} ({duration(elapsed)} elapsed, "
                           f"~{duration(self.eta())} left)\n")
        self.err.flush()

    def finish_case(self) -> None:
        self.done += 1

    def end(self) -> float:
        if self.tty and self.status:
            self.err.write("\r\x1b[K")
            self.err.flush()
        self.status = ""
        return time.perf_counter() - self.t0
