"""Resuming a sweep whose Ray state does not load: what a full disk leaves (Ray uploads its state files in
place, so any of them can be cut), written here on purpose so that the outcome never depends on which write
the disk refused.

When a state file does not load, Ray restarts the experiment from a param space `Tuner.restore` never kept,
so its trials come back without a config. A grid sweep rebuilds its trials from viseg's own sweep state and
continues; a search says it cannot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.sweep_runs import TINY, sweep
from viseg.errors import ConfigError
from viseg.sweep.driver import load_state
from viseg.sweep.ray_state import state_files
from viseg.sweep.spec import SearchAxis
from viseg.sweep.state_seal import StateSealer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(work folder, experiment folder, a pristine copy of it) after a finished one-trial grid sweep."""
    work = tmp_path_factory.mktemp("ray_state")
    result = sweep("folds=0", "trainer.max_epochs=1", "trainer.iterations_per_epoch=2", *TINY, "experiment=grid",
                   cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = work / "results" / "sweeps" / "grid"
    pristine = work / "pristine"
    shutil.copytree(experiment, pristine, symlinks=True)
    return work, experiment, pristine


def truncate_generator_state(experiment: Path) -> None:
    """The CI failure: the grid generator's state (a pickle, despite its .json name) cut by a full disk."""
    for path in experiment.glob("basic-variant-state-*.json"):
        path.write_bytes(path.read_bytes()[:200])


def drop_trial_configs(experiment: Path) -> None:
    """Valid JSON whose trial entries lack their config, the trial marked failed so that Ray resumes it."""
    for path in experiment.glob("experiment_state-*.json"):
        state = json.loads(path.read_text())
        for entry in state["trial_data"]:
            trial = json.loads(entry[0])
            trial["config"], trial["status"] = {}, "ERROR"
            entry[0] = json.dumps(trial)
        path.write_text(json.dumps(state))


def empty_json(experiment: Path) -> None:
    for path in experiment.glob("experiment_state-*.json"):
        path.write_text("{}")


def sealed(damage):
    """The damage as Ray itself wrote it (the driver's own staging copy cut, then sealed), so that the resume
    reaches the damaged-state check; damage done in the shared folder alone is refused before (test_state_seal)."""
    def damage_and_seal(experiment: Path) -> None:
        damage(experiment)
        StateSealer(experiment).seal_files(state_files(experiment))

    damage_and_seal.__name__ = damage.__name__
    return damage_and_seal


@pytest.mark.parametrize("damage", [sealed(d) for d in (truncate_generator_state, drop_trial_configs, empty_json)],
                         ids=lambda d: d.__name__)
def test_a_grid_resumes_from_its_own_sweep_state_whatever_ray_state_survived(finished_grid, damage):
    work, experiment, pristine = finished_grid
    shutil.rmtree(experiment)
    shutil.copytree(pristine, experiment, symlinks=True)
    run = next((experiment / "runs").rglob("fold_0"))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    damage(experiment)

    result = sweep(f"resume={experiment}", cwd=work)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "is damaged" in output and "without custom configuration" not in output, output[-4000:]
    assert "KeyError" not in output and not json.loads((experiment / "errors.json").read_text())
    assert list((experiment / "damaged_tune_state").iterdir())  # kept for inspection, out of Ray's way
    # the finished trial was found by variant and fold and left alone
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    assert [v["folds_finished"] for v in json.loads((experiment / "summary.json").read_text())] == [[0]]


def test_a_search_with_damaged_ray_state_says_it_cannot_continue(finished_grid, tmp_path: Path):
    from viseg.sweep.tune import restore_tuner

    _, _, pristine = finished_grid
    experiment = tmp_path / "grid"
    shutil.copytree(pristine, experiment, symlinks=True)
    plan = load_state(experiment)
    plan.storage_path, plan.search = str(tmp_path), [SearchAxis(key="optimizer.lr", kind="loguniform", low=1e-3,
                                                                high=1e-1)]
    sealed(truncate_generator_state)(experiment)
    with pytest.raises(ConfigError) as raised:
        restore_tuner(plan)
    assert "cannot continue" in str(raised.value) and f"cross_validate={experiment}" in str(raised.value)
