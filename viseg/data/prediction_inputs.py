"""`input=` -> the cases to predict, grouped by the naming of the layout the runs were trained on.

nnU-Net layout: one file per channel, `<case>_<XXXX><ending>` (imagesTr / imagesTs naming). Decathlon
layout: one (4D when multi-channel) file per case. A case that cannot be predicted as named (a channel
missing or extra, a file outside the naming, two files for one case) becomes a `CaseInput` with a problem
naming the file(s), so that the other cases are still predicted and the failures are reported together at the
end. Before a case is read, `check_case_headers` checks what its headers show (readable, size, dimensions,
channels, spacing): the checks verification runs on training data, which prediction inputs never went through.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from viseg.data.dataset import Case, ImageSource
from viseg.errors import ConfigError, DatasetError

NIFTI_ENDINGS = (".nii.gz", ".nii")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class CaseInput:
    """One case to predict, or why it cannot be (`problem`, naming the file and the fix)."""

    case_id: str
    case: Case | None = None
    problem: str | None = None


def strip_nifti_ending(name: str) -> str | None:
    return next((name[: -len(e)] for e in NIFTI_ENDINGS if name.endswith(e)), None)


def input_files(spec: str) -> list[Path]:
    """A folder's NIfTI files (hidden files and anything else ignored), or the comma-listed files as given."""
    parts = [Path(p.strip()).expanduser() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ConfigError("input= is empty", fix="pass a folder of <case>_0000.nii.gz files or a comma list of files")
    if len(parts) == 1 and parts[0].is_dir():
        files = sorted(p for p in parts[0].iterdir()
                       if not p.name.startswith(".") and strip_nifti_ending(p.name) is not None)
        if not files:
            raise ConfigError(f"input folder {parts[0]} holds no NIfTI files",
                              fix="pass a folder of <case>_0000.nii.gz files (nnU-Net's imagesTs naming)")
        return files
    if len(parts) == 1 and not parts[0].exists():
        raise ConfigError(f"input {parts[0]} does not exist", fix="pass an existing folder or file(s)")
    return parts


def find_cases(spec: str, channel_names: tuple[str, ...], pathfinder: str = "nnunet") -> list[CaseInput]:
    """The cases in `input=`, sorted by id; files that do not exist are reported as their case's problem."""
    files = input_files(spec)
    if pathfinder == "decathlon":
        return _single_file_cases(files, len(channel_names))
    return _channel_file_cases(files, channel_names)


def _single_file_cases(files: list[Path], num_channels: int) -> list[CaseInput]:
    """One case per file; two files with one case id (`a.nii` and `a.nii.gz`, or the same name in two listed
    folders) would write the same `<case>` output, the second over the first: the case fails, naming both."""
    by_case: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        by_case[strip_nifti_ending(path.name) or path.name].append(path)
    cases = []
    for case_id, paths in sorted(by_case.items()):
        if len(paths) > 1:
            cases.append(CaseInput(case_id, problem=f"case {case_id}: several input files "
                                   f"{[str(p) for p in paths]} have this case id, and each would write the same "
                                   "output; keep one (or rename the others)"))
        else:
            cases.append(_single_file_case(case_id, paths[0], num_channels))
    return cases


def _single_file_case(case_id: str, path: Path, num_channels: int) -> CaseInput:
    if not path.is_file():
        return CaseInput(case_id, problem=f"{path} does not exist")
    channels = tuple(ImageSource(path, c if num_channels > 1 else None) for c in range(num_channels))
    return CaseInput(case_id, case=Case(case_id, channels, label=None))


def _channel_file_cases(files: list[Path], channel_names: tuple[str, ...]) -> list[CaseInput]:
    by_case: dict[str, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
    problems: list[CaseInput] = []
    for path in files:
        stem = strip_nifti_ending(path.name)
        match = _CHANNEL_SUFFIX.match(stem) if stem is not None else None
        if match is None:
            problems.append(CaseInput(stem or path.name, problem=(
                f"{path} does not follow the naming <case>_<XXXX>.nii.gz (one file per channel, "
                f"_0000 for {channel_names[0]}); rename it")))
            continue
        by_case[match["case"]][int(match["channel"])].append(path)
    cases = [_channel_case(case_id, channels, channel_names) for case_id, channels in by_case.items()]
    return sorted(cases + problems, key=lambda c: c.case_id)


def _channel_case(case_id: str, channels: dict[int, list[Path]], channel_names: tuple[str, ...]) -> CaseInput:
    expected = len(channel_names)
    names = ", ".join(f"_{i:04d} {n}" for i, n in enumerate(channel_names))
    extra = sorted(c for c in channels if c >= expected)
    if extra:
        files = ", ".join(str(p) for c in extra for p in channels[c])
        return CaseInput(case_id, problem=f"case {case_id}: {files}: channel {extra[0]:04d} does not exist, the "
                                          f"model takes {expected} channel(s) ({names}); remove the file")
    duplicated = [paths for paths in channels.values() if len(paths) > 1]
    if duplicated:
        return CaseInput(case_id, problem=f"case {case_id}: one channel in several files "
                                          f"{[str(p) for p in duplicated[0]]}; keep one")
    any_file = next(iter(channels.values()))[0]
    missing = [c for c in range(expected) if c not in channels]
    if missing:
        ending = any_file.name[len(f"{case_id}_0000"):]
        wanted = ", ".join(str(any_file.with_name(f"{case_id}_{c:04d}{ending}")) for c in missing)
        return CaseInput(case_id, problem=f"case {case_id}: {wanted} missing; the model takes {expected} "
                                          f"channel(s) ({names})")
    absent = [channels[c][0] for c in range(expected) if not channels[c][0].is_file()]
    if absent:
        return CaseInput(case_id, problem=f"case {case_id}: {absent[0]} does not exist")
    sources = tuple(ImageSource(channels[c][0]) for c in range(expected))
    return CaseInput(case_id, case=Case(case_id, sources, label=None))


def check_case_headers(case: Case, num_channels: int) -> None:
    """What the headers of a case's files must show before its voxels are read, as verification checks
    training data: readable, a claimed size the file can hold and memory allows (viseg.data.nifti), one 3D volume
    per channel file or a 4D file with exactly the model's channels, valid spacings, one grid for all files.
    Raises DatasetError naming the file."""

    from viseg.data.nifti import VolumeHeader, read_header
    headers: dict[Path, VolumeHeader] = {}
    for source in case.images:
        if source.path not in headers:
            headers[source.path] = read_header(source.path)
    for path, header in headers.items():
        four_d = any(s.channel_index is not None for s in case.images if s.path == path)
        expected = (f"a 4D volume of {num_channels} channels" if four_d else "one 3D volume (one file per channel, "
                    "_0000, _0001, ...)" if num_channels > 1 else "one 3D volume")
        if len(header.shape_zyx) != 3 or header.num_channels != (num_channels if four_d else 1):
            found = f"{len(header.shape_zyx) + (header.num_channels > 1)}D, shape (z, y, x) {header.shape_zyx}" + (
                f" x {header.num_channels} channels" if header.num_channels > 1 else "")
            raise DatasetError(f"{path} is {found}; the model takes {expected}",
                               fix="pass files with the training data's channels and dimensions")
        spacing = np.asarray(header.spacing_zyx, dtype=np.float64)
        if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
            raise DatasetError(f"{path} has spacing (z, y, x) {header.spacing_zyx}; every spacing must be a "
                               "positive finite number of mm", fix="write the voxel size (pixdim) into the header")
    first, *others = headers.items()
    for path, header in others:
        if header.shape_zyx != first[1].shape_zyx:
            raise DatasetError(f"case {case.case_id}: {path} has shape (z, y, x) {header.shape_zyx} but {first[0]} "
                               f"has {first[1].shape_zyx}", fix="resample every channel to the same voxel grid")
