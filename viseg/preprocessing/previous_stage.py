"""The previous stage's prediction as a cascade's input: its on-disk form and its one-hot channels.

A 3d_lowres run writes, for each case of its fold, the label map it predicts, resampled to the cascade's
preprocessed grid: `<lowres run>/predicted_next_stage/<next stage>/<case>.npy`, int16 (Z, Y, X) label values.
A `.npy` (not nnU-Net's compressed `.npz`) so the training loader memory-maps it and reads only its patch. The
network then sees one more input channel per foreground label, 1 where the previous stage predicted that label
(nnU-Net's convert_labelmap_to_one_hot, appended after the image channels).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from viseg.errors import DatasetError
from viseg.io.atomic import write_atomically
from viseg.io.layout import NEXT_STAGE_DIR

PREVIOUS_DTYPE = np.int16


def next_stage_dir(lowres_run: Path, next_stage: str) -> Path:
    return Path(lowres_run) / NEXT_STAGE_DIR / next_stage


def previous_file(folder: Path, case_id: str) -> Path:
    return Path(folder) / f"{case_id}.npy"


def save_previous(folder: Path, case_id: str, labels: np.ndarray) -> Path:
    """Atomically: two cascade trials of one fold may write the same case, and a kill leaves no half file."""
    path = previous_file(folder, case_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(labels, dtype=PREVIOUS_DTYPE)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.save would append .npy to the temporary name
            np.save(handle, array, allow_pickle=False)

    write_atomically(path, write)
    return path


def load_previous(folder: Path, case_id: str, shape: Sequence[int] | None = None, mmap: bool = True) -> np.ndarray:
    """The (Z, Y, X) label map of `case_id`; `shape`, when given, is the case's preprocessed grid it must fit."""
    path = previous_file(folder, case_id)
    try:
        labels = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read the previous stage's prediction of case {case_id}: {path}: {exc}",
                           fix=f"delete {path}; the cascade predicts it again with its lowres run") from None
    if labels.ndim != 3 or (shape is not None and tuple(labels.shape) != tuple(shape)):
        raise DatasetError(f"{path} has shape {tuple(labels.shape)}, the case's preprocessed grid is "
                           f"{tuple(shape) if shape is not None else '3D'}",
                           fix=f"delete {path}; the cascade predicts it again with its lowres run")
    return labels


def one_hot_previous(labels: np.ndarray, foreground_labels: Sequence[int], dtype: np.dtype = np.float32
                     ) -> np.ndarray:
    """(K, *labels.shape): channel k is 1 where the previous stage predicted `foreground_labels[k]`. Other
    values (background, -1 outside the nonzero mask) are 0 in every channel."""
    labels = np.asarray(labels)
    return np.stack([labels == value for value in foreground_labels]).astype(dtype)
