"""The one atomic writer, and how a full disk is recognised and reported."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from viseg.errors import StorageFullError, is_storage_full, storage_full, unwritable_file
from viseg.io.atomic import copy_atomically, write_atomically, write_text_atomically
from viseg.sweep.ray_state import SweepTrials, file_problem, set_aside_damaged_state


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path: Path):
    target = tmp_path / "state.json"
    target.write_text("old")

    def half_then_full(tmp: Path) -> None:
        tmp.write_text("new, but only ha")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError):
        write_atomically(target, half_then_full)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_full_disk_at_write_or_close_names_the_target(tmp_path: Path):
    """Python names no file when write() or close() hits ENOSPC (only open() does): the trial's error would
    then say only "the experiment folder"."""
    def full_at_close(tmp: Path) -> None:
        tmp.write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as raised:
        write_atomically(tmp_path / "metrics.csv", full_at_close)
    assert unwritable_file(raised.value) == str(tmp_path / "metrics.csv")
    assert sorted(tmp_path.iterdir()) == []


def test_writes_replace_the_target_and_keep_the_ending_when_asked(tmp_path: Path):
    seen: list[Path] = []
    write_atomically(tmp_path / "plot.png", lambda tmp: (seen.append(tmp), tmp.write_bytes(b"png")), keep_ending=True)
    assert seen[0].name.endswith(".plot.png") and seen[0].parent == tmp_path
    write_text_atomically(tmp_path / "a.txt", "text", fsync=True)
    copy_atomically(tmp_path / "a.txt", tmp_path / "b.txt")
    assert (tmp_path / "plot.png").read_bytes() == b"png" and (tmp_path / "b.txt").read_text() == "text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "plot.png"]


def test_a_full_disk_is_recognised_through_wrappers_and_names_the_refused_file(tmp_path: Path):
    full = OSError(errno.ENOSPC, "No space left on device", "/cache/plans.json", None, "/results/plans.json")
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("the trial failed") from exc
    except RuntimeError as wrapped:
        assert is_storage_full(wrapped)
        assert unwritable_file(wrapped) == "/results/plans.json"  # the copy's destination, not its source
    assert is_storage_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_storage_full(OSError("[errno 28] Error writing bytes to file. Detail: No space left on device"))
    assert not is_storage_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_storage_full(ValueError("no"))

    error = storage_full("a checkpoint", tmp_path / "not" / "yet" / "last.ckpt", fix="free space")
    assert isinstance(error, StorageFullError)
    assert str(error).startswith(f"no space left on device writing a checkpoint: {tmp_path}/not/yet/last.ckpt (")
    assert "MiB free of" in str(error) and str(error).endswith("fix: free space")


def _trial_entry(variant: str, fold: int) -> list[str]:
    return [json.dumps({"config": {"variant": variant, "fold": fold}}), "{}"]


def test_damaged_ray_state_is_set_aside_and_a_restorable_folder_is_left_alone(tmp_path: Path):
    import pickle

    experiment = tmp_path / "experiment"
    experiment.mkdir()
    trials = SweepTrials(variants=["default"], folds=[0], search=False)
    (experiment / "tuner.pkl").write_bytes(pickle.dumps({}))
    (experiment / "basic-variant-state-2026-01-01_00-00-00.json").write_bytes(pickle.dumps({"_iterators": []}))
    state = {"trial_data": [_trial_entry("default", 0)], "runner_data": {}}
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    assert set_aside_damaged_state(experiment, trials) is None

    (experiment / "experiment_state-2026-01-02_00-00-00.json").write_text("")  # what a full disk leaves
    assert set_aside_damaged_state(experiment, trials) is None  # the older, complete state is still there
    assert (experiment / "damaged_tune_state" / "experiment_state-2026-01-02_00-00-00.json").is_file()

    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": [')
    reason = set_aside_damaged_state(experiment, trials)
    assert reason is not None and "no readable experiment_state" in reason
    assert not list(experiment.glob("experiment_state-*.json"))


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("experiment_state-1.json", json.dumps({}), "no runner_data"),  # valid JSON, nothing Ray can resume
    ("experiment_state-1.json", json.dumps({"trial_data": [], "runner_data": {}}), "no trial entries"),
    ("experiment_state-1.json", json.dumps({"trial_data": [_trial_entry("other", 0)], "runner_data": {}}),
     "without this sweep's variant and fold"),
    ("basic-variant-state-1.json", b"\x80\x05\x95", "unreadable (UnpicklingError)"),  # a cut pickle
])
def test_ray_state_that_ray_would_restart_from_is_damaged(tmp_path: Path, name: str, content, problem: str):
    trials = SweepTrials(variants=["default"], folds=[0], search=False)
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    kind = "json" if name.startswith("experiment_state") else "pickle"
    assert problem in (file_problem(path, kind, trials) or "")


def test_a_checkpoint_on_a_full_disk_says_to_continue_the_run_not_to_run_the_command_again(tmp_path: Path):
    """The run folder exists by then, and the same `viseg.train` command refuses an existing run."""
    from viseg.training.callbacks import atomic_save_checkpoint

    class TrainerOnAFullDisk:  # Lightning's save_checkpoint as a full volume ends it: half a file, then ENOSPC
        is_global_zero = True

        def save_checkpoint(self, path: Path, weights_only: bool = False) -> None:
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    run = tmp_path / "fold_0"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(StorageFullError) as raised:
        atomic_save_checkpoint(TrainerOnAFullDisk(), run / "checkpoints" / "last.ckpt")  # type: ignore[arg-type]
    assert f"continue_from={run}" in raised.value.fix and "same command" not in raised.value.fix
    assert list((run / "checkpoints").iterdir()) == []
