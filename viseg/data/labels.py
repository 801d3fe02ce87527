"""What dataset.json's labels mean for training, and how a label map is encoded on its way to the loss.

This module is the one owner of two rules that several stages need:

* Which label values are classes. Every value above 0 is, except the one named `ignore`: nnU-Net's
  sparse-annotation convention marks voxels nobody annotated. They are left out of the loss and of every
  score, the network has no output for them, and nothing ever predicts them. nnU-Net requires `ignore` to
  be the highest label value (LabelManager: `ignore_label == max(all_labels) + 1`).
* The training encoding (`LabelEncoding`): the loader turns the preprocessed label values into codes,
  augmentation moves them with the image, then the loss, the pseudo-Dice and the full-case validation read
  them. Defining the codes here, once, keeps the loader and the augmenter from each re-deriving them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

from viseg.errors import ConfigError

IGNORE = "ignore"  # the dataset.json label name nnU-Net reserves for unannotated voxels


def ignore_label(labels: Mapping[str, int]) -> int | None:
    """The value of dataset.json's `ignore` label, or None when it has none."""
    value = labels.get(IGNORE)
    return None if value is None else int(value)


def class_labels(labels: Mapping[str, int]) -> tuple[int, ...]:
    """The label values a network can learn: every value above 0 but the ignore label (nnU-Net's
    LabelManager.foreground_labels)."""
    ignore = ignore_label(labels)
    return tuple(sorted({int(v) for v in labels.values() if int(v) != 0 and int(v) != ignore}))


def ignore_label_problem(labels: Mapping[str, int]) -> str | None:
    """Why dataset.json's ignore label breaks nnU-Net's convention, or None when it does not (or is absent).

    It must lie above every other label: the classes are then 0..K without a gap and the ignore value is
    never mistaken for one of them."""
    ignore = ignore_label(labels)
    others = [int(v) for name, v in labels.items() if name != IGNORE]
    if ignore is None or not others or ignore > max(others):
        return None
    return (f'label "{IGNORE}" has value {ignore}, but it must be the highest label value (the other labels go up '
            f"to {max(others)}): nnU-Net's convention for voxels left unannotated")


def choose_foreground_labels(labels: Mapping[str, int], requested: Sequence[int] | None,
                             dataset_name: str) -> tuple[int, ...]:
    """The label values the network predicts: `requested`, or every class label when None. The ignore label
    is never one of them: it marks voxels without annotation, not a structure to segment."""
    available = class_labels(labels)
    if requested is None:
        return available
    ignore = ignore_label(labels)
    if ignore is not None and ignore in requested:
        raise ConfigError(f"foreground_labels={list(requested)} lists {ignore}, the '{IGNORE}' label of dataset "
                          f"{dataset_name}: it marks unannotated voxels, which are left out of training and "
                          "never predicted",
                          fix=f"remove {ignore} from foreground_labels; choose from {list(available)}")
    unknown = sorted(set(requested) - set(available))
    if unknown:
        raise ConfigError(f"foreground_labels {unknown} are not labels of dataset {dataset_name} "
                          f"(its labels: {dict(labels)})", fix=f"choose from {list(available)}")
    return tuple(sorted(int(v) for v in requested))


@dataclass(frozen=True)
class LabelEncoding:
    """The label codes between the loader and the loss.

    0 is background (and every dataset label not in `foreground_labels`), 1..K are `foreground_labels` in
    their order, K + 1 (`ignore_index`) is the ignore label when the dataset has one, and OUTSIDE (-1) marks
    voxels outside the nonzero mask or past the image border. The loader keeps OUTSIDE so that augmentation
    can zero the masked channels there after its intensity transforms (nnU-Net's MaskImageTransform); then
    it becomes background, before anything reaches the loss (nnU-Net's RemoveLabelTransform(-1, 0)).
    """

    foreground_labels: tuple[int, ...]
    ignore_label: int | None = None
    OUTSIDE: ClassVar[int] = -1  # preprocessing's value outside the nonzero mask; the loader pads with it

    def __post_init__(self) -> None:
        labels = list(self.foreground_labels)
        if len(set(labels)) != len(labels) or any(v <= 0 for v in labels):
            raise ConfigError(f"foreground_labels={labels} must be distinct positive label values")
        if self.ignore_label is not None and (self.ignore_label <= 0 or self.ignore_label in labels):
            raise ConfigError(f"the ignore label {self.ignore_label} must be positive and not one of the "
                              f"foreground_labels {labels}")

    @classmethod
    def for_classes(cls, num_classes: int, ignore: bool = False) -> LabelEncoding:
        """Codes only, where dataset values do not matter (the codes 1..K are then the values too)."""
        return cls(tuple(range(1, num_classes)), num_classes if ignore else None)

    @property
    def num_classes(self) -> int:
        """Network outputs: background and the foreground labels (never the ignore label)."""
        return len(self.foreground_labels) + 1

    @property
    def ignore_index(self) -> int | None:
        """The code of ignored voxels: one past the last class, so no argmax can produce it."""
        return None if self.ignore_label is None else self.num_classes

    @property
    def label_codes(self) -> tuple[int, ...]:
        """Codes that spatial augmentation resamples as labels of their own, besides background and OUTSIDE."""
        ignore = () if self.ignore_index is None else (self.ignore_index,)
        return (*range(1, self.num_classes), *ignore)

    @cached_property
    def _lookup(self) -> np.ndarray:
        """Index: label value + 1, values clipped to [-1, largest + 1]; unlisted values map to background."""
        largest = max(0, *self.foreground_labels, self.ignore_label or 0)
        table = np.zeros(largest + 3, dtype=np.int64)
        table[0] = self.OUTSIDE
        for code, value in enumerate(self.foreground_labels, start=1):
            table[value + 1] = code
        if self.ignore_label is not None:
            table[self.ignore_label + 1] = self.ignore_index
        return table

    def encode(self, seg: np.ndarray, keep_outside: bool = True) -> np.ndarray:
        """Preprocessed label values (-1 outside the nonzero mask) -> codes, int64. `keep_outside=False`
        turns OUTSIDE into background right away (where nothing is augmented)."""
        codes = self._lookup[np.clip(seg, -1, len(self._lookup) - 2) + 1]
        if not keep_outside:
            codes[codes == self.OUTSIDE] = 0
        return codes
