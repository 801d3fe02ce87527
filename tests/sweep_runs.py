"""Running `python -m viseg.sweep` as a user does, in a subprocess, and reading what it left behind."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def sweep(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "viseg.sweep", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


TINY = ("splits.n_folds=3", "trainer.val_iterations=1", "max_concurrent_trials=1")


def wait_for(condition, process: subprocess.Popen, timeout: float = 600, what: str = "") -> None:
    """Poll until `condition()` holds; fail early if the sweep ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"sweep ended (rc {process.returncode}) before {what}:\n{output[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


def start_sweep(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "viseg.sweep", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_session(process: subprocess.Popen) -> None:
    """What a lost driver machine looks like: the driver and the local Ray it started die at once."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def run_folders(experiment: Path) -> dict[str, Path]:
    return {str(p.relative_to(experiment / "runs")).split("/", 2)[-1]: p
            for p in (experiment / "runs").rglob("fold_*") if p.is_dir()}


def epochs_in(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv") as handle:
        return [int(float(row["epoch"])) for row in csv.DictReader(handle)]


def trial_results(experiment: Path) -> list[dict]:
    """Every result a grid trial reported to Tune (result.json of each trial folder), oldest first per trial."""
    rows = []
    for path in experiment.glob("*_fold*_*/result.json"):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def kill_after_second_epoch(process: subprocess.Popen, experiment: Path, pid_key: str) -> str:
    """SIGKILL the process named by `pid_key` in the trial's latest report once it reported epoch 1, then let the
    sweep finish; its output. The driver and its Ray are killed afterwards whatever happened."""
    try:
        wait_for(lambda: any(r.get("epoch", -1) >= 1 for r in trial_results(experiment)), process,
                 what="the trial's second epoch")
        os.kill(trial_results(experiment)[-1][pid_key], signal.SIGKILL)
        output, _ = process.communicate(timeout=600)
    finally:
        kill_session(process)
    return output

