"""Training end to end on real NIfTI files: run folders, caching, learning, kill and continue."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import viseg
from tests.helpers import compose_typed
from viseg.data.demo import DemoSpec, generate_demo_dataset
from viseg.errors import ConfigError
from viseg.preprocessing.prepare import prepare
from viseg.preprocessing.preprocess import preprocess_dataset
from viseg.training.train import run_dir_for, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("data") / "demo", DemoSpec(n_cases=6), progress=False)


def tiny(demo: Path, work: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long CPU run: small patch, few iterations, no loader workers."""
    return [f"dataset.basepath={demo}", f"paths.cache={work / 'cache'}", f"paths.results={work / 'results'}",
            "splits.n_folds=3", "num_processes=1", "loader.num_workers=0", "patch_size=[16,32,32]",
            "trainer.max_epochs=2", "trainer.iterations_per_epoch=2", "trainer.val_iterations=1", *extra]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(("config_name", "labels"), [("anatomy_config", ["1", "2", "3"]), ("lesion_config", ["3"])])
def test_run_folder_is_complete(demo: Path, tmp_path: Path, config_name: str, labels: list[str]):
    reports: list[tuple[dict, Path]] = []
    result = train(compose_typed(config_name, tiny(demo, tmp_path)), progress=False,
                   report=lambda metrics, checkpoints: reports.append((metrics, checkpoints)))
    run = result.run_dir
    # the reporting hook (the Ray adapter's entry point) sees every epoch once its checkpoint is on disk
    assert [int(m["epoch"]) for m, _ in reports] == [0, 1]
    assert all((c / "last.ckpt").is_file() and "val/ema_pseudo_dice" in m for m, c in reports)
    assert run.parts[-2:] == (config_name.split("_")[0], "fold_0")
    for name in ("plans.json", "dataset.json", "splits.json", "config.yaml", "progress.png", "metrics.csv",
                 "finished.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "validation/summary.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.patch_size == [16, 32, 32] and saved.model.model_args.n_stages >= 3
    assert saved.num_classes == len(labels) + 1 and saved.foreground_labels == [int(v) for v in labels]
    rows = read_metrics(run)
    assert [int(float(r["epoch"])) for r in rows] == [0, 1]
    assert {"train/loss", "val/loss", "val/ema_pseudo_dice", "lr", "epoch_time"} <= set(rows[0])
    summary = OmegaConf.to_container(OmegaConf.load(run / "validation" / "summary.json"))
    assert sorted(summary["cases"]) == sorted(OmegaConf.load(run / "splits.json")[0]["val"])
    assert list(summary["mean_dice_per_class"]) == labels
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["viseg"]["config_yaml"] == (run / "config.yaml").read_text()
    assert list(checkpoint["viseg"]["plans"]["configurations"]["3d_fullres"]["patch_size"]) == [16, 32, 32]
    assert_training_log(run / "training_log.txt", epochs=2, classes=len(labels))
    code = json.loads((run / "code.json").read_text())  # which code trained it: this checkout's commit
    assert code["version"] == viseg.__version__ and len(code["commit"]) == 40 and isinstance(code["dirty"], bool)


def assert_training_log(path: Path, epochs: int, classes: int) -> None:
    """nnU-Net's habit: the start with the device, one plain line per epoch with every field, the end."""
    lines = path.read_text().splitlines()
    assert f"training from epoch 0 of {epochs} on cpu (32-true precision)" in lines[0], lines
    per_epoch = [line for line in lines if "  epoch " in line]
    assert [line.split("  epoch ")[1].split()[0] for line in per_epoch] == [f"{e}/{epochs - 1}" for e in range(epochs)]
    for line in per_epoch:
        for field in ("train_loss ", "val_loss ", "ema 0.", "lr 0.", " s"):
            assert field in line, (field, line)
        assert len(line.split("pseudo_dice [")[1].split("]")[0].split()) == classes, line
    assert "new best" in per_epoch[0]
    assert f"training ended after epoch {epochs - 1}; best EMA pseudo-Dice" in lines[-1], lines


def test_preprocessing_runs_once_for_runs_sharing_a_plan(demo: Path, tmp_path: Path):
    first = train(compose_typed("anatomy_config", tiny(demo, tmp_path, "trainer.max_epochs=1")), progress=False)
    folder = preprocess_dataset(prepare(compose_typed("anatomy_config", tiny(demo, tmp_path)), progress=False),
                                progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    # a second run (another fold, another lr) over the same plan reuses every preprocessed case
    second = train(compose_typed("anatomy_config", tiny(demo, tmp_path, "fold=1", "trainer.max_epochs=1",
                                                        "optimizer.lr=0.02")), progress=False)
    assert first.run_dir != second.run_dir
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert len(list(folder.glob("*_data.npy"))) == 6


def test_a_trained_network_beats_a_floor_a_broken_pipeline_cannot_reach(demo: Path, tmp_path: Path):
    """The organ is large and bright: even a short CPU training must segment it well. A pipeline whose
    labels and images were misaligned, unnormalised or mislabelled stays far below."""
    result = train(compose_typed("anatomy_config", tiny(demo, tmp_path, "trainer.max_epochs=8",
                                                        "trainer.iterations_per_epoch=6")), progress=False)
    organ = result.validation["mean_dice_per_class"]["1"]
    assert organ > 0.6, result.validation


def _viseg_train(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "viseg.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_first_checkpoint(process: subprocess.Popen, run_dir: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.csv").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file():
            return
        if process.poll() is not None:
            pytest.fail(f"training ended before its first checkpoint:\n{process.stdout.read()}")
        time.sleep(0.1)
    pytest.fail("no checkpoint within the time limit")


def test_sigkill_then_continue_ends_where_an_uninterrupted_run_would(demo: Path, tmp_path: Path):
    overrides = tiny(demo, tmp_path, "trainer.max_epochs=4")
    cfg = compose_typed("anatomy_config", overrides)
    run_dir = run_dir_for(cfg, prepare(cfg, progress=False))
    process = _viseg_train(*overrides, cwd=tmp_path)
    _wait_for_first_checkpoint(process, run_dir)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (run_dir / "finished.json").exists()
    epochs_done = len(read_metrics(run_dir))
    assert epochs_done < 4
    started = json.loads((run_dir / "code.json").read_text())
    (run_dir / "code.json").write_text(json.dumps({**started, "commit": "0000000000ab" + "0" * 28}))

    resumed = subprocess.run([sys.executable, "-m", "viseg.train", f"continue_from={run_dir}"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # it started with "other" code (as after a checkout between the kill and the continue): said, not hidden
    assert "continues with other code than it started with (commit 0000000000ab" in resumed.stdout + resumed.stderr
    rows = read_metrics(run_dir)
    assert [int(float(r["epoch"])) for r in rows] == [0, 1, 2, 3]
    # poly: lr0 * (1 - epoch / max_epochs) ** 0.9, exactly what an uninterrupted run uses in its last epoch
    assert float(rows[-1]["lr"]) == pytest.approx(0.01 * (1 - 3 / 4) ** 0.9, rel=1e-6)
    torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert (run_dir / "finished.json").is_file()
    # off a terminal the command prints the log's lines; the log gained the continued part
    assert "  epoch 3/3  train_loss" in resumed.stdout, resumed.stdout
    log = (run_dir / "training_log.txt").read_text()
    assert "continuing at epoch" in log and log.count("training from epoch 0 of 4") == 1


def test_continue_refuses_locked_overrides_and_warns_about_horizons(demo: Path, tmp_path: Path):
    result = train(compose_typed("anatomy_config", tiny(demo, tmp_path, "trainer.max_epochs=1")), progress=False)
    locked = subprocess.run([sys.executable, "-m", "viseg.train", f"continue_from={result.run_dir}",
                             "model.model_args.n_stages=3", "optimizer.lr=0.1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert locked.returncode == 2
    assert "model.model_args.n_stages, optimizer.lr cannot change" in locked.stderr
    longer = subprocess.run([sys.executable, "-m", "viseg.train", f"continue_from={result.run_dir}",
                             "trainer.max_epochs=2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert longer.returncode == 0, longer.stdout + longer.stderr
    assert "keeps the horizon" in longer.stdout + longer.stderr
    assert [int(float(r["epoch"])) for r in read_metrics(result.run_dir)] == [0, 1]


def test_a_second_run_into_the_same_folder_is_refused(demo: Path, tmp_path: Path):
    cfg = compose_typed("anatomy_config", tiny(demo, tmp_path, "trainer.max_epochs=1"))
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, progress=False)


def test_hydra_multirun_trains_one_run_per_fold(demo: Path, tmp_path: Path):
    """The training docs' `-m fold=0,1`: one process, one run folder per fold."""
    overrides = tiny(demo, tmp_path, "trainer.max_epochs=1", "trainer.iterations_per_epoch=1")
    result = subprocess.run([sys.executable, "-m", "viseg.train", "-m", "fold=0,1", *overrides], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    finished = sorted(p.parent.name for p in (tmp_path / "results").rglob("finished.json"))
    assert finished == ["fold_0", "fold_1"]


def test_an_ignore_label_is_trained_around_and_never_predicted(demo: Path, tmp_path: Path):
    """dataset.json's `ignore` (nnU-Net's sparse annotation, here value 4 on a slab of every label file):
    no network output for it, no score for it, and no prediction ever holds it."""
    import json
    import shutil

    import nibabel as nib
    import numpy as np

    from viseg.config import PredictConfig
    from viseg.predict import predict_command

    sparse = tmp_path / "sparse"
    shutil.copytree(demo, sparse)
    raw = json.loads((sparse / "dataset.json").read_text())
    raw["labels"]["ignore"] = 4
    (sparse / "dataset.json").write_text(json.dumps(raw))
    for path in sorted((sparse / "labelsTr").glob("*.nii.gz")):
        image = nib.load(str(path))
        label = np.asanyarray(image.dataobj).copy()
        label[: label.shape[0] // 3] = 4  # an unannotated third of the field of view (x axis on disk)
        nib.save(nib.Nifti1Image(label, image.affine, image.header), str(path))
    result = train(compose_typed("anatomy_config", tiny(sparse, tmp_path, "trainer.max_epochs=1")), progress=False)
    run = result.run_dir
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.foreground_labels == [1, 2, 3] and saved.num_classes == 4
    assert list(result.validation["mean_dice_per_class"]) == ["1", "2", "3"]
    rows = read_metrics(run)
    assert all(np.isfinite(float(rows[-1][key])) for key in ("train/loss", "val/loss"))
    image = next((sparse / "imagesTr").glob("*_0000.nii.gz"))
    cfg = PredictConfig(model=str(run), input=str(image), output=str(tmp_path / "predicted"), mirror=False,
                        device="cpu", save_probabilities=True)
    assert predict_command(cfg, progress=False) == 0
    case = image.name.removesuffix("_0000.nii.gz")
    predicted = np.asanyarray(nib.load(str(tmp_path / "predicted" / f"{case}.nii.gz")).dataobj)
    assert set(np.unique(predicted).tolist()) <= {0, 1, 2, 3}
    with np.load(tmp_path / "predicted" / f"{case}.npz") as stored:
        assert stored["probabilities"].shape[0] == 4 and list(stored["labels"]) == [0, 1, 2, 3]
