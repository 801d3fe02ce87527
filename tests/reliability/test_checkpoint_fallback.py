"""A damaged latest checkpoint: resume falls back to the previous one and says so; none is ever loaded."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import compose_typed
from viseg.data.demo import DemoSpec, generate_demo_dataset
from viseg.training.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("fallback")
    demo = generate_demo_dataset(work / "demo", DemoSpec(n_cases=6), progress=False)
    overrides = [f"dataset.basepath={demo}", f"paths.cache={work / 'cache'}", f"paths.results={work / 'results'}",
                 "splits.n_folds=3", "num_processes=1", "loader.num_workers=0", "patch_size=[16,32,32]",
                 "trainer.max_epochs=2", "trainer.iterations_per_epoch=2", "trainer.val_iterations=1"]
    return train(compose_typed("anatomy_config", overrides), progress=False).run_dir


def continue_run(run_dir: Path, epochs: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "viseg.train", f"continue_from={run_dir}",
                           f"trainer.max_epochs={epochs}"], capture_output=True, text=True, timeout=600)


def test_truncated_last_checkpoint_falls_back_to_the_previous_one(finished_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(run)], check=True)
    last, previous = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "previous.ckpt"
    assert previous.is_file()  # written by the second epoch: the first epoch's last.ckpt
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    result = continue_run(run, 3)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "last.ckpt is unreadable" in output and "previous.ckpt instead" in output
    # previous.ckpt ended epoch 0: epochs 1 and 2 are trained now, the history has every epoch once
    with open(run / "metrics.csv") as handle:
        assert [int(float(r["epoch"])) for r in csv.DictReader(handle)] == [0, 1, 2]
    finished = json.loads((run / "finished.json").read_text())
    assert finished["epochs"] == 3
    # the quality bench takes the full-case validation out of the wall time, as nnU-Net's is timed apart there
    assert 0 < finished["validation_seconds"] < finished["seconds"]


def test_no_readable_checkpoint_is_a_clear_error_naming_both_files(finished_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(run)], check=True)
    for name in ("last.ckpt", "previous.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"not a checkpoint")
    result = continue_run(run, 3)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "last.ckpt is unreadable" in result.stderr and "previous.ckpt is unreadable" in result.stderr
    assert "fix:" in result.stderr and "Traceback" not in result.stderr
