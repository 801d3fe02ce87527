"""The cascade in a sweep: `configuration=3d_lowres,3d_cascade_fullres` on a real local Ray. The cascade trial of
a fold starts alongside its lowres trial, waits for it through the experiment's Ray actor, then trains on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.sweep_runs import sweep

pytestmark = pytest.mark.slow

TINY_LOWRES = ("plan.gpu_memory_gb=0.002", "plan.base_num_features=4", "patch_size=null", "splits.n_folds=2",
               "trainer.max_epochs=1", "trainer.iterations_per_epoch=2", "trainer.val_iterations=1")


def test_dry_run_lists_each_cascades_lowres_stage_first(tmp_path: Path):
    result = sweep("configuration=3d_fullres,3d_cascade_fullres", "folds=0,1", *TINY_LOWRES, "dry_run=true",
                   cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "6 (3 variant(s) x folds [0, 1])" in result.stdout
    rows = [line.split()[0] for line in result.stdout.splitlines() if " fold " in line]
    assert rows[:2] == ["configuration-3d_lowres"] * 2 and rows[-1] == "configuration-3d_cascade_fullres"
    assert "(the previous stage of configuration-3d_cascade_fullres)" in result.stdout


def test_a_search_over_the_cascade_is_refused(tmp_path: Path):
    result = sweep("configuration=3d_cascade_fullres", "optimizer.lr=interval(0.001, 0.01)", "num_samples=2",
                   "folds=0", *TINY_LOWRES, "dry_run=true", cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and "in a search" in result.stderr, result.stdout + result.stderr


def test_the_cascade_trial_waits_for_its_lowres_trial_then_trains_on_it(tmp_path: Path):
    result = sweep("configuration=3d_lowres,3d_cascade_fullres", "folds=0", *TINY_LOWRES, "max_concurrent_trials=2",
                   "experiment=cascade", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = tmp_path / "results" / "sweeps" / "cascade"
    (lowres_run,) = (experiment / "runs").rglob("configuration-3d_lowres/fold_0")
    (cascade_run,) = (experiment / "runs").rglob("configuration-3d_cascade_fullres/fold_0")
    assert (cascade_run / "finished.json").is_file()
    assert OmegaConf.load(cascade_run / "config.yaml").previous_stage == str(lowres_run)
    assert (cascade_run / "previous_stage" / "finished.json").is_file()
    assert any((lowres_run / "predicted_next_stage" / "3d_cascade_fullres").glob("*.npy"))
    # both trials started together (two CPUs, one each), and the cascade's run began once the lowres one ended
    # (Tune's time_total_s counts from the trial's start, so its first report says when it started)
    (cascade_trial,) = experiment.glob("configuration-3d_cascade_fullres_fold0_*")
    first = json.loads((cascade_trial / "result.json").read_text().splitlines()[0])
    lowres_done = (lowres_run / "finished.json").stat().st_mtime
    assert first["timestamp"] - first["time_total_s"] < lowres_done < (cascade_run / "config.yaml").stat().st_mtime
