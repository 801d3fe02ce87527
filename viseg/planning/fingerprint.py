"""Dataset fingerprint, as nnU-Net defines it: what planning needs to know about the data.

Per case: crop to the nonzero bounding box, then record spacing, shapes before and after cropping,
foreground intensities and per-class voxel counts. Foreground intensities are subsampled exactly as
nnU-Net's DatasetFingerprintExtractor does (1e8 samples over the dataset, drawn with replacement from a
RandomState(1234) per case), so that the statistics, and hence the plans, agree with nnU-Net's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from viseg.data.dataset import Case, DatasetInfo
from viseg.data.nifti import read_case
from viseg.io.jsonio import read_json, write_json_atomic
from viseg.parallel import parallel_map

FINGERPRINT_SCHEMA_VERSION = 1
FOREGROUND_SAMPLES_TOTAL = 10e7  # nnU-Net's num_foreground_voxels_for_intensitystats
FOREGROUND_SAMPLE_SEED = 1234  # nnU-Net's seed for every case
_PERCENTILES = np.array((0.5, 50.0, 99.5))


@dataclass(frozen=True)
class CaseFingerprint:
    case_id: str
    spacing: tuple[float, ...]
    shape_before_crop: tuple[int, ...]
    shape_after_crop: tuple[int, ...]
    relative_size_after_cropping: float
    class_voxel_counts: dict[int, int]


@dataclass
class Fingerprint:
    dataset_name: str
    dataset_signature: str
    channel_names: list[str]
    labels: dict[str, int]
    case_ids: list[str]
    spacings: list[list[float]]
    shapes_before_crop: list[list[int]]
    shapes_after_crop: list[list[int]]
    median_relative_size_after_cropping: float
    foreground_intensity_properties_per_channel: dict[str, dict[str, float]]
    class_voxel_counts: dict[str, list[int]]  # label value -> voxels per case, in case order
    schema_version: int = FINGERPRINT_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    # region-based labels (dataset.json, see viseg.data.labels): empty for label-based datasets
    regions: list[list[int]] = field(default_factory=list)
    region_names: list[str] = field(default_factory=list)
    regions_class_order: list[int] = field(default_factory=list)

    @property
    def num_cases(self) -> int:
        return len(self.case_ids)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:
        return cls(**data)

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> Fingerprint:
        return cls.from_dict(read_json(path))


def nonzero_bbox(image: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of voxels that are nonzero in any channel.

    nnU-Net fills holes in the nonzero mask before taking its bounding box; filling holes never changes a
    bounding box, so it is skipped here (it is the most expensive step of nnU-Net's crop).
    """
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)
    bounds = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nonzero = np.flatnonzero(np.any(mask, axis=other))
        bounds.append(slice(int(nonzero[0]), int(nonzero[-1]) + 1))
    return tuple(bounds)


def _foreground_samples(image: np.ndarray, foreground: np.ndarray, num_samples: int) -> list[np.ndarray]:
    rs = np.random.RandomState(FOREGROUND_SAMPLE_SEED)
    samples = []
    for channel in image:
        pixels = channel[foreground]
        samples.append(rs.choice(pixels, num_samples, replace=True) if len(pixels) else pixels[:0])
    return samples


def analyze_case(args: tuple[Case, int]) -> tuple[CaseFingerprint, list[np.ndarray]]:
    """Fingerprint of one case plus its foreground intensity samples (a worker-process function)."""
    case, num_samples = args
    arrays = read_case(case)
    bbox = nonzero_bbox(arrays.image)
    image = arrays.image[(slice(None), *bbox)]
    label = arrays.label[bbox] if arrays.label is not None else np.zeros(image.shape[1:], np.uint8)
    values, counts = np.unique(label, return_counts=True)
    before, after = arrays.image.shape[1:], image.shape[1:]
    fingerprint = CaseFingerprint(
        case_id=case.case_id,
        spacing=tuple(float(s) for s in arrays.spacing),
        shape_before_crop=tuple(int(s) for s in before),
        shape_after_crop=tuple(int(s) for s in after),
        relative_size_after_cropping=float(np.prod(after) / np.prod(before)),
        class_voxel_counts={int(v): int(c) for v, c in zip(values, counts)},
    )
    return fingerprint, _foreground_samples(image, label > 0, num_samples)


def intensity_statistics(samples: np.ndarray) -> dict[str, float]:
    if samples.size == 0:
        return {k: float("nan") for k in ("mean", "median", "std", "min", "max", "percentile_99_5",
                                          "percentile_00_5")}
    p005, median, p995 = np.percentile(samples, _PERCENTILES)
    return {
        "mean": float(np.mean(samples)),
        "median": float(median),
        "std": float(np.std(samples)),
        "min": float(np.min(samples)),
        "max": float(np.max(samples)),
        "percentile_99_5": float(p995),
        "percentile_00_5": float(p005),
    }


def extract_fingerprint(
    info: DatasetInfo,
    cases: list[Case],
    num_processes: int | None = None,
    progress: bool = True,
    signature: str = "",
) -> Fingerprint:
    """Fingerprint a verified dataset, in parallel over cases."""
    num_samples = int(FOREGROUND_SAMPLES_TOTAL // max(1, len(cases)))
    results = parallel_map(analyze_case, [(case, num_samples) for case in cases], num_processes,
                           desc="Fingerprinting", progress=progress)
    per_case = [r[0] for r in results]
    stats = {
        str(c): intensity_statistics(np.concatenate([r[1][c] for r in results]))
        for c in range(info.num_channels)
    }
    label_values = sorted(set(info.labels.values()))
    return Fingerprint(
        dataset_name=info.name,
        dataset_signature=signature,
        channel_names=list(info.channel_names),
        labels=dict(info.labels),
        case_ids=[c.case_id for c in per_case],
        spacings=[list(c.spacing) for c in per_case],
        shapes_before_crop=[list(c.shape_before_crop) for c in per_case],
        shapes_after_crop=[list(c.shape_after_crop) for c in per_case],
        median_relative_size_after_cropping=float(np.median([c.relative_size_after_cropping for c in per_case])),
        foreground_intensity_properties_per_channel=stats,
        class_voxel_counts={str(v): [c.class_voxel_counts.get(v, 0) for c in per_case] for v in label_values},
        **_region_fields(info),
    )


def _region_fields(info: DatasetInfo) -> dict[str, Any]:
    if info.regions is None:
        return {}
    return {"regions": [list(r) for r in info.regions.regions], "region_names": list(info.regions.names),
            "regions_class_order": list(info.regions.class_order or ())}
