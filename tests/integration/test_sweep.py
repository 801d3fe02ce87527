"""The sweep layer on a real local Ray: a reduced version of the README's main command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def sweep(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "viseg.sweep", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_reduced_main_command_runs_every_trial_and_prepares_once(tmp_path: Path):
    result = sweep("folds=0-1", "lr_scheduler=step_lr,poly", "trainer.max_epochs=1",
                   "trainer.iterations_per_epoch=2", "trainer.val_iterations=1", "splits.n_folds=3",
                   "experiment=reduced", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = tmp_path / "results" / "sweeps" / "reduced"
    finished = sorted(str(p.parent.relative_to(experiment / "runs")).split("/", 2)[-1]
                      for p in (experiment / "runs").rglob("finished.json"))
    assert finished == ["lr_scheduler-poly/fold_0", "lr_scheduler-poly/fold_1",
                        "lr_scheduler-step_lr/fold_0", "lr_scheduler-step_lr/fold_1"]
    # every trial used the driver's one cache: one dataset folder, one preprocessed folder
    caches = list((tmp_path / ".viseg_cache").glob("VisegDemo-*"))
    assert len(caches) == 1 and len(list((caches[0] / "preprocessed").iterdir())) == 1
    summary = json.loads((experiment / "summary.json").read_text())
    assert sorted(v["variant"] for v in summary) == ["lr_scheduler-poly", "lr_scheduler-step_lr"]
    assert all(v["folds_finished"] == [0, 1] for v in summary)
    assert (experiment / "summary.png").is_file() and "lr_scheduler-poly" in result.stdout


def test_dry_run_prints_trials_and_starts_nothing(tmp_path: Path):
    result = sweep("folds=0,2", "lr_scheduler=step_lr,poly,cosine", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "6 (3 variant(s) x folds [0, 2])" in result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["lr_scheduler=nope,poly"], "lr_scheduler"),
    (["folds=0-9"], "out of range"),
    (["trainer.max_epochs=abc"], "max_epochs"),
    (["patch_size=interval(8, 64)"], "cannot be searched"),
    (["model.model_args.n_stages=3"], "derived"),
    (["sweep=nope"], "does not exist"),
])
def test_invalid_overrides_fail_fast_with_a_readable_message(tmp_path: Path, args: list[str], message: str):
    result = sweep(*args, "dry_run=true", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_help_explains_the_grammar(tmp_path: Path):
    result = sweep("--help", cwd=tmp_path, timeout=60)
    assert result.returncode == 0 and "resume=<experiment path>" in result.stdout and "interval" in result.stdout
