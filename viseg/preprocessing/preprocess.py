"""Case + plans -> network-ready arrays, used by training (through the cache) and by inference.

`preprocess_case` follows nnU-Net v2's DefaultPreprocessor step for step and is bit-identical to it:
transpose -> crop to the nonzero region -> normalize per channel -> resample to the plan's spacing.
Normalization comes before resampling because it uses the nonzero mask, which no longer fits the image
once both are interpolated.

The cache holds one folder per (dataset, preprocessing-relevant part of the plan):

    <dataset cache>/preprocessed/<configuration>-<hash8>/
        manifest.json       what the hash covers
        <case>_data.npy     float32 (C, Z, Y, X)
        <case>_seg.npy      int16 (1, Z, Y, X): original label values, -1 outside the nonzero mask
        <case>_fg.npz       foreground locations for oversampling, keys 'class_<label value>'
        <case>.json         CaseProperties, file sizes, blake2b digests and the folder hash; written LAST
        .lock               held by the one process writing into the folder

Only what changes the arrays enters the hash, so plans differing in patch or batch size share a folder.
Every file is written under a temporary name and renamed, and the marker comes last: a killed run never
leaves a case that looks complete.

Writers take the folder's lock (`filelock`: flock(2) on the lock file), so two processes, on one node or on
two, never preprocess into one folder at once: the second waits, then finds the cases done. Only the lock
holder removes temporary files, and every temporary file it finds is a dead writer's. Over NFS flock works
where the client has lock support (NFSv4, or v3 with lockd: not `nolock` or `local_lock=all` mounts);
Lustre needs its `flock` mount option. Where flock is missing, filelock 4 falls back to a lock file created
with O_EXCL, which a SIGKILLed writer leaves behind (delete `.lock` by hand once no preprocessing runs).
The digests are checked only on the locked path, never on the lock-free one every trial takes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from filelock import FileLock, Timeout
from scipy.ndimage import binary_fill_holes

from viseg.data.dataset import Case
from viseg.data.labels import Region, class_labels
from viseg.data.nifti import read_case
from viseg.io.atomic import write_atomically
from viseg.io.jsonio import read_json, write_json_atomic
from viseg.io.layout import cached_case_files, foreground_key, label_of_foreground_key
from viseg.parallel import parallel_map
from viseg.planning.fingerprint import nonzero_bbox
from viseg.planning.geometry import compute_new_shape
from viseg.planning.plans import Plans
from viseg.preprocessing.prepare import PreparedDataset
from viseg.preprocessing.resampling import (
    check_resampled_size,
    resample_image,
    resample_segmentation,
)

if TYPE_CHECKING:
    from viseg.preprocessing.prepare import PreparedDataset

log = logging.getLogger(__name__)

# Bump whenever preprocessing changes its output for the same inputs: old cache folders are then ignored.
PREPROCESS_VERSION = 1
NUM_FOREGROUND_SAMPLES = 10000
MIN_PERCENT_COVERAGE = 0.01  # nnU-Net: sample at least 1 % of a large class's voxels
NORM_EPS = 1e-8


@dataclass
class CaseProperties:
    """Geometry needed to undo preprocessing, in two axis orders (inference: resample the prediction to
    shape_after_crop, transpose back with transpose_backward, paste into shape_before_crop at bbox):

    * original (untransposed, the reader's (z, y, x)): original_spacing, shape_before_crop, bbox;
    * network (after transpose_forward): shape_after_crop, spacing_after_resampling, shape_after_resampling.

    bbox holds [start, stop) per axis. nnU-Net keeps its bbox in the transposed order; viseg stores it in the
    original one so that it indexes the image as read.
    """

    case_id: str
    original_spacing: list[float]
    shape_before_crop: list[int]
    bbox: list[list[int]]
    shape_after_crop: list[int]
    spacing_after_resampling: list[float]
    shape_after_resampling: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseProperties:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


# -- normalization (nnU-Net's default_normalization_schemes) ---------------------------------------------


def _zscore(image: np.ndarray, mask: np.ndarray | None, props: dict[str, float]) -> np.ndarray:
    if mask is not None:  # voxels outside the mask stay 0 (nnU-Net masks when cropping removed > 25 %)
        values = image[mask]
        image[mask] = (values - values.mean()) / max(values.std(), NORM_EPS)
        return image
    mean, std = image.mean(), image.std()
    image -= mean
    image /= max(std, NORM_EPS)
    return image


def _ct(image: np.ndarray, mask: np.ndarray | None, props: dict[str, float]) -> np.ndarray:
    np.clip(image, props["percentile_00_5"], props["percentile_99_5"], out=image)
    image -= props["mean"]
    image /= max(props["std"], NORM_EPS)
    return image


def _rescale_to_01(image: np.ndarray, mask: np.ndarray | None, props: dict[str, float]) -> np.ndarray:
    image -= image.min()
    image /= np.clip(image.max(), a_min=NORM_EPS, a_max=None)
    return image


def _rgb_to_01(image: np.ndarray, mask: np.ndarray | None, props: dict[str, float]) -> np.ndarray:
    if image.min() < 0 or image.max() > 255:
        raise ValueError(f"RGBTo01Normalization expects values in [0, 255], found [{image.min()}, {image.max()}]; "
                         "use another normalization for this channel (channel name in dataset.json)")
    image /= 255.0
    return image


NORMALIZERS = {
    "ZScoreNormalization": _zscore,
    "CTNormalization": _ct,
    "NoNormalization": lambda image, mask, props: image,
    "RescaleTo01Normalization": _rescale_to_01,
    "RGBTo01Normalization": _rgb_to_01,
}


def normalize(data: np.ndarray, seg: np.ndarray, schemes: tuple[str, ...], use_mask: tuple[bool, ...],
              intensity_properties: dict[str, dict[str, float]]) -> np.ndarray:
    """Per-channel normalization in place; `seg >= 0` is the mask (only z-score uses it)."""
    mask = seg[0] >= 0 if any(use_mask) else None
    for c in range(data.shape[0]):
        if schemes[c] not in NORMALIZERS:
            raise ValueError(f"unknown normalization scheme {schemes[c]!r}; known: {sorted(NORMALIZERS)}")
        masked = mask if use_mask[c] and schemes[c] == "ZScoreNormalization" else None
        data[c] = NORMALIZERS[schemes[c]](data[c], masked, intensity_properties.get(str(c), {}))
    return data


# -- one case ---------------------------------------------------------------------------------------------


def crop_to_nonzero(data: np.ndarray, seg: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """nnU-Net's crop_to_nonzero: crop to the bounding box of the hole-filled nonzero mask and mark label 0
    outside the mask as -1. Holes are filled inside the box only: a hole never touches the box's border,
    and background reaching it connects to the image border, so the result is the same, on fewer voxels."""
    box = nonzero_bbox(data)
    data = data[(slice(None), *box)]
    mask = binary_fill_holes(np.any(data != 0, axis=0))
    if seg is None:
        seg = np.where(mask, np.int16(0), np.int16(-1))[None]
    else:
        seg = seg[(slice(None), *box)]
        seg[(seg == 0) & ~mask[None]] = -1
    return data, seg, [[s.start, s.stop] for s in box]


def _label_as_int16(label: np.ndarray) -> np.ndarray:
    if label.size and (label.min() < 0 or label.max() > np.iinfo(np.int16).max):
        raise ValueError(f"label values must lie in [0, 32767], found [{label.min()}, {label.max()}]")
    return label.astype(np.int16)[None]


def preprocess_case(image: np.ndarray, label: np.ndarray | None, spacing: tuple[float, ...], plans: Plans,
                    configuration: str, case_id: str = "") -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """(C, Z, Y, X) image (+ optional (Z, Y, X) label) -> float32 data, int16 (1, Z, Y, X) seg (None without
    a label), properties. I/O-free: inference calls it with label=None."""
    plan = plans.configuration(configuration)
    axes = [int(i) for i in plans.transpose_forward]
    data = np.array(image, dtype=np.float32).transpose([0, *[i + 1 for i in axes]])
    seg = _label_as_int16(label).transpose([0, *[i + 1 for i in axes]]) if label is not None else None
    current_spacing = [float(spacing[i]) for i in axes]
    shape_before = list(image.shape[1:])
    data, seg_or_mask, bbox_t = crop_to_nonzero(data, seg)
    shape_after_crop = list(data.shape[1:])
    # 2d: the slices keep their own spacing (nnU-Net does not resample between slices for 2d)
    target = [float(s) for s in plan.spacing]
    if len(target) < len(current_spacing):
        target = [current_spacing[0], *target]
    new_shape = compute_new_shape(shape_after_crop, current_spacing, target)
    check_resampled_size(case_id, shape_after_crop, new_shape, data.shape[0], spacing, plan.spacing)
    data = normalize(data, seg_or_mask, plan.normalization_schemes, plan.use_mask_for_norm,
                     plans.foreground_intensity_properties_per_channel)
    r = plan.resampling
    data = resample_image(data, current_spacing, target, new_shape, r.data_order, r.order_z, r.force_separate_z)
    if seg is not None:
        seg = resample_segmentation(seg_or_mask, current_spacing, target, new_shape, r.seg_order, r.order_z,
                                    r.force_separate_z).astype(np.int16, copy=False)
        seg = np.ascontiguousarray(seg)
    bbox = [bbox_t[axes.index(a)] for a in range(len(axes))]  # back to the original axis order
    properties = CaseProperties(case_id=case_id, original_spacing=[float(s) for s in spacing],
                                shape_before_crop=shape_before, bbox=bbox, shape_after_crop=shape_after_crop,
                                spacing_after_resampling=target, shape_after_resampling=list(new_shape))
    return np.ascontiguousarray(data, dtype=np.float32), seg, properties


def sample_foreground_locations(seg: np.ndarray, label_values: Sequence[Region],
                                seed: int = 1234) -> dict[Region, np.ndarray]:
    """Up to 10,000 voxels per label or region (at least 1 % of them), as nnU-Net's class_locations: (N, 4)
    int coordinates into the (1, Z, Y, X) seg, leading 0. Same random stream as nnU-Net, so the same voxels."""
    rng = np.random.RandomState(seed)
    flat = seg.reshape(-1)
    locations: dict[Region, np.ndarray] = {}
    for value in label_values:
        key: Region = tuple(int(v) for v in value) if isinstance(value, tuple) else int(value)
        index = np.flatnonzero(np.isin(flat, key) if isinstance(key, tuple) else flat == key)
        if index.size == 0:  # no draw for an absent label, as in nnU-Net, so later labels draw the same
            locations[key] = np.zeros((0, seg.ndim), dtype=np.int64)
            continue
        n = max(min(NUM_FOREGROUND_SAMPLES, index.size), int(np.ceil(index.size * MIN_PERCENT_COVERAGE)))
        chosen = index[rng.choice(index.size, n, replace=False)]
        locations[key] = np.stack(np.unravel_index(chosen, seg.shape), axis=1).astype(np.int64)
    return locations


# -- the cache --------------------------------------------------------------------------------------------


def cache_inputs(plans: Plans, configuration: str) -> dict[str, Any]:
    """Everything that changes the preprocessed arrays, and nothing else (not patch size, batch size,
    network or foreground_labels: the loader remaps labels)."""
    plan = plans.configuration(configuration)
    return {
        "preprocess_version": PREPROCESS_VERSION,
        "dataset_signature": plans.dataset_signature,
        "configuration": plan.data_configuration,
        "labels": dict(sorted(plans.labels.items())),
        "transpose_forward": list(plans.transpose_forward),
        "spacing": [float(s) for s in plan.spacing],
        "normalization_schemes": list(plan.normalization_schemes),
        "use_mask_for_norm": [bool(m) for m in plan.use_mask_for_norm],
        "foreground_intensity_properties_per_channel": plans.foreground_intensity_properties_per_channel,
        "resampling": asdict(plan.resampling),
    }


def cache_hash(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:8]


def preprocessed_dir(prepared: PreparedDataset) -> Path:
    """Where `preprocess_dataset` puts (or has put) this prepared dataset's arrays: beside the dataset's
    fingerprint, so runs with other plans (or a continued run, whose plans_dir is its run folder) share it."""
    inputs = cache_inputs(prepared.plans, prepared.configuration)
    return prepared.cache_dir / "preprocessed" / f"{inputs['configuration']}-{cache_hash(inputs)}"


LOCK_FILE = ".lock"
DIGEST_CHUNK = 2**22


def file_digest(path: Path) -> str:
    """blake2b of a file's content: hashlib's fastest strong hash, about a second per GB on one core."""
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        while chunk := handle.read(DIGEST_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_case_complete(folder: Path, case_id: str, verify: bool = False) -> bool:
    """The marker exists, parses, belongs to this folder's hash, records a digest for every file, and every
    file has the recorded size; with `verify`, also the recorded content (the files are not fsynced, so a
    crash of the machine can leave one of the right size holding zeros)."""
    try:
        files = cached_case_files(case_id)
        marker = read_json(folder / files.marker)
        if marker["folder_hash"] != folder.name.rsplit("-", 1)[-1]:
            return False
        sizes, digests = marker["file_sizes"], marker["file_blake2b"]
        names = files.arrays
        if not all((folder / name).stat().st_size == sizes[name] and isinstance(digests[name], str)
                   for name in names):
            return False
        return not verify or all(file_digest(folder / name) == digests[name] for name in names)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_atomic(path: Path, write) -> int:
    """`write(handle)` into a temp file beside `path`, then rename; returns the size. No fsync: the marker
    (written with fsync, after these) records the sizes and digests, so a file damaged by a crash is found."""
    def fill(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            write(handle)

    write_atomically(path, fill)
    return path.stat().st_size


class CaseJob(NamedTuple):
    """What a worker process needs for one case (small and picklable)."""

    case: Case
    plans: Plans
    configuration: str
    folder: Path


def preprocess_and_save(job: CaseJob) -> str:
    """Worker: read, preprocess and cache one case; the marker is written last."""

    arrays = read_case(job.case, with_label=True)
    # an unlabelled case is all background (-1 outside the nonzero mask), like nnU-Net's seg without a label
    label = arrays.label if arrays.label is not None else np.zeros(arrays.image.shape[1:], np.int16)
    data, seg, properties = preprocess_case(arrays.image, label, arrays.spacing, job.plans, job.configuration,
                                            case_id=job.case.case_id)
    # every class a patch may be centred on; never the ignore label (nnU-Net's foreground_labels), and for a
    # region plan its regions (nnU-Net's foreground_regions)
    centres = job.plans.label_encoding().scored if job.plans.regions else class_labels(job.plans.labels)
    locations = sample_foreground_locations(seg, centres)
    files = cached_case_files(job.case.case_id)
    names = files.arrays
    sizes = {
        names[0]: _write_atomic(job.folder / names[0], lambda f: np.save(f, data)),
        names[1]: _write_atomic(job.folder / names[1], lambda f: np.save(f, seg)),
        names[2]: _write_atomic(job.folder / names[2],
                                lambda f: np.savez(f, **{foreground_key(k): v for k, v in locations.items()})),
    }
    digests = {name: file_digest(job.folder / name) for name in names}  # still in the page cache: cheap
    write_json_atomic(job.folder / files.marker,
                      {"folder_hash": job.folder.name.rsplit("-", 1)[-1], "file_sizes": sizes,
                       "file_blake2b": digests, "properties": properties.to_dict()})
    return job.case.case_id


def _remove_temp_files(folder: Path) -> None:
    """Temporary files of writers that died: called only while holding the folder's lock, when no other
    writer can exist, so every one found is a leftover (whichever node, whichever pid wrote it)."""
    for tmp in [*folder.glob(".*.tmp"), *folder.glob(".*.tmp.*")]:
        tmp.unlink(missing_ok=True)


def folder_lock(folder: Path) -> FileLock:
    return FileLock(str(folder / LOCK_FILE))


def _write_manifest(folder: Path, inputs: dict[str, Any]) -> None:
    path = folder / "manifest.json"
    try:
        if read_json(path) == inputs:
            return
    except (OSError, ValueError):
        pass
    write_json_atomic(path, inputs)


def preprocess_dataset(prepared: PreparedDataset, num_processes: int | None = None, progress: bool = True) -> Path:
    """Preprocess every case of a PreparedDataset that is not already complete in the cache; returns the
    folder. A second call finds everything complete and does no work.

    The fast path (every marker present, every size right) reads no array and takes no lock: it is what
    each trial of a sweep runs after the driver preprocessed. Anything less, and the folder's lock is taken
    and every case is checked again, this time against its digests, before the missing ones are written."""
    folder = preprocessed_dir(prepared)
    if all(is_case_complete(folder, c.case_id) for c in prepared.cases):
        log.info("%d cases already preprocessed in %s", len(prepared.cases), folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        todo = [c for c in prepared.cases if not is_case_complete(folder, c.case_id, verify=True)]
        done = len(prepared.cases) - len(todo)
        if not todo:  # another process finished them while this one waited for the lock
            log.info("%d cases already preprocessed in %s", done, folder)
            return folder
        if done:
            log.info("%d cases already preprocessed, %d to do, in %s", done, len(todo), folder)
        _remove_temp_files(folder)
        _write_manifest(folder, cache_inputs(prepared.plans, prepared.configuration))
        jobs = [CaseJob(case, prepared.plans, prepared.configuration, folder) for case in todo]
        parallel_map(preprocess_and_save, jobs, num_processes=num_processes, desc="Preprocessing",
                     progress=progress)
    log.info("preprocessed %d cases into %s", len(todo), folder)
    return folder


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """The folder's lock, saying so when another process holds it (it may be preprocessing for hours)."""
    lock = folder_lock(folder)
    try:
        lock.acquire(timeout=1)
    except Timeout:
        log.info("waiting for another process preprocessing into %s (it holds %s)", folder, folder / LOCK_FILE)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def load_case(folder: Path, case_id: str, mmap: bool = True
              ) -> tuple[np.ndarray, np.ndarray, CaseProperties, dict[int, np.ndarray]]:
    """A cached case: data, seg (memory-mapped by default, so a loader reads only its patches), properties
    and class locations."""
    data, seg, locations = load_arrays(folder, case_id, mmap)
    marker = read_json(Path(folder) / cached_case_files(case_id).marker)
    return data, seg, CaseProperties.from_dict(marker["properties"]), locations


def load_arrays(folder: Path, case_id: str, mmap: bool = True
                ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """A cached case's data, seg and class locations: what the patch sampler needs, without the properties."""
    folder, mode, files = Path(folder), ("r" if mmap else None), cached_case_files(case_id)
    data = np.load(folder / files.data, mmap_mode=mode)
    seg = np.load(folder / files.seg, mmap_mode=mode)
    with np.load(folder / files.foreground) as npz:
        locations = {label_of_foreground_key(key): np.asarray(npz[key]) for key in npz.files}
    return data, seg, locations
