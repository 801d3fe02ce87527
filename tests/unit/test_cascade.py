"""The cascade's previous-stage input: its file format, its crop with every patch, its one-hot channels
through augmentation, and nnU-Net's perturbations of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.test_loader import SHAPE, coordinates, ids, labels, origin_labels, sampler, write_case
from viseg.config import AugmentationConfig
from viseg.data.labels import LabelEncoding
from viseg.errors import DatasetError
from viseg.preprocessing.previous_stage import load_previous, one_hot_previous, save_previous
from viseg.training.augment import BatchAugmenter
from viseg.training.cascade_augment import ball, binary_operator, perturb_previous_stage

FOREGROUND = (1, 2, 3)


@pytest.fixture
def cascade_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Preprocessed cases and, as their 'previous stage', each case's own label map shifted by one voxel."""
    data_dir, previous_dir = tmp_path / "data", tmp_path / "previous"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    for index, case_id in enumerate(ids()):
        seg = labels(SHAPE, rng)
        # a 4th channel names the case (index + 1), so that a patch tells which case it came from
        write_case(data_dir, case_id, np.concatenate([coordinates(SHAPE), np.full((1, *SHAPE), index + 1.0)]), seg)
        save_previous(previous_dir, case_id, np.roll(np.maximum(seg, 0), 1, axis=2))
    return data_dir, previous_dir


def test_previous_stage_files_round_trip_and_are_checked_against_the_grid(tmp_path: Path):
    values = np.random.default_rng(1).integers(0, 4, (4, 5, 6))
    path = save_previous(tmp_path, "case_0", values)
    assert path.name == "case_0.npy" and not list(tmp_path.glob(".*tmp*"))
    assert np.array_equal(load_previous(tmp_path, "case_0", (4, 5, 6)), values)
    with pytest.raises(DatasetError, match=r"case_0.npy has shape \(4, 5, 6\)") as raised:
        load_previous(tmp_path, "case_0", (4, 5, 7))
    assert "delete" in raised.value.fix
    with pytest.raises(DatasetError, match="cannot read the previous stage's prediction of case case_1"):
        load_previous(tmp_path, "case_1")


def test_one_hot_previous_has_a_channel_per_foreground_label():
    previous = np.array([[[0, 1, 2, 3, -1]]])
    one_hot = one_hot_previous(previous, FOREGROUND)
    assert one_hot.shape == (3, 1, 1, 5) and one_hot.dtype == np.float32
    assert one_hot[:, 0, 0].tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0]]


def test_the_sampler_crops_the_previous_stage_with_each_patch(cascade_folders):
    data_dir, previous_dir = cascade_folders
    patches = sampler(data_dir, previous_dir=previous_dir, batch_size=4)
    encoding = LabelEncoding(FOREGROUND)
    for seed in range(3):
        data, seg = patches.sample_batch(np.random.default_rng(seed))
        assert seg.shape == (4, 2, 8, 12, 12)
        for i in range(4):
            index = data[i, :3].astype(np.int64) - 1
            inside = (index >= 0).all(axis=0)
            case = ids()[int(data[i, 3].max()) - 1]
            assert np.array_equal(encoding.encode(origin_labels(data_dir, case, data[i]))[inside], seg[i, 0][inside])
            previous = np.load(previous_dir / f"{case}.npy")
            expected = encoding.encode(previous[tuple(index[:, inside])])
            assert np.array_equal(seg[i, 1][inside], expected)
            assert (seg[i, 1][~inside] == LabelEncoding.OUTSIDE).all()  # padding, as the labels


def test_without_augmentation_the_previous_stage_leaves_as_exact_one_hot_channels():
    encoding = LabelEncoding(FOREGROUND)
    augmenter = BatchAugmenter((4, 6, 6), AugmentationConfig(enabled=False), False, encoding, previous_stage=True)
    generator = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 4, (2, 1, 6, 8, 8), generator=generator)
    previous = torch.randint(0, 4, (2, 1, 6, 8, 8), generator=generator)
    data = torch.randn(2, 1, 6, 8, 8, generator=generator)
    out, labels_out = augmenter(data, torch.cat([seg, previous], 1))
    assert out.shape == (2, 1 + 3, 4, 6, 6) and labels_out.shape == (2, 1, 4, 6, 6)
    crop = (slice(None), 0, slice(1, 5), slice(1, 7), slice(1, 7))
    for k in range(3):
        assert torch.equal(out[:, 1 + k], (previous[crop] == k + 1).float())
    assert torch.equal(out[:, :1], data[:, :, 1:5, 1:7, 1:7])


def test_with_augmentation_the_previous_stage_moves_with_the_labels():
    """The previous stage equal to the labels: after rotation, scaling and mirroring its one-hot channels still
    agree with the labels wherever nnU-Net's perturbations did not change them (most voxels)."""
    encoding = LabelEncoding(FOREGROUND)
    cfg = AugmentationConfig(p_rotation=1.0, p_scaling=1.0)
    augmenter = BatchAugmenter((8, 16, 16), cfg, False, encoding, previous_stage=True)
    generator = torch.Generator().manual_seed(3)
    seg = torch.zeros(4, 1, 12, 24, 24, dtype=torch.int64)
    seg[:, :, 3:9, 6:18, 6:18] = 1
    seg[:, :, 4:8, 8:12, 8:12] = 2
    data = torch.randn(4, 1, 12, 24, 24, generator=generator)
    out, labels_out = augmenter(data, torch.cat([seg, seg], 1), generator)
    assert out.shape == (4, 4, 8, 16, 16)
    one_hot = out[:, 1:]
    assert set(torch.unique(one_hot).tolist()) <= {0.0, 1.0} and one_hot.sum(1).max() <= 1
    as_labels = (one_hot * torch.arange(1, 4).view(1, 3, 1, 1, 1)).sum(1)
    assert (as_labels == labels_out[:, 0]).float().mean() > 0.8


def test_binary_operators_are_nnunets_ball_morphology():
    assert int(ball(1, 3, torch.device("cpu")).sum()) == 7 and int(ball(1.5, 3, torch.device("cpu")).sum()) == 19
    cube = torch.zeros(9, 9, 9, dtype=torch.bool)
    cube[2:7, 2:7, 2:7] = True
    strel = ball(1, 3, torch.device("cpu"))
    assert int(binary_operator(cube, "erosion", strel).sum()) == 27
    assert int(binary_operator(cube, "dilation", strel).sum()) == 125 + 6 * 25
    opened = binary_operator(cube, "opening", strel)  # the 3^3 core grown by the cross: the cube less its rims
    assert int(opened.sum()) == 27 + 6 * 9 and not (opened & ~cube).any()
    dot = torch.zeros(9, 9, 9, dtype=torch.bool)
    dot[4, 4, 4] = True
    assert not binary_operator(dot, "opening", strel).any()  # a speck smaller than the ball vanishes
    assert torch.equal(binary_operator(cube, "closing", strel), cube)
    with pytest.raises(ValueError, match="unknown binary operator"):
        binary_operator(cube, "skeleton", strel)


def test_perturbations_keep_one_hot_and_change_some_samples_only():
    one_hot = torch.zeros(32, 2, 10, 16, 16)
    one_hot[:, 0, 2:8, 3:13, 3:13] = 1
    one_hot[:, 1, 4:6, 6:9, 6:9] = 1
    one_hot[:, 0, 4:6, 6:9, 6:9] = 0
    one_hot[:, 1, 1:2, 14:15, 14:15] = 1  # a second, small component of label 2
    out = perturb_previous_stage(one_hot, seed=7)
    assert torch.equal(out, perturb_previous_stage(one_hot, seed=7))  # one seed, one result
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0} and out.sum(1).max() <= 1
    changed = [(out[i] != one_hot[i]).any().item() for i in range(32)]
    # P(unchanged) is at least 0.6 * 0.8 (neither perturbation drawn); each drawn one may still change nothing
    assert 0 < sum(changed) < 32
    assert torch.equal(one_hot[:, 1, 1, 14, 14], torch.ones(32))  # the input is not modified
