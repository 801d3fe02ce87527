"""Dataset verification on real NIfTI files: every check fires on the case and file that is broken,
and several problems at once all land in one report."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from viseg.data.dataset import Discovery
from viseg.data.pathfinders import DecathlonPathFinder, DefaultNNUnetFormatPathFinder
from viseg.data.verify import VerificationReport, verify_case, verify_dataset

LABELS = {"background": 0, "a": 1, "b": 2}
SHAPE = (8, 16, 16)  # (z, y, x)
SPACING = (2.0, 1.0, 1.0)  # (z, y, x) mm
CHANNELS = ("T1", "T2")


def save_nifti(arr_zyx: np.ndarray, path: Path, spacing_zyx: tuple[float, ...] = SPACING,
               origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
    """Written as (x, y, z) with pixdim (sx, sy, sz), like the reference generator, so io reads (z, y, x)."""
    arr_xyz = np.ascontiguousarray(arr_zyx.transpose(*reversed(range(arr_zyx.ndim))))
    sx, sy, sz = [*reversed(spacing_zyx), 1.0, 1.0, 1.0][:3]
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = origin
    img = nib.Nifti1Image(arr_xyz, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


@dataclass
class Synthetic:
    """A small valid nnU-Net-layout dataset that a test breaks in place."""

    root: Path
    case_ids: list[str]

    def image(self, case: str, channel: int) -> Path:
        return self.root / "imagesTr" / f"{case}_{channel:04d}.nii.gz"

    def label(self, case: str) -> Path:
        return self.root / "labelsTr" / f"{case}.nii.gz"

    def discover(self) -> Discovery:
        return DefaultNNUnetFormatPathFinder(self.root).discover()

    def verify(self, num_processes: int = 1) -> VerificationReport:
        return verify_dataset(self.discover(), num_processes=num_processes, progress=False)

    def edit_json(self, **changes: object) -> None:
        path = self.root / "dataset.json"
        raw = json.loads(path.read_text())
        raw.update(changes)
        path.write_text(json.dumps(raw))


def make_dataset(root: Path, n_cases: int = 4) -> Synthetic:
    rng = np.random.default_rng(0)
    case_ids = [f"case_{i:03d}" for i in range(n_cases)]
    ds = Synthetic(root, case_ids)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in case_ids:
        for channel in range(len(CHANNELS)):
            save_nifti(rng.normal(100.0, 10.0, SHAPE).astype(np.float32), ds.image(case, channel))
        save_nifti(valid_label(), ds.label(case))
    (root / "dataset.json").write_text(json.dumps({
        "name": "Tiny", "channel_names": {str(i): n for i, n in enumerate(CHANNELS)}, "labels": LABELS,
        "numTraining": n_cases, "file_ending": ".nii.gz",
    }))
    return ds


def valid_label(dtype: type = np.uint8) -> np.ndarray:
    label = np.zeros(SHAPE, dtype=dtype)
    label[2:6, 4:12, 4:12] = 1
    label[3:5, 6:10, 6:10] = 2
    return label


def image_data(ds: Synthetic, case: str, channel: int) -> np.ndarray:
    return np.asanyarray(nib.load(str(ds.image(case, channel))).dataobj).transpose(2, 1, 0).copy()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def set_pixdim(path: Path, axis_xyz: int, value: float) -> None:
    """nibabel's writer fixes zero or negative spacings, so an invalid one is patched into the header."""
    img = nib.load(str(path))
    header = img.header.copy()
    header["pixdim"][1 + axis_xyz] = value
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, header=header), str(path))


def found(report: VerificationReport) -> set[tuple[str, str | None, Path | None]]:
    return {(p.check, p.case, p.file) for p in report.problems}


@pytest.fixture
def ds(tmp_path: Path) -> Synthetic:
    return make_dataset(tmp_path / "Dataset001_Tiny")


def test_clean_dataset_passes(ds: Synthetic) -> None:
    report = ds.verify()
    assert report.problems == []
    assert report.ok
    assert report.n_cases == 4 and report.dataset == "Tiny"
    assert "PASSED" in report.render()
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


# Each breaker damages case_001 and returns (check, file that must be named).
Breaker = Callable[[Synthetic], tuple[str, Path]]


def _channel_shape(ds: Synthetic) -> tuple[str, Path]:
    save_nifti(np.zeros((8, 16, 17), np.float32), ds.image("case_001", 1))
    return "shape-mismatch", ds.image("case_001", 1)


def _label_shape(ds: Synthetic) -> tuple[str, Path]:
    save_nifti(np.zeros((9, 16, 16), np.uint8), ds.label("case_001"))
    return "shape-mismatch", ds.label("case_001")


def _channel_spacing(ds: Synthetic) -> tuple[str, Path]:
    save_nifti(image_data(ds, "case_001", 1), ds.image("case_001", 1), spacing_zyx=(2.5, 1.0, 1.0))
    return "spacing-mismatch", ds.image("case_001", 1)


def _label_spacing(ds: Synthetic) -> tuple[str, Path]:
    save_nifti(valid_label(), ds.label("case_001"), spacing_zyx=(2.0, 1.01, 1.0))
    return "spacing-mismatch", ds.label("case_001")


def _spacing_nan(ds: Synthetic) -> tuple[str, Path]:
    set_pixdim(ds.image("case_001", 0), 2, float("nan"))
    return "spacing-invalid", ds.image("case_001", 0)


def _spacing_inf(ds: Synthetic) -> tuple[str, Path]:
    set_pixdim(ds.label("case_001"), 0, float("inf"))
    return "spacing-invalid", ds.label("case_001")


def _image_4d(ds: Synthetic) -> tuple[str, Path]:
    save_nifti(np.zeros((2, *SHAPE), np.float32), ds.image("case_001", 1))  # written as (x, y, z, 2)
    return "dimensionality", ds.image("case_001", 1)


def _image_2d(ds: Synthetic) -> tuple[str, Path]:
    save_nifti(np.zeros((16, 16), np.float32), ds.image("case_001", 0))
    return "dimensionality", ds.image("case_001", 0)


def _image_5d(ds: Synthetic) -> tuple[str, Path]:
    # Its header reads as 3D; only the voxel read shows it, and it must not add grid-comparison noise.
    save_nifti(np.zeros((2, 1, *SHAPE), np.float32), ds.image("case_001", 0))
    return "dimensionality", ds.image("case_001", 0)


def _label_4d(ds: Synthetic) -> tuple[str, Path]:
    save_nifti(np.zeros((3, *SHAPE), np.uint8), ds.label("case_001"))
    return "dimensionality", ds.label("case_001")


def _image_nan(ds: Synthetic) -> tuple[str, Path]:
    data = image_data(ds, "case_001", 1)
    data[0, 0, :3] = np.nan
    save_nifti(data, ds.image("case_001", 1))
    return "nan", ds.image("case_001", 1)


def _image_inf(ds: Synthetic) -> tuple[str, Path]:
    data = image_data(ds, "case_001", 0)
    data[1, 2, :3] = [np.inf, -np.inf, np.inf]
    save_nifti(data, ds.image("case_001", 0))
    return "inf", ds.image("case_001", 0)


def _label_not_integer(ds: Synthetic) -> tuple[str, Path]:
    label = valid_label(np.float32)
    label[0, 0, 0] = 0.5
    save_nifti(label, ds.label("case_001"))
    return "label-not-integer", ds.label("case_001")


def _label_nan(ds: Synthetic) -> tuple[str, Path]:
    label = valid_label(np.float32)
    label[0, 0, 0] = np.nan
    save_nifti(label, ds.label("case_001"))
    return "label-nan", ds.label("case_001")


def _label_stray(ds: Synthetic) -> tuple[str, Path]:
    label = valid_label()
    label[0, 0, :2] = 7
    save_nifti(label, ds.label("case_001"))
    return "label-outside-set", ds.label("case_001")


def _truncated_image(ds: Synthetic) -> tuple[str, Path]:
    truncate(ds.image("case_001", 0))
    return "unreadable", ds.image("case_001", 0)


def _truncated_label(ds: Synthetic) -> tuple[str, Path]:
    truncate(ds.label("case_001"))
    return "unreadable", ds.label("case_001")


def _garbage_image(ds: Synthetic) -> tuple[str, Path]:
    ds.image("case_001", 1).write_bytes(b"this is not a NIfTI file\n" * 100)
    return "unreadable", ds.image("case_001", 1)


def _missing_channel(ds: Synthetic) -> tuple[str, Path]:
    ds.image("case_001", 1).unlink()
    return "missing-channel", ds.image("case_001", 1)


BREAKERS = [_channel_shape, _label_shape, _channel_spacing, _label_spacing, _spacing_nan, _spacing_inf,
            _image_4d, _image_2d, _image_5d, _label_4d, _image_nan, _image_inf, _label_not_integer,
            _label_nan, _label_stray, _truncated_image, _truncated_label, _garbage_image, _missing_channel]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda b: b.__name__.strip("_"))
def test_each_check_names_case_and_file(ds: Synthetic, breaker: Breaker) -> None:
    check, path = breaker(ds)
    report = ds.verify()
    assert found(report) == {(check, "case_001", path)}, report.render()
    assert not report.ok
    assert check in report.render() and str(path) in report.render()


@pytest.mark.parametrize(("breaker", "words"), [
    (_image_nan, ["3 NaN"]), (_image_inf, ["3 infinite"]), (_label_stray, ["[7]", "2 voxels"]),
    (_label_not_integer, ["0.5"]), (_channel_shape, ["(8, 16, 17)", "(8, 16, 16)"]),
    (_label_spacing, ["1.01"]),
])
def test_messages_say_what_was_found(ds: Synthetic, breaker: Breaker, words: list[str]) -> None:
    breaker(ds)
    [problem] = ds.verify().problems
    for word in words:
        assert word in problem.message
    assert problem.fix


@pytest.mark.parametrize("what", ["origin", "direction"])
def test_affine_mismatch_is_a_warning(ds: Synthetic, what: str) -> None:
    if what == "origin":
        save_nifti(valid_label(), ds.label("case_002"), origin=(5.0, 0.0, 0.0))
        path = ds.label("case_002")
    else:
        img = nib.load(str(ds.image("case_002", 1)))
        flipped = img.affine @ np.diag([-1.0, 1.0, 1.0, 1.0])  # same spacing, x axis reversed
        path = ds.image("case_002", 1)
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), flipped), str(path))
    report = ds.verify()
    assert found(report) == {("affine-mismatch", "case_002", path)}
    assert report.ok and len(report.warnings) == 1
    assert what in report.warnings[0].message
    assert "PASSED with 1 warning" in report.render()


def test_num_training_mismatch(ds: Synthetic) -> None:
    ds.edit_json(numTraining=7)
    report = ds.verify()
    assert found(report) == {("num-training", None, ds.root / "dataset.json")}
    assert "numTraining=7" in report.problems[0].message and "4 cases" in report.problems[0].message


@pytest.mark.parametrize(("labels", "checks"), [
    ({"background": 0, "a": 1, "b": 3}, {"label-values"}),
    ({"a": 1, "b": 2}, {"background"}),
    ({"a": 1, "b": 3}, {"background", "label-values"}),
    ({"background": 0, "a": 1, "b": 1}, {"label-values"}),
])
def test_dataset_label_rules(ds: Synthetic, labels: dict[str, int], checks: set[str]) -> None:
    ds.edit_json(labels=labels)
    report = ds.verify()
    dataset_level = {p.check for p in report.problems if p.case is None}
    assert dataset_level == checks
    assert all(p.file == ds.root / "dataset.json" for p in report.problems if p.case is None)


def test_the_ignore_label_must_be_the_highest_value(ds: Synthetic) -> None:
    """nnU-Net's sparse-annotation convention; the report names dataset.json, the key and the fix."""
    ds.edit_json(labels={"background": 0, "ignore": 1, "a": 2, "b": 3})
    label = valid_label()
    save_nifti(np.where(label > 0, label + 1, 0).astype(np.uint8), ds.label("case_001"))  # values 0, 2, 3
    report = ds.verify()
    assert found(report) == {("ignore-label", None, ds.root / "dataset.json")}
    problem = report.problems[0]
    assert str(ds.root / "dataset.json") in problem.message and '"ignore"' in problem.message
    assert "highest label value" in problem.message
    assert 'give "ignore" the value 3' in problem.fix and "0..2" in problem.fix
    # the fix: the other labels 0..2 and the ignore label last
    ds.edit_json(labels={**LABELS, "ignore": 3})
    label[0] = 3  # one unannotated slice
    save_nifti(label, ds.label("case_001"))
    assert ds.verify().problems == []


def test_missing_dataset_json_gives_discovery_problems_only(ds: Synthetic) -> None:
    (ds.root / "dataset.json").unlink()
    report = ds.verify()
    assert [p.check for p in report.problems] == ["dataset-json"]
    assert report.n_cases == 0 and not report.ok


def test_five_problems_at_once_in_one_report(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "Dataset002_Broken", n_cases=6)
    save_nifti(np.zeros((8, 16, 17), np.float32), ds.image("case_000", 1))
    data = image_data(ds, "case_001", 0)
    data[4, 4, 4] = np.nan
    save_nifti(data, ds.image("case_001", 0))
    label = valid_label()
    label[0, 0, 0] = 9
    save_nifti(label, ds.label("case_002"))
    truncate(ds.image("case_003", 1))
    ds.image("case_004", 0).unlink()

    report = ds.verify()

    assert found(report) == {
        ("shape-mismatch", "case_000", ds.image("case_000", 1)),
        ("nan", "case_001", ds.image("case_001", 0)),
        ("label-outside-set", "case_002", ds.label("case_002")),
        ("unreadable", "case_003", ds.image("case_003", 1)),
        ("missing-channel", "case_004", ds.image("case_004", 0)),
    }
    assert not report.ok and len(report.errors) == 5
    text = report.render()
    assert text.splitlines()[0] == "Dataset Tiny: 6 cases, 5 errors, 0 warnings"
    assert text.rstrip().endswith("FAILED: 5 errors to fix before planning or training.")
    assert len(json.loads(json.dumps(report.to_dict()))["problems"]) == 5


def test_process_pool_gives_the_same_report(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "Dataset003_Pool", n_cases=5)
    _channel_shape(ds)
    _label_stray(ds)
    truncate(ds.image("case_003", 0))
    serial = ds.verify(num_processes=1)
    pooled = ds.verify(num_processes=2)
    assert len(serial.problems) == 3
    assert pooled.problems == serial.problems


def test_render_puts_errors_first_grouped_by_check(ds: Synthetic) -> None:
    save_nifti(valid_label(), ds.label("case_000"), origin=(0.0, 3.0, 0.0))  # warning
    for case in ("case_001", "case_003"):
        label = valid_label()
        label[0, 0, 0] = 5
        save_nifti(label, ds.label(case))
    truncate(ds.image("case_002", 0))
    text = ds.verify().render()
    order = [text.index(s) for s in ("-- label-outside-set (2) --", "-- unreadable (1) --",
                                      "-- affine-mismatch (1) --", "FAILED")]
    assert order == sorted(order)


def test_case_check_never_raises(ds: Synthetic) -> None:
    case = ds.discover().cases[0]
    problems = verify_case((case, None))  # type: ignore[arg-type]  # a bug inside the checker
    assert [(p.check, p.case, p.file) for p in problems] == [("unexpected-error", "case_000",
                                                              ds.image("case_000", 0))]


def test_decathlon_4d_files(tmp_path: Path) -> None:
    root = tmp_path / "Task01_Tiny"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case, n_channels in (("c0", 2), ("c1", 1)):  # c1 lacks the second channel dataset.json declares
        save_nifti(np.ones((n_channels, *SHAPE), np.float32), root / "imagesTr" / f"{case}.nii.gz")
        save_nifti(valid_label(), root / "labelsTr" / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Dec", "modality": {"0": "FLAIR", "1": "T1"},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": 2, "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                                       for c in ("c0", "c1")],
    }))
    report = verify_dataset(DecathlonPathFinder(root).discover(), num_processes=1, progress=False)
    assert found(report) == {("dimensionality", "c1", root / "imagesTr" / "c1.nii.gz")}
    assert "at least 2 channels" in report.problems[0].message
