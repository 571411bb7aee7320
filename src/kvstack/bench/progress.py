"""How far a long benchmark has got, and about how long it has left.

On a terminal: a rich progress bar (done/total, elapsed, ETA) on stderr, under the benchmark's own
lines. Anywhere else (a CI log, a pipe, a file): no bar and no control characters, only a plain
line at every tenth of the way with the same ETA, so a log still shows the run is alive.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PLAIN_STEPS = 10  # plain lines per run: one at every tenth of the way


def print_now(line: str) -> None:
    """A line on stdout at once (a pipe buffers, and a CI log should show progress as it happens)."""
    print(line, flush=True)


def interactive(stream: TextIO | None = None, environ: Mapping[str, str] = os.environ) -> bool:
    """A person watches ``stream`` (stderr by default): a terminal, not CI, not a dumb terminal."""
    stream = stream if stream is not None else sys.stderr
    in_ci = environ.get("CI", "").lower() not in ("", "0", "false")
    return stream.isatty() and not in_ci and environ.get("TERM") != "dumb"


def eta_seconds(done: float, total: float, elapsed: float) -> float | None:
    """Seconds left at the average pace so far; None before any progress."""
    if done <= 0 or elapsed <= 0:
        return None
    return max(0.0, elapsed * (total - done) / done)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def plain_line(description: str, done: float, total: float, unit: str, elapsed: float) -> str:
    """The plain-text progress line, e.g. ``routing: 30% (150/500 requests), 1:02 elapsed, ETA 2:24``."""
    share = done / total if total else 1.0
    return (
        f"{description}: {share:.0%} ({done:.0f}/{total:.0f} {unit}), "
        f"{_clock(elapsed)} elapsed, ETA {_clock(eta_seconds(done, total, elapsed))}"
    )


class BenchProgress:
    """Progress of one benchmark run toward ``total`` ``unit`` (requests, seconds, ...).

    Use as a context manager; :meth:`advance` (or :meth:`update` to an absolute amount) as work
    completes. ``show_bar`` defaults to :func:`interactive`; ``say`` prints the plain lines.
    """

    def __init__(
        self,
        description: str,
        total: float,
        unit: str,
        *,
        show_bar: bool | None = None,
        say: Callable[[str], None] = print_now,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description, self.total, self.unit = description, max(total, 1e-9), unit
        self.show_bar = interactive() if show_bar is None else show_bar
        self.done = 0.0
        self._say, self._clock = say, clock
        self._started = 0.0
        self._next_step = 1
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> BenchProgress:
        self._started = self._clock()
        if self.show_bar:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:.0f}/{task.total:.0f} " + self.unit),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def log(self, line: str) -> None:
        """Print one of the benchmark's own lines: above the bar while it draws (a plain write to
        stdout would land on the bar's line), else to stdout."""
        if self._bar is not None:
            self._bar.console.print(line, highlight=False, markup=False, soft_wrap=True)
        else:
            print_now(line)

    def advance(self, amount: float = 1.0) -> None:
        self.update(self.done + amount)

    def update(self, done: float) -> None:
        self.done = min(done, self.total)
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=self.done)
            return
        if self.done >= self.total * self._next_step / PLAIN_STEPS:
            while self.done >= self.total * self._next_step / PLAIN_STEPS:
                self._next_step += 1
            elapsed = self._clock() - self._started
            self._say(plain_line(self.description, self.done, self.total, self.unit, elapsed))
