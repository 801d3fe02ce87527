"""Pathfinders on real folders of tiny NIfTI files: nnU-Net v2 and Decathlon (MSD) layouts, every
discovery problem named with its check, case and file, and the registry's error for unknown names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from viseg.data.dataset import Discovery, ImageSource
from viseg.data.nifti import read_case
from viseg.data.pathfinders import (
    PATHFINDERS,
    DecathlonPathFinder,
    DefaultNNUnetFormatPathFinder,
    get_pathfinder,
)
from viseg.data.verify import verify_dataset
from viseg.errors import ConfigError

SHAPE = (4, 6, 8)  # (z, y, x): every axis distinct, so a transposed read cannot pass
SPACING = (2.0, 1.0, 1.0)  # (z, y, x) mm


def save_nifti(arr: np.ndarray, path: Path, spacing_zyx: tuple[float, ...] = SPACING) -> None:
    """Write (z, y, x) or (c, z, y, x) data as nibabel's (x, y, z[, c]), the layout viseg.data.nifti reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr_xyz = np.ascontiguousarray(arr.transpose(*reversed(range(arr.ndim))))
    sz, sy, sx = spacing_zyx
    affine = np.diag([sx, sy, sz, 1.0])
    img = nib.Nifti1Image(arr_xyz, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def label_volume() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[1:3, 2:4, 2:6] = 1
    return label


def checks(discovery: Discovery) -> set[tuple[str, str | None, Path | None, str]]:
    return {(p.check, p.case, p.file, p.severity) for p in discovery.problems}


# -- nnU-Net v2 layout --------------------------------------------------------------------------------
NNUNET_JSON: dict[str, Any] = {
    "name": "Tiny",
    "channel_names": {"0": "T1", "1": "T2"},
    "labels": {"background": 0, "organ": 1},
    "numTraining": 3,
    "file_ending": ".nii.gz",
}


def make_nnunet(root: Path, case_ids: tuple[str, ...] = ("case_b", "case_a", "case_c"),
                img_folder: str = "imagesTr", seg_folder: str = "labelsTr",
                dataset_json: dict[str, Any] | None = None) -> Path:
    (root / img_folder).mkdir(parents=True)
    (root / seg_folder).mkdir(parents=True)
    for case in case_ids:
        for channel in (0, 1):
            image = root / img_folder / f"{case}_{channel:04d}.nii.gz"
            save_nifti(np.full(SHAPE, channel, np.float32), image)
        save_nifti(label_volume(), root / seg_folder / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps(dataset_json or NNUNET_JSON))
    return root


@pytest.fixture
def nnunet_root(tmp_path: Path) -> Path:
    return make_nnunet(tmp_path / "Dataset001_Tiny")


def test_nnunet_multichannel_cases_in_sorted_order(nnunet_root: Path) -> None:
    discovery = DefaultNNUnetFormatPathFinder(nnunet_root).discover()
    assert discovery.problems == []
    assert discovery.info is not None
    assert discovery.info.channel_names == ("T1", "T2")
    assert discovery.info.labels == {"background": 0, "organ": 1}
    assert [c.case_id for c in discovery.cases] == ["case_a", "case_b", "case_c"]
    for case in discovery.cases:
        assert case.images == tuple(
            ImageSource(nnunet_root / "imagesTr" / f"{case.case_id}_{ch:04d}.nii.gz") for ch in (0, 1)
        )
        assert case.label == nnunet_root / "labelsTr" / f"{case.case_id}.nii.gz"
    arrays = read_case(discovery.cases[0])
    assert arrays.image.shape == (2, *SHAPE)
    assert (arrays.image[1] == 1).all() and (arrays.image[0] == 0).all()


def test_nnunet_channel_names_from_folder(nnunet_root: Path) -> None:
    assert DefaultNNUnetFormatPathFinder(nnunet_root)._extract_channelnames_from_folder() == ["0000", "0001"]


def test_nnunet_custom_folder_names(tmp_path: Path) -> None:
    root = make_nnunet(tmp_path / "ds", case_ids=("x1", "x2"), img_folder="imgs", seg_folder="segs",
                       dataset_json={**NNUNET_JSON, "numTraining": 2})
    discovery = get_pathfinder("nnunet", root, img_foldername="imgs", seg_foldername="segs").discover()
    assert discovery.problems == []
    assert [c.label for c in discovery.cases] == [root / "segs" / "x1.nii.gz", root / "segs" / "x2.nii.gz"]
    assert discovery.cases[0].images[0].path == root / "imgs" / "x1_0000.nii.gz"
    # The default folder names do not exist here: the problem names the folder and the setting to change.
    default = get_pathfinder("nnunet", root).discover()
    [missing] = [p for p in default.problems if p.check == "missing-folder"]
    assert missing.file == root / "imagesTr" and "img_foldername" in missing.fix


def test_stray_file_is_a_warning(nnunet_root: Path) -> None:
    stray = nnunet_root / "imagesTr" / "notes.txt"
    stray.write_text("scanner protocol notes")
    (nnunet_root / "imagesTr" / ".DS_Store").write_bytes(b"\0")  # hidden files are ignored silently
    discovery = DefaultNNUnetFormatPathFinder(nnunet_root).discover()
    assert checks(discovery) == {("unexpected-file", None, stray, "warning")}
    assert len(discovery.cases) == 3


def test_same_case_with_two_endings_is_a_duplicate(nnunet_root: Path) -> None:
    save_nifti(np.zeros(SHAPE, np.float32), nnunet_root / "imagesTr" / "case_a_0000.nii")
    discovery = DefaultNNUnetFormatPathFinder(nnunet_root).discover()
    [problem] = discovery.problems
    assert (problem.check, problem.case, problem.severity) == ("duplicate-case", "case_a", "error")
    assert "case_a_0000.nii" in problem.message and "case_a_0000.nii.gz" in problem.message


def test_label_without_image_is_an_orphan_warning(nnunet_root: Path) -> None:
    orphan = nnunet_root / "labelsTr" / "ghost.nii.gz"
    save_nifti(label_volume(), orphan)
    discovery = DefaultNNUnetFormatPathFinder(nnunet_root).discover()
    assert checks(discovery) == {("orphan-label", "ghost", orphan, "warning")}
    assert "ghost" not in [c.case_id for c in discovery.cases]


def test_missing_label_and_channel_name_the_file(nnunet_root: Path) -> None:
    (nnunet_root / "labelsTr" / "case_b.nii.gz").unlink()
    (nnunet_root / "imagesTr" / "case_c_0001.nii.gz").unlink()
    discovery = DefaultNNUnetFormatPathFinder(nnunet_root).discover()
    assert checks(discovery) == {
        ("missing-label", "case_b", nnunet_root / "labelsTr" / "case_b.nii.gz", "error"),
        ("missing-channel", "case_c", nnunet_root / "imagesTr" / "case_c_0001.nii.gz", "error"),
    }


@pytest.mark.parametrize(("content", "words"), [
    (None, ["missing"]),
    ("{not json", ["not valid JSON"]),
    ("[1, 2]", ["JSON object"]),
    ({**NNUNET_JSON, "channel_names": {"1": "T1", "2": "T2"}}, ["channel_names"]),
    ({**NNUNET_JSON, "channel_names": {"0": 5}}, ["channel_names"]),
    ({**NNUNET_JSON, "channel_names": []}, ["channel_names"]),
    ({**NNUNET_JSON, "labels": {"background": 0, "whole": [1, "2"], "core": []}}, ["labels"]),
    ({**NNUNET_JSON, "file_ending": ".mha"}, ["file_ending", ".mha"]),
], ids=["missing", "invalid-json", "not-object", "channel-keys", "channel-values", "channel-list",
        "bad-region-labels", "mha"])
def test_bad_dataset_json(nnunet_root: Path, content: Any, words: list[str]) -> None:
    path = nnunet_root / "dataset.json"
    if content is None:
        path.unlink()
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    discovery = DefaultNNUnetFormatPathFinder(nnunet_root).discover()
    assert discovery.info is None and discovery.cases == []
    [problem] = discovery.problems
    assert (problem.check, problem.file, problem.severity) == ("dataset-json", path, "error")
    assert str(path) in problem.message and problem.fix
    for word in words:
        assert word in problem.message


def test_several_dataset_json_problems_at_once(nnunet_root: Path) -> None:
    path = nnunet_root / "dataset.json"
    path.write_text(json.dumps({**NNUNET_JSON, "labels": {"a": "one"}, "file_ending": ".mha",
                                "numTraining": "three"}))
    discovery = DefaultNNUnetFormatPathFinder(nnunet_root).discover()
    assert [p.check for p in discovery.problems] == ["dataset-json"] * 3
    assert all(p.file == path for p in discovery.problems)


def test_missing_images_folder(tmp_path: Path) -> None:
    root = make_nnunet(tmp_path / "ds")
    for path in (root / "imagesTr").iterdir():
        path.unlink()
    (root / "imagesTr").rmdir()
    discovery = DefaultNNUnetFormatPathFinder(root).discover()
    assert ("missing-folder", None, root / "imagesTr", "error") in checks(discovery)
    assert discovery.cases == []


def test_empty_images_folder(tmp_path: Path) -> None:
    root = make_nnunet(tmp_path / "ds", case_ids=())
    discovery = DefaultNNUnetFormatPathFinder(root).discover()
    assert [(p.check, p.severity) for p in discovery.problems] == [("empty-dataset", "error")]
    assert "imagesTr" in discovery.problems[0].message


def test_missing_dataset_folder(tmp_path: Path) -> None:
    discovery = DefaultNNUnetFormatPathFinder(tmp_path / "nowhere").discover()
    assert discovery.info is None
    assert [p.check for p in discovery.problems] == ["dataset-folder"]


# -- Decathlon (MSD) layout ---------------------------------------------------------------------------
MSD_IDS = ("BRATS_002", "BRATS_001")


def msd_channel(case_index: int, channel: int) -> np.ndarray:
    """Distinct values per case and channel, varying along every axis."""
    grid = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    return grid + 1000.0 * channel + 100_000.0 * case_index


def msd_json(modality: dict[str, str], case_ids: tuple[str, ...] = MSD_IDS, **changes: Any) -> dict[str, Any]:
    return {
        "name": "BRATS", "modality": modality, "labels": {"0": "background", "1": "edema"},
        "numTraining": len(case_ids),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                     for c in case_ids],
        **changes,
    }


def make_msd(root: Path, n_channels: int = 2) -> Path:
    for i, case in enumerate(MSD_IDS):
        channels = [msd_channel(i, c) for c in range(n_channels)]
        image = np.stack(channels) if n_channels > 1 else channels[0]  # 4D files only for several channels
        save_nifti(image, root / "imagesTr" / f"{case}.nii.gz")
        save_nifti(label_volume(), root / "labelsTr" / f"{case}.nii.gz")
    modality = {"0": "FLAIR", "1": "T1w"} if n_channels == 2 else {"0": "CT"}
    write_json(root, msd_json(modality))
    return root


def write_json(root: Path, content: dict[str, Any]) -> None:
    (root / "dataset.json").write_text(json.dumps(content))


@pytest.fixture
def msd_root(tmp_path: Path) -> Path:
    return make_msd(tmp_path / "Task01_BrainTumour")


def test_msd_dataset_json_is_normalised(msd_root: Path) -> None:
    discovery = get_pathfinder("decathlon", msd_root).discover()
    assert discovery.problems == []
    assert discovery.info is not None
    assert discovery.info.labels == {"background": 0, "edema": 1}
    assert discovery.info.channel_names == ("FLAIR", "T1w")
    assert [c.case_id for c in discovery.cases] == ["BRATS_001", "BRATS_002"]
    for case in discovery.cases:
        image = msd_root / "imagesTr" / f"{case.case_id}.nii.gz"
        assert case.images == (ImageSource(image, 0), ImageSource(image, 1))
        assert case.label == msd_root / "labelsTr" / f"{case.case_id}.nii.gz"


def test_msd_read_case_splits_the_4d_file_into_channels(msd_root: Path) -> None:
    discovery = get_pathfinder("decathlon", msd_root).discover()
    for case in discovery.cases:
        arrays = read_case(case)
        index = MSD_IDS.index(case.case_id)
        assert arrays.image.shape == (2, *SHAPE)
        np.testing.assert_array_equal(arrays.image[0], msd_channel(index, 0))
        np.testing.assert_array_equal(arrays.image[1], msd_channel(index, 1))
        np.testing.assert_array_equal(arrays.label, label_volume())
        assert arrays.spacing == SPACING


def test_msd_channel_names_from_folder(msd_root: Path) -> None:
    assert DecathlonPathFinder(msd_root)._extract_channelnames_from_folder() == ["0", "1"]


def test_msd_valid_dataset_passes_verification(msd_root: Path) -> None:
    report = verify_dataset(get_pathfinder("decathlon", msd_root).discover(), num_processes=1, progress=False)
    assert report.ok and report.problems == [], report.render()
    assert report.n_cases == 2


def test_msd_entry_outside_the_dataset_is_refused(msd_root: Path) -> None:
    save_nifti(np.stack([msd_channel(0, 0)] * 2), msd_root.parent / "outside.nii.gz")
    raw = msd_json({"0": "FLAIR", "1": "T1w"})
    raw["training"].append({"image": "../outside.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"})
    write_json(msd_root, raw)
    discovery = get_pathfinder("decathlon", msd_root).discover()
    [problem] = discovery.problems
    assert (problem.check, problem.file) == ("path-escape", msd_root / "dataset.json")
    assert "../outside.nii.gz" in problem.message
    assert [c.case_id for c in discovery.cases] == ["BRATS_001", "BRATS_002"]


def test_msd_symlinked_files_stay_inside(tmp_path: Path) -> None:
    """Datasets are often assembled from links to shared storage: a link is not a path escape."""
    storage = make_msd(tmp_path / "storage")
    root = tmp_path / "Task01_Linked"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
        for path in (storage / folder).iterdir():
            os.symlink(path, root / folder / path.name)
    write_json(root, msd_json({"0": "FLAIR", "1": "T1w"}))
    discovery = get_pathfinder("decathlon", root).discover()
    assert discovery.problems == []
    assert discovery.cases[0].images[0].path == root / "imagesTr" / "BRATS_001.nii.gz"


def test_msd_duplicate_entry(msd_root: Path) -> None:
    raw = msd_json({"0": "FLAIR", "1": "T1w"})
    raw["training"].append(dict(raw["training"][0]))
    write_json(msd_root, raw)
    discovery = get_pathfinder("decathlon", msd_root).discover()
    assert checks(discovery) == {("duplicate-case", "BRATS_002", msd_root / "dataset.json", "error")}
    assert len(discovery.cases) == 2


def test_msd_missing_label_file(msd_root: Path) -> None:
    label = msd_root / "labelsTr" / "BRATS_001.nii.gz"
    label.unlink()
    discovery = get_pathfinder("decathlon", msd_root).discover()
    assert checks(discovery) == {("missing-label", "BRATS_001", label, "error")}


def test_msd_entry_without_label_key(msd_root: Path) -> None:
    raw = msd_json({"0": "FLAIR", "1": "T1w"})
    del raw["training"][1]["label"]
    write_json(msd_root, raw)
    discovery = get_pathfinder("decathlon", msd_root).discover()
    assert checks(discovery) == {("missing-label", "BRATS_001", msd_root / "dataset.json", "error")}


@pytest.mark.parametrize(("changes", "word"), [
    ({"training": "imagesTr"}, "training"),
    ({"labels": {"background": 0, "edema": 1}}, "labels"),  # nnU-Net v2 labels under the MSD layout
])
def test_msd_bad_dataset_json(msd_root: Path, changes: dict[str, Any], word: str) -> None:
    write_json(msd_root, msd_json({"0": "FLAIR", "1": "T1w"}, **changes))
    discovery = get_pathfinder("decathlon", msd_root).discover()
    problem = discovery.problems[0]
    assert (problem.check, problem.file) == ("dataset-json", msd_root / "dataset.json")
    assert word in problem.message
    assert discovery.cases == []


def test_msd_single_modality_3d_images(tmp_path: Path) -> None:
    root = make_msd(tmp_path / "Task09_Spleen", n_channels=1)
    discovery = get_pathfinder("decathlon", root).discover()
    assert discovery.problems == []
    assert discovery.info is not None and discovery.info.channel_names == ("CT",)
    for case in discovery.cases:
        assert case.images == (ImageSource(root / "imagesTr" / f"{case.case_id}.nii.gz", None),)
        arrays = read_case(case)
        assert arrays.image.shape == (1, *SHAPE)
        np.testing.assert_array_equal(arrays.image[0], msd_channel(MSD_IDS.index(case.case_id), 0))
    assert DecathlonPathFinder(root)._extract_channelnames_from_folder() == ["0"]
    report = verify_dataset(discovery, num_processes=1, progress=False)
    assert report.ok, report.render()


# -- registry -----------------------------------------------------------------------------------------
def test_unknown_pathfinder_lists_the_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        get_pathfinder("nope", tmp_path)
    text = str(excinfo.value)
    assert "'nope'" in text
    for name in PATHFINDERS:
        assert name in text
    assert set(PATHFINDERS) >= {"nnunet", "decathlon"}


def test_registry_names_build_their_classes(tmp_path: Path) -> None:
    assert type(get_pathfinder("nnunet", tmp_path)) is DefaultNNUnetFormatPathFinder
    assert type(get_pathfinder("decathlon", tmp_path)) is DecathlonPathFinder
