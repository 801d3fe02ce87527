"""Ray's experiment state is code (pickles; its JSON carries cloudpickled values too), and the experiment folder
is often shared. viseg seals the state files its driver writes with a key from the user's config folder and
never loads a file without that seal: not on resume, not when cross-validating a search, not in the notebook.

The crafted files here run `open(marker, "w")` when unpickled, so "no marker" proves nothing was loaded."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest

from tests.sweep_runs import TINY, sweep
from viseg.errors import ConfigError
from viseg.sweep.driver import load_state
from viseg.sweep.ray_state import UNTRUSTED, state_files
from viseg.sweep.spec import SearchAxis
from viseg.sweep.state_seal import SEAL_FILE, StateSealer, load_key, untrusted_state_files


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): what an attacker's payload would do, made visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def payload(marker: Path) -> bytes:
    return pickle.dumps(_WritesMarker(marker))


# -- the key and the seal, without Ray ------------------------------------------------------------------


def test_the_key_is_created_private_and_a_key_others_can_read_is_refused(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("VISEG_STATE_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    key = load_key()
    path = tmp_path / "config" / "viseg" / "state.key"
    assert path.read_bytes() == key and len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_key() == key  # reused, not replaced

    path.chmod(0o644)
    with pytest.raises(ConfigError) as raised:
        load_key()
    assert str(path) in str(raised.value) and f"chmod 600 {path}" in str(raised.value)


def test_a_file_changed_after_sealing_or_never_sealed_is_untrusted(tmp_path: Path):
    state = tmp_path / "experiment_state-2026-01-01_00-00-00.json"
    other = tmp_path / "searcher-state-2026-01-01_00-00-00.pkl"
    state.write_text('{"trial_data": []}')
    other.write_bytes(b"never sealed")
    StateSealer(tmp_path).seal_files([state])
    assert untrusted_state_files(tmp_path, [state, other]) == [other.name]

    state.write_text('{"trial_data": [] }')  # one byte more
    assert untrusted_state_files(tmp_path, [state]) == [state.name]
    # a sealed file's content under another name does not pass either: the name is part of the digest
    renamed = tmp_path / "basic-variant-state-2026-01-01_00-00-00.json"
    renamed.write_text('{"trial_data": []}')
    assert untrusted_state_files(tmp_path, [renamed]) == [renamed.name]


def test_the_previous_version_of_a_file_still_verifies_while_ray_uploads_the_next(tmp_path: Path):
    """Ray uploads its state after writing it: a driver that dies in between leaves the previous version."""
    state = tmp_path / "experiment_state-x.json"
    sealer = StateSealer(tmp_path)
    for version in ("one", "two"):
        state.write_text(version)
        sealer.seal_files([state])
    state.write_text("one")
    assert untrusted_state_files(tmp_path, [state]) == []
    assert len(json.loads((tmp_path / SEAL_FILE).read_text())["files"][state.name]) == 2


# -- real sweeps ---------------------------------------------------------------------------------------

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(work folder, a pristine copy of the experiment) after a finished one-trial grid sweep."""
    work = tmp_path_factory.mktemp("state_seal")
    result = sweep("folds=0", "trainer.max_epochs=1", "trainer.iterations_per_epoch=2", *TINY, "experiment=grid",
                   cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pristine = work / "pristine"
    shutil.copytree(work / "results" / "sweeps" / "grid", pristine, symlinks=True)
    return work, pristine


def fresh_copy(finished_grid: tuple[Path, Path], name: str) -> Path:
    work, pristine = finished_grid
    experiment = work / "results" / "sweeps" / name
    shutil.rmtree(experiment, ignore_errors=True)
    shutil.copytree(pristine, experiment, symlinks=True)
    return experiment


@slow
def test_a_finished_sweep_leaves_every_state_file_sealed(finished_grid):
    _, pristine = finished_grid
    names = {p.name for p in state_files(pristine)}
    assert "tuner.pkl" in names and any(n.startswith("experiment_state-") for n in names)
    assert any(n.startswith("basic-variant-state-") for n in names)
    assert untrusted_state_files(pristine, state_files(pristine)) == []
    key = Path(os.environ["VISEG_STATE_KEY"])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes() not in (pristine / "tuner.pkl").read_bytes()  # the key never goes into Ray's state


@slow
def test_a_planted_tuner_pkl_never_runs_and_the_grid_goes_on_from_its_run_folders(finished_grid, tmp_path: Path):
    work, _ = finished_grid
    experiment = fresh_copy(finished_grid, "planted")
    marker = tmp_path / "pwned"
    (experiment / "tuner.pkl").write_bytes(payload(marker))
    run = next((experiment / "runs").rglob("fold_0"))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    original = work / "results" / "sweeps" / "grid"
    original_files = {p: p.stat().st_mtime_ns for p in original.rglob("*") if p.is_file()}

    result = sweep(f"resume={experiment}", cwd=work)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert not marker.exists(), "the planted tuner.pkl was unpickled"
    assert "does not carry your viseg's seal (tuner.pkl)" in output, output[-4000:]
    assert (experiment / UNTRUSTED / "tuner.pkl").read_bytes() == payload(marker)  # kept, out of Ray's way
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # the finished fold stays
    assert [v["folds_finished"] for v in json.loads((experiment / "summary.json").read_text())] == [[0]]
    assert untrusted_state_files(experiment, state_files(experiment)) == []  # the new state is sealed again
    # a copied experiment continues where it is, not in the folder it was copied from
    assert {p: p.stat().st_mtime_ns for p in original.rglob("*") if p.is_file()} == original_files


@slow
def test_a_search_with_planted_state_refuses_to_resume_and_loads_nothing(finished_grid, tmp_path: Path):
    from viseg.sweep.tune import restore_tuner

    experiment = fresh_copy(finished_grid, "planted-search")
    marker = tmp_path / "pwned"
    searcher = next(experiment.glob("basic-variant-state-*.json"))
    searcher.write_bytes(payload(marker))
    plan = load_state(experiment)
    plan.search = [SearchAxis(key="optimizer.lr", kind="loguniform", low=1e-3, high=1e-1)]
    with pytest.raises(ConfigError) as raised:
        restore_tuner(plan)
    message = str(raised.value)
    assert searcher.name in message and "never unpickles" in message and f"cross_validate={experiment}" in message
    assert not marker.exists()
    assert searcher.read_bytes() == payload(marker)  # left in place: with the right key the owner can resume


@slow
def test_cross_validate_reads_trial_reports_not_the_pickled_experiment_state(finished_grid, tmp_path: Path):
    """Ray's ExperimentAnalysis decodes the experiment state's trial entries with cloudpickle: shown here to run
    the planted payload, which viseg's own reader never touches."""
    from ray.tune import ExperimentAnalysis

    from viseg.sweep.driver import load_state
    from viseg.sweep.search_report import read_configurations

    experiment = fresh_copy(finished_grid, "planted-cv")
    marker = tmp_path / "pwned"
    state_path = next(experiment.glob("experiment_state-*.json"))
    state = json.loads(state_path.read_text())
    trial = json.loads(state["trial_data"][0][0])
    trial["config"]["planted"] = {"_type": "CLOUDPICKLE_FALLBACK", "value": payload(marker).hex()}
    state["trial_data"][0][0] = json.dumps(trial)
    state_path.write_text(json.dumps(state))

    candidates = read_configurations(experiment, load_state(experiment), ended=True)
    assert [(c.variant, c.status) for c in candidates] == [("default", "finished")]
    assert not marker.exists()

    ExperimentAnalysis(str(experiment))  # the reader viseg no longer uses
    assert marker.exists(), "the planted payload should show why Ray's reader is not used"
