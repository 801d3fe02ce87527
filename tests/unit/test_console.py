"""The sweep console and plain progress lines, driven with trial stand-ins (the integration test runs the real
sweep: tests/integration/test_sweep.py::check_console)."""

from __future__ import annotations

import io
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest

from viseg.noise import VERBOSE_ENV, quiet_libraries, verbosity
from viseg.progress import PlainProgress, format_duration, track
from viseg.sweep import console as console_module
from viseg.sweep.console import TrialRow, _ConsoleState, render_rows, status_line


@dataclass
class FakeTrial:
    """What the console reads of a Tune Trial."""

    trial_id: str
    config: dict[str, Any]
    status: str = "RUNNING"
    error: Exception | None = None
    last_result: dict[str, Any] = field(default_factory=dict)

    def get_error(self) -> Exception | None:
        return self.error


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_row_follows_grid_and_search_reports():
    row = TrialRow("poly", "0", max_epochs=4, status="RUNNING")
    row.update({"epoch": 0.0, "epoch_time": 2.0, "val/ema_pseudo_dice": 0.41, "node_ip": "10.0.0.7"})
    assert (row.epochs, row.ema, row.node, row.seconds_left) == (1, 0.41, "10.0.0.7", 6.0)
    row.update({"epochs": 4, "epoch_time": 2.0})  # a search trial counts epochs all its folds have
    assert row.epochs == 4 and row.status_word == "validating" and row.seconds_left is None
    row.update({"final/mean_dice": 0.5, "val/ema_pseudo_dice": 0.45})  # the last report has no epoch
    row.status = "TERMINATED"
    assert (row.epochs, row.final_dice, row.status_word) == (4, 0.5, "finished")
    stopped = TrialRow("asha", "0,1", max_epochs=9, status="TERMINATED", epochs=2)
    assert stopped.status_word == "stopped"


def test_the_table_has_the_columns_a_user_asked_for():
    rows = [TrialRow("step_lr", "0", 12, "RUNNING", 3, 0.8123, 2.5, None, "10.0.0.1"),
            TrialRow("poly", "1", 12, "PENDING")]
    header, first, second = render_rows(rows)
    assert header.split() == ["trial", "fold", "status", "epoch", "EMA", "Dice", "final", "Dice", "epoch", "time",
                              "ETA", "node"]
    assert first.split() == ["step_lr", "0", "running", "3/12", "0.812", "-", "2.5", "s", "22", "s", "10.0.0.1"]
    assert second.split()[:4] == ["poly", "1", "pending", "0/12"]
    # the columns line up
    assert header.index("status") == first.index("running") == second.index("pending")


def test_the_status_line_counts_names_the_best_and_estimates_the_rest():
    rows = [TrialRow("a", "0", 10, "RUNNING", 5, 0.7, 2.0), TrialRow("b", "0", 10, "RUNNING", 5, 0.9, 2.0),
            TrialRow("c", "1", 10, "PENDING"), TrialRow("d", "1", 10, "ERROR", 1)]
    line = status_line(rows, elapsed=75, running_at_once=2)
    # (5 + 5 + 10 epochs left) x 2 s, two at a time
    assert line == "[sweep 1m15s] 4 trials: 2 running, 1 pending, 1 failed; best EMA Dice 0.900 (b fold 0); " \
                   "about 20 s left"


def test_off_a_terminal_it_prints_a_line_per_ended_trial_and_a_status_line_now_and_then(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(console_module.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    console = _ConsoleState({"poly": 2}, folds=[0, 1], search=False, stream=out, every_s=30)
    trial = FakeTrial("t1", {"variant": "poly", "fold": 1})
    console.seen(trial).update({"epoch": 0.0, "epoch_time": 1.5, "val/ema_pseudo_dice": 0.3})
    for now in (110.0, 129.0):
        clock[0] = now
        console.tick()
    assert out.getvalue() == ""  # not yet 30 s
    clock[0] = 131.0
    console.tick()
    console.tick()
    assert out.getvalue().splitlines() == ["[sweep 31 s] 1 trials: 1 running; best EMA Dice 0.300 (poly fold 1); "
                                           "about 2 s left"]
    console.seen(trial).update({"epoch": 1.0, "final/mean_dice": 0.25})
    console.ended(trial)
    failed = FakeTrial("t2", {"variant": "poly", "fold": 0}, error=RuntimeError("out of memory\nmore"))
    console.ended(failed, failed=True)
    lines = out.getvalue().splitlines()
    assert lines[1] == "finished poly fold 1: 2/2 epochs, EMA Dice 0.300, final Dice 0.250"
    assert lines[2] == "failed   poly fold 0: RuntimeError: out of memory"
    assert "\x1b" not in out.getvalue()


def test_on_a_terminal_the_table_is_redrawn_in_place_and_other_output_goes_above_it(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(console_module.time, "monotonic", lambda: clock[0])
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    console = _ConsoleState({"poly": 3}, folds=[0], search=False)
    assert console.live
    console.seen(FakeTrial("t1", {"variant": "poly", "fold": 0})).update({"epoch": 0.0, "epoch_time": 1.0})
    clock[0] = 2.0
    console.tick()
    first = terminal.getvalue()
    assert first.count("\n") == 3 and "\x1b[" not in first  # header, one row, the status line
    assert sys.stdout is not terminal  # other writers now go above the table
    print("(run_trial pid=1) a warning")
    assert terminal.getvalue() == first + "\x1b[3F\x1b[J(run_trial pid=1) a warning\n"
    clock[0] = 4.0
    console.tick()  # drawn again below the warning, nothing to erase
    assert terminal.getvalue().endswith("a warning\n" + first.replace("[sweep 2 s]", "[sweep 4 s]"))
    clock[0] = 4.5
    console.tick()  # at most once a second
    clock[0] = 6.0
    console.tick()
    assert terminal.getvalue().count("\x1b[3F\x1b[J") == 2
    console.finish()
    assert sys.stdout is terminal  # given back; the last table stays on the terminal


def test_a_search_trial_is_one_row_over_its_folds():
    out = io.StringIO()
    console = _ConsoleState({"lr": 5}, folds=[0, 1, 2], search=True, stream=out)
    row = console.seen(FakeTrial("ab12", {"variant": "lr", "params": {"optimizer.lr": 0.01}}))
    assert (row.label, row.folds, row.max_epochs) == ("lr-ab12", "0,1,2", 5)


def test_plain_progress_prints_how_far_and_how_long(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("viseg.progress.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = PlainProgress(total=10, desc="Preprocessing", unit="case", stream=out, every_s=30)
    for step in range(10):
        clock[0] = 10.0 * (step + 1)
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "Preprocessing: 3/10 cases (30 %), 30 s, about 1m10s left"
    assert lines[-1] == "Preprocessing: 10/10 cases (100 %), 1m40s"
    assert len(lines) == 4  # at 30, 60 and 90 s, and the end


def test_a_quick_step_prints_nothing_off_a_terminal_and_track_yields_every_item():
    out = io.StringIO()
    assert list(track(range(5), "Validating", stream=out)) == [0, 1, 2, 3, 4]
    assert out.getvalue() == ""
    assert [format_duration(s) for s in (4.2, 65, 3725)] == ["4 s", "1m05s", "1h02m"]


def test_quiet_libraries_silences_banners_and_known_warnings_but_not_others(monkeypatch):
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert verbosity() == 1
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    monkeypatch.setattr(rank_zero, "level", logging.NOTSET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("Your `IterableDataset` has `__len__` defined. In combination ...", UserWarning, stacklevel=1)
        warnings.warn("a warning viseg has not seen before", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning viseg has not seen before"]
    assert rank_zero.level == logging.WARNING


@pytest.mark.parametrize(("value", "expected"), [("2", 2), ("0", 0), ("loud", 1)])
def test_verbosity_comes_from_the_environment(monkeypatch, value: str, expected: int):
    monkeypatch.setenv(VERBOSE_ENV, value)
    assert verbosity() == expected
