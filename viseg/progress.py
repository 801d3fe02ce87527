"""Progress of long steps (verification, fingerprinting, preprocessing, validation, prediction, `best=`).

On a terminal, a tqdm bar. Anywhere else (`ray job logs --follow`, a SLURM output file, CI) a bar's carriage
returns pile up into one unreadable line, so there it prints plain lines instead: what the step is doing, how
far it is and how long the rest will take, at most every `every_s` seconds and at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")
PLAIN_EVERY_S = 30.0  # how often a plain progress line is printed off a terminal


def format_duration(seconds: float) -> str:
    """`42 s`, `3m05s`, `1h02m`: the width a status line can afford."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class PlainProgress:
    """tqdm's `update`/`close`/`write` for a stream that is not a terminal: a line per `every_s` seconds."""

    def __init__(self, total: int, desc: str, unit: str, stream: IO[str], every_s: float):
        self.total, self.desc, self.unit, self.stream, self.every_s = total, desc, unit, stream, every_s
        self.done, self.started = 0, time.monotonic()
        self.last_line = self.started
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last_line >= self.every_s and self.done < self.total:
            self.last_line = now
            self._line(now)

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = now - self.started
        text = f"{self.desc}: {self.done}/{self.total} {self.unit}s"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f} %)"
        text += f", {format_duration(elapsed)}"
        if not final and self.done:
            text += f", about {format_duration(elapsed / self.done * (self.total - self.done))} left"
        print(text, file=self.stream, flush=True)

    def write(self, text: str, file: IO[str] | None = None) -> None:
        print(text, file=file or self.stream, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # a step of a few cases would print a line for nothing: only one that took a while says it is done
        if time.monotonic() - self.started >= self.every_s or self.last_line != self.started:
            self._line(time.monotonic(), final=True)


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "case", stream: IO[str] | None = None,
                 every_s: float = PLAIN_EVERY_S) -> Any:
    """A tqdm bar on a terminal, plain lines elsewhere, nothing when disabled. The caller updates and closes it."""
    from tqdm.auto import tqdm

    stream = stream or sys.stderr
    if not enabled:
        return tqdm(total=total, disable=True)
    if is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, file=stream)
    return PlainProgress(total, desc, unit, stream, every_s)


def track(items: Iterable[T], desc: str, enabled: bool = True, unit: str = "case", stream: IO[str] | None = None,
          every_s: float = PLAIN_EVERY_S) -> Iterator[T]:
    """`for x in track(items, "Predicting"):` with the bar of `progress_bar`."""
    items = list(items)
    bar = progress_bar(len(items), desc, enabled, unit, stream, every_s)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


def is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
