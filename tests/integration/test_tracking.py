"""Experiment tracking (tracking=mlflow|wandb): a sweep's trials read back from a real local MLflow store, an
offline W&B run's files, and the errors a user gets without the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import compose_typed
from tests.sweep_runs import sweep
from viseg.data.demo import DemoSpec, generate_demo_dataset
from viseg.errors import ConfigError
from viseg.training.tracking import absolute_uri, sweep_variant
from viseg.training.train import train


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("data") / "demo", DemoSpec(n_cases=4), progress=False)


@pytest.fixture(scope="module")
def tiny(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """test_train's overrides for a seconds-long CPU run, on one cache: the dataset is preprocessed once."""
    return [f"dataset.basepath={demo}", f"paths.cache={tmp_path_factory.mktemp('cache')}", "splits.n_folds=3",
            "num_processes=1", "loader.num_workers=0", "patch_size=[16,32,32]", "trainer.max_epochs=2",
            "trainer.iterations_per_epoch=2", "trainer.val_iterations=1"]


def test_missing_package_fails_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = compose_typed("anatomy_config", [f"paths.results={tmp_path / 'results'}", f"paths.cache={tmp_path / 'c'}",
                                           "tracking=mlflow"])  # composes: a tracked run's config loads anywhere
    with pytest.raises(ConfigError, match=r"pip install 'viseg\[mlflow\]'"):
        train(cfg, progress=False)
    assert not (tmp_path / "results").exists() and not (tmp_path / "c").exists()


def test_sweep_variants_get_one_experiment_and_an_absolute_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///m.db") == f"sqlite:///{tmp_path.resolve() / 'm.db'}"
    assert absolute_uri("file:runs") == (tmp_path.resolve() / "runs").as_uri()
    assert absolute_uri("http://server:5000") == "http://server:5000"
    untracked = OmegaConf.to_yaml(OmegaConf.structured(compose_typed()))
    assert sweep_variant(untracked, "exp") == untracked
    tracked = OmegaConf.create(sweep_variant(OmegaConf.to_yaml(OmegaConf.structured(
        compose_typed("anatomy_config", ["tracking=mlflow"]))), "exp"))
    assert tracked.tracking.experiment == "exp"
    assert tracked.tracking.uri == f"sqlite:///{tmp_path.resolve() / 'results' / 'mlflow.db'}"


@pytest.mark.slow
def test_sweep_trials_are_mlflow_runs(tiny: list[str], tmp_path: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # two trials at once, as a sweep runs them: both open the store and the experiment together
    result = sweep(*tiny, "folds=0-1", "experiment=tracked", "tracking=mlflow", f"tracking.uri={uri}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tracked"], output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["default_fold0", "default_fold1"], [r.info for r in runs]
    client = MlflowClient(uri)
    for run in runs:
        fold = run.data.tags["fold"]
        assert run.info.run_name == f"{run.data.tags['variant']}_fold{fold}" and run.info.status == "FINISHED"
        assert run.data.params["trainer.max_epochs"] == "2" and run.data.params["fold"] == fold
        assert run.data.tags["resumed"] == "false" and run.data.tags["plan"].startswith("PlainConvUNet-3d_fullres")
        assert "viseg.version" in run.data.tags and "final/mean_dice" in run.data.metrics
        for metric in ("train/loss", "val/loss", "val/ema_pseudo_dice"):
            assert len(client.get_metric_history(run.info.run_id, metric)) == 2, metric  # one per epoch
        saved = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / f"dl{fold}")))
        run_dir = Path(run.data.tags["run_dir"])
        assert saved.read_text() == (run_dir / "config.yaml").read_text()
        assert run_dir.is_relative_to(tmp_path / "results" / "sweeps" / "tracked")


@pytest.mark.slow
def test_offline_wandb_run_writes_its_files(tiny: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    overrides = [*tiny, f"paths.results={tmp_path / 'results'}", "tracking=wandb", "trainer.max_epochs=1"]
    result = train(compose_typed("anatomy_config", overrides), progress=False)
    (offline,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    assert list(offline.glob("run-*.wandb"))
    assert (offline / "files" / "config.yaml").read_text() == (result.run_dir / "config.yaml").read_text()
