"""Progress of the long phases (model load, reference pass, eval sampling, base sampling, label batches,
reward-model training): one callback type that the core calls, and one read-out that every view shows.

A long function takes ``on_progress: Progress = ignore`` and calls ``on_progress(phase, done, total)``
once with ``done = 0`` when the phase starts and again after each unit of work (a batch of prompts,
a batch of pairs, a checkpoint merged). A child process forwards the same three values over its pipe.
:class:`ProgressMeter` turns the reports into "Reference pass 16/32 pairs · 4.1/s · ETA 0:04".
"""

from __future__ import annotations

import time
from typing import Callable

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def ignore(phase: str, done: int, total: int) -> None:
    """The default ``on_progress``: nobody is watching."""


def format_duration(seconds: float) -> str:
    """0:07, 12:34 or 1:02:03."""
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressMeter:
    """The current phase's count, rate and ETA, from ``(phase, done, total)`` reports.

    The rate is measured from the phase's first report, so it counts the work done since then only.
    `clock` is injectable so tests control time.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.phase: str | None = None
        self.done = self.total = 0
        self._start_time = 0.0
        self._start_done = 0

    def update(self, phase: str, done: int, total: int) -> None:
        if phase != self.phase or done < self.done:  # a new phase, or the same name started again
            self.phase, self._start_time, self._start_done = phase, self.clock(), done
        self.done, self.total = done, total

    def clear(self) -> None:
        self.phase = None
        self.done = self.total = 0

    @property
    def rate(self) -> float | None:
        """Units per second since the phase began; None before the first unit is done."""
        elapsed = self.clock() - self._start_time
        counted = self.done - self._start_done
        return counted / elapsed if counted > 0 and elapsed > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate else None

    def text(self) -> str:
        """'Reference pass 16/32 · 4.1/s · ETA 0:04' (rate and ETA once they are known); '' when idle."""
        if self.phase is None:
            return ""
        parts = [f"{self.phase} {self.done:,}/{self.total:,}"]
        rate = self.rate
        if rate is not None:
            parts.append(f"{rate:.2g}/s" if rate < 10 else f"{rate:,.0f}/s")
            parts.append(f"ETA {format_duration(self.eta_seconds)}")
        return " · ".join(parts)
