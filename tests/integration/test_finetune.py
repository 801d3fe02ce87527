"""Bringing models: init_from= starts a new run from another run's weights (heads re-initialised where the class
count differs, the encoder optionally frozen), a sweep varies the fine-tuning settings from one source, and
export-model makes one file of a run that predicts as the run does and is refused when changed."""

from __future__ import annotations

import hashlib
import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import compose_typed, tiny_run
from tests.sweep_runs import run_folders, sweep
from viseg.errors import ConfigError
from viseg.export_model import main as export_main
from viseg.training.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch anatomy run (3 foreground classes): the weights to start from."""
    work = tmp_path_factory.mktemp("source")
    return train(compose_typed("anatomy_config", tiny(demo, work, "trainer.max_epochs=1")), progress=False).run_dir


def tiny(demo: Path, work: Path, *extra: str) -> list[str]:
    return tiny_run(demo, work, "patch_size=[16,32,32]", "plan.base_num_features=8", *extra)


def network_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")}


def test_a_lesion_run_starts_from_an_anatomy_run_with_its_heads_reinitialised(demo: Path, source: Path,
                                                                             tmp_path: Path, monkeypatch):
    """lesion_config predicts one class, the source three: every tensor but the heads comes from the source."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    from viseg.training import train as train_module

    real = train_module.initialise_from

    def spy(network, *source):  # the network as fine-tuning starts, before any step
        report = real(network, *source)
        seen["start"] = {k: v.detach().clone() for k, v in network.state_dict().items()}
        return report

    monkeypatch.setattr(train_module, "initialise_from", spy)
    cfg = compose_typed("lesion_config", tiny(demo, tmp_path, "trainer.max_epochs=1", f"init_from={source}",
                                              "finetune.freeze_encoder_epochs=1", "finetune.lr=0.001"))
    result = train(cfg, progress=False)
    theirs = network_weights(source / "checkpoints" / "last.ckpt")
    start = seen["start"]
    heads = [k for k in start if "seg_layers" in k]
    assert heads and all(start[k].shape != theirs[k].shape for k in heads if k.endswith("weight"))
    assert all(torch.equal(start[k], theirs[k]) for k in start if k not in heads)

    report = json.loads((result.run_dir / "init_from.json").read_text())
    assert sorted(report["reinitialised"]) == sorted(k for k in heads if not k.startswith("decoder.encoder."))
    assert report["loaded"] and not any("seg_layers" in k for k in report["loaded"])
    log = (result.run_dir / "training_log.txt").read_text()
    assert f"initialised from {source / 'checkpoints' / 'last.ckpt'}" in log and "re-initialised" in log
    # a new run: epoch 0, its own schedule; the frozen epoch stepped at finetune.lr and left the encoder alone
    assert "training from epoch 0" in log and "lr 0.001" in log.split("epoch 0/0", 1)[1].split("\n", 1)[0]
    after = network_weights(result.run_dir / "checkpoints" / "last.ckpt")
    encoder = [k for k in after if k.startswith("encoder.")]
    assert all(torch.equal(after[k], theirs[k]) for k in encoder)
    assert not all(torch.equal(after[k], start[k]) for k in heads)


def test_another_topology_is_refused_naming_the_stage_and_the_plan_values(demo: Path, source: Path,
                                                                          tmp_path: Path):
    cfg = compose_typed("anatomy_config", tiny(demo, tmp_path, "trainer.max_epochs=1", f"init_from={source}",
                                               "patch_size=[16,64,64]"))
    with pytest.raises(ConfigError) as error:
        train(cfg, progress=False)
    assert "stage" in error.value.message and "patch_size=[16,32,32]" in error.value.fix
    assert f"plan.from={source}" in error.value.fix
    assert not list((tmp_path / "results").rglob("checkpoints/*.ckpt"))


def test_a_sweep_varies_the_finetuning_settings_from_one_source(demo: Path, source: Path, tmp_path: Path):
    result = sweep(*tiny(demo, tmp_path, "trainer.max_epochs=2"), f"init_from={source}",
                   "finetune.freeze_encoder_epochs=1,2", "folds=0", "max_concurrent_trials=1", "experiment=tune",
                   cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = run_folders(tmp_path / "results" / "sweeps" / "tune")
    assert len(runs) == 2
    theirs = network_weights(source / "checkpoints" / "last.ckpt")
    for name, run in runs.items():
        frozen = 2 if "freeze_encoder_epochs-2" in name else 1
        assert (run / "finished.json").is_file() and (run / "init_from.json").is_file()
        after = network_weights(run / "checkpoints" / "last.ckpt")
        unchanged = all(torch.equal(after[k], theirs[k]) for k in after if k.startswith("encoder.stages.1."))
        assert unchanged == (frozen == 2), name  # frozen for both epochs, or trained in the second


def _predict(model: str, images: Path, output: Path) -> dict[str, bytes]:
    from viseg.config import PredictConfig
    from viseg.predict import predict_command

    cfg = PredictConfig(model=model, input=str(images), output=str(output), mirror=False, device="cpu")
    assert predict_command(cfg, progress=False) == 0
    import nibabel as nib

    return {p.name: np.asarray(nib.load(p).dataobj).tobytes() for p in sorted(output.glob("*.nii.gz"))}


def test_an_exported_model_predicts_as_its_run_folder_and_a_tampered_one_is_refused(demo: Path, source: Path,
                                                                                   tmp_path: Path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where predict unpacks archives
    archive = tmp_path / "model.zip"
    assert export_main([str(source), str(archive)]) == 0
    with zipfile.ZipFile(archive) as opened:
        names = set(opened.namelist())
        manifest = json.loads(opened.read("manifest.json"))
    assert {"fold_0/plans.json", "fold_0/dataset.json", "fold_0/config.yaml", "fold_0/checkpoints/last.ckpt",
            "manifest.json"} <= names
    assert set(manifest["sha256"]) == names - {"manifest.json"} and manifest["checkpoint"] == "final"

    images = tmp_path / "images"
    images.mkdir()
    for case in ("demo_000", "demo_001"):
        (images / f"{case}_0000.nii.gz").symlink_to(demo / "imagesTr" / f"{case}_0000.nii.gz")
    from_run = _predict(str(source), images, tmp_path / "from_run")
    from_zip = _predict(str(archive), images, tmp_path / "from_zip")
    assert len(from_run) == 2 and from_zip == from_run
    # init_from= takes the archive too: the same weights as the run's own final checkpoint
    from viseg.training.init_weights import source_checkpoint

    assert network_weights(source_checkpoint(str(archive))).keys() == network_weights(
        source / "checkpoints" / "last.ckpt").keys()

    def rewritten(target: Path, change) -> Path:
        with zipfile.ZipFile(archive) as original, zipfile.ZipFile(target, "w") as copy:
            entries = {name: original.read(name) for name in original.namelist()}
            for name, data in change(entries).items():
                copy.writestr(name, data)
        return target

    def tamper(entries: dict[str, bytes]) -> dict[str, bytes]:
        entries["fold_0/config.yaml"] += b"\n# changed\n"
        return entries

    def escape(entries: dict[str, bytes]) -> dict[str, bytes]:
        manifest = json.loads(entries["manifest.json"])
        manifest["sha256"]["../outside.txt"] = hashlib.sha256(b"x").hexdigest()
        return {**entries, "manifest.json": json.dumps(manifest).encode(), "../outside.txt": b"x"}

    for change, why in ((tamper, "does not match its sha256"), (escape, "outside the model's folder")):
        bad = rewritten(tmp_path / f"{change.__name__}.zip", change)
        with pytest.raises(ConfigError) as error:
            _predict(str(bad), images, tmp_path / change.__name__)
        assert why in error.value.message and str(bad) in error.value.message
        assert not (tmp_path / "outside.txt").exists() and not (tmp_path / change.__name__).exists()
