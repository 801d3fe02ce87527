"""Dataset verification: every problem of a dataset in one report, before any planning or training.

Like nnU-Net's verify_dataset_integrity, but it never stops at the first problem: someone repairing a
dataset of hundreds of cases wants the whole list at once, not one re-run per broken file. Discovery
(the pathfinders) already reports what can be seen without reading image data (missing files, a bad
dataset.json); this module adds the dataset-level label checks and reads every case once, in worker
processes, for what only the headers and voxels show.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from viseg.data.dataset import Case, DatasetInfo, Discovery, Problem, Severity
from viseg.data.labels import IGNORE, class_labels, ignore_label_problem, region_problems
from viseg.data.nifti import READ_ERRORS, VolumeHeader, read_header, read_voxels
from viseg.errors import DatasetError
from viseg.parallel import parallel_map

SPACING_RTOL = 1e-3  # relative: exporters round spacings differently; 1e-3 still catches real resampling
DIRECTION_ATOL = 1e-3  # direction cosines are unit vectors, so an absolute tolerance is a relative one
ORIGIN_ATOL_MM = 1e-2
MAX_LISTED = 10  # stray label values listed in a message; the voxel count covers the rest

_READ_FAILURES = (DatasetError, *READ_ERRORS)
_REEXPORT = "re-export or re-download the file, or remove the case"


@dataclass
class VerificationReport:
    """Every problem found in one dataset; `ok` when none of them is an error (warnings are advice)."""

    dataset: str
    n_cases: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def render(self) -> str:
        """Errors first, grouped by check, so the most common problem reads as one block."""
        lines = [f"Dataset {self.dataset}: {_plural(self.n_cases, 'case')}, "
                 f"{_plural(len(self.errors), 'error')}, {_plural(len(self.warnings), 'warning')}"]
        for problems in (self.errors, self.warnings):
            for check, group in _group_by_check(problems).items():
                lines.append(f"\n-- {check} ({len(group)}) --")
                lines.extend(problem.render() for problem in group)
        lines.append("")
        lines.append(self._verdict())
        return "\n".join(lines)

    def _verdict(self) -> str:
        if not self.ok:
            return f"FAILED: {_plural(len(self.errors), 'error')} to fix before planning or training."
        if self.warnings:
            return f"PASSED with {_plural(len(self.warnings), 'warning')}: review them above."
        return "PASSED: no problems found."

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable, for CI logs and tools that read the report."""
        return {
            "dataset": self.dataset,
            "n_cases": self.n_cases,
            "ok": self.ok,
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "problems": [_problem_dict(p) for p in self.problems],
        }


def verify_dataset(discovery: Discovery, num_processes: int | None = None,
                   progress: bool = True) -> VerificationReport:
    """Discovery's problems, then dataset.json label checks, then every case read once in parallel.

    Problems keep that order (and case order within the per-case checks), whatever the number of
    processes, so two runs on the same data give the same report.
    """
    problems = list(discovery.problems)
    info = discovery.info
    if info is None:  # without dataset.json there is nothing to check the files against
        return VerificationReport("(no valid dataset.json)", len(discovery.cases), problems)
    problems += check_dataset_info(info, len(discovery.cases))
    tasks = [(case, info) for case in discovery.cases]
    for case_problems in parallel_map(verify_case, tasks, num_processes, desc=f"verify {info.name}",
                                      progress=progress):
        problems += case_problems
    return VerificationReport(info.name, len(discovery.cases), problems)


def check_dataset_info(info: DatasetInfo, n_cases: int) -> list[Problem]:
    """Label and case-count rules nnU-Net enforces on dataset.json itself."""
    problems = []
    where = info.dataset_json
    values = sorted(set(info.labels.values()))
    if 0 not in values:
        problems.append(Problem("background", f"labels {info.labels} have no background (value 0)",
                                'add "background": 0 to "labels" in dataset.json', file=where))
    # nnU-Net encodes labels as channel indices, so it needs 0..n-1 without gaps; a missing 0 alone is
    # the background problem above, not a second one here.
    with_background = sorted({0, *values})
    if with_background != list(range(len(with_background))):
        problems.append(Problem("label-values", f"label values {values} are not consecutive integers "
                                f"0..{len(with_background) - 1}", "renumber the labels 0, 1, 2, ... in "
                                "dataset.json and in every label file", file=where))
    if len(values) != len(info.labels):
        problems.append(Problem("label-values", f"several label names share a value: {info.labels}",
                                "give every label name its own value", file=where))
    ignore = ignore_label_problem(info.labels)
    if ignore is not None:
        others = len(info.labels) - 1
        problems.append(Problem("ignore-label", f"{where}: {ignore}",
                                f'in "labels" of dataset.json number the other labels 0..{others - 1} and give '
                                f'"{IGNORE}" the value {others}, then relabel the voxels in every label file',
                                file=where))
    if info.regions is not None:
        for message, fix in region_problems(info.regions, class_labels(info.labels)):
            problems.append(Problem("regions", f"{where}: {message}", fix, file=where))
    if info.num_training is not None and info.num_training != n_cases:
        problems.append(Problem("num-training", f"dataset.json says numTraining={info.num_training} but "
                                f"{_plural(n_cases, 'case')} were found",
                                f"set numTraining to {n_cases} or add the missing cases", file=where))
    return problems


def verify_case(task: tuple[Case, DatasetInfo]) -> list[Problem]:
    """Every problem of one case; never raises, so one odd file cannot hide the rest of the report.

    Module-level and taking one small picklable tuple so that worker processes can run it.
    """
    case, info = task
    checker = _CaseCheck(case, info)
    try:
        return checker.run()
    except Exception as exc:  # a bug or an exotic file: report it and let the other cases be checked
        return [*checker.problems, Problem(
            "unexpected-error", f"verifying case {case.case_id} failed while reading {checker.current}: "
            f"{type(exc).__name__}: {exc}", "check the file by hand; if it opens elsewhere, report this as "
            "a viseg bug with this message", case.case_id, checker.current)]


@dataclass(frozen=True)
class _File:
    """One file of a case: what it is for, which channels are read from it, and its header."""

    path: Path
    role: str  # "channel 0001 (T2)", "image" (4D Decathlon file) or "label"
    channels: tuple[int | None, ...]  # ImageSource.channel_index of every channel read from it
    header: VolumeHeader


class _CaseCheck:
    """Checks one case, one file at a time so that at most one volume is in memory.

    It remembers the file it is reading so that an unexpected error can still name it.
    """

    def __init__(self, case: Case, info: DatasetInfo) -> None:
        self.case = case
        self.info = info
        self.problems: list[Problem] = []
        self.current: Path | None = next(iter(case.files()), None)

    def add(self, check: str, message: str, fix: str, path: Path, severity: Severity = "error") -> None:
        self.problems.append(Problem(check, message, fix, self.case.case_id, path, severity))

    def run(self) -> list[Problem]:
        opened = [self._open(path, role, channels) for path, role, channels in self._image_files()]
        images = [f for f in opened if f is not None and self._dims_ok(f)]
        label = self._open(self.case.label, "label", (None,)) if self.case.label is not None else None
        label = label if label is not None and self._dims_ok(label) else None
        # Voxels first: a file whose data cannot be read (truncated, or 5D, which its header hides) is
        # reported once and kept out of the grid comparisons, where it would only add noise.
        volumes = [f for f in images if self._check_intensities(f)]
        volumes += [label] if label is not None and self._check_label(label) else []
        spacing_ok = {f.path: self._spacing_ok(f) for f in volumes}
        for other in volumes[1:]:  # the first readable image file is the reference grid
            self._compare(volumes[0], other, spacing_ok[volumes[0].path] and spacing_ok[other.path])
        return self.problems

    def _image_files(self) -> list[tuple[Path, str, tuple[int | None, ...]]]:
        """Image sources grouped by file: a Decathlon 4D file holds every channel and is opened once."""
        channels: dict[Path, list[int | None]] = {}
        roles: dict[Path, str] = {}
        for number, source in enumerate(self.case.images):
            channels.setdefault(source.path, []).append(source.channel_index)
            names = self.info.channel_names
            name = names[number] if number < len(names) else "undeclared"
            roles.setdefault(source.path, "image" if source.channel_index is not None
                             else f"channel {number:04d} ({name})")
        return [(path, roles[path], tuple(indices)) for path, indices in channels.items()]

    def _open(self, path: Path, role: str, channels: tuple[int | None, ...]) -> _File | None:
        if not path.exists():
            return None  # discovery already reported it (missing-channel, missing-label, ...)
        self.current = path
        try:
            return _File(path, role, channels, read_header(path))
        except _READ_FAILURES as exc:
            self.add("unreadable", f"{role}: {_reason(exc)}", _fix(exc), path)
            return None

    def _dims_ok(self, f: _File) -> bool:
        header = f.header
        ndim = len(header.shape_zyx) + (1 if header.num_channels > 1 else 0)
        indices = [c for c in f.channels if c is not None]
        if indices and ndim == 4 and header.num_channels > max(indices):
            return True
        if not indices and ndim == 3:
            return True
        expected = f"4D volume with at least {max(indices) + 1} channels" if indices else "3D volume"
        found = f"{ndim}D, spatial shape (z, y, x) {header.shape_zyx}" + (
            f" x {header.num_channels} channels" if header.num_channels > 1 else "")
        fix = ("store the label as one 3D volume on the image grid" if f.role == "label" else
               "store each channel as its own 3D file (<case>_XXXX)" if not indices else
               "check channel_names/modality in dataset.json against the file")
        self.add("dimensionality", f"{f.role} is {found}; a {expected} is expected", fix, f.path)
        return False

    def _spacing_ok(self, f: _File) -> bool:
        spacing = np.asarray(f.header.spacing_zyx, dtype=np.float64)
        if np.all(np.isfinite(spacing)) and np.all(spacing > 0):
            return True
        self.add("spacing-invalid", f"{f.role} has spacing (z, y, x) {f.header.spacing_zyx}; every spacing "
                 "must be a positive finite number of mm", "write the voxel size (pixdim) into the header",
                 f.path)
        return False

    def _compare(self, ref: _File, other: _File, spacings_valid: bool) -> None:
        """Same grid as the reference: shape always, spacing and orientation when both spacings are valid."""
        a, b = ref.header, other.header
        if a.shape_zyx != b.shape_zyx:
            self.add("shape-mismatch", f"{other.role} has shape (z, y, x) {b.shape_zyx} but {ref.role} has "
                     f"{a.shape_zyx}", "resample every channel and the label to the same voxel grid",
                     other.path)
        if not spacings_valid:
            return
        if not np.allclose(b.spacing_zyx, a.spacing_zyx, rtol=SPACING_RTOL, atol=0.0):
            self.add("spacing-mismatch", f"{other.role} has spacing (z, y, x) {_round(b.spacing_zyx)} but "
                     f"{ref.role} has {_round(a.spacing_zyx)}", "resample every channel and the label to the "
                     "same voxel grid", other.path)
        difference = _affine_difference(a.affine, b.affine)
        if difference is not None:
            self.add("affine-mismatch", f"{other.role} and {ref.role} are placed differently in space: "
                     f"{difference}", "check that they belong together; if the voxels align, copy the "
                     "reference's affine into the header", other.path, severity="warning")

    def _voxels(self, f: _File, channel: int | None) -> np.ndarray | None:
        self.current = f.path
        try:
            return read_voxels(f.path, channel)
        except _READ_FAILURES as exc:
            # io raises DatasetError from a read error for corrupt data, and without a cause when the
            # file reads fine but has the wrong number of dimensions (headers cannot see e.g. 5D files).
            unreadable = not isinstance(exc, DatasetError) or exc.__cause__ is not None
            self.add("unreadable" if unreadable else "dimensionality", f"{f.role}: {_reason(exc)}",
                     _fix(exc), f.path)
            return None

    def _check_intensities(self, f: _File) -> bool:
        """NaN and inf per channel; False when the voxels cannot be read."""
        for channel in f.channels:
            data = self._voxels(f, channel)
            if data is None:
                return False  # one report per broken file, not one per channel in it
            if not np.issubdtype(data.dtype, np.floating):
                continue  # integer voxels cannot hold NaN or inf
            role = f.role if channel is None else f"{f.role} channel {channel}"
            for check, what, count in (("nan", "NaN", np.isnan(data).sum()),
                                       ("inf", "infinite", np.isinf(data).sum())):
                if count:
                    self.add(check, f"{role} has {int(count)} {what} voxel(s) of {data.size}",
                             "fix the export (or replace the voxels with a valid intensity)", f.path)
        return True

    def _check_label(self, f: _File) -> bool:
        """Label values against dataset.json; False when the voxels cannot be read."""
        data = self._voxels(f, None)
        if data is None:
            return False
        values = np.unique(data)
        if np.issubdtype(values.dtype, np.floating):
            nan = int(np.isnan(data).sum()) if np.isnan(values).any() else 0
            if nan:
                self.add("label-nan", f"label has {nan} NaN voxel(s)", "fix the label export", f.path)
            values = values[~np.isnan(values)]
            integral = np.isfinite(values) & (values == np.round(values))
            if not integral.all():
                bad = values[~integral]
                self.add("label-not-integer", f"label has {int(np.isin(data, bad).sum())} voxel(s) with "
                         f"non-integer values, e.g. {_listed(bad)}", "save labels as integers (no "
                         "interpolation when resampling a label)", f.path)
            values = values[integral]
        stray = sorted(set(int(v) for v in values) - set(self.info.labels.values()))
        if stray:
            self.add("label-outside-set", f"label has values {_listed(stray)} not declared in dataset.json "
                     f"labels {sorted(self.info.labels.values())} ({int(np.isin(data, stray).sum())} voxels)",
                     "fix the label file or add the values to 'labels' in dataset.json", f.path)
        return True


def _affine_difference(a: np.ndarray, b: np.ndarray) -> str | None:
    """Orientation and origin only: scale is the spacing, which the spacing check already covers."""
    parts = []
    direction_a, direction_b = _directions(a), _directions(b)
    if not np.allclose(direction_a, direction_b, rtol=0.0, atol=DIRECTION_ATOL):
        parts.append(f"direction {_round(direction_b.ravel())} vs {_round(direction_a.ravel())}")
    if not np.allclose(a[:3, 3], b[:3, 3], rtol=0.0, atol=ORIGIN_ATOL_MM):
        parts.append(f"origin {_round(b[:3, 3])} mm vs {_round(a[:3, 3])} mm")
    return "; ".join(parts) or None


def _directions(affine: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    return affine[:3, :3] / np.where(norms > 0, norms, 1.0)


def _reason(exc: BaseException) -> str:
    return exc.message if isinstance(exc, DatasetError) else f"cannot read it: {type(exc).__name__}: {exc}"


def _fix(exc: BaseException) -> str:
    return (exc.fix if isinstance(exc, DatasetError) else None) or _REEXPORT


def _round(values: Iterable[float]) -> list[float]:
    return [round(float(v), 4) for v in values]


def _listed(values: Iterable[Any]) -> str:
    items = [v.item() if isinstance(v, np.generic) else v for v in values]
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{items[:MAX_LISTED]}{more}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _group_by_check(problems: list[Problem]) -> dict[str, list[Problem]]:
    groups: dict[str, list[Problem]] = {}
    for problem in problems:
        groups.setdefault(problem.check, []).append(problem)
    return groups


def _problem_dict(problem: Problem) -> dict[str, Any]:
    return {
        "check": problem.check,
        "severity": problem.severity,
        "case": problem.case,
        "file": str(problem.file) if problem.file is not None else None,
        "message": problem.message,
        "fix": problem.fix,
    }
