"""Region-based labels (nnU-Net's regions): parsing and verifying dataset.json, the BCE + Dice loss, the pseudo-Dice,
labels from sigmoid outputs, postprocessing and model selection on regions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from viseg.data.labels import LabelEncoding, planned_labels, region_problems, split_region_labels
from viseg.data.pathfinders import DefaultNNUnetFormatPathFinder
from viseg.data.verify import check_dataset_info
from viseg.errors import ConfigError
from viseg.inference.ensemble import Postprocessing
from viseg.inference.export import keep_largest_component, probabilities_to_labels
from viseg.io.layout import foreground_key, label_of_foreground_key
from viseg.preprocessing.preprocess import sample_foreground_locations
from viseg.sweep.best import Reference, choose_postprocessing, score
from viseg.training.loss import DeepSupervisionLoss, RegionDiceBCELoss, region_targets
from viseg.training.module import region_confusion_counts

BRATS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


def test_region_labels_become_label_values_and_regions():
    labels, regions = split_region_labels(BRATS, [1, 2, 3])
    assert labels == {"background": 0, "label_1": 1, "label_2": 2, "enhancing tumor": 3}
    assert regions.regions == ((1, 2, 3), (2, 3), (3,)) and regions.class_order == (1, 2, 3)
    assert regions.names == ("whole tumor", "tumor core", "enhancing tumor")
    assert region_problems(regions, (1, 2, 3)) == []


@pytest.mark.parametrize(("order", "expected"), [
    (None, "no regions_class_order"),
    ([1, 2], "has 2 entries for 3 regions"),
    ([1, 2, 7], "lists [7], which no region contains"),
    ([3, 2, 1], "label value 1 comes back as 3"),  # whole tumour alone would write 3
])
def test_region_definitions_that_cannot_give_the_labels_back_are_problems(order, expected):
    _, regions = split_region_labels(BRATS, order)
    problems = region_problems(regions, (1, 2, 3))
    assert problems and expected in problems[0][0], problems


def _dataset(root: Path, labels: dict, **extra) -> DefaultNNUnetFormatPathFinder:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": 0,
                                                   "file_ending": ".nii.gz", **extra}))
    return DefaultNNUnetFormatPathFinder(root)


def test_verification_reads_regions_and_names_a_missing_class_order(tmp_path: Path):
    info = _dataset(tmp_path / "ok", BRATS, regions_class_order=[1, 2, 3]).discover().info
    assert info is not None and info.regions is not None and info.regions.class_order == (1, 2, 3)
    assert check_dataset_info(info, 0) == []
    info = _dataset(tmp_path / "no_order", BRATS).discover().info
    problems = check_dataset_info(info, 0)
    assert [p.check for p in problems] == ["regions"]
    assert "regions_class_order" in problems[0].message and str(tmp_path / "no_order" / "dataset.json") in \
        problems[0].message and "one label value per region" in problems[0].fix


def test_foreground_labels_cannot_narrow_a_region_dataset():
    labels, regions = split_region_labels(BRATS, [1, 2, 3])
    fields = planned_labels(labels, regions.regions, regions.names, regions.class_order, None, "BraTS")
    assert fields["foreground_labels"] == (1, 2, 3) and fields["regions"] == ((1, 2, 3), (2, 3), (3,))
    with pytest.raises(ConfigError, match="regions"):
        planned_labels(labels, regions.regions, regions.names, regions.class_order, [1], "BraTS")


def _nnunet_dc_and_bce(logits: torch.Tensor, regions: torch.Tensor, batch_dice: bool) -> torch.Tensor:
    """nnU-Net's DC_and_BCE_loss without an ignore label, written out from its source."""
    x = torch.sigmoid(logits)
    axes = tuple(range(2, x.ndim))
    intersect, sum_pred, sum_gt = (x * regions).sum(axes), x.sum(axes), regions.sum(axes)
    if batch_dice:
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    dice = ((2 * intersect + 1e-5) / (sum_gt + sum_pred + 1e-5).clamp_min(1e-8)).mean()
    return F.binary_cross_entropy_with_logits(logits, regions) - dice


@pytest.mark.parametrize("batch_dice", [False, True])
def test_the_region_loss_is_nnunets_dc_and_bce(batch_dice: bool):
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (2, 1, 6, 6), generator=generator)
    logits = torch.randn(2, 3, 6, 6, generator=generator)
    region_codes = ((1, 2, 3), (2, 3), (3,))
    regions = region_targets(codes, region_codes)
    assert torch.equal(regions[:, 1:2], ((codes == 2) | (codes == 3)).float())
    loss = RegionDiceBCELoss(batch_dice, region_codes)(logits, codes)
    assert torch.allclose(loss, _nnunet_dc_and_bce(logits, regions, batch_dice))


def test_the_region_loss_skips_ignored_voxels_and_trains_deep_supervision():
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 3, (2, 1, 8, 8), generator=generator)
    logits = torch.randn(2, 2, 8, 8, generator=generator, requires_grad=True)
    loss = RegionDiceBCELoss(False, ((1, 2), (2,)), ignore_index=3)
    ignored = codes.clone()
    ignored[:, :, :4] = 3
    changed = logits.detach().clone()
    changed[:, :, :4] += 5.0  # what the network says on ignored voxels does not matter
    assert torch.allclose(loss(logits.detach(), ignored), loss(changed, ignored))
    assert not torch.allclose(loss(logits.detach(), codes), loss(changed, codes))
    deep = DeepSupervisionLoss(loss, 2)
    total = deep([logits, logits[:, :, ::2, ::2]], codes)
    total.backward()
    assert logits.grad is not None and torch.isfinite(total)


def test_region_pseudo_dice_counts_per_region():
    codes = torch.tensor([[[[0, 1, 2, 2]]]])
    inside = torch.tensor([[[[False, True, True, False]], [[True, False, True, False]]]])
    counts = region_confusion_counts(inside, codes, ((1, 2), (2,)))
    # region (1, 2) is [_, x, x, x]: tp 2, fp 0, fn 1; region (2,) is [_, _, x, x]: tp 1, fp 1, fn 1
    assert counts.tolist() == [[2, 1], [0, 1], [1, 1]]
    ignored = region_confusion_counts(inside, codes.masked_fill(codes == 0, 9), ((1, 2), (2,)), ignore_index=9)
    assert ignored.tolist() == [[2, 1], [0, 0], [1, 1]]  # the false positive sat on an ignored voxel


def test_region_outputs_become_labels_by_regions_class_order():
    probabilities = np.array([[0.9, 0.9, 0.9, 0.2], [0.1, 0.8, 0.7, 0.9], [0.0, 0.1, 0.6, 0.9]])
    # whole tumour, core, enhancing: later regions over earlier ones; enhancing alone still writes 3
    assert probabilities_to_labels(probabilities, (0, 1, 2, 3), (1, 2, 3)).tolist() == [1, 2, 3, 3]
    assert probabilities_to_labels(probabilities, (0, 1, 2)).tolist() == [0, 0, 0, 1]  # labels: argmax


def test_postprocessing_and_model_selection_work_on_regions(tmp_path: Path):
    truth = np.zeros((1, 20, 20), dtype=np.int16)
    truth[0, 2:10, 2:10] = 1
    truth[0, 4:8, 4:8] = 2  # region (1, 2): one blob
    predicted_regions = np.zeros((2, 1, 20, 20), dtype=np.float32)
    predicted_regions[0][truth > 0] = 1.0
    predicted_regions[0, 0, 15:17, 15:17] = 1.0  # a spurious speck of region (1, 2)
    predicted_regions[1][truth == 2] = 1.0
    reference = Reference({"case": truth}, (0, 1, 2), ((1, 2), (2,)), (1, 2))
    load = {"case": predicted_regions}.__getitem__
    baseline = score(load, reference)
    assert set(baseline["dice_per_label"]) == {"(1, 2)", "2"} and baseline["dice_per_label"]["2"] == 1.0
    chosen = choose_postprocessing(load, reference, baseline)
    assert chosen["largest_component_labels"] == [(1, 2)] and chosen["mean_dice_after"] == 1.0
    path = tmp_path / "postprocessing.json"
    path.write_text(json.dumps({"largest_component_labels": [[1, 2]]}))
    assert Postprocessing.load(path).largest_component_labels == ((1, 2),)
    cleaned = keep_largest_component(probabilities_to_labels(predicted_regions, (0, 1, 2), (1, 2)), [(1, 2)])
    assert np.array_equal(cleaned, truth)


def test_oversampling_locations_are_drawn_per_region():
    seg = np.zeros((1, 4, 4, 4), dtype=np.int16)
    seg[0, 0, 0, :2] = 1
    seg[0, 1, 1, 1] = 2
    locations = sample_foreground_locations(seg, [(1, 2), 2])
    assert len(locations[(1, 2)]) == 3 and len(locations[2]) == 1
    assert label_of_foreground_key(foreground_key((1, 2))) == (1, 2) and label_of_foreground_key("class_3") == 3


def test_the_encoding_counts_outputs_per_region():
    encoding = LabelEncoding((1, 2, 3), None, ((1, 3), (2,), (3,)), (1, 2, 3))
    assert encoding.num_outputs == 3 and encoding.num_classes == 4 and encoding.scored == ((1, 3), 2, 3)
    with pytest.raises(ConfigError):
        LabelEncoding((1, 2), None, ((1, 3),), (1,))
