"""Predict cases with an ensemble: preprocess as training did, slide the window, average, export.

Per case: the same `preprocess_case` as training -> `predict_volume` per network (Gaussian-weighted sliding
window, test-time mirroring along the axes training mirrored) -> softmax averaged over the ensemble ->
`revert_geometry` back to the input's grid -> class -> label value -> postprocessing.json, if any -> NIfTI
with the input's affine and header. An ensemble of several configurations or plans (`Ensemble.groups`) runs
this per group up to `revert_geometry` and averages the groups' probabilities in the input's grid. Model
selection (`best=`) calls `predict_case` directly.

Each case's inputs are checked before its voxels are read (`check_case_headers`), then for NaN and infinite
voxels. A case that fails in any way, a MemoryError or a bug included, fails alone: `predict_cases` records
it and goes on with the others.

Which cases a command predicts: `select_part` (nnU-Net's num_parts/part_id) and `split_finished` (its
--continue_prediction). `predict_cases` runs the cases one after the other in this process; the same work split
into stages that overlap runs in `inference.background` (local worker processes) and `inference.cluster` (Ray).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from viseg.data.prediction_inputs import CaseInput, check_case_headers
from viseg.errors import ConfigError, DatasetError, VisegError, is_storage_full
from viseg.inference.ensemble import Ensemble, Postprocessing
from viseg.preprocessing.previous_stage import one_hot_previous
from viseg.progress import progress_bar

if TYPE_CHECKING:
    from viseg.data.prediction_inputs import CaseInput
    from viseg.inference.ensemble import Ensemble, Postprocessing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceOptions:
    mirror: bool = True
    step: float = 0.5
    batch_size: int = 2


@dataclass
class PredictionReport:
    predicted: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # case id -> message naming the file
    skipped: list[str] = field(default_factory=list)  # already in the output folder (continue_prediction)
    nodes: dict[str, str] = field(default_factory=dict)  # case id -> the Ray node that predicted it (ray=true)


def label_file(output: Path, case_id: str, file_ending: str) -> Path:
    """Where a case's label map goes: `<output>/<case><file_ending>` (the training data's ending)."""
    return output / f"{case_id}{file_ending}"


def probabilities_file(output: Path, case_id: str) -> Path:
    return output / f"{case_id}.npz"


def select_part(cases: list[CaseInput], num_parts: int, part_id: int) -> list[CaseInput]:
    """nnU-Net's num_parts/part_id: `cases[part_id::num_parts]` of the cases sorted by id. Every process of a
    split sees the same sorted folder, so the parts cover it exactly once; taken before finished cases are
    skipped, so that a rerun of a part predicts the same cases as the first run."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ConfigError(f"part_id={part_id} is not a part of num_parts={num_parts}",
                          fix=f"use part_id=0 ... part_id={max(num_parts, 1) - 1}, one process per part")
    return sorted(cases, key=lambda c: c.case_id)[part_id::num_parts]


def split_finished(cases: list[CaseInput], output: Path, file_ending: str,
                   save_probabilities: bool = False) -> tuple[list[CaseInput], list[str]]:
    """(cases still to predict, ids of those already in `output`), nnU-Net's --continue_prediction.

    A label file that exists is complete: `write_segmentation` writes under a hidden temporary name and renames
    (an interrupted write leaves no `<case><ending>`). With save_probabilities a case is done only when its
    `.npz`, written after the label file, is there too."""
    todo, done = [], []
    for case_input in cases:
        finished = label_file(output, case_input.case_id, file_ending).is_file() and (
            not save_probabilities or probabilities_file(output, case_input.case_id).is_file())
        if finished:
            done.append(case_input.case_id)
        else:
            todo.append(case_input)
    return todo, done


def ensemble_probabilities(ensemble: Ensemble, data: np.ndarray, options: InferenceOptions) -> np.ndarray:
    """Softmax (a region plan: sigmoid) averaged over the ensemble's networks, (K, *data's spatial shape) on
    the plan's grid.

    Probabilities, not logits, are averaged, so every member weighs the same however confident it is. One
    plan's grid only: the groups of a mixed ensemble have no common grid, so `predict_case` averages them."""

    from viseg.inference.sliding_window import predict_volume
    if ensemble.groups:
        raise ValueError(f"ensemble_probabilities takes an ensemble of one configuration and plan, got "
                         f"{len(ensemble.groups)} groups ({', '.join(g.configuration for g in ensemble.groups)}): "
                         "predict each group, or use predict_case, which averages the groups in the image's "
                         "geometry")

    plan = ensemble.plans.configuration(ensemble.configuration)
    axes = ensemble.mirror_axes if options.mirror else ()
    device = ensemble.device
    total = None
    for network in ensemble.networks:
        probabilities = predict_volume(network, data, plan.patch_size, ensemble.num_classes, device,
                                       mirror_axes=axes, batch_size=options.batch_size, step=options.step,
                                       regions=bool(ensemble.plans.regions))
        total = probabilities if total is None else total + probabilities
    return (total / len(ensemble.networks)).float().cpu().numpy()


def predict_case(ensemble: Ensemble, image: np.ndarray, spacing: tuple[float, ...],
                 options: InferenceOptions | None = None, case_id: str = "") -> np.ndarray:
    """(C, Z, Y, X) image with its (z, y, x) spacing -> (K, Z, Y, X) float32 class probabilities in the
    image's own geometry. Class k is label value `ensemble.label_values[k]`; `case_id` names it in errors.

    A cascade first predicts the case with its lowres ensemble, in the image's geometry, and hands that label
    map to preprocessing as the case's label (cropped and resampled as labels are, nnU-Net's
    -prev_stage_predictions), then as one-hot channels to the full-resolution networks.

    An ensemble of several groups (configurations or plans) returns the mean of each group's prediction, each
    group weighing the same however many folds it has: nnU-Net's nnUNetv2_ensemble averages its models'
    probabilities likewise. Their preprocessed grids differ, so they are averaged in the image's geometry."""

    from viseg.inference.export import revert_geometry
    from viseg.preprocessing.preprocess import preprocess_case
    check_channels(image, ensemble.plans.num_channels)
    if ensemble.groups:
        first, *others = ensemble.groups
        total = np.asarray(predict_case(first, image, spacing, options, case_id), dtype=np.float32)
        for group in others:  # a running sum: the total and one group's prediction in memory, not all
            total += predict_case(group, image, spacing, options, case_id)
        return total / np.float32(len(ensemble.groups))
    previous = None
    if ensemble.previous is not None:  # a cascade: the lowres ensemble's labels, preprocessed like a label map
        lowres = ensemble.previous
        previous = segment(predict_case(lowres, image, spacing, options, case_id), lowres.label_values,
                           regions_class_order=lowres.plans.regions_class_order)
    data, previous_seg, properties = preprocess_case(image, previous, spacing, ensemble.plans, ensemble.configuration,
                                                     case_id=case_id)
    if previous_seg is not None:
        data = np.concatenate([data, one_hot_previous(previous_seg[0], ensemble.plans.foreground_labels, data.dtype)])
    probabilities = ensemble_probabilities(ensemble, data, options or InferenceOptions())
    return revert_geometry(probabilities, properties, ensemble.plans, ensemble.configuration)


def segment(probabilities: np.ndarray, label_values: tuple[int, ...],
            postprocessing: Postprocessing | None = None, regions_class_order: tuple[int, ...] = ()) -> np.ndarray:
    """Label map (original label values) from probabilities, postprocessed when a spec is given."""

    from viseg.inference.export import keep_largest_component, probabilities_to_labels
    labels = probabilities_to_labels(probabilities, label_values, regions_class_order)
    if postprocessing is not None:
        labels = keep_largest_component(labels, postprocessing.largest_component_labels)
    return labels


def check_postprocessing(postprocessing: Postprocessing | None, ensemble: Ensemble) -> None:
    if postprocessing is None:
        return
    unknown = [v for v in postprocessing.largest_component_labels if v not in ensemble.scored]
    if unknown:
        raise ConfigError(f"{postprocessing.source} names label(s) {unknown} the model does not predict "
                          f"(it predicts {list(ensemble.scored)})",
                          fix="list only predicted label values in largest_component_labels")


def check_channels(image: np.ndarray, num_channels: int) -> None:
    if image.shape[0] != num_channels:
        raise DatasetError(f"image has {image.shape[0]} channel(s); the model takes {num_channels}",
                           fix="pass the channels in dataset.json's channel_names order")


def check_finite(case_input: CaseInput, image: np.ndarray) -> None:
    """NaN or infinite voxels would spread through normalisation into every window that touches them."""
    for channel, source in enumerate(case_input.case.images if case_input.case else ()):
        bad = int(np.count_nonzero(~np.isfinite(image[channel])))
        if bad:
            raise DatasetError(f"{source.path}: channel {channel} has {bad} NaN or infinite voxel(s) of "
                               f"{image[channel].size}", fix="fix the export (or replace the voxels with a valid "
                               "intensity)")


def predict_one(ensemble: Ensemble, case_input: CaseInput, output: Path, options: InferenceOptions,
                postprocessing: Postprocessing | None = None, save_probabilities: bool = False) -> Path:
    """Read, predict and write one case; returns the label file. Input problems raise DatasetError."""

    from viseg.data.nifti import read_case
    from viseg.inference.export import write_probabilities, write_segmentation
    if case_input.case is None:
        raise DatasetError(case_input.problem or f"case {case_input.case_id} cannot be read")
    check_case_headers(case_input.case, ensemble.plans.num_channels)
    arrays = read_case(case_input.case, with_label=False)
    check_finite(case_input, arrays.image)
    probabilities = predict_case(ensemble, arrays.image, arrays.spacing, options, case_input.case_id)
    target = label_file(output, case_input.case_id, ensemble.file_ending)
    plans = ensemble.plans
    write_segmentation(segment(probabilities, ensemble.label_values, postprocessing, plans.regions_class_order),
                       case_input.case.images[0].path, target)
    if save_probabilities:
        write_probabilities(probabilities, plans.regions_class_order or ensemble.label_values,
                            probabilities_file(output, case_input.case_id), plans.regions)
    return target


def predict_cases(ensemble: Ensemble, cases: list[CaseInput], output: Path, options: InferenceOptions,
                  postprocessing: Postprocessing | None = None, save_probabilities: bool = False,
                  progress: bool = True) -> PredictionReport:
    """Every case in turn; a case that fails, for whatever reason, is reported (naming its files) and skipped.

    Any Exception, not only VisegError: a MemoryError (a huge case), a library's error on an exotic file or a
    bug hit by one case must not cost the other cases of the folder. A full disk, KeyboardInterrupt and SystemExit
    still stop the command. The traceback of an unexpected error goes to the debug log."""
    output.mkdir(parents=True, exist_ok=True)
    report = PredictionReport()
    bar = progress_bar(len(cases), "Predicting", enabled=progress)
    try:
        for case_input in cases:
            try:
                predict_one(ensemble, case_input, output, options, postprocessing, save_probabilities)
            except Exception as exc:
                if is_storage_full(exc):  # no later case could be written either: stop, naming the file
                    raise
                message = failure_message(case_input, exc)
                report.failures[case_input.case_id] = message
                bar.write(f"viseg predict: {case_input.case_id} failed: {message}", file=sys.stderr)
            else:
                report.predicted.append(case_input.case_id)
            bar.update(1)
    finally:
        bar.close()
    return report


def failure_message(case_input: CaseInput, exc: BaseException) -> str:
    """What the report says about a failed case: a VisegError's own message (it names the file and the fix),
    anything else as an unexpected error with the case's files."""
    return str(exc) if isinstance(exc, VisegError) else _unexpected(case_input, exc)


def _unexpected(case_input: CaseInput, exc: BaseException) -> str:
    """An error viseg did not foresee, with the files it happened on, so that the case can be looked at."""
    log.debug("case %s failed", case_input.case_id, exc_info=exc)
    files = [str(s.path) for s in case_input.case.images] if case_input.case else []
    what = "out of memory while predicting" if isinstance(exc, MemoryError) else "unexpected error while predicting"
    return (f"{', '.join(files) or case_input.case_id}: {what}: {type(exc).__name__}: {exc}\n  fix: "
            + ("free memory or predict this case on a larger machine" if isinstance(exc, MemoryError) else
               "check the file by hand; if it opens elsewhere, report this as a viseg bug with this message"))
