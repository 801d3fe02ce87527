"""`input=` -> the cases to predict, grouped by the naming of the layout the runs were trained on.

nnU-Net layout: one file per channel, `<case>_<XXXX><ending>` (imagesTr / imagesTs naming). Decathlon
layout: one (4D when multi-channel) file per case. A case that cannot be predicted as named (a channel
missing or extra, a file outside the naming) becomes a `CaseInput` with a problem naming the file, so that
the other cases are still predicted and the failures are reported together at the end.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from viseg.data.dataset import Case, ImageSource
from viseg.errors import ConfigError

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
        return [_single_file_case(path, len(channel_names)) for path in files]
    return _channel_file_cases(files, channel_names)


def _single_file_case(path: Path, num_channels: int) -> CaseInput:
    case_id = strip_nifti_ending(path.name) or path.name
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
