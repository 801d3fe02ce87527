"""init_from= on real runs: a new run starts from another run's weights, heads re-initialised where the class
count differs, the encoder optionally frozen; a sweep varies the fine-tuning settings from one source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import compose_typed
from tests.sweep_runs import run_folders, sweep
from viseg.data.demo import DemoSpec, generate_demo_dataset
from viseg.errors import ConfigError
from viseg.training.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("data") / "demo", DemoSpec(n_cases=6), progress=False)


@pytest.fixture(scope="module")
def source(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch anatomy run (3 foreground classes): the weights to start from."""
    work = tmp_path_factory.mktemp("source")
    return train(compose_typed("anatomy_config", tiny(demo, work, "trainer.max_epochs=1")), progress=False).run_dir


def tiny(demo: Path, work: Path, *extra: str) -> list[str]:
    return [f"dataset.basepath={demo}", f"paths.cache={work / 'cache'}", f"paths.results={work / 'results'}",
            "splits.n_folds=3", "num_processes=1", "loader.num_workers=0", "patch_size=[16,32,32]",
            "plan.base_num_features=8", "trainer.iterations_per_epoch=2", "trainer.val_iterations=1", *extra]


def network_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")}


def test_a_lesion_run_starts_from_an_anatomy_run_with_its_heads_reinitialised(demo: Path, source: Path,
                                                                             tmp_path: Path, monkeypatch):
    """lesion_config predicts one class, the source three: every tensor but the heads comes from the source."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    from viseg.training import train as train_module

    real = train_module.initialise_from

    def spy(network, init_from):  # the network as fine-tuning starts, before any step
        report = real(network, init_from)
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
