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
import threading
import time


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, estimates: list[float], out=None, err=None):
        self.estimates, self.done, self.t0 = estimates, 0, time.perf_counter()
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.tty = self.err.isatty() and self.out.isatty()
        self.label = ""  # the running case; "" while none is
        self.case_t0 = self.t0  # when it started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if self.tty:  # redraw the progress line every second, so elapsed time and ETA move during a case
            threading.Thread(target=self._tick, daemon=True).start()

    def eta(self) -> float:
        """Seconds left: the remaining estimates, scaled by measured / estimated so far."""
        now = time.perf_counter()
        spent_estimate = sum(self.estimates[: self.done])
        finished = self.case_t0 - self.t0 if self.label else now - self.t0  # time the finished cases took
        scale = min(10.0, max(0.1, finished / spent_estimate)) if self.done and spent_estimate > 0 else 1.0
        left = scale * sum(self.estimates[self.done:])
        if self.label:  # the running case has used part of its share already
            left -= min(now - self.case_t0, 0.9 * scale * self.estimates[self.done])
        return left

    def _status(self) -> str:
        total, width = len(self.estimates), 20
        filled = width * self.done // max(1, total)
        elapsed = time.perf_counter() - self.t0
        text = (f"[{'#' * filled}{'-' * (width - filled)}] {self.done}/{total}  {duration(elapsed)} elapsed, "
                f"~{duration(self.eta())} left" + (f"  running: {self.label}" if self.label else ""))
        return "\r\x1b[K" + text[:160]

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if self.label:
                    self.err.write(self._status())
                    self.err.flush()

    def line(self, text: str) -> None:
        """A finished row (or a header): printed above the progress line."""
        with self._lock:
            if self.tty:
                self.err.write("\r\x1b[K")
                self.err.flush()
            self.out.write(text + "\n")
            self.out.flush()
            if self.tty and self.label:
                self.err.write(self._status())
                self.err.flush()

    def start(self, label: str) -> None:
        with self._lock:
            self.label, self.case_t0 = label, time.perf_counter()
            if self.tty:
                self.err.write(self._status())
            else:
                self.err.write(f"[{self.done + 1}/{len(self.estimates)}] {label} "
                               f"({duration(time.perf_counter() - self.t0)} elapsed, ~{duration(self.eta())} left)\n")
            self.err.flush()

    def finish_case(self) -> None:
        with self._lock:
            self.done += 1
            self.label = ""

    def end(self) -> float:
        self._stop.set()
        with self._lock:
            self.label = ""
            if self.tty:
                self.err.write("\r\x1b[K")
                self.err.flush()
        return time.perf_counter() - self.t0
