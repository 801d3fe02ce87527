"""Resampling images and segmentations to a target spacing, with nnU-Net v2's semantics.

nnU-Net's `resample_data_or_seg` is reproduced operation for operation (same skimage/scipy calls on the same
dtypes), so that the preprocessed arrays are bit-identical to nnU-Net's for the same input:

* images: cubic spline (`skimage.transform.resize`, order 3, mode 'edge', no anti-aliasing);
* segmentations: each label's indicator is interpolated (order 1) and every voxel takes the label with the
  highest score; exact ties go to the nearest-neighbour label (batchgenerators >= 0.25.5, which nnU-Net
  2.8.1 uses; older versions thresholded each indicator at 0.5, which could leave voxels unlabelled where
  three labels meet). No value outside the input's labels can appear.
* anisotropic spacing (max/min > 3): the high-resolution plane is resampled slice by slice with `order`
  and the low-resolution axis with `order_z` (0: nearest), because a cubic spline across 5-10 mm slices
  invents structure between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import map_coordinates
from skimage.transform import resize

from viseg.errors import DatasetError
from viseg.planning.geometry import ANISOTROPY_THRESHOLD

Spacing = Sequence[float]


def check_resampled_size(case: str, shape: Sequence[int], new_shape: Sequence[int], num_channels: int,
                         header_spacing: Spacing, target_spacing: Spacing) -> None:
    """Refuse a case whose resampled float32 array (all channels) exceeds VISEG_MAX_IMAGE_GB, before it is
    allocated. The same budget as for reading a volume (viseg.data.nifti), so one setting bounds both. A spacing
    written in cm where mm is meant (or m) is 10x (1000x) too large per axis: the case grows 1000x (10^9x) at
    resampling, and without this check the process dies of memory instead of naming the case. The actual
    peak is about three times the array (resampling works in float64, one channel at a time)."""

    from viseg.data.nifti import MAX_IMAGE_GB_VARIABLE, max_image_bytes
    voxels = int(np.prod([int(n) for n in new_shape], dtype=np.float64))
    needed = num_channels * voxels * np.dtype(np.float32).itemsize
    budget = max_image_bytes()
    if needed <= budget:
        return
    growth = voxels / max(int(np.prod([int(n) for n in shape], dtype=np.float64)), 1)
    raise DatasetError(
        f"case {case or '(unnamed)'}: its header spacing (z, y, x) {_mm(header_spacing)} mm resampled to the "
        f"plan's target spacing {_mm(target_spacing)} mm turns shape {tuple(int(n) for n in shape)} into "
        f"{tuple(int(n) for n in new_shape)} ({growth:.3g}x the voxels, {needed / 2**30:.3g} GiB as float32), "
        f"more than the {budget / 2**30:.3g} GiB one volume may take ({MAX_IMAGE_GB_VARIABLE})",
        fix="check the voxel size (pixdim) and its unit in the header: viseg reads spacings in mm, and a spacing "
            "written in cm or m grows a case 10x or 1000x per axis; if the case really is this large, raise "
            f"{MAX_IMAGE_GB_VARIABLE}")


def _mm(spacing: Spacing) -> list[float]:
    return [float(f"{float(s):.4g}") for s in spacing]


def get_do_separate_z(spacing: Spacing, threshold: float = ANISOTROPY_THRESHOLD) -> bool:
    return bool(np.max(spacing) / np.min(spacing) > threshold)


def get_lowres_axis(spacing: Spacing) -> np.ndarray:
    """Every axis with the largest spacing (more than one: no single low-resolution axis)."""
    return np.where(max(spacing) / np.array(spacing) == 1)[0]


def determine_separate_z(force_separate_z: bool | None, current_spacing: Spacing,
                         new_spacing: Spacing) -> tuple[bool, int | None]:
    """nnU-Net's `determine_do_sep_z_and_axis`: whether (and along which axis) to resample out of plane
    separately; the current spacing decides first, then the target."""
    if force_separate_z is not None:
        axes = get_lowres_axis(current_spacing) if force_separate_z else None
        do_separate_z = force_separate_z
    elif get_do_separate_z(current_spacing):
        do_separate_z, axes = True, get_lowres_axis(current_spacing)
    elif get_do_separate_z(new_spacing):
        do_separate_z, axes = True, get_lowres_axis(new_spacing)
    else:
        do_separate_z, axes = False, None
    if axes is None:
        return do_separate_z, None
    # (0.24, 1.25, 1.25)-like spacings have two "low-resolution" axes: resample jointly, as nnU-Net does
    if len(axes) != 1:
        return False, None
    return do_separate_z, int(axes[0])


def resample_image(data: np.ndarray, current_spacing: Spacing, new_spacing: Spacing, new_shape: Sequence[int],
                   order: int = 3, order_z: int = 0, force_separate_z: bool | None = None) -> np.ndarray:
    """Channel-first image (C, Z, Y, X) resampled to `new_shape`; the output keeps the input's dtype."""
    separate, axis = determine_separate_z(force_separate_z, current_spacing, new_spacing)
    return _resample(data, new_shape, False, axis, order, separate, order_z)


def resample_segmentation(seg: np.ndarray, current_spacing: Spacing, new_spacing: Spacing,
                          new_shape: Sequence[int], order: int = 1, order_z: int = 0,
                          force_separate_z: bool | None = None) -> np.ndarray:
    """Label map, channel-first (C, Z, Y, X) or without channel axis, resampled to `new_shape`."""
    squeeze = seg.ndim == len(new_shape)
    separate, axis = determine_separate_z(force_separate_z, current_spacing, new_spacing)
    out = _resample(seg[None] if squeeze else seg, new_shape, True, axis, order, separate, order_z)
    return out[0] if squeeze else out


def resize_image(image: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    return resize(image, new_shape, order, mode="edge", anti_aliasing=False)


def resize_segmentation(seg: np.ndarray, new_shape: Sequence[int], order: int = 1) -> np.ndarray:
    """batchgenerators' `resize_segmentation`: per-label indicator interpolation, argmax over labels (the
    smallest label wins a tie), except that a tie including the nearest-neighbour label goes to it."""
    dtype = seg.dtype
    new_shape = tuple(int(s) for s in new_shape)
    if seg.size == 0:
        return np.zeros(new_shape, dtype=dtype)
    nearest = resize(seg.astype(float), new_shape, 0, mode="edge", clip=True, anti_aliasing=False)
    if order == 0:
        return nearest.astype(dtype)
    labels = np.unique(seg)
    if len(labels) == 1:
        return np.full(new_shape, labels[0], dtype=dtype)
    winner = np.zeros(new_shape, dtype=np.int32)
    best = nearest_score = None
    for i, label in enumerate(labels):
        score = resize((seg == label).astype(float), new_shape, order, mode="edge", clip=True,
                       anti_aliasing=False)
        if best is None:
            best, nearest_score = score, np.where(nearest == label, score, 0.0)
            continue
        np.copyto(winner, i, where=score > best)
        np.maximum(best, score, out=best)
        np.copyto(nearest_score, score, where=nearest == label)
    result = labels.astype(dtype)[winner]
    use_nearest = (nearest_score == best) & (best > 0)
    result[use_nearest] = nearest[use_nearest].astype(dtype)
    return result


def _resample(data: np.ndarray, new_shape: Sequence[int], is_seg: bool, axis: int | None, order: int,
              do_separate_z: bool, order_z: int) -> np.ndarray:
    """nnU-Net's `resample_data_or_seg`; returns the input itself when the shape does not change."""
    if data.ndim != len(new_shape) + 1:
        raise ValueError(f"data of shape {data.shape} must be channel-first with {len(new_shape)} spatial axes")
    new_shape = np.array([int(s) for s in new_shape])
    if np.array_equal(np.array(data.shape[1:]), new_shape):
        return data
    resize_fn = resize_segmentation if is_seg else resize_image
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    source = data.astype(float, copy=False)
    for c in range(data.shape[0]):
        if do_separate_z and axis is not None:
            in_plane = _resize_slices(source[c], new_shape, axis, order, resize_fn)
            out[c] = _resample_along_axis(in_plane, new_shape, axis, order_z, is_seg, data.dtype)
        else:
            out[c] = resize_fn(source[c], new_shape, order)
    return out


def _resize_slices(volume: np.ndarray, new_shape: np.ndarray, axis: int, order: int, resize_fn) -> np.ndarray:
    """Every slice across `axis` resized in plane; `axis` keeps its length (float64, like nnU-Net)."""
    moved = np.moveaxis(volume, axis, 0)
    plane_shape = tuple(np.delete(new_shape, axis))
    out = np.zeros((moved.shape[0], *plane_shape))
    for i in range(moved.shape[0]):
        out[i] = resize_fn(moved[i], plane_shape, order)
    return np.moveaxis(out, 0, axis)


def _resample_along_axis(volume: np.ndarray, new_shape: np.ndarray, axis: int, order_z: int, is_seg: bool,
                         dtype: np.dtype) -> np.ndarray:
    """The out-of-plane step: map_coordinates with skimage's align_corners=False grid along `axis` (the
    other axes already have their new size, so their coordinates are the identity)."""
    if volume.shape[axis] == new_shape[axis]:
        return volume.astype(dtype)
    scale = volume.shape[axis] / new_shape[axis]
    coords = scale * (np.arange(new_shape[axis]) + 0.5) - 0.5
    if order_z == 0:
        # nearest neighbour is separable: pick source slices with the same map_coordinates rounding
        index = map_coordinates(np.arange(volume.shape[axis], dtype=float), coords[None], order=0, mode="nearest")
        return np.take(volume, index.astype(np.intp), axis=axis).astype(dtype)
    grid = np.array(np.meshgrid(*[np.arange(n, dtype=float) for n in new_shape], indexing="ij"))
    grid[axis] = coords.reshape([-1 if a == axis else 1 for a in range(len(new_shape))])
    if not is_seg:
        return map_coordinates(volume, grid, order=order_z, mode="nearest").astype(dtype)
    out = np.zeros(tuple(new_shape), dtype=dtype)
    for label in np.unique(volume):
        score = map_coordinates((volume == label).astype(float), grid, order=order_z, mode="nearest")
        out[np.round(score) > 0.5] = label
    return out
