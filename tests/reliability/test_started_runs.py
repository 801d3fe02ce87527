"""A started run is never redone and never re-made: it continues with its own plan and split, says what
changed in the dataset since it started, and a run folder caught between the two checkpoint renames is
refused by the same command and continued by continue_from= from previous.ckpt.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import compose_typed
from viseg.data.demo import DemoSpec, generate_demo_dataset
from viseg.errors import ConfigError, DatasetError
from viseg.io.checkpoints import keep_previous
from viseg.io.layout import BEST_CHECKPOINT, CHECKPOINTS_DIR, FINISHED_MARKER, LAST_CHECKPOINT, PREVIOUS_CHECKPOINT
from viseg.preprocessing.prepare import prepare
from viseg.training.continue_run import last_checkpoint, split_changes
from viseg.training.train import _refuse_existing_run, train

pytestmark = pytest.mark.slow


def overrides(demo: Path, work: Path, epochs: int) -> list[str]:
    return [f"dataset.basepath={demo}", f"paths.cache={work / 'cache'}", f"paths.results={work / 'results'}",
            "splits.n_folds=3", "num_processes=1", "loader.num_workers=0", "patch_size=[16,32,32]",
            f"trainer.max_epochs={epochs}", "trainer.iterations_per_epoch=2", "trainer.val_iterations=1"]


def start_run(work: Path, epochs: int = 1) -> tuple[Path, Path]:
    """(dataset, run folder) of a finished run on a fresh six-case demo dataset."""
    demo = generate_demo_dataset(work / "demo", DemoSpec(n_cases=6), progress=False)
    run = train(compose_typed("anatomy_config", overrides(demo, work, epochs)), progress=False).run_dir
    return demo, run


def epochs_in(run: Path) -> list[int]:
    with open(run / "metrics.csv") as handle:
        return [int(float(row["epoch"])) for row in csv.DictReader(handle)]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_resumed_trial_keeps_its_own_split_and_names_the_cases_that_moved(tmp_path: Path, caplog):
    """What a sweep trial's resume does (prepare the dataset as it is now, resume from the run folder's
    checkpoint), after the dataset's splits_final.json moved training cases of fold 0 into validation."""
    demo, run = start_run(tmp_path)
    own = json.loads((run / "splits.json").read_text())
    moved = sorted(own[0]["train"])[:2]
    changed = [{"train": sorted(set(own[0]["train"]) - set(moved) | set(own[0]["val"])), "val": moved}, *own[1:]]
    (demo / "splits_final.json").write_text(json.dumps(changed))
    (run / FINISHED_MARKER).unlink()  # stopped after its last checkpoint, as a trial on a full disk

    cfg = compose_typed("anatomy_config", overrides(demo, tmp_path, epochs=2))
    with caplog.at_level(logging.WARNING):
        train(cfg, prepared=prepare(cfg, progress=False), resume_from=last_checkpoint(run), run_dir=run,
              progress=False, retry=True)
    assert json.loads((run / "splits.json").read_text()) == own  # the run's own split, not the new one
    validated = json.loads((run / "validation" / "summary.json").read_text())["cases"]
    assert sorted(validated) == sorted(own[0]["val"])
    warning = next((r.getMessage() for r in caplog.records if "changed since" in r.getMessage()), "")
    assert "from train into val" in warning and all(case in warning for case in moved), caplog.text
    assert epochs_in(run) == [0, 1]


def test_continuing_after_a_case_was_added_keeps_the_split_and_names_the_case(tmp_path: Path):
    demo, run = start_run(tmp_path)
    own, plans = (run / "splits.json").read_text(), (run / "plans.json").read_text()
    for folder, suffix in (("imagesTr", "_0000"), ("labelsTr", "")):
        shutil.copyfile(demo / folder / f"demo_000{suffix}.nii.gz", demo / folder / f"demo_new{suffix}.nii.gz")
    meta = json.loads((demo / "dataset.json").read_text())
    (demo / "dataset.json").write_text(json.dumps(meta | {"numTraining": meta["numTraining"] + 1}))

    result = subprocess.run([sys.executable, "-m", "viseg.train", f"continue_from={run}", "trainer.max_epochs=2"],
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "1 case(s) added, not in the run's split: demo_new" in output, output[-3000:]
    assert "dataset's files changed since the run's plan was made" in output
    assert (run / "splits.json").read_text() == own and (run / "plans.json").read_text() == plans


def test_cases_of_the_run_that_are_gone_are_an_error_naming_them():
    own = [{"train": ["a", "b"], "val": ["c"]}]
    with pytest.raises(DatasetError, match="no longer in the dataset: c"):
        split_changes(own, own, 0, ["a", "b"])
    assert split_changes(own, [{"train": ["a", "c"], "val": ["b"]}], 0, ["a", "b", "c"]) == [
        "fold 0's split now puts 1 case(s) from train into val: b",
        "fold 0's split now puts 1 case(s) from val into train: c"]


def test_a_run_killed_between_the_checkpoint_renames_is_refused_then_continued_from_previous(tmp_path: Path):
    """keep_previous renamed last.ckpt to previous.ckpt, the kill came before the new last.ckpt was renamed
    into place: the folder holds previous.ckpt, best.ckpt and the metrics, no last.ckpt, no finished.json."""
    demo, run = start_run(tmp_path, epochs=2)
    checkpoints = run / CHECKPOINTS_DIR
    keep_previous(checkpoints)  # the first of the two renames, exactly as the checkpoint callback does it
    (run / FINISHED_MARKER).unlink()
    shutil.rmtree(run / "validation")
    assert not (checkpoints / LAST_CHECKPOINT).exists() and (checkpoints / PREVIOUS_CHECKPOINT).is_file()
    kept = {name: digest(run / name) for name in (f"{CHECKPOINTS_DIR}/{BEST_CHECKPOINT}", "metrics.csv")}

    again = subprocess.run([sys.executable, "-m", "viseg.train", *overrides(demo, tmp_path, epochs=2)],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"run folder {run} already holds a run" in again.stderr
    assert "checkpoints/previous.ckpt" in again.stderr and f"continue_from={run}" in again.stderr
    assert {name: digest(run / name) for name in kept} == kept  # nothing was overwritten

    resumed = subprocess.run([sys.executable, "-m", "viseg.train", f"continue_from={run}", "trainer.max_epochs=3"],
                             capture_output=True, text=True, timeout=600)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert "last.ckpt is missing" in output and "previous.ckpt instead" in output
    assert epochs_in(run) == [0, 1, 2]  # epoch 1 ended in previous.ckpt: only epoch 2 is trained
    assert json.loads((run / FINISHED_MARKER).read_text())["epochs"] == 3


@pytest.mark.parametrize("left", ["config.yaml", f"{CHECKPOINTS_DIR}/{BEST_CHECKPOINT}",
                                  f"{CHECKPOINTS_DIR}/{PREVIOUS_CHECKPOINT}"])
def test_any_checkpoint_or_config_makes_a_folder_an_existing_run(tmp_path: Path, left: str):
    (tmp_path / left).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / left).write_text("")
    with pytest.raises(ConfigError, match=f"already holds a run \\({left}\\)") as raised:
        _refuse_existing_run(tmp_path)
    resumable = left.endswith(PREVIOUS_CHECKPOINT)
    assert (f"continue_from={tmp_path}" in str(raised.value)) == resumable
    assert ("nothing to continue" in str(raised.value)) == (not resumable)
