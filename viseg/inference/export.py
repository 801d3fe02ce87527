"""Back from the network's grid to the input image: revert preprocessing, map classes to label values,
postprocess, write NIfTI (and optionally the probabilities).

The revert undoes `preprocess_case` in reverse order, as nnU-Net's export does: resample from the plan's
spacing back to the cropped shape, transpose back, paste into the uncropped shape (background probability 1
outside the crop box). The label map is written with the first input channel's affine and header, so it
overlays the image exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from viseg.data.labels import Region
from viseg.io.atomic import write_atomically
from viseg.planning.plans import Plans
from viseg.preprocessing.preprocess import CaseProperties
from viseg.preprocessing.resampling import resample_image

# nnU-Net plans' resampling_fn_probabilities_kwargs: {"is_seg": false, "order": 1, "order_z": 0,
# "force_separate_z": null}. Linear (not cubic) keeps interpolated probabilities in [0, 1] and summing to 1;
# order_z and force_separate_z are the data resampling's, which the plan holds.
PROBABILITY_ORDER = 1
REGION_THRESHOLD = 0.5  # a region's sigmoid probability above which a voxel is in it (nnU-Net's)


def revert_geometry(probabilities: np.ndarray, properties: CaseProperties, plans: Plans,
                    configuration: str) -> np.ndarray:
    """(K, *shape_after_resampling) probabilities on the plan's grid (network axis order) -> (K, Z, Y, X)
    float32 in the original image's geometry and axis order."""
    plan = plans.configuration(configuration)
    original_spacing = [properties.original_spacing[i] for i in plans.transpose_forward]
    resampled = resample_image(np.asarray(probabilities, dtype=np.float32), properties.spacing_after_resampling,
                               original_spacing, properties.shape_after_crop, order=PROBABILITY_ORDER,
                               order_z=plan.resampling.order_z, force_separate_z=plan.resampling.force_separate_z)
    cropped = resampled.transpose([0, *[i + 1 for i in plans.transpose_backward]])
    box = tuple(slice(start, stop) for start, stop in properties.bbox)
    expected = tuple(stop - start for start, stop in properties.bbox)
    if cropped.shape[1:] != expected:
        raise ValueError(f"reverted crop has shape {cropped.shape[1:]} but the bbox spans {expected}: "
                         "transpose or bbox bookkeeping is inconsistent")
    full = np.zeros((cropped.shape[0], *properties.shape_before_crop), dtype=np.float32)
    if not plans.regions:  # outside the nonzero box there is only background; regions: in none of them
        full[0] = 1.0  # (nnU-Net's revert_cropping_on_probabilities)
    full[(slice(None), *box)] = cropped
    return full


def label_dtype(label_values: Sequence[int]) -> np.dtype:
    """uint8 while every label fits (the common case, and what viewers expect), else int16."""
    return np.dtype(np.uint8) if max(label_values) <= np.iinfo(np.uint8).max else np.dtype(np.int16)


def probabilities_to_labels(probabilities: np.ndarray, label_values: Sequence[int],
                            regions_class_order: Sequence[int] = ()) -> np.ndarray:
    """argmax over classes, then class k -> original label value label_values[k]. With regions (sigmoid
    outputs), region i at probability > 0.5 writes `regions_class_order[i]`, later regions over earlier
    ones (nnU-Net's convert_probabilities_to_segmentation)."""
    probabilities = np.asarray(probabilities)
    if not regions_class_order:
        lookup = np.asarray(label_values, dtype=label_dtype(label_values))
        return lookup[probabilities.argmax(0)]
    segmentation = np.zeros(probabilities.shape[1:], dtype=label_dtype(regions_class_order))
    for channel, value in enumerate(regions_class_order):
        segmentation[probabilities[channel] > REGION_THRESHOLD] = value
    return segmentation


def keep_largest_component(segmentation: np.ndarray, labels: Sequence[Region]) -> np.ndarray:
    """For each label value (or region: the union of its values), keep only its largest connected component;
    the rest becomes background.

    Full connectivity (26 neighbours in 3D), as nnU-Net's remove_all_but_largest_component (skimage's
    label with connectivity=None)."""
    from scipy.ndimage import generate_binary_structure
    from scipy.ndimage import label as connected_components

    out = segmentation.copy()
    structure = generate_binary_structure(out.ndim, out.ndim)
    for value in labels:
        mask = np.isin(out, value) if isinstance(value, tuple) else out == value
        components, count = connected_components(mask, structure=structure)
        if count < 2:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0  # not a component: everything else
        out[(components != 0) & (components != sizes.argmax())] = 0
    return out


def write_segmentation(segmentation: np.ndarray, reference: Path, path: Path) -> None:
    """Write a (Z, Y, X) label map as NIfTI with `reference`'s affine and header (written under a temporary
    name and renamed, so an interrupted run never leaves a half-written prediction)."""
    import nibabel as nib

    ref = nib.load(str(reference))
    data = np.ascontiguousarray(segmentation.transpose(2, 1, 0))  # viseg (z, y, x) -> NIfTI (x, y, z)
    image = type(ref)(data, ref.affine, ref.header.copy())
    image.set_data_dtype(data.dtype)
    # the image's intensity scaling and display window mean nothing for labels
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, 0
    write_atomically(path, lambda tmp: nib.save(image, str(tmp)), keep_ending=True)


def write_probabilities(probabilities: np.ndarray, label_values: Sequence[int], path: Path,
                        regions: Sequence[Sequence[int]] = ()) -> None:
    """`<case>.npz`: 'probabilities' float32 (K, X, Y, Z), the label NIfTI's array order, so that
    argmax(0) overlays the written label map voxel for voxel; 'labels' the label value of each channel.
    A region model's channels are sigmoid probabilities of its regions: 'regions' then holds each one's
    label values (-1 padded), and 'labels' the value each region writes (regions_class_order)."""
    data = np.ascontiguousarray(np.asarray(probabilities, dtype=np.float32).transpose(0, 3, 2, 1))
    def fill(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            extra = {"regions": _padded(regions)} if regions else {}
            np.savez_compressed(handle, probabilities=data, labels=np.asarray(label_values, dtype=np.int16),
                                **extra)

    write_atomically(path, fill)


def _padded(regions: Sequence[Sequence[int]]) -> np.ndarray:
    width = max(len(r) for r in regions)
    return np.asarray([[*r, *[-1] * (width - len(r))] for r in regions], dtype=np.int16)
