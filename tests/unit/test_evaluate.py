"""Metrics on masks whose answers are derived by hand, and `python -m viseg.evaluate` on real NIfTI files
(tiny synthetic ones and two ACDC label maps)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from viseg.errors import ConfigError, DatasetError
from viseg.evaluation.evaluate import EvaluateConfig, evaluate_folders, labels_from_dataset_json, summarize
from viseg.evaluation.metrics import binary_metrics, label_map_metrics, region_key

SPACING = (2.0, 1.0, 1.5)  # (z, y, x) mm of the synthetic NIfTI files


def cube(shape: tuple[int, int, int], start: tuple[int, int, int], size: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


# --- metrics ---------------------------------------------------------------------------------------------


def test_identical_masks_score_perfectly() -> None:
    mask = cube((12, 12, 12), (2, 3, 4), 6)
    m = binary_metrics(mask, mask, (3.0, 1.0, 0.5))
    assert (m["Dice"], m["IoU"], m["HD95_mm"], m["ASSD_mm"]) == (1.0, 1.0, 0.0, 0.0)
    assert (m["TP"], m["FP"], m["FN"]) == (216, 0, 0)


def test_disjoint_masks_have_dice_zero() -> None:
    pred, ref = cube((10, 10, 20), (2, 2, 1), 4), cube((10, 10, 20), (2, 2, 12), 4)
    m = binary_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert (m["Dice"], m["IoU"], m["TP"], m["FP"], m["FN"]) == (0.0, 0.0, 0, 64, 64)
    assert m["HD95_mm"] > 0 and m["ASSD_mm"] > 0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shifted_cube_distances_derived_by_hand(axis: int) -> None:
    """An 8-voxel cube shifted by k=2 voxels along `axis` (spacing s=1.5 mm there, >= k*s in-plane).

    Prediction surface (8^3 - 6^3 = 296 voxels), distance to the reference surface:
      bottom face inside the reference: 28 rim voxels lie on its side faces -> 0; 36 interior -> k*s = 3.0
      (the nearest alternatives are >= 3.0 mm away in-plane); rings of the 5 slices inside -> 0;
      ring of the 1st slice beyond the reference (28) -> 1*s = 1.5; top face (64) -> 2*s = 3.0.
    So 168 x 0, 28 x 1.5, 100 x 3.0, and the same from the reference side by symmetry.
    HD95 = 3.0 (index 0.95*295 lies among the 3.0s); ASSD = (28*1.5 + 100*3.0) / 296 = 171/148.
    """
    spacing = [4.0, 3.0, 3.5]
    spacing[axis] = 1.5
    start = [3, 3, 3]
    ref = cube((14, 14, 14), tuple(start), 8)  # type: ignore[arg-type]
    start[axis] += 2
    pred = cube((14, 14, 14), tuple(start), 8)  # type: ignore[arg-type]
    m = binary_metrics(pred, ref, spacing)
    assert m["HD95_mm"] == pytest.approx(3.0, abs=1e-12)
    assert m["ASSD_mm"] == pytest.approx(171 / 148, abs=1e-12)
    assert m["Dice"] == pytest.approx(2 * 6 * 64 / (2 * 512))


def test_hd95_is_the_larger_directed_percentile() -> None:
    """Prediction = reference cube A plus a 3^3 cube B 2 voxels above A's top face (z spacing 1.5 mm).

    prediction -> reference: A's 296 surface voxels at 0; B's 26 surface voxels at (g+1, g+2, g+3)*1.5 mm
    (9, 8, 9 voxels, g=2: nearest is A's top face straight below). 26/322 > 5%, so the directed 95th
    percentile is 4.5 + 0.95*(6.0-4.5) = 5.925 (numpy's linear interpolation at index 0.95*321 = 304.95).
    reference -> prediction: all 0. HD95 = max = 5.925; MedPy's pooled percentile would hide B and say 0.
    ASSD = 1.5*(9*3 + 8*4 + 9*5) / (322 + 296) = 156/618.
    """
    ref = cube((16, 12, 12), (1, 2, 2), 8)
    pred = ref | cube((16, 12, 12), (11, 4, 4), 3)  # A's top face is z=8; B starts at z=11 (gap g=2)
    m = binary_metrics(pred, ref, (1.5, 1.0, 1.0))
    assert m["HD95_mm"] == pytest.approx(5.925, abs=1e-12)
    assert m["ASSD_mm"] == pytest.approx(156 / 618, abs=1e-12)


def test_crop_and_border_do_not_change_distances() -> None:
    """The same objects in a larger, zero-padded array give the same metrics (the crop is exact and an
    object cut by the array border keeps that face as surface)."""
    rng = np.random.default_rng(0)
    pred = ndimage.binary_opening(rng.random((10, 12, 14)) > 0.4)
    ref = ndimage.binary_opening(rng.random((10, 12, 14)) > 0.4)
    padded = binary_metrics(np.pad(pred, 3), np.pad(ref, 3), (2.0, 0.7, 1.1))
    assert binary_metrics(pred, ref, (2.0, 0.7, 1.1)) == pytest.approx(padded)


def test_both_empty_is_none_and_left_out_of_the_mean() -> None:
    empty = np.zeros((4, 4, 4), dtype=bool)
    m = binary_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert (m["Dice"], m["IoU"], m["HD95_mm"], m["ASSD_mm"]) == (None, None, None, None)
    assert (m["TP"], m["FP"], m["FN"], m["volume_pred_ml"]) == (0, 0, 0, 0.0)

    seen = np.zeros((6, 6, 6), dtype=np.uint8)
    seen[1:3, 1:3, 1:3] = 1
    half = seen.copy()
    half[1] = 0  # Dice 2*4/(4+8) = 2/3
    cases = [{"metrics": label_map_metrics(half, seen, (1.0, 1.0, 1.0), [1])},
             {"metrics": label_map_metrics(np.zeros_like(seen), np.zeros_like(seen), (1.0, 1.0, 1.0), [1])}]
    summary = summarize([1], cases)
    assert summary["mean"]["1"]["Dice"] == pytest.approx(2 / 3)
    assert summary["mean"]["1"]["TP"] == pytest.approx(2.0)  # counts exist for every case
    assert summary["foreground_mean"]["Dice"] == pytest.approx(2 / 3)


def test_one_empty_scores_zero_without_distances() -> None:
    ref = cube((6, 6, 6), (1, 1, 1), 2)
    m = binary_metrics(np.zeros_like(ref), ref, (1.0, 1.0, 1.0))
    assert (m["Dice"], m["IoU"], m["HD95_mm"], m["ASSD_mm"], m["FN"]) == (0.0, 0.0, None, None, 8)
    m = binary_metrics(ref, np.zeros_like(ref), (1.0, 1.0, 1.0))
    assert (m["Dice"], m["FP"], m["n_ref"]) == (0.0, 8, 0)


def test_volume_in_ml_uses_the_spacing() -> None:
    mask = cube((10, 10, 10), (0, 0, 0), 5)  # 125 voxels of 2 * 0.5 * 3 = 3 mm^3
    m = binary_metrics(mask, mask[::-1].copy(), (2.0, 0.5, 3.0))
    assert m["volume_pred_ml"] == pytest.approx(0.375)
    assert m["volume_ref_ml"] == pytest.approx(0.375)


def test_regions_merge_label_values() -> None:
    ref = np.zeros((4, 4, 4), dtype=np.uint8)
    ref[0], ref[1] = 1, 2
    pred = np.where(ref > 0, 3 - ref, 0)  # 1 and 2 swapped: wrong per label, right as a region
    metrics = label_map_metrics(pred, ref, (1.0, 1.0, 1.0), [1, (1, 2)])
    assert region_key((1, 2)) == "(1, 2)"
    assert (metrics["1"]["Dice"], metrics["(1, 2)"]["Dice"]) == (0.0, 1.0)


def test_labels_from_dataset_json(tmp_path: Path) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"background": 0, "edema": 1, "tumor": [1, 2], "ignore": 3}}))
    assert labels_from_dataset_json(path) == [1, (1, 2)]


# --- evaluation of folders ------------------------------------------------------------------------------


def save_label(arr_zyx: np.ndarray, path: Path, spacing_zyx: tuple[float, ...] = SPACING) -> None:
    """Written as (x, y, z) with pixdim (sx, sy, sz), so viseg.data.nifti reads it back as (z, y, x)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*reversed(spacing_zyx), 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr_zyx.transpose(2, 1, 0)).astype(np.uint8), affine), str(path))


def two_cases(root: Path) -> tuple[Path, Path]:
    """case_a: label 1 exact, label 2 half missing; case_b: label 1 exact, label 2 absent from both."""
    ref_a = np.zeros((6, 8, 8), dtype=np.uint8)
    ref_a[1:5, 1:5, 1:5] = 1
    ref_a[1:3, 5:7, 5:7] = 2
    pred_a = ref_a.copy()
    pred_a[2, 5:7, 5:7] = 0  # label 2: 4 of 8 voxels found -> Dice 2/3
    ref_b = np.zeros((6, 8, 8), dtype=np.uint8)
    ref_b[2:4, 2:4, 2:4] = 1
    for folder, a, b in (("pred", pred_a, ref_b), ("ref", ref_a, ref_b)):
        save_label(a, root / folder / "case_a.nii.gz")
        save_label(b, root / folder / "case_b.nii.gz")
    return root / "pred", root / "ref"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "viseg.evaluate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_writes_summary(tmp_path: Path) -> None:
    pred, ref = two_cases(tmp_path)
    result = run_cli(f"pred={pred}", f"ref={ref}", "num_processes=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["labels"] == [1, 2]
    assert [c["case"] for c in summary["metric_per_case"]] == ["case_a", "case_b"]
    case_a = summary["metric_per_case"][0]
    assert case_a["reference_file"] == str(ref / "case_a.nii.gz")
    assert case_a["metrics"]["2"]["Dice"] == pytest.approx(2 / 3)
    assert case_a["metrics"]["2"]["volume_ref_ml"] == pytest.approx(8 * 3.0 / 1000)
    assert summary["metric_per_case"][1]["metrics"]["2"]["Dice"] is None
    assert summary["mean"]["1"]["Dice"] == 1.0 and summary["mean"]["1"]["HD95_mm"] == 0.0
    assert summary["mean"]["2"]["Dice"] == pytest.approx(2 / 3)  # case_b's None is left out
    assert summary["foreground_mean"]["Dice"] == pytest.approx((1 + 2 / 3) / 2)
    assert "Dice" in result.stdout and "summary.json" in result.stdout


def test_cli_missing_prediction_is_a_clean_error(tmp_path: Path) -> None:
    pred, ref = two_cases(tmp_path)
    (pred / "case_b.nii.gz").unlink()
    result = run_cli(f"pred={pred}", f"ref={ref}", cwd=tmp_path)
    assert result.returncode != 0
    assert "case_b" in result.stderr and "fix:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (pred / "summary.json").exists()


def test_stray_prediction_is_an_error(tmp_path: Path) -> None:
    pred, ref = two_cases(tmp_path)
    shutil.copy(pred / "case_a.nii.gz", pred / "case_c.nii.gz")
    with pytest.raises(DatasetError, match="case_c"):
        evaluate_folders(EvaluateConfig(pred=str(pred), ref=str(ref), num_processes=1), progress=False)


@pytest.mark.parametrize("mismatch", ["shape", "spacing"])
def test_grid_mismatch_names_both_files(tmp_path: Path, mismatch: str) -> None:
    pred, ref = two_cases(tmp_path)
    if mismatch == "shape":
        save_label(np.zeros((6, 8, 9), dtype=np.uint8), pred / "case_b.nii.gz")
    else:
        save_label(np.zeros((6, 8, 8), dtype=np.uint8), pred / "case_b.nii.gz", spacing_zyx=(5.0, 1.0, 1.5))
    with pytest.raises(DatasetError, match=mismatch) as info:
        evaluate_folders(EvaluateConfig(pred=str(pred), ref=str(ref), num_processes=1), progress=False)
    assert str(pred / "case_b.nii.gz") in str(info.value) and str(ref / "case_b.nii.gz") in str(info.value)


def test_labels_come_from_dataset_json_beside_ref(tmp_path: Path) -> None:
    pred, ref = two_cases(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2, "c": 3}}))
    summary, _ = evaluate_folders(EvaluateConfig(pred=str(pred), ref=str(ref), num_processes=1), progress=False)
    assert summary["labels"] == [1, 2, 3]
    assert summary["mean"]["3"]["Dice"] is None  # in no case: nothing to score, not a perfect score


def test_ignored_voxels_are_scored_for_no_label() -> None:
    """nnU-Net's ignore_mask: where the reference says 'ignore', a prediction is neither right nor wrong."""
    ref = np.zeros((4, 6, 6), dtype=np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    ref[:, :, 4:] = 3  # unannotated
    pred = ref.copy()
    pred[:, :, 4:] = 1  # label 1 predicted all over the unannotated part
    pred[0, 0, 5] = 2
    unmasked = label_map_metrics(pred, ref, (1.0, 1.0, 1.0), [1, 2])
    metrics = label_map_metrics(pred, ref, (1.0, 1.0, 1.0), [1, 2], ignore_label=3)
    assert unmasked["1"]["FP"] > 0
    assert metrics["1"]["Dice"] == 1.0 and metrics["1"]["FP"] == 0 and metrics["1"]["HD95_mm"] == 0.0
    assert metrics["2"]["Dice"] is None and metrics["2"]["n_pred"] == 0


def test_the_ignore_label_of_dataset_json_is_not_scored(tmp_path: Path) -> None:
    pred, ref = two_cases(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}}))
    reference = np.zeros((6, 8, 8), dtype=np.uint8)
    reference[2:4, 2:4, 2:4] = 1
    reference[5] = 3
    prediction = reference.copy()
    prediction[5] = 2  # predictions on the unannotated slice count for nothing
    save_label(reference, ref / "case_b.nii.gz")
    save_label(prediction, pred / "case_b.nii.gz")
    summary, _ = evaluate_folders(EvaluateConfig(pred=str(pred), ref=str(ref), num_processes=1), progress=False)
    assert summary["labels"] == [1, 2]
    case_b = summary["metric_per_case"][1]["metrics"]
    assert case_b["1"]["Dice"] == 1.0 and case_b["2"]["Dice"] is None and case_b["2"]["FP"] == 0
    with pytest.raises(ConfigError, match="ignore label"):
        evaluate_folders(EvaluateConfig(pred=str(pred), ref=str(ref), labels=[1, 3], num_processes=1),
                         progress=False)


# --- real data -------------------------------------------------------------------------------------------

ACDC_CASES = ("patient001_frame01", "patient002_frame02")


def test_acdc_self_and_eroded(shared: Path, tmp_path: Path) -> None:
    """Two real ACDC label maps in nnU-Net layout (labelsTr beside dataset.json): against themselves every
    label is perfect; with the LV (3) eroded in one case, that case's LV loses Dice and gains distance."""
    acdc = shared / "data" / "acdc"
    ref, pred = tmp_path / "acdc" / "labelsTr", tmp_path / "pred"
    ref.mkdir(parents=True)
    pred.mkdir()
    shutil.copy(acdc / "dataset.json", tmp_path / "acdc" / "dataset.json")
    for case in ACDC_CASES:
        shutil.copy(acdc / "labelsTr" / f"{case}.nii.gz", ref / f"{case}.nii.gz")
        shutil.copy(acdc / "labelsTr" / f"{case}.nii.gz", pred / f"{case}.nii.gz")

    cfg = EvaluateConfig(pred=str(pred), ref=str(ref), num_processes=1, output=str(tmp_path / "self.json"))
    summary, _ = evaluate_folders(cfg, progress=False)
    assert summary["labels"] == [1, 2, 3]
    for label in ("1", "2", "3"):
        assert summary["mean"][label]["Dice"] == 1.0 and summary["mean"][label]["HD95_mm"] == 0.0

    img = nib.load(str(ref / f"{ACDC_CASES[0]}.nii.gz"))
    labels = np.asanyarray(img.dataobj)
    lv = labels == 3
    eroded = np.where(lv & ~ndimage.binary_erosion(lv, iterations=2), 0, labels).astype(labels.dtype)
    nib.save(nib.Nifti1Image(eroded, img.affine, img.header), str(pred / f"{ACDC_CASES[0]}.nii.gz"))
    summary, _ = evaluate_folders(EvaluateConfig(pred=str(pred), ref=str(ref), num_processes=1), progress=False)
    lv_metrics = summary["metric_per_case"][0]["metrics"]["3"]
    assert lv_metrics["Dice"] < 1.0 and lv_metrics["HD95_mm"] > 0.0 and lv_metrics["FP"] == 0
    assert summary["metric_per_case"][0]["metrics"]["1"]["Dice"] == 1.0
    assert summary["metric_per_case"][1]["metrics"]["3"]["Dice"] == 1.0
