"""What a sweep prints while it runs: one table of its trials, updated in place on a terminal, and a compact
status line every few seconds where there is none (`ray job logs --follow`, SLURM output files, CI).

Ray's own trial tables, Lightning's banners and Ray's per-checkpoint lines are off unless `verbose=2`
(`noise.py`); this console replaces them. Errors and warnings always pass: on a terminal they are printed
above the table, which is then drawn again below them.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import IO, Any

from viseg.progress import format_duration, is_terminal

EMA_METRIC = "val/ema_pseudo_dice"
FINAL_DICE = "final/mean_dice"
STATUS_WORDS = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "TERMINATED": "finished",
                "ERROR": "failed"}
REDRAW_EVERY_S = 1.0  # a terminal's table is drawn again at most this often


def error_message(error: BaseException) -> str:
    """The trial's own exception (a viseg error keeps its fix), not Ray's wrapper header."""
    cause = getattr(error, "cause", None) or error
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(cause).__name__}: {cause}")
    return text.strip()[:1000]


@dataclass
class TrialRow:
    """One line of the table: what the newest report of a trial says."""

    label: str
    folds: str
    max_epochs: int
    status: str = "PENDING"
    epochs: int = 0  # epochs trained so far
    ema: float | None = None
    epoch_time: float | None = None
    final_dice: float | None = None
    node: str = ""

    @property
    def status_word(self) -> str:
        if self.status == "TERMINATED" and self.final_dice is None:
            return "stopped"  # a scheduler ended it before its last epoch
        if self.status == "RUNNING" and self.max_epochs and self.epochs >= self.max_epochs:
            return "validating"  # every epoch trained: the full-case validation runs
        return STATUS_WORDS.get(self.status, self.status.lower())

    @property
    def seconds_left(self) -> float | None:
        if self.status not in ("RUNNING", "PENDING") or not self.epoch_time or self.epochs >= self.max_epochs:
            return None
        return max(0, self.max_epochs - self.epochs) * self.epoch_time

    def update(self, result: dict[str, Any]) -> None:
        if "epochs" in result:  # a search trial: epochs its folds have all trained
            self.epochs = max(self.epochs, int(result["epochs"]))
        elif "epoch" in result:  # a grid trial's metrics row: the epoch just trained (from 0)
            self.epochs = max(self.epochs, int(result["epoch"]) + 1)
        if result.get(EMA_METRIC) is not None:
            self.ema = float(result[EMA_METRIC])
        if result.get("epoch_time") is not None:
            self.epoch_time = float(result["epoch_time"])
        if result.get(FINAL_DICE) is not None:
            self.final_dice = float(result[FINAL_DICE])
        self.node = str(result.get("node_ip") or result.get("hostname") or self.node)


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_rows(rows: list[TrialRow]) -> list[str]:
    """The table as lines: trial, folds, status, epoch / max, EMA pseudo-Dice, final Dice, epoch time, ETA, node."""
    header = ["trial", "fold", "status", "epoch", "EMA Dice", "final Dice", "epoch time", "ETA", "node"]
    table = [header] + [[row.label, row.folds, row.status_word, f"{row.epochs}/{row.max_epochs}", _number(row.ema),
                         _number(row.final_dice), "-" if row.epoch_time is None else f"{row.epoch_time:.1f} s",
                         "-" if row.seconds_left is None else format_duration(row.seconds_left), row.node or "-"]
                        for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
            for line in table]


def status_line(rows: list[TrialRow], elapsed: float, running_at_once: int) -> str:
    """Counts per status, the best EMA so far and a rough time left: the line printed off a terminal."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status_word] = counts.get(row.status_word, 0) + 1
    order = ("running", "pending", "finished", "stopped", "failed", "paused")
    parts = [f"{counts[word]} {word}" for word in order if counts.get(word)]
    text = f"[sweep {format_duration(elapsed)}] {len(rows)} trials: {', '.join(parts)}"
    scored = [row for row in rows if row.ema is not None]
    if scored:
        best = max(scored, key=lambda row: row.ema or 0.0)
        text += f"; best EMA Dice {best.ema:.3f} ({best.label} fold {best.folds})"
    left = sweep_seconds_left(rows, running_at_once)
    if left:
        text += f"; about {format_duration(left)} left"
    return text


def sweep_seconds_left(rows: list[TrialRow], running_at_once: int) -> float | None:
    """Epochs still to train times a typical epoch time, shared by the trials that run at once. Rough (it leaves
    out start-up and validation) but enough to tell minutes from hours."""
    times = [row.epoch_time for row in rows if row.epoch_time]
    if not times:
        return None
    typical = sorted(times)[len(times) // 2]
    epochs = sum(max(0, row.max_epochs - row.epochs) for row in rows if row.status in ("RUNNING", "PENDING"))
    return epochs * typical / max(1, running_at_once)


def make_console(**kwargs: Any) -> Any:
    """The console as a Tune callback (built here so that importing this module does not import Ray)."""
    from ray import tune

    class SweepConsole(_ConsoleState, tune.Callback):
        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.seen(trial)

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                            **info: Any) -> None:
            self.seen(trial).update(result)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.ended(trial)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.ended(trial, failed=True)

        def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
            for trial in trials:
                self.seen(trial)
            self.tick()

        def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
            for trial in trials:
                self.seen(trial)
            self.finish()

    return SweepConsole(**kwargs)


class _ConsoleState:
    """The console's bookkeeping and drawing, apart from Ray's callback interface (tested without Ray)."""

    def __init__(self, max_epochs: dict[str, int], folds: list[int], search: bool, stream: IO[str] | None = None,
                 every_s: float = 30.0, live: bool | None = None):
        self.max_epochs, self.search = max_epochs, search
        self.folds_text = ",".join(map(str, folds))
        self.stream = stream or sys.stdout
        self.live = is_terminal(self.stream) if live is None else live
        self.every_s = every_s
        self.rows: dict[str, TrialRow] = {}
        self.started = time.monotonic()
        self.last_output = self.started
        self._drawn = 0  # lines of the table now on the terminal
        self._guard: _StreamGuard | None = None

    # --- bookkeeping ---------------------------------------------------------------------------------
    def seen(self, trial: Any) -> TrialRow:
        row = self.rows.get(trial.trial_id)
        if row is None:
            config = trial.config or {}
            variant = str(config.get("variant"))
            label = f"{variant}-{trial.trial_id}" if self.search else variant
            folds = self.folds_text if self.search else str(config.get("fold"))
            row = self.rows[trial.trial_id] = TrialRow(label, folds, self.max_epochs.get(variant, 0))
        row.status = str(trial.status)
        return row

    def ended(self, trial: Any, failed: bool = False) -> None:
        row = self.seen(trial)
        row.status = "ERROR" if failed else "TERMINATED"
        if self.live:
            return  # the table shows it
        if failed:
            error = trial.get_error() if hasattr(trial, "get_error") else None
            why = error_message(error).splitlines()[0] if error is not None else "see its error.txt"
            self._print(f"failed   {row.label} fold {row.folds}: {why}")
            return
        what = f"final Dice {row.final_dice:.3f}" if row.final_dice is not None else "stopped early"
        self._print(f"{row.status_word:<8} {row.label} fold {row.folds}: {row.epochs}/{row.max_epochs} epochs, "
                    f"EMA Dice {_number(row.ema)}, {what}{f' (node {row.node})' if row.node else ''}")

    # --- output --------------------------------------------------------------------------------------
    def tick(self) -> None:
        now = time.monotonic()
        if self.live:
            if now - self.last_output >= REDRAW_EVERY_S:
                self.draw()
        elif now - self.last_output >= self.every_s:
            self._print(self.status_line())

    def status_line(self) -> str:
        running = sum(1 for row in self.rows.values() if row.status == "RUNNING")
        return status_line(list(self.rows.values()), time.monotonic() - self.started, running)

    def lines(self) -> list[str]:
        return [*render_rows(list(self.rows.values())), self.status_line()]

    def draw(self) -> None:
        """The table in place of the one drawn before (on a terminal): cursor up over it, clear, print."""
        if self._guard is None:
            self._guard = _StreamGuard(self)
        width = shutil.get_terminal_size().columns
        lines = [line[:width - 1] for line in self.lines()]  # a wrapped line would throw off the cursor-up count
        erase = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
        self._guard.raw_write(erase + "\n".join(lines) + "\n")
        self._drawn = len(lines)
        self.last_output = time.monotonic()

    def erase(self) -> None:
        """Take the table off the terminal, so that another line can be printed where it was."""
        if self._drawn:
            self._guard.raw_write(f"\x1b[{self._drawn}F\x1b[J")  # type: ignore[union-attr]
            self._drawn = 0

    def finish(self) -> None:
        if self.live:
            self.draw()
            self._drawn = 0  # the last table stays on the terminal
            if self._guard is not None:
                self._guard.release()
                self._guard = None
        else:
            self._print(self.status_line())

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
        self.last_output = time.monotonic()


class _StreamGuard:
    """While the live table is on a terminal, everything else written to stdout or stderr (a trial's warning,
    Ray's log forwarding, viseg's own log) goes above it: the table is erased, the text written, the table drawn
    again. Python's log handlers hold their stream from when they were made, so theirs are redirected too."""

    def __init__(self, console: _ConsoleState):
        self.console = console
        self.terminal = console.stream
        self.saved = {"stdout": sys.stdout, "stderr": sys.stderr}
        sys.stdout, sys.stderr = _Above(self, sys.stdout), _Above(self, sys.stderr)
        self.handlers = [h for h in logging.getLogger().handlers
                         if isinstance(h, logging.StreamHandler) and h.stream in self.saved.values()]
        for handler in self.handlers:
            handler.setStream(sys.stdout if handler.stream is self.saved["stdout"] else sys.stderr)

    def raw_write(self, text: str) -> None:
        self.terminal.write(text)
        self.terminal.flush()

    def write_above(self, stream: IO[str], text: str) -> None:
        """The table comes off and the text goes where it was; the next tick draws the table below it."""
        self.console.erase()
        stream.write(text)
        stream.flush()

    def release(self) -> None:
        for handler in self.handlers:
            handler.setStream(self.saved["stdout"] if handler.stream is sys.stdout else self.saved["stderr"])
        sys.stdout, sys.stderr = self.saved["stdout"], self.saved["stderr"]


class _Above(io.TextIOBase):
    """A stdout or stderr that writes above the live table."""

    def __init__(self, guard: _StreamGuard, stream: IO[str]):
        self.guard, self.stream = guard, stream

    def write(self, text: str) -> int:
        self.guard.write_above(self.stream, text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

