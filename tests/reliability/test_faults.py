"""SIGKILL at the worst moments of a real training process: mid-checkpoint-write and mid-preprocessing.

Nothing half-written may ever be trusted: the run continues from its last complete checkpoint, and the
preprocessing cache ends up identical to one written without interruption.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import compose_typed
from viseg.data.demo import DemoSpec, generate_demo_dataset
from viseg.io.checkpoints import unreadable_reason
from viseg.io.jsonio import read_json

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("faults") / "demo", DemoSpec(n_cases=20), progress=False)


def overrides(demo: Path, work: Path, epochs: int) -> list[str]:
    return [f"dataset.basepath={demo}", f"paths.cache={work / 'cache'}", f"paths.results={work / 'results'}",
            "splits.n_folds=3", "num_processes=1", "loader.num_workers=0", "patch_size=[16,32,32]",
            f"trainer.max_epochs={epochs}", "trainer.iterations_per_epoch=2", "trainer.val_iterations=1"]


def start_training(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "viseg.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)


def kill_when(process: subprocess.Popen, condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """SIGKILL the process group the moment `condition` holds (polled every millisecond)."""
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            if process.poll() is not None:
                pytest.fail(f"training ended before {what}:\n{process.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.001)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


def run_train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "viseg.train", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_kill_mid_checkpoint_write_resumes_from_a_complete_checkpoint(demo: Path, tmp_path: Path):
    args = overrides(demo, tmp_path, epochs=6)
    process = start_training(args)
    runs = tmp_path / "results"

    def writing_a_later_checkpoint() -> bool:
        # after the first epoch's last.ckpt exists, catch Lightning writing the next one
        for tmp in runs.rglob("checkpoints/.last.ckpt.*.tmp"):
            if (tmp.parent / "last.ckpt").exists() or (tmp.parent / "previous.ckpt").exists():
                return True
        return False

    kill_when(process, writing_a_later_checkpoint, "a checkpoint write after the first epoch")
    checkpoints = next(runs.rglob("checkpoints"))
    complete = [p for p in (checkpoints / "last.ckpt", checkpoints / "previous.ckpt") if p.is_file()]
    assert complete and all(unreadable_reason(p) is None for p in complete)  # never a torn file under a real name

    run_dir = checkpoints.parent
    result = run_train([f"continue_from={run_dir}"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert read_json(run_dir / "finished.json")["epochs"] == 6


def preprocessed_markers(cache: Path) -> list[Path]:
    return [p for p in cache.glob("*/preprocessed/*/*.json") if p.name != "manifest.json"]


def test_kill_mid_preprocessing_leaves_a_cache_identical_to_an_uninterrupted_one(demo: Path, tmp_path: Path):
    from viseg.preprocessing.prepare import prepare
    from viseg.preprocessing.preprocess import load_case, preprocess_dataset

    args = overrides(demo, tmp_path, epochs=1)
    process = start_training(args)
    kill_when(process, lambda: 3 <= len(preprocessed_markers(tmp_path / "cache")) < 20, "preprocessing half done")
    assert len(preprocessed_markers(tmp_path / "cache")) < 20

    result = run_train(args)  # the same command again: the cache is completed, training runs
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    clean = tmp_path / "clean"
    folder = preprocess_dataset(prepare(compose_typed("anatomy_config", overrides(demo, clean, 1)), progress=False),
                                num_processes=1, progress=False)
    resumed = next((tmp_path / "cache").glob("*/preprocessed/*"))
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in folder.iterdir())
    for marker in preprocessed_markers(clean / "cache"):
        ours, theirs = load_case(resumed, marker.stem, mmap=False), load_case(folder, marker.stem, mmap=False)
        for a, b in zip(ours[:2], theirs[:2]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
