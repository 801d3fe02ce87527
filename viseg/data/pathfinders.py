"""Pathfinders: turn a dataset folder into cases, without reading image data.

A new on-disk layout is a new `PathFinder` subclass implementing `_get_all_paths()` and
`_extract_channelnames_from_folder()`, added to `PATHFINDERS`; the `dataset.pathfinder` config value picks
one by name. Problems (missing files, bad dataset.json) are collected, never raised one at a time, so that
verification can report all of them at once.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections import defaultdict
from pathlib import Path
from typing import Any

from viseg.data.dataset import Case, DatasetInfo, Discovery, ImageSource, Problem
from viseg.data.labels import RegionLabels, has_regions, is_label_or_region, is_label_value, split_region_labels
from viseg.errors import ConfigError

DATASET_JSON = "dataset.json"
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_NIFTI_ENDINGS = (".nii.gz", ".nii")
_KEY_EXAMPLES = {"numTraining": '"numTraining": <number of training cases>', "file_ending": '"file_ending": ".nii.gz"'}


class PathFinder(ABC):
    """Finds cases and channel names of one dataset layout."""

    # dataset.json keys a layout requires besides labels and channel names (which every layout needs)
    REQUIRED_KEYS: tuple[str, ...] = ()

    def __init__(self, basepath: Path, img_foldername: str = "imagesTr", seg_foldername: str = "labelsTr"):
        self.basepath = Path(basepath)
        self.img_foldername = img_foldername
        self.seg_foldername = seg_foldername
        self.problems: list[Problem] = []

    def discover(self) -> Discovery:
        """dataset.json, the cases, and every problem found without reading voxel data."""
        self.problems = []
        if not self.basepath.is_dir():
            self._problem(
                "dataset-folder",
                f"dataset folder {self.basepath} does not exist",
                "set dataset.basepath to the folder that holds dataset.json",
                file=self.basepath,
            )
            return Discovery(info=None, problems=self.problems)
        info = self._read_dataset_json()
        cases = self._get_all_paths(info) if info is not None else []
        if info is not None and not cases:
            self._problem(
                "empty-dataset",
                f"no cases found under {self.basepath / self.img_foldername}",
                f"put images in {self.img_foldername}/ named as this layout expects "
                f"(pathfinder={self._registry_name()})",
                file=self.basepath / self.img_foldername,
            )
        return Discovery(info=info, cases=cases, problems=list(self.problems))

    @abstractmethod
    def _get_all_paths(self, info: DatasetInfo) -> list[Case]:
        """All cases with their image channel sources and label file."""

    @abstractmethod
    def _extract_channelnames_from_folder(self) -> list[str]:
        """The channel identifiers present on disk, to compare with dataset.json."""

    @abstractmethod
    def _labels_from_json(self, raw: dict[str, Any]) -> dict[str, int] | None:
        """dataset.json labels normalised to name -> value."""

    def _regions_from_json(self, raw: dict[str, Any]) -> RegionLabels | None:
        """dataset.json's regions, for layouts that have them."""
        return None

    # -- shared helpers -------------------------------------------------------------------------------
    def _registry_name(self) -> str:
        return next((k for k, v in PATHFINDERS.items() if v is type(self)), type(self).__name__)

    def _problem(self, check: str, message: str, fix: str, case: str | None = None,
                 file: Path | None = None, severity: str = "error") -> None:
        self.problems.append(Problem(check, message, fix, case, file, severity))  # type: ignore[arg-type]

    def _read_dataset_json(self) -> DatasetInfo | None:
        path = self.basepath / DATASET_JSON
        if not path.is_file():
            self._problem("dataset-json", f"{path} is missing", "write a dataset.json (nnU-Net v2 format)",
                          file=path)
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._problem("dataset-json", f"{path} is not valid JSON: {exc}", "fix the JSON syntax", file=path)
            return None
        if not isinstance(raw, dict):
            self._problem("dataset-json", f"{path} must hold a JSON object", "see nnU-Net's dataset.json",
                          file=path)
            return None
        return self._info_from_json(raw, path)

    def _info_from_json(self, raw: dict[str, Any], path: Path) -> DatasetInfo | None:
        channels = raw.get("channel_names", raw.get("modality"))
        ok = True
        missing = [key for key in self.REQUIRED_KEYS if key not in raw]
        if missing:  # an error, but the defaults let discovery go on and report everything else too
            examples = ", ".join(_KEY_EXAMPLES.get(key, f'"{key}": ...') for key in missing)
            self._problem("dataset-json", f"{path}: required key(s) {missing} missing", f"add {examples}",
                          file=path)
        if not isinstance(channels, dict) or not channels:
            self._problem("dataset-json", f"{path}: 'channel_names' is missing or not an object",
                          'add e.g. "channel_names": {"0": "MRI"}', file=path)
            ok = False
        elif sorted(channels) != [str(i) for i in range(len(channels))] or not all(
            isinstance(v, str) for v in channels.values()
        ):
            self._problem("dataset-json", f"{path}: channel_names keys must be '0'..'{len(channels) - 1}' "
                          f"with string names, got {channels}", 'use e.g. {"0": "T1", "1": "T2"}', file=path)
            ok = False
        labels = self._labels_from_json(raw)
        if labels is None:
            self._problem("dataset-json", f"{path}: 'labels' is missing or malformed: {raw.get('labels')!r}",
                          'add e.g. "labels": {"background": 0, "organ": 1}', file=path)
            ok = False
        num_training = raw.get("numTraining")
        if num_training is not None and (not isinstance(num_training, int) or isinstance(num_training, bool)):
            self._problem("dataset-json", f"{path}: numTraining must be an integer, got {num_training!r}",
                          "set numTraining to the number of training cases", file=path)
            num_training = None
        file_ending = raw.get("file_ending", ".nii.gz")
        if not isinstance(file_ending, str) or file_ending not in _NIFTI_ENDINGS:
            self._problem("dataset-json", f"{path}: file_ending {file_ending!r} is not supported",
                          f"viseg reads NIfTI: use one of {_NIFTI_ENDINGS}", file=path)
            ok = False
        if not ok:
            return None
        name = raw.get("name") if isinstance(raw.get("name"), str) else self.basepath.name
        regions = self._regions_from_json(raw)
        return DatasetInfo(
            name=name,
            root=self.basepath,
            channel_names=tuple(channels[str(i)] for i in range(len(channels))),
            labels=labels,  # type: ignore[arg-type]
            num_training=num_training,
            file_ending=file_ending,
            dataset_json=path,
            regions=regions,
        )


class DefaultNNUnetFormatPathFinder(PathFinder):
    """nnU-Net v2 raw layout: imagesTr/<case>_<XXXX><ending> per channel, labelsTr/<case><ending>."""

    # nnU-Net's verify_dataset_integrity requires these too: a silent default would hide a half-written file
    REQUIRED_KEYS = ("numTraining", "file_ending")

    def _labels_from_json(self, raw: dict[str, Any]) -> dict[str, int] | None:
        """name -> value; with regions (a name -> list of values, nnU-Net's format) the label values of
        their union, the regions themselves going to `_regions_from_json`."""
        labels = raw.get("labels")
        if not isinstance(labels, dict) or not labels:
            return None
        if not all(map(is_label_or_region, labels.values())):
            return None
        if has_regions(labels):
            return split_region_labels(labels, None)[0]
        return {name: int(v[0]) if isinstance(v, list) else int(v) for name, v in labels.items()}

    def _regions_from_json(self, raw: dict[str, Any]) -> RegionLabels | None:
        labels, order = raw.get("labels"), raw.get("regions_class_order")
        if not isinstance(labels, dict) or not has_regions(labels):
            return None
        if order is not None and not (isinstance(order, list) and all(is_label_value(v) for v in order)):
            self._problem("regions", f"{self.basepath / DATASET_JSON}: regions_class_order must be a list of label "
                          f"values, got {order!r}", 'write e.g. "regions_class_order": [1, 2, 3]',
                          file=self.basepath / DATASET_JSON)
            order = None
        return split_region_labels(labels, order)[1]

    def _image_files(self, ending: str) -> dict[tuple[str, int], list[Path]]:
        folder = self.basepath / self.img_foldername
        found: dict[tuple[str, int], list[Path]] = defaultdict(list)
        if not folder.is_dir():
            return found
        for path in sorted(folder.iterdir()):
            stem = _strip_nifti_ending(path.name)
            match = _CHANNEL_SUFFIX.match(stem) if stem is not None else None
            if match is None:
                if not path.name.startswith("."):
                    self._problem("unexpected-file", f"{path.name} does not match <case>_<XXXX>{ending}; ignored",
                                  "rename it or move it out of the images folder", file=path, severity="warning")
                continue
            found[(match["case"], int(match["channel"]))].append(path)
        return found

    def _extract_channelnames_from_folder(self) -> list[str]:
        found = self._image_files(".nii.gz")
        return [f"{c:04d}" for c in sorted({channel for _, channel in found})]

    def _get_all_paths(self, info: DatasetInfo) -> list[Case]:
        images_dir = self.basepath / self.img_foldername
        labels_dir = self.basepath / self.seg_foldername
        if not images_dir.is_dir():
            self._problem("missing-folder", f"image folder {images_dir} does not exist",
                          "set dataset.img_foldername to the folder with the images", file=images_dir)
            return []
        found = self._image_files(info.file_ending)
        by_case: dict[str, dict[int, Path]] = defaultdict(dict)
        for (case_id, channel), paths in found.items():
            if len(paths) > 1:
                self._problem("duplicate-case", f"channel {channel} of case {case_id} exists more than once: "
                              f"{[p.name for p in paths]}", "keep exactly one file per case and channel",
                              case=case_id, file=paths[0])
            by_case[case_id][channel] = paths[0]
        cases = [self._case(case_id, chans, info, labels_dir) for case_id, chans in sorted(by_case.items())]
        self._orphan_labels(labels_dir, set(by_case), info.file_ending)
        return cases

    def _case(self, case_id: str, channels: dict[int, Path], info: DatasetInfo, labels_dir: Path) -> Case:
        expected = range(info.num_channels)
        for channel in sorted(set(channels) - set(expected)):
            self._problem("channel-count", f"case {case_id} has a file for channel {channel:04d} but dataset.json "
                          f"declares {info.num_channels} channel(s)", "remove the file or add the channel to "
                          "channel_names", case=case_id, file=channels[channel])
        sources = []
        for channel in expected:
            path = channels.get(channel, images_path(self.basepath / self.img_foldername, case_id, channel,
                                                     info.file_ending))
            if channel not in channels:
                self._problem("missing-channel", f"case {case_id} has no file for channel {channel:04d} "
                              f"({info.channel_names[channel]})", f"add {path.name}", case=case_id, file=path)
            elif not path.is_file():
                self._broken_file(case_id, f"channel {channel:04d}", path)
            sources.append(ImageSource(path))
        label = labels_dir / f"{case_id}{info.file_ending}"
        if label.is_symlink() and not label.exists():
            self._broken_file(case_id, "label", label)
        elif not label.is_file():
            self._problem("missing-label", f"case {case_id} has no label file", f"add {label}",
                          case=case_id, file=label)
        return Case(case_id=case_id, images=tuple(sources), label=label)

    def _broken_file(self, case_id: str, role: str, path: Path) -> None:
        """A listed name that is no readable file: a dangling symlink (its target moved or was never
        mounted) or a folder. Verification skips files that do not exist, so discovery must report it."""
        if path.is_symlink():
            message = f"case {case_id}: {role} is a broken symbolic link to {os.readlink(path)}"
            fix = "point the link at an existing file (is the shared storage mounted?) or replace it with the file"
        else:
            message = f"case {case_id}: {role} {path.name} is not a file"
            fix = "replace it with the NIfTI file"
        self._problem("broken-file", message, fix, case=case_id, file=path)

    def _orphan_labels(self, labels_dir: Path, case_ids: set[str], ending: str) -> None:
        if not labels_dir.is_dir():
            self._problem("missing-folder", f"label folder {labels_dir} does not exist",
                          "set dataset.seg_foldername to the folder with the labels", file=labels_dir)
            return
        for path in sorted(labels_dir.iterdir()):
            stem = _strip_nifti_ending(path.name)
            if (stem is not None and stem in case_ids and path.name != f"{stem}{ending}"
                    and (labels_dir / f"{stem}{ending}").exists()):
                # e.g. a.nii beside a.nii.gz: which one is the label is anybody's guess
                self._problem("duplicate-case", f"case {stem} has a second label file {path.name} beside "
                              f"{stem}{ending} (file_ending {ending})", f"keep only {stem}{ending}",
                              case=stem, file=path)
            elif stem is not None and stem not in case_ids:
                self._problem("orphan-label", f"label {path.name} has no image", "add its image or remove it",
                              case=stem, file=path, severity="warning")


class DecathlonPathFinder(PathFinder):
    """Medical Segmentation Decathlon: 4D multi-channel NIfTI, cases listed in dataset.json 'training'."""

    def _labels_from_json(self, raw: dict[str, Any]) -> dict[str, int] | None:
        labels = raw.get("labels")
        if not isinstance(labels, dict) or not labels:
            return None
        try:  # MSD maps value -> name
            return {str(name): int(value) for value, name in labels.items()}
        except (TypeError, ValueError):
            return None

    def _training_entries(self) -> list[Any]:
        raw = json.loads((self.basepath / DATASET_JSON).read_text(encoding="utf-8"))
        entries = raw.get("training")
        return entries if isinstance(entries, list) else []

    def _extract_channelnames_from_folder(self) -> list[str]:

        from viseg.data.nifti import read_header
        entries = [e for e in self._training_entries() if isinstance(e, dict) and "image" in e]
        if not entries:
            return []
        path = self._inside(entries[0]["image"])
        return [str(i) for i in range(read_header(path).num_channels)] if path is not None else []

    def _inside(self, relative: Any, case: str | None = None) -> Path | None:
        """Resolve a dataset.json path; paths may not escape the dataset folder."""
        if not isinstance(relative, str):
            self._problem("dataset-json", f"path entry {relative!r} is not a string", "use './imagesTr/x.nii.gz'",
                          case=case, file=self.basepath / DATASET_JSON)
            return None
        # Lexical, not resolve(): files linked in from shared storage are inside the dataset all the same.
        root = Path(os.path.abspath(self.basepath))
        path = Path(os.path.normpath(root / relative))
        if path != root and root not in path.parents:
            self._problem("path-escape", f"{relative!r} points outside the dataset folder",
                          "keep every file inside the dataset folder", case=case, file=self.basepath / DATASET_JSON)
            return None
        return self.basepath / path.relative_to(root)

    def _get_all_paths(self, info: DatasetInfo) -> list[Case]:
        if not isinstance(json.loads(info.dataset_json.read_text(encoding="utf-8")).get("training"), list):
            self._problem("dataset-json", f"{info.dataset_json}: the Decathlon layout needs a 'training' list",
                          'add "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]',
                          file=info.dataset_json)
            return []
        cases: dict[str, Case] = {}
        for entry in self._training_entries():
            case = self._entry_case(entry, info)
            if case is None:
                continue
            if case.case_id in cases:
                first, second = cases[case.case_id].images[0].path, case.images[0].path
                files = f"{first}" if first == second else f"{first} and {second}"
                self._problem("duplicate-case", f"case {case.case_id} is listed twice in 'training' ({files}): "
                              "both would be one case, the second hiding the first",
                              "remove one of the entries (a.nii and a.nii.gz are the same case id)",
                              case=case.case_id, file=info.dataset_json)
                continue
            cases[case.case_id] = case
        return [cases[k] for k in sorted(cases)]

    def _entry_case(self, entry: Any, info: DatasetInfo) -> Case | None:
        if not isinstance(entry, dict) or "image" not in entry:
            self._problem("dataset-json", f"training entry {entry!r} has no 'image'", "add 'image' and 'label'",
                          file=info.dataset_json)
            return None
        image = self._inside(entry["image"])
        if image is None:
            return None
        case_id = _strip_nifti_ending(image.name) or image.name
        label = self._inside(entry.get("label"), case_id) if entry.get("label") is not None else None
        for path, what in ((image, "image"), (label, "label")):
            if path is not None and not path.is_file():
                self._problem(f"missing-{what}", f"case {case_id}: {what} file {path} does not exist",
                              "fix the path in dataset.json or add the file", case=case_id, file=path)
        if entry.get("label") is None:
            self._problem("missing-label", f"case {case_id} has no 'label' entry", "add its label path",
                          case=case_id, file=info.dataset_json)
        multi = info.num_channels > 1
        sources = tuple(ImageSource(image, c if multi else None) for c in range(info.num_channels))
        return Case(case_id=case_id, images=sources, label=label)


PATHFINDERS: dict[str, type[PathFinder]] = {
    "nnunet": DefaultNNUnetFormatPathFinder,
    "decathlon": DecathlonPathFinder,
}


def get_pathfinder(name: str, basepath: Path, img_foldername: str = "imagesTr",
                   seg_foldername: str = "labelsTr") -> PathFinder:
    if name not in PATHFINDERS:
        raise ConfigError(f"dataset.pathfinder={name!r} is not a registered layout",
                          fix=f"use one of {sorted(PATHFINDERS)}")
    return PATHFINDERS[name](basepath, img_foldername, seg_foldername)


def images_path(folder: Path, case_id: str, channel: int, ending: str) -> Path:
    return folder / f"{case_id}_{channel:04d}{ending}"


def _strip_nifti_ending(name: str) -> str | None:
    for ending in _NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None
