"""Trained nnU-Net v2 model folders as they are: viseg predicts with them, fine-tunes from them and plans new
datasets like them (plan.from=). The folders are written as nnU-Net writes them (tests/nnunet_models.py), holding
the weights of a real viseg run, so that viseg's prediction through the nnU-Net folder can be compared voxel for
voxel with the run's own. Agreement with nnU-Net's own predictor on a model nnU-Net trained is the bench's
(bench/nnunet_import_vs_nnunet.py)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from tests.helpers import compose_typed, tiny_run
from tests.nnunet_models import nnunet_plans, write_nnunet_model
from viseg.config import PredictConfig
from viseg.errors import ConfigError
from viseg.planning.plans import Plans
from viseg.predict import predict_command
from viseg.training.train import train

pytestmark = pytest.mark.slow


def tiny(demo: Path, work: Path, *extra: str) -> list[str]:
    return tiny_run(demo, work, "trainer.max_epochs=1", *extra)


@pytest.fixture(scope="module")
def twins(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished viseg anatomy run, and an nnU-Net model folder holding its plan and weights."""
    work = tmp_path_factory.mktemp("twins")
    run = train(compose_typed("anatomy_config", tiny(demo, work, "patch_size=[16,32,32]", "plan.base_num_features=8")),
                progress=False).run_dir
    plans = Plans.load(run / "plans.json")
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    weights = {k.removeprefix("network."): v for k, v in state.items() if k.startswith("network.")}
    dataset_json = json.loads((demo / "dataset.json").read_text())
    model = write_nnunet_model(work / "nnUNet_results", nnunet_plans(plans, "3d_fullres"), dataset_json,
                               "3d_fullres", weights=weights)
    return run, model


def predict(model: str, images: Path, output: Path, **options) -> dict[str, np.ndarray]:
    cfg = PredictConfig(model=model, input=str(images), output=str(output), device="cpu", **options)
    assert predict_command(cfg, progress=False) == 0
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(output.glob("*.nii.gz"))}


def test_an_nnunet_model_folder_predicts_what_the_same_network_predicts_in_viseg(demo: Path, twins, tmp_path: Path,
                                                                               caplog):
    run, model = twins
    images = tmp_path / "images"
    images.mkdir()
    case = sorted((demo / "imagesTr").glob("*_0000.nii.gz"))[0]
    (images / case.name).symlink_to(case)
    caplog.set_level("INFO")
    through_nnunet = predict(str(model), images, tmp_path / "nnunet", folds="0")
    assert "checkpoint_final.pth" in caplog.text and "trainer nnUNetTrainer" in caplog.text
    own = predict(str(run), images, tmp_path / "viseg")
    name = case.name.replace("_0000", "")
    assert list(through_nnunet) == [name]
    assert np.array_equal(through_nnunet[name], own[name])  # mirrored along the checkpoint's axes (0, 1, 2)
    assert len(np.unique(through_nnunet[name])) > 1
    written, given = nib.load(tmp_path / "nnunet" / name), nib.load(case)
    assert written.shape == given.shape and np.allclose(written.affine, given.affine)


def test_folds_pick_the_folds_of_an_nnunet_model(demo: Path, twins, tmp_path: Path):
    from viseg.inference.ensemble import resolve_model

    run, _ = twins
    dataset_json = json.loads((demo / "dataset.json").read_text())
    model = write_nnunet_model(tmp_path, nnunet_plans(Plans.load(run / "plans.json"), "3d_fullres"), dataset_json,
                               "3d_fullres", folds=(0, 2))
    assert [p.name for p in resolve_model(str(model)).run_dirs] == ["fold_0", "fold_2"]
    assert [p.name for p in resolve_model(str(model), folds="2").run_dirs] == ["fold_2"]
    with pytest.raises(ConfigError) as error:
        resolve_model(str(model), folds="0,1")
    assert "fold_1/checkpoint_final.pth" in error.value.message and "fold_0" in error.value.fix


def test_plan_from_and_init_from_an_nnunet_model_fine_tune_it_on_another_label_set(demo: Path, twins,
                                                                                 tmp_path: Path):
    """lesion_config (1 class) from the 3-class nnU-Net model: the plan is the model's, every tensor but the
    heads is loaded, and the run trains from there."""
    run, model = twins
    cfg = compose_typed("lesion_config", tiny(demo, tmp_path, f"plan.from_model={model}", f"init_from={model}"))
    result = train(cfg, progress=False)
    report = json.loads((result.run_dir / "init_from.json").read_text())
    assert report["source"] == str(model / "fold_0" / "checkpoint_final.pth")
    assert report["reinitialised"] and all("seg_layers" in k for k in report["reinitialised"])
    source_cfg = yaml.safe_load((run / "config.yaml").read_text())
    resolved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    for key in ("patch_size", "spacing", "transpose_forward"):
        assert resolved[key] == source_cfg[key], key
    assert resolved["model"]["model_args"]["features_per_stage"] == source_cfg["model"]["model_args"][
        "features_per_stage"]
    assert resolved["foreground_labels"] == [3]
    plans = Plans.load(result.run_dir / "plans.json")
    assert plans.planner["plan_from"] == str(model) and plans.planner["plan_from_kind"] == "nnU-Net"


def test_plan_from_a_viseg_run_lets_init_from_fit_and_refuses_another_patch(demo: Path, twins, tmp_path: Path):
    run, _ = twins
    cfg = compose_typed("lesion_config", tiny(demo, tmp_path, f"plan.from_model={run}", f"init_from={run}"))
    result = train(cfg, progress=False)
    assert json.loads((result.run_dir / "init_from.json").read_text())["loaded"]
    clash = compose_typed("lesion_config", tiny(demo, tmp_path / "b", f"plan.from_model={run}",
                                                "patch_size=[16,64,64]"))
    with pytest.raises(ConfigError) as error:
        train(clash, progress=False)
    assert "patch_size" in error.value.message and "drop patch_size=" in error.value.fix


def test_plan_from_on_the_command_line_is_the_plan_key(demo: Path, twins, tmp_path: Path, capsys):
    from viseg.plan import main as plan_main

    _, model = twins
    try:
        plan_main([*tiny(demo, tmp_path), f"plan.from={model}"])
    except SystemExit as stopped:  # Hydra's app exits only on an error
        assert stopped.code in (0, None)
    assert f"plan from          {model} (nnU-Net, PlainConvUNet)" in capsys.readouterr().out
