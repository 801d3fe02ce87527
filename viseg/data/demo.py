"""The built-in demo dataset: small, synthetic, deterministic, in nnU-Net v2 raw layout.

Each case is an anisotropic MRI-like volume (z 14..20 slices of ~4 mm, 48..64 x 48..64 pixels of ~1 mm):
a smooth textured background (~100) with Gaussian noise, a randomly rotated ellipsoid "organ" (label 1, ~180),
a thin tilted tube "vessel" (label 2, ~240) crossing it, and 1-3 small "lesion" blobs (label 3, ~300) strictly
inside the organ and off the vessel. Labels: lesion overrides vessel overrides organ.

It exists so that the tests and the default sweep can plan, train and predict end to end on a laptop CPU in
minutes, with no download. Everything depends only on the seed; case i is the same whatever n_cases is.

The region variant (`DemoSpec(regions=True)`, `python -m viseg.demo --regions`) has the same images and label
files with nnU-Net's region-based dataset.json: "organ" is the organ including its lesions (values 1 and 3),
"vessel" and "lesion" are regions of one value, and regions_class_order [1, 2, 3] turns the predicted regions
back into the same label values.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from viseg.errors import ConfigError
from viseg.io.jsonio import read_json, write_json_atomic
from viseg.progress import track

# Bump whenever the generated content changes, so that cached demo datasets are regenerated.
DEMO_VERSION = 1
MARKER = "demo_spec.json"
_LABEL_NAMES = ("background", "organ", "vessel", "lesion")  # label value = index
_SHAPE_RANGE = ((14, 20), (48, 64), (48, 64))  # (z, y, x), inclusive
# (z, y, x) mm; 4x anisotropy as in clinical MRI, so that planning exercises its anisotropic rules
_SPACING = (4.0, 1.0, 1.0)
_SPACING_JITTER = 0.05
# Class means 60-80 apart against a noise std of 10-18: clear contrast, yet noisy enough to need learning.
_BACKGROUND, _ORGAN, _VESSEL, _LESION = 100.0, 180.0, 240.0, 300.0


@dataclass(frozen=True)
class DemoSpec:
    """What determines a demo dataset; its dict (plus DEMO_VERSION) is the cache key."""

    n_cases: int = 20
    seed: int = 0
    regions: bool = False  # the region-based dataset.json (see the module docstring)

    def __post_init__(self) -> None:
        if self.n_cases < 1:
            raise ConfigError(f"demo n_cases must be >= 1, got {self.n_cases}", fix="use e.g. --n-cases 20")
        if self.seed < 0:
            raise ConfigError(f"demo seed must be >= 0, got {self.seed}", fix="use a non-negative --seed")


def _axes_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
    """Voxel-centre coordinates in mm per axis, shaped to broadcast to (z, y, x) without a full meshgrid."""
    return [(np.arange(n, dtype=np.float32) * sp).reshape([-1 if i == a else 1 for i in range(3)])
            for a, (n, sp) in enumerate(zip(shape, spacing, strict=True))]


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random rotation from a random unit quaternion (elementwise maths only: portable bits)."""
    w, x, y, z = (q := rng.normal(size=4)) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def _organ(rng: np.random.Generator, axes: list[np.ndarray], extent: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rotated ellipsoid mask, its centre (mm) and radii (mm), kept inside the volume by a bounding sphere."""
    radii = rng.uniform(0.22, 0.32, size=3) * extent[1:].mean()
    margin = np.minimum(radii.max() + 2.0, extent / 2)
    center = rng.uniform(margin, extent - margin)
    rot = _rotation(rng)
    rel = [ax - c for ax, c in zip(axes, center, strict=True)]
    inside = sum(((rot[k, 0] * rel[0] + rot[k, 1] * rel[1] + rot[k, 2] * rel[2]) / radii[k]) ** 2
                 for k in range(3))
    return inside <= 1.0, center, radii


def _vessel(rng: np.random.Generator, axes: list[np.ndarray], center: np.ndarray,
            radii: np.ndarray) -> np.ndarray:
    """Straight tube through the organ; tilted <= 45 deg from z so it stays connected across 4 mm slices."""
    through = center + rng.uniform(-0.3, 0.3, size=3) * radii.min()
    tilt, azimuth = rng.uniform(0.0, np.pi / 4), rng.uniform(0.0, 2 * np.pi)
    direction = np.array([np.cos(tilt), np.sin(tilt) * np.sin(azimuth), np.sin(tilt) * np.cos(azimuth)])
    radius = rng.uniform(2.0, 3.0)
    rel = [ax - p for ax, p in zip(axes, through, strict=True)]
    along = sum(d * r for d, r in zip(direction, rel, strict=True))
    return (rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - along**2) <= radius**2


def _lesions(rng: np.random.Generator, axes: list[np.ndarray], allowed: np.ndarray,
             spacing: tuple[float, ...]) -> np.ndarray:
    """1-3 balls whose one-voxel neighbourhood stays in `allowed` (organ minus vessel): strictly inside."""
    from scipy import ndimage  # heavy (0.5 s): imported on use so that `--help` answers fast

    core = ndimage.binary_erosion(allowed)
    depth = ndimage.distance_transform_edt(core, sampling=spacing)
    lesion = np.zeros(allowed.shape, dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(3.0, 5.0)
        candidates = np.argwhere(depth > radius + 0.5)
        if len(candidates) == 0:  # a thin organ: the deepest point, with the largest ball that fits
            candidates = np.argwhere(depth == depth.max())
            radius = max(float(depth.max()) - 0.5, 1.5)
        center = candidates[rng.integers(len(candidates))] * np.asarray(spacing)
        lesion |= sum((ax - c) ** 2 for ax, c in zip(axes, center, strict=True)) <= radius**2
    return lesion & core


def _texture(rng: np.random.Generator, axes: list[np.ndarray], n_waves: int = 5) -> np.ndarray:
    """Low-frequency texture (plane waves of 30..100 mm wavelength), roughly in [-1, 1]: bias-field-like."""
    out = np.zeros(np.broadcast_shapes(*(ax.shape for ax in axes)), dtype=np.float32)
    for _ in range(n_waves):
        direction = (d := rng.normal(size=3)) / np.linalg.norm(d)
        k = 2 * np.pi / rng.uniform(30.0, 100.0)
        phase = rng.uniform(0.0, 2 * np.pi)
        out += np.cos(sum(k * di * ax for di, ax in zip(direction, axes, strict=True)) + phase)
    return out / np.sqrt(n_waves / 2)


def make_demo_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One case drawn from `rng`: image float32 (z, y, x), label uint8 (z, y, x), spacing (z, y, x) mm."""
    from scipy import ndimage

    shape = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in _SHAPE_RANGE)
    jitter = rng.uniform(-_SPACING_JITTER, _SPACING_JITTER, size=3)
    spacing = tuple(round(float(s * (1 + j)), 4) for s, j in zip(_SPACING, jitter, strict=True))
    axes = _axes_mm(shape, spacing)
    organ, center, radii = _organ(rng, axes, np.array(shape) * np.array(spacing))
    vessel = _vessel(rng, axes, center, radii)
    lesion = _lesions(rng, axes, organ & ~vessel, spacing)
    label = np.zeros(shape, dtype=np.uint8)
    for value, mask in ((1, organ), (2, vessel), (3, lesion)):  # later classes override earlier ones
        label[mask] = value
    texture = _texture(rng, axes)
    image = np.where(label == 0, _BACKGROUND + 20.0 * texture, _ORGAN + 8.0 * texture)
    image[label == 2], image[label == 3] = _VESSEL, _LESION
    image = ndimage.gaussian_filter(image, sigma=(0.0, 0.6, 0.6))  # in-plane partial-volume edges
    gain, noise = rng.uniform(0.9, 1.1), rng.uniform(10.0, 18.0)  # scanner-to-scanner variation
    image = gain * image + noise * rng.standard_normal(shape, dtype=np.float32)
    return np.clip(image, 0.0, None).astype(np.float32), label, spacing  # type: ignore[return-value]


def _save_nifti(arr_zyx: np.ndarray, spacing_zyx: tuple[float, ...], path: Path) -> None:
    """Write (z, y, x) data as nibabel (x, y, z), the inverse of viseg.data.nifti (and nnU-Net's NibabelIO)."""
    import nibabel as nib

    sz, sy, sx = spacing_zyx
    affine = np.diag([sx, sy, sz, 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(arr_zyx.transpose(2, 1, 0)), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_zooms((sx, sy, sz))
    nib.save(img, str(path))


def _marker(spec: DemoSpec) -> dict:
    fields = asdict(spec)
    if not spec.regions:  # the label-based demo's marker as it was before regions, so caches stay valid
        fields.pop("regions")
    return {"version": DEMO_VERSION, "spec": fields}


def _labels(spec: DemoSpec) -> dict:
    if not spec.regions:
        return {"labels": {name: value for value, name in enumerate(_LABEL_NAMES)}}
    return {"labels": {"background": 0, "organ": [1, 3], "vessel": 2, "lesion": 3}, "regions_class_order": [1, 2, 3]}


def _write_dataset(root: Path, spec: DemoSpec, progress: bool) -> None:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(spec.seed)
    for i in track(range(spec.n_cases), "viseg demo dataset", enabled=progress):
        image, label, spacing = make_demo_case(rng)
        _save_nifti(image, spacing, root / "imagesTr" / f"demo_{i:03d}_0000.nii.gz")
        _save_nifti(label, spacing, root / "labelsTr" / f"demo_{i:03d}.nii.gz")
    write_json_atomic(root / "dataset.json", {
        "channel_names": {"0": "MRI"},
        **_labels(spec),
        "numTraining": spec.n_cases,
        "file_ending": ".nii.gz",
        "name": "VisegDemo",
        "description": f"viseg synthetic demo (v{DEMO_VERSION}, seed {spec.seed}): anisotropic MRI-like "
                       "volumes with an organ, a vessel crossing it and small lesions inside it",
    })
    write_json_atomic(root / MARKER, _marker(spec))  # last: its presence means the folder is complete


def _check_replaceable(out_dir: Path) -> None:
    """Never delete a folder we did not make: only a missing, empty or earlier demo folder is replaced."""
    ours = (out_dir / MARKER).is_file() or (out_dir.is_dir() and not any(out_dir.iterdir()))
    if out_dir.exists() and not ours:
        raise ConfigError(f"{out_dir} exists and is not a viseg demo dataset; refusing to overwrite it",
                          fix="choose a new or empty output folder, or delete this one")


def generate_demo_dataset(out_dir: Path, spec: DemoSpec = DemoSpec(), progress: bool = True) -> Path:
    """Write the demo dataset to `out_dir` atomically: built in a hidden sibling, then renamed into place,
    so a killed run never leaves a half dataset that looks complete."""
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_dataset(tmp / "dataset", spec, progress)
        if out_dir.exists():  # a directory cannot be os.replace'd onto a non-empty one: move the old aside
            os.replace(out_dir, tmp / "old")
        os.replace(tmp / "dataset", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_demo_dataset(path: Path, spec: DemoSpec) -> bool:
    """True if `path` holds a complete demo dataset generated from `spec` by this DEMO_VERSION."""
    try:
        return (Path(path) / "dataset.json").is_file() and read_json(Path(path) / MARKER) == _marker(spec)
    except (OSError, ValueError):
        return False


def demo_dataset_dir(cache_dir: Path, spec: DemoSpec = DemoSpec()) -> Path:
    """Deterministic cache location for `spec` (the "Dataset900_" prefix keeps nnU-Net naming)."""
    suffix = "_regions" if spec.regions else ""
    return Path(cache_dir) / "demo" / f"Dataset900_VisegDemo_n{spec.n_cases}_s{spec.seed}{suffix}"


def ensure_demo_dataset(cache_dir: Path, spec: DemoSpec = DemoSpec(), progress: bool = True) -> Path:
    """The cached demo dataset for `spec`, generated only if missing or stale; cheap when present."""
    path = demo_dataset_dir(cache_dir, spec)
    return path if is_demo_dataset(path, spec) else generate_demo_dataset(path, spec, progress)
