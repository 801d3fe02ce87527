"""Reading NIfTI cases into arrays in nnU-Net's axis order.

nnU-Net reads .nii.gz with SimpleITK, which returns (z, y, x). viseg reads with nibabel (x, y, z) and
transposes, exactly like nnU-Net's own NibabelIO, so shapes, spacings, fingerprints and plans match
nnU-Net's for the same files.

Every read passes through `_load`, which checks the size the header claims before any voxel is read
(`check_claimed_size`): a 200-byte file whose header claims 4096^3 float32 voxels would otherwise make
nibabel allocate 256 GiB. So verify, fingerprint, preprocess and predict all refuse such a file with a
DatasetError naming it, instead of dying of a MemoryError (or the OOM killer) somewhere later.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from viseg.data.dataset import Case
from viseg.errors import ConfigError, DatasetError

# Everything nibabel and gzip raise for unreadable, truncated or non-NIfTI files.
READ_ERRORS = (nib.filebasedimages.ImageFileError, EOFError, zlib.error, OSError, ValueError)

# The largest volume (voxel data as the header describes it: shape x data type) viseg agrees to read, in GiB.
# An environment variable rather than a config key: verify, fingerprint, preprocess (in worker processes) and
# predict all read images, and the variable reaches every one of them, workers included, without threading a
# setting through each call. 16 GiB holds a 1024 x 2048 x 2048 float32 volume, far beyond CT and MRI; one
# machine's answer is every machine's (a fraction of the RAM would pass a case on the head node and refuse it
# on a worker).
MAX_IMAGE_GB_VARIABLE = "VISEG_MAX_IMAGE_GB"
DEFAULT_MAX_IMAGE_GB = 16.0
# Deflate cannot compress better than about 1032:1 (a 258-byte match costs at least 2 bits), so a .nii.gz whose
# header claims more than this many times its size in voxel data is lying (or truncated). Just above the
# limit, so that no file gzip could have written is refused.
MAX_GZIP_RATIO = 1100


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
    """The image with its header only (nibabel reads voxels lazily), after the size its header claims passed."""
    try:
        img = nib.load(str(path))
    except READ_ERRORS as exc:
        raise DatasetError(
            f"cannot read {path}: {exc}", fix="re-export the file as NIfTI (.nii.gz) or remove the case"
        ) from exc
    check_claimed_size(path, tuple(int(s) for s in img.shape), np.dtype(img.get_data_dtype()),
                       int(img.header.get_data_offset()))
    return img


def max_image_bytes() -> int:
    """The memory budget for one volume, from VISEG_MAX_IMAGE_GB (read at each call, never at import)."""
    raw = os.environ.get(MAX_IMAGE_GB_VARIABLE, "").strip()
    if not raw:
        return int(DEFAULT_MAX_IMAGE_GB * 2**30)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{MAX_IMAGE_GB_VARIABLE}={raw!r} is not a positive number of GiB",
                          fix=f"set e.g. {MAX_IMAGE_GB_VARIABLE}=64, or unset it for the default "
                              f"{DEFAULT_MAX_IMAGE_GB:g}")
    return int(value * 2**30)


def check_claimed_size(path: Path, shape: tuple[int, ...], dtype: np.dtype, data_offset: int = 0) -> None:
    """Refuse a header whose voxel data (shape x dtype) cannot be in the file or would not fit the budget.

    Checked against the file itself (an uncompressed .nii must hold every byte; a .nii.gz can hold at most
    MAX_GZIP_RATIO times its size) and against VISEG_MAX_IMAGE_GB. Other compressions (.bz2, .zst) get the
    budget only: their ratios have no useful bound."""
    claimed = math.prod(shape) * dtype.itemsize
    size = Path(path).stat().st_size
    voxels = "x".join(str(n) for n in shape) or "0"
    described = f"its header claims {voxels} voxels of {dtype} ({_gib(claimed)} of voxel data)"
    name = Path(path).name
    if name.endswith(".nii") and claimed + data_offset > size:
        raise DatasetError(f"{path}: {described}, but the file holds {size} bytes (truncated, or the header "
                           "is wrong)", fix="re-export or re-download the file, or remove the case")
    if name.endswith(".gz") and claimed > MAX_GZIP_RATIO * size:
        raise DatasetError(f"{path}: {described}, more than gzip can compress into its {size} bytes "
                           f"(at most {MAX_GZIP_RATIO}:1): the header is corrupt or forged, or the file is "
                           "truncated", fix="re-export or re-download the file, or remove the case")
    budget = max_image_bytes()
    if claimed > budget:
        raise DatasetError(f"{path}: {described}, more than the {_gib(budget)} one volume may take "
                           f"({MAX_IMAGE_GB_VARIABLE})", fix=f"check the header's dimensions; if the volume is "
                           f"really this large and the machine has the memory, raise {MAX_IMAGE_GB_VARIABLE} "
                           f"(e.g. {MAX_IMAGE_GB_VARIABLE}={math.ceil(claimed / 2**30)})")


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.3g} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.3g} MiB"


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
