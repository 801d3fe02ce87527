"""Region-based training (nnU-Net's regions) end to end on the demo's region variant: dataset.json maps "organ" to
the organ including its lesions (values 1 and 3), "vessel" and "lesion" to one value each, with
regions_class_order [1, 2, 3]. The network has one sigmoid output per region; prediction thresholds them and
writes label values back by that order; evaluate scores the regions."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import compose_typed, tiny_run
from viseg.config import PredictConfig
from viseg.data.demo import DemoSpec, generate_demo_dataset
from viseg.evaluation.evaluate import EvaluateConfig, evaluate_folders
from viseg.planning.network import build_model
from viseg.planning.plans import Plans
from viseg.predict import predict_command
from viseg.training.train import train

pytestmark = pytest.mark.slow
REGIONS = ((1, 3), (2,), (3,))


@pytest.fixture(scope="module")
def region_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("data") / "regions", DemoSpec(n_cases=6, regions=True),
                                 progress=False)


@pytest.fixture(scope="module")
def region_run(region_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("regions")
    cfg = compose_typed("anatomy_config", tiny_run(region_demo, work, "trainer.max_epochs=2", "patch_size=[16,32,32]",
                                                   "plan.base_num_features=8"))
    return train(cfg, progress=False).run_dir


def test_a_region_plan_has_one_sigmoid_output_per_region(region_run: Path):
    plans = Plans.load(region_run / "plans.json")
    assert plans.regions == REGIONS and plans.regions_class_order == (1, 2, 3)
    assert plans.region_names == ("organ", "vessel", "lesion") and plans.foreground_labels == (1, 2, 3)
    network = build_model(plans, "3d_fullres", deep_supervision=False)
    with torch.no_grad():
        output = network(torch.zeros(1, 1, *plans.configuration("3d_fullres").patch_size))
    assert output.shape[1] == 3  # no background output
    validation = json.loads((region_run / "validation" / "summary.json").read_text())
    assert list(validation["mean_dice_per_class"]) == ["(1, 3)", "2", "3"]
    log = (region_run / "training_log.txt").read_text()
    assert "pseudo" in log.lower()


def test_prediction_thresholds_the_regions_and_writes_labels_by_regions_class_order(region_demo: Path,
                                                                                   region_run: Path, tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    cases = sorted((region_demo / "imagesTr").glob("*_0000.nii.gz"))[:2]
    for case in cases:
        (images / case.name).symlink_to(case)
    output = tmp_path / "predicted"
    cfg = PredictConfig(model=str(region_run), input=str(images), output=str(output), device="cpu",
                        save_probabilities=True, mirror=False)
    assert predict_command(cfg, progress=False) == 0
    for case in cases:
        name = case.name.replace("_0000", "")
        labels = np.asarray(nib.load(output / name).dataobj)
        with np.load(output / name.replace(".nii.gz", ".npz")) as npz:
            probabilities, written, regions = npz["probabilities"], npz["labels"], npz["regions"]
        assert probabilities.shape == (3, *labels.shape)
        assert written.tolist() == [1, 2, 3] and regions.tolist() == [[1, 3], [2, -1], [3, -1]]
        assert probabilities.min() >= 0 and probabilities.max() <= 1
        # sigmoid outputs, not a softmax: the channels do not sum to 1
        assert not np.allclose(probabilities.sum(0), 1.0, atol=1e-3)
        expected = np.zeros(labels.shape, dtype=np.uint8)
        for channel, value in enumerate((1, 2, 3)):  # later regions over earlier ones
            expected[probabilities[channel] > 0.5] = value
        assert np.array_equal(labels, expected)
    reference = tmp_path / "reference"  # the predicted cases' labels, with the dataset.json beside them
    (reference / "labelsTr").mkdir(parents=True)
    (reference / "dataset.json").symlink_to(region_demo / "dataset.json")
    for case in cases:
        name = case.name.replace("_0000", "")
        (reference / "labelsTr" / name).symlink_to(region_demo / "labelsTr" / name)
    summary, _ = evaluate_folders(EvaluateConfig(pred=str(output), ref=str(reference / "labelsTr"),
                                                 num_processes=1), progress=False)
    assert summary["labels"] == [[1, 3], 2, 3]
    assert set(summary["mean"]) == {"(1, 3)", "2", "3"}
    assert all(0.0 <= summary["mean"][k]["Dice"] <= 1.0 for k in summary["mean"] if summary["mean"][k]["Dice"])
