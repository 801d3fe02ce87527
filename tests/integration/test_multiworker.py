"""A sweep trial on two Ray Train workers (DDP over gloo on a real local Ray), and its recovery from a killed
worker. `devices=1,2` mixes a one-process variant with a two-worker one in the same sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.sweep_runs import epochs_in, kill_after_second_epoch, run_folders, start_sweep, sweep, trial_results

pytestmark = pytest.mark.slow

TINY = ("splits.n_folds=3", "trainer.val_iterations=1", "trainer.iterations_per_epoch=2", "resources.cpu=0.5")


def test_a_two_worker_trial_survives_a_killed_worker_and_resumes_from_its_checkpoint(tmp_path: Path):
    experiment = tmp_path / "results" / "sweeps" / "workers"
    # epochs of a few seconds and more of them than the reports can lag behind, so the kill lands mid-training
    process = start_sweep("folds=0", "resources.workers=2", "trainer.max_epochs=8", *TINY,
                          "trainer.iterations_per_epoch=12", "max_failures=2", "experiment=workers", cwd=tmp_path)
    output = kill_after_second_epoch(process, experiment, "worker_pid")  # rank 0
    assert process.returncode == 0, output[-4000:]
    run = run_folders(experiment)["default/fold_0"]
    assert json.loads((run / "finished.json").read_text())["epochs"] == 8
    assert (run / "validation" / "summary.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    rows = [r for r in trial_results(experiment) if "epoch" in r]
    assert {r["workers"] for r in rows} == {2}  # every epoch trained by both workers (DDP world size 2)
    assert len({r["worker_pid"] for r in rows}) == 2  # a new rank 0 after the kill ...
    assert epochs_in(run) == list(range(8))  # ... which went on from the checkpoint, not from epoch 0
    log = (run / "training_log.txt").read_text()
    assert "x 2 processes (DDP)" in log and "continuing at epoch" in log


def test_a_sweep_mixes_one_process_and_two_worker_variants(tmp_path: Path):
    result = sweep("folds=0", "devices=1,2", "trainer.max_epochs=1", *TINY, "experiment=mixed", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = tmp_path / "results" / "sweeps" / "mixed"
    runs = run_folders(experiment)
    assert sorted(runs) == ["devices-1/fold_0", "devices-2/fold_0"]
    assert all((r / "finished.json").is_file() for r in runs.values())
    assert "x 2 processes (DDP)" in (runs["devices-2/fold_0"] / "training_log.txt").read_text()
    assert "processes" not in (runs["devices-1/fold_0"] / "training_log.txt").read_text()


def test_workers_that_cannot_fit_the_local_ray_are_refused(tmp_path: Path):
    result = sweep("folds=0", "resources.workers=4", "resources.cpu=1", "trainer.max_epochs=1", "splits.n_folds=3",
                   "experiment=toobig", cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and "4 Ray Train workers" in result.stderr, result.stdout + result.stderr
