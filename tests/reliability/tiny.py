"""A tiny valid nnU-Net-layout dataset that a test breaks in place, and the CLI as a user runs it.

Small on purpose (3 cases of 6 x 12 x 12 voxels, two channels): every bad-input case copies it, so the
copies must cost milliseconds, and two channels let a case lose one channel file and still exist.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHAPE = (6, 12, 12)  # (z, y, x)
SPACING = (2.0, 1.0, 1.0)  # (z, y, x) mm
CHANNELS = ("T1", "T2")
LABELS = {"background": 0, "organ": 1, "vessel": 2}
CASE_IDS = ("case_000", "case_001", "case_002")


def write_nifti(arr_zyx: np.ndarray, path: Path, spacing_zyx: tuple[float, ...] = SPACING,
                affine: np.ndarray | None = None) -> None:
    """(z, y, x) data written as nibabel's (x, y, z), the inverse of viseg.data.nifti's reader."""
    if affine is None:
        sx, sy, sz = [*reversed(spacing_zyx), 1.0, 1.0, 1.0][:3]
        affine = np.diag([sx, sy, sz, 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(arr_zyx.transpose(*reversed(range(arr_zyx.ndim)))), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def read_zyx(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj).transpose(2, 1, 0).copy()


def valid_label() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[2:4, 3:9, 3:9] = 1
    label[2:3, 4:6, 4:6] = 2
    return label


@dataclass
class TinyDataset:
    """Files live under `root`; `basepath` is what the command line is given (a test may point it at a
    symlink or move the dataset under an unusual name)."""

    root: Path
    basepath: Path = field(init=False)

    def __post_init__(self) -> None:
        self.basepath = self.root

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    def image(self, case: str = "case_001", channel: int = 1) -> Path:
        return self.root / "imagesTr" / f"{case}_{channel:04d}.nii.gz"

    def label(self, case: str = "case_001") -> Path:
        return self.root / "labelsTr" / f"{case}.nii.gz"

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*"))

    def raw_json(self) -> dict[str, Any]:
        return json.loads(self.dataset_json.read_text())

    def write_json(self, raw: Any) -> None:
        self.dataset_json.write_text(json.dumps(raw))

    def edit_json(self, drop: tuple[str, ...] = (), **changes: Any) -> None:
        raw = {k: v for k, v in self.raw_json().items() if k not in drop}
        self.write_json(raw | changes)


def make_tiny_dataset(root: Path, channels: tuple[str, ...] = CHANNELS) -> TinyDataset:
    """Fingerprinting draws nnU-Net's fixed 1e8 intensity samples per channel (seconds each, whatever the
    dataset's size), so tests that plan use one channel."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    ds = TinyDataset(root)
    for case in CASE_IDS:
        for channel in range(len(channels)):
            write_nifti(rng.normal(100.0, 10.0, SHAPE).astype(np.float32), ds.image(case, channel))
        write_nifti(valid_label(), ds.label(case))
    ds.write_json({"name": "Tiny", "channel_names": {str(i): n for i, n in enumerate(channels)},
                   "labels": LABELS, "numTraining": len(CASE_IDS), "file_ending": ".nii.gz"})
    return ds


def keep_one_channel(ds: TinyDataset) -> None:
    """Drop every channel but the first (see make_tiny_dataset for why planning tests want one)."""
    for path in (ds.root / "imagesTr").glob("*_0001.nii.gz"):
        path.unlink()
    ds.edit_json(channel_names={"0": CHANNELS[0]})


def copy_dataset(source: TinyDataset, root: Path) -> TinyDataset:
    shutil.copytree(source.root, root, symlinks=True)
    return TinyDataset(root)


def viseg_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"viseg.{module}", *args]


def viseg_env(extra_pythonpath: Path | None = None) -> dict[str, str]:
    """The user's environment, minus HYDRA_FULL_ERROR (it would turn every config error into a traceback)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    paths = [str(p) for p in (extra_pythonpath, REPO) if p is not None]
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_viseg(module: str, *args: str, cwd: Path, extra_pythonpath: Path | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """`python -m viseg.<module> args...` in `cwd`, as a user would type it."""
    return subprocess.run(viseg_command(module, *args), cwd=cwd, env=viseg_env(extra_pythonpath),
                          capture_output=True, text=True, timeout=timeout, check=False)
