"""Reading NIfTI cases into arrays in nnU-Net's axis order.

nnU-Net reads .nii.gz with SimpleITK, which returns (z, y, x). viseg reads with nibabel (x, y, z) and
transposes, exactly like nnU-Net's own NibabelIO, so shapes, spacings, fingerprints and plans match
nnU-Net's for the same files.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from viseg.data.dataset import Case
from viseg.errors import DatasetError

# Everything nibabel and gzip raise for unreadable, truncated or non-NIfTI files.
READ_ERRORS = (nib.filebasedimages.ImageFileError, EOFError, zlib.error, OSError, ValueError)


@dataclass(frozen=True)
class VolumeHeader:
    shape_zyx: tuple[int, ...]  # spatial shape in (z, y, x); a 4D file keeps its channel count apart
    num_channels: int  # 1 for a 3D file, the 4th dimension for a 4D file
    spacing_zyx: tuple[float, ...]
    affine: np.ndarray


@dataclass(frozen=True)
class CaseArrays:
    image: np.ndarray  # (C, Z, Y, X) float32
    label: np.ndarray | None  # (Z, Y, X) integer
    spacing: tuple[float, float, float]  # (z, y, x) in mm
    affine: np.ndarray  # of the first channel, in nibabel's (x, y, z) convention


def _load(path: Path) -> nib.Nifti1Image:
    try:
        return nib.load(str(path))
    except READ_ERRORS as exc:
        raise DatasetError(
            f"cannot read {path}: {exc}", fix="re-export the file as NIfTI (.nii.gz) or remove the case"
        ) from exc


def read_header(path: Path) -> VolumeHeader:
    """Shape, spacing and affine without reading the voxel data."""
    img = _load(path)
    shape = tuple(int(s) for s in img.shape)
    zooms = tuple(float(z) for z in img.header.get_zooms())
    while len(shape) > 3 and shape[-1] == 1:  # a trailing singleton axis is still a 3D volume
        shape, zooms = shape[:-1], zooms[:-1]
    num_channels = shape[3] if len(shape) == 4 else 1
    spatial = shape[:3]
    return VolumeHeader(
        shape_zyx=tuple(reversed(spatial)) if len(spatial) == 3 else tuple(spatial),
        num_channels=num_channels,
        spacing_zyx=tuple(reversed(zooms[: len(spatial)])),
        affine=np.asarray(img.affine, dtype=np.float64),
    )


def read_voxels(path: Path, channel_index: int | None = None) -> np.ndarray:
    """Voxel data in (z, y, x); for a 4D file, the given channel."""
    img = _load(path)
    try:
        data = np.asanyarray(img.dataobj)
    except READ_ERRORS as exc:
        raise DatasetError(
            f"cannot read the voxel data of {path} (truncated or corrupt): {exc}",
            fix="re-export or re-download the file",
        ) from exc
    while data.ndim > 3 and data.shape[-1] == 1 and channel_index is None:
        data = data[..., 0]
    if channel_index is not None:
        if data.ndim != 4 or channel_index >= data.shape[3]:
            raise DatasetError(
                f"{path} has shape {data.shape}; channel {channel_index} does not exist",
                fix="check the channel list (modality/channel_names) in dataset.json",
            )
        data = data[..., channel_index]
    if data.ndim != 3:
        raise DatasetError(
            f"{path} has {data.ndim} dimensions (shape {data.shape}); a 3D volume is expected",
            fix="store one 3D volume per file (channels as separate _XXXX files)",
        )
    return data.transpose(2, 1, 0)


def read_case(case: Case, with_label: bool = True) -> CaseArrays:
    """All channels of a case as float32 (C, Z, Y, X), as nnU-Net's readers return them."""
    channels = [read_voxels(src.path, src.channel_index) for src in case.images]
    shapes = {c.shape for c in channels}
    if len(shapes) != 1:
        raise DatasetError(
            f"case {case.case_id}: channels have different shapes {sorted(shapes)}",
            fix="resample all channels of a case to the same grid",
        )
    image = np.stack(channels).astype(np.float32, copy=False)
    header = read_header(case.images[0].path)
    label = None
    if with_label and case.label is not None:
        label = read_voxels(case.label)
        if label.shape != image.shape[1:]:
            raise DatasetError(
                f"case {case.case_id}: label shape {label.shape} differs from image shape {image.shape[1:]}",
                fix="the label must be on the same voxel grid as the image",
            )
    spacing = tuple(header.spacing_zyx)
    return CaseArrays(image=image, label=label, spacing=spacing, affine=header.affine)  # type: ignore[arg-type]
