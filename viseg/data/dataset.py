"""What a pathfinder finds: the dataset description, its cases, and any problems found on the way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from viseg.data.labels import RegionLabels

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset, phrased so the user can fix it without reading code."""

    check: str  # short machine-readable name, e.g. "shape-mismatch"
    message: str
    fix: str
    case: str | None = None
    file: Path | None = None
    severity: Severity = "error"

    def render(self) -> str:
        where = " ".join(part for part in (f"[{self.case}]" if self.case else "", str(self.file or "")) if part)
        return f"{self.severity.upper():7s} {self.check}: {where}\n        {self.message}\n        fix: {self.fix}"


@dataclass(frozen=True)
class ImageSource:
    """One input channel of a case: a 3D file, or one channel of a 4D file (Decathlon layout)."""

    path: Path
    channel_index: int | None = None


@dataclass(frozen=True)
class Case:
    case_id: str
    images: tuple[ImageSource, ...]  # in channel order
    label: Path | None

    def files(self) -> list[Path]:
        paths = list(dict.fromkeys(source.path for source in self.images))
        return [*paths, self.label] if self.label is not None else paths


@dataclass(frozen=True)
class DatasetInfo:
    """dataset.json, normalised across layouts (nnU-Net v2: name -> value labels; MSD: value -> name)."""

    name: str
    root: Path
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    num_training: int | None
    file_ending: str
    dataset_json: Path
    regions: RegionLabels | None = None  # region-based labels: the regions, `labels` their label values

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def foreground_values(self) -> tuple[int, ...]:
        return tuple(sorted(v for v in self.labels.values() if v != 0))


@dataclass
class Discovery:
    """The result of looking at a dataset folder without reading any image data."""

    info: DatasetInfo | None
    cases: list[Case] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
