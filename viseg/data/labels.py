"""What dataset.json's labels mean for training, and how a label map is encoded on its way to the loss.

This module is the one owner of two rules that several stages need:

* Which label values are classes. Every value above 0 is, except the one named `ignore`: nnU-Net's
  sparse-annotation convention marks voxels nobody annotated. They are left out of the loss and of every
  score, the network has no output for them, and nothing ever predicts them. nnU-Net requires `ignore` to
  be the highest label value (LabelManager: `ignore_label == max(all_labels) + 1`).
* The training encoding (`LabelEncoding`): the loader turns the preprocessed label values into codes,
  augmentation moves them with the image, then the loss, the pseudo-Dice and the full-case validation read
  them. Defining the codes here, once, keeps the loader and the augmenter from each re-deriving them.
* Regions (nnU-Net's region-based training, e.g. BraTS: whole tumour > tumour core > enhancing tumour).
  dataset.json then maps a name to a list of label values, and `regions_class_order` says which label
  value each region writes when the outputs become a label map again. The network has one sigmoid output
  per region; `split_region_labels` turns such a dataset.json into the label values every other stage
  knows (the union of the regions) plus the regions themselves, and `LabelEncoding` carries both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from viseg.errors import ConfigError

Region = int | tuple[int, ...]  # one label value, or several merged into one region (nnU-Net's regions)
IGNORE = "ignore"  # the dataset.json label name nnU-Net reserves for unannotated voxels
BACKGROUND = "background"


@dataclass(frozen=True)
class RegionLabels:
    """dataset.json's region definitions: `regions[i]` (label values) is output i of the network and writes
    label value `class_order[i]` into the label map, later regions over earlier ones."""

    names: tuple[str, ...]
    regions: tuple[tuple[int, ...], ...]
    class_order: tuple[int, ...] | None  # None: dataset.json has no regions_class_order (verification says so)


def is_label_value(value: object) -> bool:
    """An integer as JSON gives it (bool is an int to Python, never a label)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_label_or_region(value: object) -> bool:
    """A label value, or a non-empty JSON list of them (a region)."""
    return is_label_value(value) or (isinstance(value, list) and bool(value) and all(map(is_label_value, value)))


def has_regions(raw_labels: Mapping[str, object]) -> bool:
    """nnU-Net's rule: region-based as soon as one label maps to more than one value."""
    return any(isinstance(v, list | tuple) and len(v) > 1 for v in raw_labels.values())


def split_region_labels(raw_labels: Mapping[str, object], class_order: Sequence[int] | None
                        ) -> tuple[dict[str, int], RegionLabels]:
    """A region dataset.json's labels -> (name -> value for every label value, the regions).

    The label files hold plain values (BraTS: 1, 2, 3); the names belong to the regions. A value keeps the
    name of a region that is that value alone, else it is called `label_<value>`, so that every stage that
    reads `name -> value` labels (verification, fingerprint, sampling) works on region datasets unchanged.
    Every foreground entry is a region, single values included (nnU-Net's LabelManager)."""
    names, regions = [], []
    for name, value in raw_labels.items():
        if name in (IGNORE, BACKGROUND):
            continue
        values = tuple(int(v) for v in value) if isinstance(value, list | tuple) else (int(value),)
        names.append(str(name))
        regions.append(values)
    single = {region[0]: name for name, region in zip(names, regions) if len(region) == 1}
    every = sorted({v for region in regions for v in region} - {0})
    labels = {BACKGROUND: 0, **{single.get(v, f"label_{v}"): v for v in every}}
    if IGNORE in raw_labels:
        labels[IGNORE] = int(raw_labels[IGNORE])  # type: ignore[call-overload]
    order = tuple(int(v) for v in class_order) if class_order is not None else None
    return labels, RegionLabels(tuple(names), tuple(regions), order)


def region_problems(regions: RegionLabels, label_values: Sequence[int]) -> list[tuple[str, str]]:
    """(message, fix) for every way the region definitions cannot be trained or turned back into labels."""
    if regions.class_order is None:
        return [("labels are regions (a name maps to several values) but dataset.json has no regions_class_order",
                 f'add "regions_class_order": [...] with one label value per region, in the order of "labels" '
                 f"({', '.join(regions.names)})")]
    problems = []
    if len(regions.class_order) != len(regions.regions):
        problems.append((f"regions_class_order {list(regions.class_order)} has {len(regions.class_order)} entries "
                         f"for {len(regions.regions)} regions ({', '.join(regions.names)})",
                         "give one label value per region, in the order of \"labels\""))
    unknown = sorted(set(regions.class_order) - set(label_values))
    if unknown:
        problems.append((f"regions_class_order lists {unknown}, which no region contains "
                         f"(the label values are {list(label_values)})",
                         "list label values the regions are made of"))
    if not problems:
        for value in label_values:
            back = regions_to_label(tuple(value in r for r in regions.regions), regions.class_order)
            if back != value:
                problems.append((f"label value {value} comes back as {back} from its regions "
                                 f"({[n for n, r in zip(regions.names, regions.regions) if value in r]}) by "
                                 f"regions_class_order {list(regions.class_order)}: predictions could never "
                                 f"contain it", "order the regions from the largest to the innermost, each "
                                 "writing the value only it adds (nnU-Net's BraTS: [1, 2, 3])"))
    return problems


def regions_to_label(inside: Sequence[bool], class_order: Sequence[int]) -> int:
    """The label value a voxel gets from the regions it is in (the last region listed wins)."""
    value = 0
    for is_inside, label in zip(inside, class_order):
        if is_inside:
            value = int(label)
    return value


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


def planned_labels(labels: Mapping[str, int], regions: Sequence[Sequence[int]], region_names: Sequence[str],
                   class_order: Sequence[int], requested: Sequence[int] | None, dataset_name: str) -> dict[str, Any]:
    """The label fields of a plan (Plans' labels, foreground_labels, regions, region_names,
    regions_class_order) from a dataset's labels and regions and the user's foreground_labels."""
    if regions and requested is not None:
        raise ConfigError(f"foreground_labels={list(requested)} cannot narrow dataset {dataset_name}: its labels are "
                          f"regions ({', '.join(region_names)}), which decide what the network predicts",
                          fix="drop foreground_labels=, or edit the regions in dataset.json")
    return {"labels": dict(labels), "foreground_labels": choose_foreground_labels(labels, requested, dataset_name),
            "regions": tuple(tuple(int(v) for v in r) for r in regions), "region_names": tuple(region_names),
            "regions_class_order": tuple(int(v) for v in class_order)}


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
    # region-based training: the label values of each region (network output i) and what each writes back
    regions: tuple[tuple[int, ...], ...] = ()
    regions_class_order: tuple[int, ...] = ()
    OUTSIDE: ClassVar[int] = -1  # preprocessing's value outside the nonzero mask; the loader pads with it

    def __post_init__(self) -> None:
        labels = list(self.foreground_labels)
        if len(set(labels)) != len(labels) or any(v <= 0 for v in labels):
            raise ConfigError(f"foreground_labels={labels} must be distinct positive label values")
        if self.ignore_label is not None and (self.ignore_label <= 0 or self.ignore_label in labels):
            raise ConfigError(f"the ignore label {self.ignore_label} must be positive and not one of the "
                              f"foreground_labels {labels}")
        if self.regions and len(self.regions_class_order) != len(self.regions):
            raise ConfigError(f"{len(self.regions)} regions need as many regions_class_order entries, got "
                              f"{list(self.regions_class_order)}")
        stray = sorted({v for region in self.regions for v in region} - set(labels))
        if stray:
            raise ConfigError(f"regions contain label values {stray} that are not foreground_labels {labels}")

    @property
    def has_regions(self) -> bool:
        return bool(self.regions)

    @property
    def num_outputs(self) -> int:
        """Network outputs: one per region (sigmoid), else background and each class (softmax)."""
        return len(self.regions) if self.regions else self.num_classes

    @property
    def scored(self) -> tuple[int | tuple[int, ...], ...]:
        """What is scored, in label values: each foreground label, or each region (a single-value region as
        that value, the way nnU-Net keys it)."""
        if not self.regions:
            return self.foreground_labels
        return tuple(r[0] if len(r) == 1 else r for r in self.regions)

    @property
    def region_codes(self) -> tuple[tuple[int, ...], ...]:
        """The regions in codes (what the loss sees after `encode`)."""
        code = {value: k for k, value in enumerate(self.foreground_labels, start=1)}
        return tuple(tuple(code[v] for v in region) for region in self.regions)

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
