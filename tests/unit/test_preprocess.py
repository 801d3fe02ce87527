"""Preprocessing: nnU-Net's order of operations on real NIfTI files, and the per-plan cache.

Bit-parity with nnU-Net cannot be tested here (nnunetv2 is not a dependency); bench/preprocess_vs_nnunet.py
checks it against nnU-Net's own output.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy.ndimage import binary_fill_holes

from viseg.config import BaseConfig, PlainConvUnet2DConfig, PlainConvUnet3DConfig
from viseg.data.demo import DemoSpec, generate_demo_dataset
from viseg.data.nifti import read_case
from viseg.planning.geometry import compute_new_shape
from viseg.planning.plans import Plans
from viseg.preprocessing.prepare import PreparedDataset, prepare
from viseg.preprocessing.preprocess import (
    CaseProperties,
    crop_to_nonzero,
    is_case_complete,
    load_case,
    normalize,
    preprocess_case,
    preprocess_dataset,
    preprocessed_dir,
    sample_foreground_locations,
)
from viseg.preprocessing.resampling import (
    determine_separate_z,
    resample_image,
    resample_segmentation,
)

LABELS = {-1, 0, 1, 2, 3}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("data") / "demo", DemoSpec(n_cases=4), progress=False)


def make_cfg(root: Path, cache: Path, **overrides) -> BaseConfig:
    model = overrides.pop("model", PlainConvUnet3DConfig)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BaseConfig), {
        "model": OmegaConf.structured(model), "lr_scheduler": {"type": "PolyLR"},
        "dataset": {"basepath": str(root)}, "paths": {"cache": str(cache)}, "splits": {"n_folds": 2},
        "num_processes": 1, **overrides}))


def prepared_for(demo: Path, cache: Path, **overrides) -> PreparedDataset:
    return prepare(make_cfg(demo, cache, **overrides), progress=False)


@pytest.fixture(scope="module")
def cache(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: verification and the fingerprint (the slow part of prepare) happen once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def fullres(demo: Path, cache: Path) -> tuple[PreparedDataset, Path]:
    prepared = prepared_for(demo, cache)
    return prepared, preprocess_dataset(prepared, num_processes=2, progress=False)  # 2: the workers pickle


def isolated_cache(cache: Path, tmp_path: Path) -> Path:
    """A copy of the module's cache without preprocessed arrays, for tests that damage them."""
    shutil.copytree(cache, tmp_path / "cache", ignore=shutil.ignore_patterns("preprocessed"))
    return tmp_path / "cache"


def transposed(values, plans: Plans) -> list:
    return [values[i] for i in plans.transpose_forward]


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


# -- preprocess_case ------------------------------------------------------------------------------------


def test_shapes_follow_the_plan_spacing(fullres):
    prepared, folder = fullres
    plan = prepared.plans.configuration(prepared.configuration)
    for case in prepared.cases:
        data, seg, props, _ = load_case(folder, case.case_id)
        spacing = transposed(read_case(case).spacing, prepared.plans)
        assert props.shape_after_resampling == list(compute_new_shape(props.shape_after_crop, spacing, plan.spacing))
        assert data.shape == (1, *props.shape_after_resampling) and data.dtype == np.float32
        assert seg.shape == (1, *props.shape_after_resampling) and seg.dtype == np.int16
        assert props.spacing_after_resampling == list(plan.spacing)


def test_zscore_data_and_labels(fullres):
    prepared, folder = fullres
    for case in prepared.cases:
        data, seg, _, _ = load_case(folder, case.case_id)
        inside = data[0][seg[0] >= 0]
        assert abs(float(inside.mean())) < 0.05 and abs(float(inside.std()) - 1) < 0.05  # cubic resampling drift
        assert set(np.unique(seg).tolist()) <= LABELS


def test_class_locations_point_at_their_class(fullres):
    prepared, folder = fullres
    for case in prepared.cases:
        _, seg, _, locations = load_case(folder, case.case_id)
        assert sorted(locations) == [1, 2, 3]
        for value, coords in locations.items():
            count = int((seg == value).sum())
            assert coords.shape == (min(10000, count), 4) and np.all(coords[:, 0] == 0)
            assert np.all(seg[tuple(coords.T)] == value)
            assert len({tuple(c) for c in coords.tolist()}) == len(coords)  # without replacement


def test_transpose_crop_and_bbox(demo: Path, cache: Path):
    """With the target spacing equal to the case's own, nothing is resampled: the output must be exactly the
    normalized, transposed crop, and bbox (original axis order) must index that crop in the image as read."""
    prepared = prepared_for(demo, cache, transpose_forward=[2, 0, 1])
    plans = prepared.plans
    assert plans.transpose_forward == (2, 0, 1)
    case = read_case(prepared.cases[0])
    image = np.pad(case.image, ((0, 0), (2, 1), (0, 3), (4, 0)))  # zero border: something to crop
    label = np.pad(case.label, ((2, 1), (0, 3), (4, 0)))
    plan = dataclasses.replace(plans.configuration("3d_fullres"), spacing=tuple(transposed(case.spacing, plans)))
    plans = dataclasses.replace(plans, configurations={"3d_fullres": plan})
    data, seg, props = preprocess_case(image, label, case.spacing, plans, "3d_fullres", case_id="x")
    box = tuple(slice(a, b) for a, b in props.bbox)
    assert props.bbox == [[2, 2 + case.image.shape[1]], [0, case.image.shape[2]], [4, 4 + case.image.shape[3]]]
    assert props.shape_before_crop == list(image.shape[1:])
    crop = image[(slice(None), *box)].transpose(0, 3, 1, 2)
    assert props.shape_after_crop == list(crop.shape[1:]) == props.shape_after_resampling
    expected = (crop - crop.mean()) / crop.std()
    np.testing.assert_allclose(data, expected, atol=1e-4)
    outside = ~binary_fill_holes(np.any(crop != 0, axis=0))  # zeros at the image's surface count as outside
    expected_seg = label[box].transpose(2, 0, 1).astype(np.int16)
    expected_seg[(expected_seg == 0) & outside] = -1
    np.testing.assert_array_equal(seg[0], expected_seg)


def test_inference_without_label(fullres):
    prepared, folder = fullres
    case = read_case(prepared.cases[1])
    data, seg, props = preprocess_case(case.image, None, case.spacing, prepared.plans, prepared.configuration)
    assert seg is None
    cached, _, cached_props, _ = load_case(folder, prepared.cases[1].case_id)
    np.testing.assert_array_equal(data, cached)
    assert dataclasses.replace(props, case_id=cached_props.case_id) == cached_props


def test_crop_marks_outside_of_filled_mask():
    data = np.zeros((1, 6, 7, 7), np.float32)
    data[0, 1:5, 1:6, 1:6] = 1
    data[0, 2:4, 3, 3] = 0  # an enclosed hole: filled, so inside the mask
    seg = np.zeros((1, 6, 7, 7), np.int16)
    seg[0, 1, 1, 1] = 2
    cropped, out, bbox = crop_to_nonzero(data, seg)
    assert bbox == [[1, 5], [1, 6], [1, 6]] and cropped.shape == (1, 4, 5, 5)
    assert (out == -1).sum() == 0 and out[0, 0, 0, 0] == 2
    data[0, 1, 1, 1] = 0  # a gap at the surface is not a hole
    _, out, _ = crop_to_nonzero(data, np.zeros_like(seg))
    assert out[0, 0, 0, 0] == -1 and (out == -1).sum() == 1


def test_masked_zscore_leaves_outside_at_zero():
    rng = np.random.default_rng(0)
    data = rng.normal(50, 7, (1, 8, 9, 10)).astype(np.float32)
    seg = np.zeros((1, 8, 9, 10), np.int16)
    seg[0, :2] = -1
    data[0, :2] = 0
    out = normalize(data, seg, ("ZScoreNormalization",), (True,), {"0": {}})
    assert np.all(out[0, :2] == 0)
    assert abs(out[0, 2:].mean()) < 1e-5 and abs(out[0, 2:].std() - 1) < 1e-5


def test_ct_normalization_clips_then_scales():
    data = np.array([[[[-2000.0, 0.0, 50.0, 3000.0]]]], np.float32)
    props = {"0": {"mean": 50.0, "std": 10.0, "percentile_00_5": -100.0, "percentile_99_5": 200.0}}
    out = normalize(data, np.zeros((1, 1, 1, 4), np.int16), ("CTNormalization",), (False,), props)
    np.testing.assert_allclose(out[0, 0, 0], [-15.0, -5.0, 0.0, 15.0])


def test_sample_foreground_locations_edge_cases():
    seg = np.zeros((1, 100, 110, 110), np.int16)
    seg[0, :, :, :100] = 1  # 1,100,000 voxels: 1 % coverage exceeds 10,000
    locations = sample_foreground_locations(seg, [1, 2])
    assert locations[1].shape == (11000, 4) and locations[2].shape == (0, 4)
    again = sample_foreground_locations(seg, [1, 2])
    np.testing.assert_array_equal(locations[1], again[1])  # seeded


# -- resampling -----------------------------------------------------------------------------------------


def test_segmentation_resampling_adds_no_values():
    rng = np.random.default_rng(1)
    seg = rng.choice(np.array([-1, 0, 2, 7], np.int16), size=(1, 6, 13, 11))
    for spacing, target in [((4.0, 1.0, 1.0), (2.5, 0.7, 1.3)), ((1.0, 1.0, 1.0), (0.6, 1.7, 0.9))]:
        new_shape = compute_new_shape(seg.shape[1:], spacing, target)
        out = resample_segmentation(seg, spacing, target, new_shape)
        assert out.shape == (1, *new_shape) and out.dtype == seg.dtype
        assert set(np.unique(out).tolist()) <= {-1, 0, 2, 7}


def test_resampling_rules():
    assert compute_new_shape((10, 100, 100), (5.0, 1.0, 1.0), (2.5, 1.5, 0.7)) == (20, 67, 143)
    assert determine_separate_z(None, (4.0, 1.0, 1.0), (4.0, 1.0, 1.0)) == (True, 0)
    assert determine_separate_z(None, (1.0, 1.0, 1.0), (1.0, 4.0, 1.0)) == (True, 1)
    assert determine_separate_z(None, (0.24, 1.25, 1.25), (1.0, 1.0, 1.0)) == (False, None)
    assert determine_separate_z(None, (2.0, 1.0, 1.0), (1.0, 1.0, 1.0)) == (False, None)
    data = np.full((2, 5, 6, 7), 3.5, np.float32)
    assert resample_image(data, (1, 1, 1), (1, 1, 1), (5, 6, 7)) is data
    out = resample_image(data, (4.0, 1, 1), (2.0, 1.2, 0.8), (10, 5, 9))
    assert out.dtype == np.float32 and out.shape == (2, 10, 5, 9) and np.allclose(out, 3.5)


# -- the cache ------------------------------------------------------------------------------------------


def test_second_call_does_no_work(fullres, caplog: pytest.LogCaptureFixture):
    prepared, folder = fullres
    before = mtimes(folder)
    with caplog.at_level(logging.INFO, logger="viseg.preprocessing.preprocess"):
        assert preprocess_dataset(prepared, progress=False) == folder
    assert mtimes(folder) == before
    assert "4 cases already preprocessed" in caplog.text
    assert (folder / "manifest.json").is_file() and folder.name.startswith("3d_fullres-")
    assert isinstance(load_case(folder, prepared.cases[0].case_id)[0], np.memmap)


def test_incomplete_cases_are_redone(demo: Path, cache: Path, tmp_path: Path):
    prepared = prepared_for(demo, isolated_cache(cache, tmp_path))
    folder = preprocess_dataset(prepared, progress=False)
    ids = [c.case_id for c in prepared.cases]
    (folder / f"{ids[0]}.json").unlink()  # killed before the marker
    with (folder / f"{ids[1]}_seg.npy").open("r+b") as f:  # a truncated file
        f.truncate(100)
    (folder / f".{ids[1]}_data.npy.999999999.tmp").write_bytes(b"left by a killed run")
    assert not is_case_complete(folder, ids[0]) and not is_case_complete(folder, ids[1])
    before = mtimes(folder)
    preprocess_dataset(prepared, progress=False)
    after = mtimes(folder)
    assert all(is_case_complete(folder, i) for i in ids)
    assert after[f"{ids[0]}_data.npy"] != before[f"{ids[0]}_data.npy"]
    assert after[f"{ids[1]}_seg.npy"] != before[f"{ids[1]}_seg.npy"]
    assert after[f"{ids[2]}_data.npy"] == before[f"{ids[2]}_data.npy"]
    assert not list(folder.glob(".*.tmp"))


def test_plans_differing_in_patch_size_share_the_folder(demo: Path, cache: Path, tmp_path: Path):
    default = prepared_for(demo, cache)
    smaller = prepared_for(demo, cache, patch_size=[8, 32, 32])
    assert default.plans_dir != smaller.plans_dir
    assert (default.plans.configuration("3d_fullres").patch_size
            != smaller.plans.configuration("3d_fullres").patch_size)
    assert preprocessed_dir(default) == preprocessed_dir(smaller)
    continued = dataclasses.replace(default, plans_dir=tmp_path / "run")  # a continued run's plans_dir
    assert preprocessed_dir(continued) == preprocessed_dir(default)
    other_spacing = prepared_for(demo, cache, spacing=[3.0, 1.5, 1.5])
    assert preprocessed_dir(other_spacing) != preprocessed_dir(default)


def test_2d_configuration_keeps_slice_spacing(demo: Path, cache: Path):
    prepared = prepared_for(demo, cache, model=PlainConvUnet2DConfig)
    assert prepared.configuration == "2d"
    folder = preprocess_dataset(prepared, progress=False)
    assert folder.name.startswith("2d-")
    plan = prepared.plans.configuration("2d")
    for case in prepared.cases:
        data, seg, props, _ = load_case(folder, case.case_id)
        spacing = transposed(read_case(case).spacing, prepared.plans)
        assert props.spacing_after_resampling == [spacing[0], *plan.spacing]
        assert data.shape[1] == props.shape_after_crop[0]
        assert set(np.unique(seg).tolist()) <= LABELS


def test_case_properties_round_trip():
    props = CaseProperties("c", [4.0, 1.0, 1.0], [10, 20, 30], [[0, 10], [1, 19], [2, 30]], [10, 18, 28],
                           [4.0, 1.0, 1.0], [10, 18, 28])
    assert CaseProperties.from_dict(props.to_dict() | {"extra": 1}) == props
