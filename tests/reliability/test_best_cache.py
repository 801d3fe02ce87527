"""best= reuses a cached prediction only when the weights, mirroring and step that made it are unchanged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import compose_typed
from viseg.data.demo import DemoSpec, generate_demo_dataset
from viseg.sweep.best import cached_key, select_best
from viseg.training.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished fold (last.ckpt and best.ckpt) under `<experiment>/runs/`, as a sweep leaves it."""
    work = tmp_path_factory.mktemp("best_cache")
    demo = generate_demo_dataset(work / "demo", DemoSpec(n_cases=6), progress=False)
    overrides = [f"dataset.basepath={demo}", f"paths.cache={work / 'cache'}",
                 f"paths.results={work / 'experiment' / 'runs'}", "splits.n_folds=3", "num_processes=1",
                 "loader.num_workers=0", "patch_size=[16,32,32]", "trainer.max_epochs=2",
                 "trainer.iterations_per_epoch=2", "trainer.val_iterations=1"]
    run_dir = train(compose_typed("anatomy_config", overrides), progress=False).run_dir
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    return work / "experiment"


def predictions(experiment: Path) -> dict[str, tuple[int, dict | None]]:
    """case file -> (mtime_ns, stored key)."""
    files = sorted((experiment / "selection" / "predictions").rglob("*.npz"))
    assert files
    return {p.name: (p.stat().st_mtime_ns, cached_key(p)) for p in files}


def test_a_changed_checkpoint_choice_mirroring_or_weights_file_is_predicted_again(experiment: Path, tmp_path: Path):
    exp = tmp_path / "experiment"
    shutil.copytree(experiment, exp)
    select_best(exp, ensembles=False, checkpoint="final", mirror=False, progress=False)
    first = predictions(exp)
    assert all(key["weights"] == "final" and key["checkpoint_file"].endswith("last.ckpt")
               and key["mirror_axes"] is None and key["step"] == 0.5 for _, key in first.values())

    select_best(exp, ensembles=False, checkpoint="final", mirror=False, progress=False)
    assert predictions(exp) == first  # same producer: nothing predicted again

    report = select_best(exp, ensembles=False, checkpoint="best", mirror=False, progress=False)
    by_best = predictions(exp)
    assert report["checkpoint"] == "best"
    assert all(key["weights"] == "best" and key["checkpoint_file"].endswith("best.ckpt")
               for _, key in by_best.values())
    assert all(by_best[name][0] != first[name][0] for name in first)

    select_best(exp, ensembles=False, checkpoint="best", mirror=True, progress=False)
    mirrored = predictions(exp)
    assert all(key["mirror_axes"] for _, key in mirrored.values())

    # the same weights file rewritten (e.g. training continued): its identity changes, so predict again
    best_ckpt = next(exp.rglob("checkpoints/best.ckpt"))
    stat = best_ckpt.stat()
    os.utime(best_ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    select_best(exp, ensembles=False, checkpoint="best", mirror=True, progress=False)
    assert all(predictions(exp)[name][0] != mirrored[name][0] for name in mirrored)


def test_a_prediction_without_a_key_is_not_trusted(experiment: Path, tmp_path: Path):
    """A cache written before keys existed (or by hand) holds no key: it is predicted again."""
    exp = tmp_path / "experiment"
    shutil.copytree(experiment, exp)
    select_best(exp, ensembles=False, checkpoint="final", mirror=False, progress=False)
    stale = next((exp / "selection" / "predictions").rglob("*.npz"))
    good = np.load(stale)["probabilities"]
    np.savez_compressed(stale, probabilities=np.zeros_like(good))  # no key, wrong probabilities
    assert cached_key(stale) is None
    select_best(exp, ensembles=False, checkpoint="final", mirror=False, progress=False)
    assert json.loads(json.dumps(cached_key(stale)))["weights"] == "final"
    np.testing.assert_array_equal(np.load(stale)["probabilities"], good)
