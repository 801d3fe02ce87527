"""Metrics of a folder of predicted label maps against a folder of references (`viseg evaluate`).

Cases pair by file name. Everything that can be checked from file names and headers (missing cases,
shape and spacing mismatches) is checked for all cases before any voxel is read, and reported at once;
the metrics (viseg.evaluation.metrics) are then computed per case in worker processes. The result is summary.json in
nnU-Net's layout (metric_per_case, mean, foreground_mean) so existing nnU-Net tooling can read it. A
dataset.json `ignore` label (sparse annotation) is not scored, and its voxels count for no other label
either, as in nnU-Net.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING

from viseg.data.labels import IGNORE, ignore_label
from viseg.errors import ConfigError, DatasetError
from viseg.evaluation.metrics import Region, label_map_metrics, mean_metrics, region_key
from viseg.io.jsonio import read_json, write_json_atomic
from viseg.parallel import parallel_map

CONFIG_NAME = "evaluate"  # conf/evaluate.yaml; not *_config.yaml, which names the training configs
MAX_LISTED = 20  # case ids listed in an error message; the count covers the rest
TABLE_METRICS = ("Dice", "IoU", "HD95_mm", "ASSD_mm", "volume_pred_ml", "volume_ref_ml")


@dataclass
class EvaluateConfig:
    pred: str = MISSING  # folder of predicted label maps
    ref: str = MISSING  # folder of reference label maps with the same file names
    labels: list[int] | None = None  # None: dataset.json beside ref, else the values found in the references
    ignore_label: int | None = None  # None: dataset.json's "ignore" beside ref, if any; voxels left unscored
    output: str | None = None  # None: <pred>/summary.json
    file_ending: str = ".nii.gz"
    num_processes: int | None = None  # None: all cores

    def __post_init__(self) -> None:
        if self.labels is not None:
            labels = list(self.labels)
            if not labels or any(v <= 0 for v in labels) or len(set(labels)) != len(labels):
                raise ConfigError(f"labels={labels} must be distinct positive label values",
                                  fix="list the label values to evaluate, e.g. labels=[1,2,3], or leave it unset")
        if self.ignore_label is not None and self.ignore_label <= 0:
            raise ConfigError(f"ignore_label={self.ignore_label} must be a positive label value",
                              fix="give the value of the unannotated voxels, or leave it unset")
        if not self.file_ending:
            raise ConfigError("file_ending is empty", fix="set the files' ending, e.g. file_ending=.nii.gz")
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"num_processes={self.num_processes} must be at least 1",
                              fix="set a positive number, or leave it unset to use all cores")


@dataclass(frozen=True)
class CasePair:
    """One case to evaluate; picklable, so it travels to a worker process as is."""

    case_id: str
    pred: Path
    ref: Path
    spacing: tuple[float, ...]  # (z, y, x) in mm, from the reference header
    regions: tuple[Region, ...]
    ignore_label: int | None = None  # reference voxels of this value are not scored


def register_evaluate_config() -> None:
    """Store the schema in Hydra's ConfigStore; viseg.config.register_configs does not know it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="evaluate_base_config", node=EvaluateConfig)


# --- pairing and checks ----------------------------------------------------------------------------------


def _folder(path: str, key: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{key}={path} is not a folder", fix=f"point {key}= at the folder of label files")
    return folder


def list_cases(folder: Path, file_ending: str) -> dict[str, Path]:
    """case id -> file, for every `<case><file_ending>` in `folder` (hidden files skipped)."""
    return {p.name[: -len(file_ending)]: p for p in sorted(folder.iterdir())
            if p.is_file() and p.name.endswith(file_ending) and not p.name.startswith(".")}


def _listed(ids: Sequence[str]) -> str:
    more = f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else ""
    return ", ".join(ids[:MAX_LISTED]) + more


def pair_cases(pred: dict[str, Path], ref: dict[str, Path], pred_dir: Path, ref_dir: Path,
               file_ending: str) -> list[str]:
    """The case ids present in both folders; every unmatched case on either side is one error."""
    if not ref:
        raise DatasetError(f"no *{file_ending} files in ref={ref_dir}",
                           fix="point ref= at the reference label folder, or set file_ending=")
    no_pred = sorted(set(ref) - set(pred))
    no_ref = sorted(set(pred) - set(ref))
    lines = []
    if no_pred:
        lines.append(f"{len(no_pred)} reference case(s) have no prediction in {pred_dir}: {_listed(no_pred)}")
    if no_ref:
        lines.append(f"{len(no_ref)} prediction(s) have no reference in {ref_dir}: {_listed(no_ref)}")
    if lines:
        raise DatasetError("\n  ".join(lines),
                           fix=f"every case needs <case>{file_ending} in both folders: predict the missing cases, "
                           "remove stray predictions, or point ref= at a folder holding only the evaluated cases")
    return sorted(ref)


def check_grids(case_ids: Sequence[str], pred: dict[str, Path], ref: dict[str, Path]) -> list[tuple[float, ...]]:
    """Reference spacing per case, after checking from the headers that every prediction lies on its
    reference's grid (metrics on different grids would be meaningless). All mismatches in one error."""

    from viseg.data.nifti import read_header
    from viseg.data.verify import SPACING_RTOL
    spacings, problems = [], []
    for case_id in case_ids:
        p, r = read_header(pred[case_id]), read_header(ref[case_id])
        if p.shape_zyx != r.shape_zyx:
            problems.append(f"[{case_id}] shape (z, y, x) {p.shape_zyx} of {pred[case_id]} differs from "
                            f"{r.shape_zyx} of {ref[case_id]}")
        elif not np.allclose(p.spacing_zyx, r.spacing_zyx, rtol=SPACING_RTOL, atol=0.0):
            problems.append(f"[{case_id}] spacing (z, y, x) {_rounded(p.spacing_zyx)} of {pred[case_id]} differs "
                            f"from {_rounded(r.spacing_zyx)} of {ref[case_id]}")
        spacings.append(tuple(r.spacing_zyx))
    if problems:
        raise DatasetError(f"{len(problems)} prediction(s) are not on their reference's voxel grid:\n  "
                           + "\n  ".join(problems),
                           fix="export predictions on the reference image's grid (same shape and spacing), "
                           "e.g. with python -m viseg.predict, which resamples back to the original image")
    return spacings


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


# --- labels ----------------------------------------------------------------------------------------------


def _dataset_json_labels(path: Path) -> dict[str, Any]:

    try:
        labels = read_json(path).get("labels", {})
        if not isinstance(labels, dict):
            raise ValueError(f"'labels' is {labels!r}, not an object")
    except (OSError, ValueError, AttributeError) as exc:
        raise DatasetError(f"cannot read the labels of {path}: {exc}",
                           fix="repair dataset.json, or pass labels=[...] explicitly") from exc
    return labels


def labels_from_dataset_json(path: Path) -> list[Region] | None:
    """Foreground labels (and regions, nnU-Net's list values) of a dataset.json; None if it names none.
    The 'ignore' label is not a class to score."""
    regions: list[Region] = []
    for name, value in _dataset_json_labels(path).items():
        if name == IGNORE:
            continue
        values = [int(v) for v in value] if isinstance(value, list) else [int(value)]
        if all(v > 0 for v in values):
            regions.append(values[0] if len(values) == 1 else tuple(values))
    return regions or None


def _unique_labels(path: Path) -> list[int]:

    from viseg.data.nifti import read_voxels
    return [int(v) for v in np.unique(read_voxels(path))]


def _dataset_json_beside(ref_dir: Path) -> Path:
    return ref_dir.resolve().parent / "dataset.json"  # nnU-Net layout: labelsTr beside dataset.json


def resolve_ignore_label(cfg: EvaluateConfig, ref_dir: Path) -> int | None:
    """The configured ignore label, else dataset.json's `ignore` (beside ref), else none."""
    if cfg.ignore_label is not None:
        return int(cfg.ignore_label)
    dataset_json = _dataset_json_beside(ref_dir)
    return ignore_label(_dataset_json_labels(dataset_json)) if dataset_json.is_file() else None


def resolve_labels(cfg: EvaluateConfig, ref_dir: Path, ref_files: Sequence[Path],
                   ignore: int | None = None) -> list[Region]:
    """The configured labels, else dataset.json's, else every value > 0 present in any reference file (a
    label the references never contain is not evaluated). The ignore label is never one of them."""
    if cfg.labels is not None:
        if ignore is not None and ignore in cfg.labels:
            raise ConfigError(f"labels={list(cfg.labels)} lists {ignore}, the ignore label: its voxels are "
                              "unannotated and not scored", fix=f"remove {ignore} from labels=")
        return [int(v) for v in cfg.labels]
    dataset_json = _dataset_json_beside(ref_dir)
    if dataset_json.is_file():
        from_json = labels_from_dataset_json(dataset_json)
        if from_json:
            return from_json

    present = parallel_map(_unique_labels, ref_files, cfg.num_processes, desc="reading reference labels")
    found = sorted({v for values in present for v in values if v > 0 and v != ignore})
    if not found:
        raise DatasetError(f"the reference files in {ref_dir} contain no label > 0",
                           fix="check ref=, or pass the labels to evaluate, e.g. labels=[1]")
    return found


# --- metrics ---------------------------------------------------------------------------------------------


def evaluate_case(pair: CasePair) -> dict[str, Any]:
    """One metric_per_case entry (runs in a worker process)."""

    from viseg.data.nifti import read_voxels
    metrics = label_map_metrics(read_voxels(pair.pred), read_voxels(pair.ref), pair.spacing, pair.regions,
                                pair.ignore_label)
    return {"case": pair.case_id, "prediction_file": str(pair.pred), "reference_file": str(pair.ref),
            "metrics": metrics}


def summarize(regions: Sequence[Region], per_case: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's content: per-case metrics, per-label means over cases, the mean over labels."""
    keys = [region_key(r) for r in regions]
    mean = {k: mean_metrics([case["metrics"][k] for case in per_case]) for k in keys}
    return {"labels": [r if isinstance(r, int) else list(r) for r in regions],
            "metric_per_case": per_case, "mean": mean, "foreground_mean": mean_metrics(list(mean.values()))}


def evaluate_folders(cfg: EvaluateConfig, progress: bool = True) -> tuple[dict[str, Any], Path]:
    """Check, pair and evaluate every case; write summary.json atomically. Returns (summary, its path)."""

    pred_dir, ref_dir = _folder(cfg.pred, "pred"), _folder(cfg.ref, "ref")
    pred, ref = list_cases(pred_dir, cfg.file_ending), list_cases(ref_dir, cfg.file_ending)
    case_ids = pair_cases(pred, ref, pred_dir, ref_dir, cfg.file_ending)
    spacings = check_grids(case_ids, pred, ref)
    ignore = resolve_ignore_label(cfg, ref_dir)
    regions = tuple(resolve_labels(cfg, ref_dir, [ref[c] for c in case_ids], ignore))
    pairs = [CasePair(c, pred[c], ref[c], s, regions, ignore) for c, s in zip(case_ids, spacings)]
    per_case = parallel_map(evaluate_case, pairs, cfg.num_processes, desc="evaluating", progress=progress)
    summary = summarize(regions, per_case)
    output = Path(cfg.output) if cfg.output else pred_dir / "summary.json"
    write_json_atomic(output, summary)
    return summary, output
