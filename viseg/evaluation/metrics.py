"""Segmentation metrics for one prediction/reference pair: pure numpy/scipy, no I/O.

Per binary pair: Dice, IoU, TP/FP/FN voxel counts, the predicted and reference volumes in ml, and two
surface distances in mm (voxel spacing applied):

* HD95: the 95th-percentile Hausdorff distance, taken as the larger of the two *directed* 95th
  percentiles (prediction -> reference and reference -> prediction), as DeepMind's surface-distance
  library and MONAI compute it. MedPy's `hd95` instead takes one percentile over both directions pooled;
  the two agree when the directions are symmetric and the max-of-directed form never hides a one-sided
  error behind the other direction's many small distances.
* ASSD: the mean of all surface distances in both directions (MedPy's `assd` averages the two directed
  means instead; the pooled mean weights every surface voxel equally, whichever object it lies on).

Surfaces are mask voxels with at least one of their 3^n - 1 neighbours (full connectivity) outside the
mask, so that diagonal contact counts as surface and an object's surface is the same whichever way it is
oriented in the grid. Distances come from an exact Euclidean distance transform with the voxel spacing.

Empty masks follow nnU-Net, which is what the numbers are compared against:

* both empty: Dice, IoU and the distances are None (nnU-Net's NaN). Nothing was there to find and
  nothing was predicted: there is no overlap to score, and a 1 would inflate means with cases that say
  nothing about the model. Means over cases skip None.
* one empty: Dice and IoU are 0 (every voxel is an error); the distances are None, since a distance to
  an empty surface is undefined (some tools substitute the image diagonal; that number depends on the
  field of view and is not reported here). Dice = 0 already penalises the case in the means.

Voxels of the reference's ignore label (sparse annotation) are scored for no label: `label_map_metrics`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from viseg.data.labels import Region

Metrics = dict[str, Any]

METRIC_KEYS = ("Dice", "IoU", "TP", "FP", "FN", "n_pred", "n_ref", "volume_pred_ml", "volume_ref_ml",
               "HD95_mm", "ASSD_mm")
HD_PERCENTILE = 95.0


def region_key(region: Region) -> str:
    """The JSON key of a label or region, as nnU-Net writes it: '1' or '(1, 2)'."""
    return str(int(region)) if isinstance(region, (int, np.integer)) else str(tuple(int(v) for v in region))


def region_mask(label_map: np.ndarray, region: Region) -> np.ndarray:
    """Boolean mask of one label value, or of the union of several values for a region."""
    if isinstance(region, (int, np.integer)):
        return label_map == region
    return np.isin(label_map, np.asarray(region))


def overlap_counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) voxel counts of two boolean masks."""
    tp = int(np.count_nonzero(pred & ref))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(ref)) - tp


def dice_iou(tp: int, fp: int, fn: int) -> tuple[float | None, float | None]:
    """Dice and IoU from voxel counts; None when both masks are empty (see the module docstring)."""
    if tp + fp + fn == 0:
        return None, None
    return 2.0 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels touching the outside through any face, edge or corner; the array border counts as
    outside (binary_erosion's border_value=0), so an object cut by the field of view keeps that face."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    return mask & ~ndimage.binary_erosion(mask, structure=structure)


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the bounding box of their union.

    Exact, not an approximation: every surface voxel lies in the box, and a mask voxel on the box's edge
    has a neighbour outside the box, hence outside the mask, so it is surface with or without the crop.
    The distance transforms then cost the size of the objects, not of the whole scan.
    """
    coords = np.nonzero(pred | ref)
    box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
    return pred[box], ref[box]


def directed_surface_distances(from_surface: np.ndarray, to_surface: np.ndarray,
                               spacing: Sequence[float]) -> np.ndarray:
    """Distance in mm from each voxel of `from_surface` to the nearest voxel of `to_surface`."""
    distance_to = ndimage.distance_transform_edt(~to_surface, sampling=tuple(float(s) for s in spacing))
    return distance_to[from_surface]


def surface_distances(pred: np.ndarray, ref: np.ndarray,
                      spacing: Sequence[float]) -> tuple[float | None, float | None]:
    """(HD95, ASSD) in mm of two boolean masks; None unless both masks have voxels."""
    if not pred.any() or not ref.any():
        return None, None
    pred, ref = _crop_to_union(pred, ref)
    pred_surface, ref_surface = surface(pred), surface(ref)
    pred_to_ref = directed_surface_distances(pred_surface, ref_surface, spacing)
    ref_to_pred = directed_surface_distances(ref_surface, pred_surface, spacing)
    hd95 = max(np.percentile(pred_to_ref, HD_PERCENTILE), np.percentile(ref_to_pred, HD_PERCENTILE))
    assd = np.concatenate([pred_to_ref, ref_to_pred]).mean()
    return float(hd95), float(assd)


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> Metrics:
    """Every metric of one binary pair; `spacing` in mm per axis, in the arrays' axis order."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape or len(spacing) != pred.ndim:
        raise ValueError(f"shapes {pred.shape} and {ref.shape} with spacing {tuple(spacing)} do not match")
    tp, fp, fn = overlap_counts(pred, ref)
    dice, iou = dice_iou(tp, fp, fn)
    hd95, assd = surface_distances(pred, ref, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0  # mm^3 -> ml
    return {"Dice": dice, "IoU": iou, "TP": tp, "FP": fp, "FN": fn, "n_pred": tp + fp, "n_ref": tp + fn,
            "volume_pred_ml": (tp + fp) * voxel_ml, "volume_ref_ml": (tp + fn) * voxel_ml,
            "HD95_mm": hd95, "ASSD_mm": assd}


def label_map_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                      regions: Iterable[Region], ignore_label: int | None = None) -> dict[str, Metrics]:
    """Metrics of each label (or region) of two label maps, keyed by `region_key`.

    Voxels where the reference holds `ignore_label` (dataset.json's `ignore`: nobody annotated them) leave
    both masks, as nnU-Net's ignore_mask removes them from TP, FP and FN: a prediction there is neither
    right nor wrong. Volumes and surfaces are then those of the annotated part."""
    counted = None if ignore_label is None else ref != ignore_label
    return {region_key(r): binary_metrics(*_scored_masks(pred, ref, r, counted), spacing) for r in regions}


def dice_per_label(pred: np.ndarray, ref: np.ndarray, regions: Iterable[Region],
                   ignore_label: int | None = None) -> dict[str, float | None]:
    """Dice alone of each label (or region), keyed by `region_key`, with `label_map_metrics`' rules (ignore
    label, both-empty None). No surfaces: the cheap path of the end-of-training validation and of `best=`."""
    counted = None if ignore_label is None else ref != ignore_label
    return {region_key(r): dice_iou(*overlap_counts(*_scored_masks(pred, ref, r, counted)))[0] for r in regions}


def _scored_masks(pred: np.ndarray, ref: np.ndarray, region: Region,
                  counted: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    pred_mask, ref_mask = region_mask(pred, region), region_mask(ref, region)
    return (pred_mask, ref_mask) if counted is None else (pred_mask & counted, ref_mask & counted)


def mean_over_cases(per_case: Iterable[Mapping[str, float | None]], keys: Iterable[str]) -> dict[str, float | None]:
    """Per key, the mean over the cases that define it (a label absent from both masks does not count)."""
    cases = list(per_case)
    return {k: mean_ignoring_none(case.get(k) for case in cases) for k in keys}


def mean_ignoring_none(values: Iterable[float | int | None]) -> float | None:
    """Mean of the values that are not None; None when there are none (nnU-Net's nanmean)."""
    present = [float(v) for v in values if v is not None]
    return float(np.mean(present)) if present else None


def mean_metrics(per_item: Sequence[Metrics]) -> Metrics:
    """Per metric, the mean over items, skipping None (both-empty Dice, undefined distances)."""
    keys = [k for k in METRIC_KEYS if any(k in m for m in per_item)]
    return {k: mean_ignoring_none(m.get(k) for m in per_item) for k in keys}
