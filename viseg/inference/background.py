"""A case's prediction in three stages, so that the CPU work of other cases overlaps the network's.

    prepare_case (CPU: check, read, preprocess) -> infer (the network) -> export_case (CPU: revert geometry,
    class -> label value, postprocessing, NIfTI)

`predict_overlapped` runs the CPU stages in worker processes (nnU-Net's -npp / -nps) while this process runs the
network on the case in between: the accelerator no longer waits for gzip, resampling and NIfTI writing, which on
a folder of CT volumes take as long as the prediction itself. `inference.cluster` runs the same stages as Ray Data
operators.

The CPU stages take a `CaseSpec`: what they need of the ensemble (plans, configurations, label values, the output
folder), never its networks, so it travels to a worker process or a Ray task as a few kilobytes. The stages call
the functions `predict_one` calls, in the same order and in float32 throughout, so the labels are identical to the
sequential path's.

Ensembles: each member (the ensemble itself, or each group of a mixed ensemble) is preprocessed onto its own grid
in `prepare_case` and reverted in `export_case`, where the groups' probabilities are averaged as `predict_case`
averages them. A cascade member cannot be preprocessed ahead: its input holds its lowres stage's prediction, which
needs the network. For it `prepare_case` keeps the image as read and `infer` runs the whole `predict_case` (both
stages); reading and export still overlap.

Failures: each stage catches its case's exception where it happens and returns a `CaseFailure` worded as
`predict_cases` words it, so that no exception has to cross a process boundary (some do not unpickle) and one
case's failure never stops the others. A full disk travels as the file it refused and stops the command in the
parent, as in `predict_cases`. A worker process that dies (the kernel's out-of-memory killer) breaks its pool: the
cases it held are tried once more in a fresh pool, then fail alone.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from viseg.data.prediction_inputs import CaseInput, check_case_headers
from viseg.errors import DatasetError, VisegError, is_storage_full, unwritable_file
from viseg.inference.predict import (
    InferenceOptions,
    PredictionReport,
    check_channels,
    check_finite,
    ensemble_probabilities,
    failure_message,
    label_file,
    predict_case,
    predict_cases,
    probabilities_file,
    segment,
)
from viseg.planning.plans import Plans
from viseg.progress import progress_bar

if TYPE_CHECKING:
    from viseg.inference.ensemble import Ensemble, Postprocessing
    from viseg.preprocessing.preprocess import CaseProperties

log = logging.getLogger(__name__)


# -- what the stages carry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberSpec:
    """One group of the ensemble as the CPU stages see it: the plan and configuration it preprocesses for."""

    plans: Plans
    configuration: str
    cascade: bool  # its input holds a lowres prediction: preprocessed with the network, in `infer`


@dataclass(frozen=True)
class CaseSpec:
    """What the CPU stages need of an ensemble and a command, without the networks (picklable, small)."""

    members: tuple[MemberSpec, ...]  # in `Ensemble.members` order
    file_ending: str
    output: Path
    postprocessing: Postprocessing | None = None
    save_probabilities: bool = False

    @classmethod
    def of(cls, ensemble: Ensemble, output: Path, postprocessing: Postprocessing | None = None,
           save_probabilities: bool = False) -> CaseSpec:
        members = tuple(MemberSpec(m.plans, m.configuration, m.previous is not None) for m in ensemble.members)
        return cls(members, ensemble.file_ending, Path(output), postprocessing, save_probabilities)

    @property
    def plans(self) -> Plans:
        """The first group's plan: the groups agree on channels and labels, which is what it is read for."""
        return self.members[0].plans

    @property
    def label_values(self) -> tuple[int, ...]:
        return (0, *self.plans.foreground_labels)

    @property
    def cascade(self) -> bool:
        return any(m.cascade for m in self.members)


@dataclass
class PreparedCase:
    """A case read and preprocessed for each member, ready for the network."""

    case_id: str
    reference: Path  # the first input file: its affine and header go to the label map
    spacing: tuple[float, ...]
    # per member: (preprocessed data, what reverts it), or None for a cascade member (preprocessed in `infer`)
    grids: list[tuple[np.ndarray, CaseProperties] | None]
    image: np.ndarray | None = None  # the image as read: kept only when a member is a cascade


@dataclass
class InferredCase:
    """A case's probabilities per member: on the member's grid with the properties that revert them, or already
    in the image's geometry (properties None: a cascade member, predicted through `predict_case`)."""

    case_id: str
    reference: Path
    parts: list[tuple[np.ndarray, CaseProperties | None]]


@dataclass(frozen=True)
class CaseFailure:
    """A case that failed in some stage, worded for the report. `full_disk` names the file a full disk refused:
    no later case could be written either, so it stops the command."""

    case_id: str
    message: str
    full_disk: str | None = None
    details: str = ""  # an unexpected error's traceback, for the debug log of the process that reports it


def case_failure(case_input: CaseInput, exc: BaseException, writing: Path | None = None) -> CaseFailure:
    full = (unwritable_file(exc) or str(writing or "the output folder")) if is_storage_full(exc) else None
    details = "" if isinstance(exc, VisegError) else "".join(traceback.format_exception(exc))
    return CaseFailure(case_input.case_id, failure_message(case_input, exc), full, details)


def raise_full_disk(failure: CaseFailure) -> None:
    """The full disk a worker met, raised here as the OSError the sequential path raises, so that the command
    reports it alike (`cli.user_error`: no space left writing <file>, exit status 2)."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), failure.full_disk)


# -- the stages -----------------------------------------------------------------------------------------


def prepare_case(spec: CaseSpec, case_input: CaseInput) -> PreparedCase:
    """Check, read and preprocess one case for every member, as `predict_one` and `predict_case` do."""
    from viseg.data.nifti import read_case
    from viseg.preprocessing.preprocess import preprocess_case

    if case_input.case is None:
        raise DatasetError(case_input.problem or f"case {case_input.case_id} cannot be read")
    num_channels = spec.plans.num_channels
    check_case_headers(case_input.case, num_channels)
    arrays = read_case(case_input.case, with_label=False)
    check_finite(case_input, arrays.image)
    check_channels(arrays.image, num_channels)
    grids: list[tuple[np.ndarray, CaseProperties] | None] = []
    for member in spec.members:
        if member.cascade:
            grids.append(None)
            continue
        data, _, properties = preprocess_case(arrays.image, None, arrays.spacing, member.plans, member.configuration,
                                              case_id=case_input.case_id)
        grids.append((data, properties))
    return PreparedCase(case_input.case_id, case_input.case.images[0].path, arrays.spacing, grids,
                        arrays.image if spec.cascade else None)


def infer(ensemble: Ensemble, prepared: PreparedCase, options: InferenceOptions) -> InferredCase:
    """The network part: each member's probabilities on its grid (a cascade member: in the image's geometry)."""
    members = ensemble.members
    if len(members) != len(prepared.grids):
        raise ValueError(f"case {prepared.case_id} was prepared for {len(prepared.grids)} ensemble member(s), but "
                         f"the ensemble has {len(members)}: the stages were given different models")
    parts: list[tuple[np.ndarray, CaseProperties | None]] = []
    for member, grid in zip(members, prepared.grids):
        if grid is None:
            assert prepared.image is not None  # kept by prepare_case for every cascade member
            parts.append((predict_case(member, prepared.image, prepared.spacing, options, prepared.case_id), None))
        else:
            data, properties = grid
            parts.append((ensemble_probabilities(member, data, options), properties))
    return InferredCase(prepared.case_id, prepared.reference, parts)


def combined_probabilities(spec: CaseSpec, inferred: InferredCase) -> np.ndarray:
    """(K, Z, Y, X) float32 in the image's geometry: each member reverted, the groups averaged exactly as
    `predict_case` averages them (a running float32 sum, then divided by the number of groups)."""
    from viseg.inference.export import revert_geometry

    def reverted(member: MemberSpec, part: tuple[np.ndarray, CaseProperties | None]) -> np.ndarray:
        probabilities, properties = part
        if properties is None:
            return probabilities
        return revert_geometry(probabilities, properties, member.plans, member.configuration)

    pairs = list(zip(spec.members, inferred.parts))
    if len(pairs) == 1:
        return reverted(*pairs[0])
    total = np.asarray(reverted(*pairs[0]), dtype=np.float32)
    for pair in pairs[1:]:
        total += reverted(*pair)
    return total / np.float32(len(pairs))


def export_case(spec: CaseSpec, inferred: InferredCase) -> Path:
    """Revert, label, postprocess and write one case (and its probabilities); returns the label file."""
    from viseg.inference.export import write_probabilities, write_segmentation

    probabilities = combined_probabilities(spec, inferred)
    plans = spec.plans
    target = label_file(spec.output, inferred.case_id, spec.file_ending)
    write_segmentation(segment(probabilities, spec.label_values, spec.postprocessing, plans.regions_class_order),
                       inferred.reference, target)
    if spec.save_probabilities:
        write_probabilities(probabilities, plans.regions_class_order or spec.label_values,
                            probabilities_file(spec.output, inferred.case_id), plans.regions)
    return target


# The stages as workers run them: every exception of the case becomes its CaseFailure (module-level functions,
# so that a worker process or a Ray task imports them by name).


def prepare_task(spec: CaseSpec, case_input: CaseInput) -> PreparedCase | CaseFailure:
    try:
        return prepare_case(spec, case_input)
    except Exception as exc:
        return case_failure(case_input, exc)


def infer_task(ensemble: Ensemble, prepared: PreparedCase, options: InferenceOptions,
               case_input: CaseInput) -> InferredCase | CaseFailure:
    try:
        return infer(ensemble, prepared, options)
    except Exception as exc:
        return case_failure(case_input, exc)


def export_task(spec: CaseSpec, inferred: InferredCase, case_input: CaseInput) -> Path | CaseFailure:
    try:
        return export_case(spec, inferred)
    except Exception as exc:
        return case_failure(case_input, exc, label_file(spec.output, inferred.case_id, spec.file_ending))


# -- the local pipeline ---------------------------------------------------------------------------------

GPU_WORKERS = 2  # worker processes per CPU stage by default when the network runs on a GPU (nnU-Net: 3 and 3)


def default_processes(requested: int | None, device_type: str) -> int:
    """num_processes_preprocessing / num_processes_export: as given, else GPU_WORKERS when the network runs on an
    accelerator, whose host CPU then idles while it predicts, and 0 on the CPU: there torch's threads already
    take the cores, and workers only add their start-up and contention (measured on a 2-core machine: 8 cases took
    15 s overlapped against 6 s in one process)."""
    if requested is not None:
        return requested
    return 0 if device_type == "cpu" else GPU_WORKERS


# What the CPU stages import. The forkserver preloads them, so that each worker forked from it starts with them
# loaded (a fork, not a second of imports per worker), when this process starts the forkserver.
STAGE_MODULES = ("viseg.inference.background", "viseg.data.nifti", "viseg.preprocessing.preprocess",
                 "viseg.inference.export")


def _warm_up() -> None:
    """A worker's first task: import what the stages import (scipy, scikit-image, nibabel: about a second), so
    that a stage's workers are ready when its first case comes. Plain imports, not names computed at run time."""
    import viseg.data.nifti
    import viseg.inference.export
    import viseg.preprocessing.preprocess  # noqa: F401


class _Stage:
    """A CPU stage's worker processes, or this process when it is given 0 or 1 of them.

    Workers start with 'forkserver' (as `parallel_map`'s): this process holds torch's threads and must not be
    forked. A pool that broke (a worker killed) is replaced at the next submit."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.pool: ProcessPoolExecutor | None = None

    @property
    def pooled(self) -> bool:
        return self.processes > 1

    def start(self) -> None:
        """Start the workers now (each imports the stages' libraries), rather than when the first case comes."""
        for _ in range(self.processes if self.pooled else 0):
            self.submit(_warm_up)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        if not self.pooled:  # today's sequential path: done before submit returns
            future: Future[Any] = Future()
            future.set_result(fn(*args))
            return future
        if self.pool is None:
            import multiprocessing

            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["__main__", *STAGE_MODULES])  # no effect once the server runs
            self.pool = ProcessPoolExecutor(max_workers=self.processes, mp_context=context)
        try:
            return self.pool.submit(fn, *args)
        except BrokenProcessPool:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
            return self.submit(fn, *args)

    def retry(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` once more after its worker died (`submit` replaces the broken pool; a pool that already
        replaced it keeps its other cases running); a second death is returned, not raised."""
        try:
            return self.submit(fn, *args).result()
        except BrokenProcessPool as exc:
            return exc

    def close(self, cancel: bool) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)
            self.pool = None


def _died(case_input: CaseInput, step: str, key: str) -> CaseFailure:
    return CaseFailure(case_input.case_id, f"case {case_input.case_id}: the worker process {step} it died twice "
                       "(killed, most likely by the system for lack of memory)\n  fix: predict it in the command's "
                       f"own process ({key}=0) or on a machine with more memory; continue_prediction=true skips the "
                       "cases already written")


def predict_overlapped(ensemble: Ensemble, cases: list[CaseInput], output: Path, options: InferenceOptions,
                       postprocessing: Postprocessing | None = None, save_probabilities: bool = False,
                       progress: bool = True, num_processes_preprocessing: int = 2,
                       num_processes_export: int = 2) -> PredictionReport:
    """`predict_cases` with reading + preprocessing of the next cases and export of finished ones in worker
    processes while this process runs the network. The same report, labels and failure handling.

    Memory stays bounded: at most `num_processes_preprocessing` cases are prepared ahead of the network and at
    most `num_processes_export` wait for or are in export (each a case's probabilities, K float32 volumes).
    0 or 1 processes for both, or a single case, is `predict_cases` itself."""
    preprocessing = min(num_processes_preprocessing, len(cases))
    export = min(num_processes_export, len(cases))
    if (preprocessing <= 1 and export <= 1) or len(cases) <= 1:
        return predict_cases(ensemble, cases, output, options, postprocessing, save_probabilities, progress)
    output.mkdir(parents=True, exist_ok=True)
    spec = CaseSpec.of(ensemble, output, postprocessing, save_probabilities)
    log.info("reading and preprocessing in %s, export in %s, while the network predicts",
             f"{preprocessing} worker processes" if preprocessing > 1 else "this process",
             f"{export} worker processes" if export > 1 else "this process")
    if spec.cascade:
        log.info("cascade: the full-resolution stage's preprocessing needs the lowres stage's prediction, so it "
                 "runs with the network in this process; reading and export still overlap")
    report = PredictionReport()
    bar = progress_bar(len(cases), "Predicting", enabled=progress)
    stages = _Stage(preprocessing), _Stage(export)
    finished = False
    try:
        stages[1].start()  # export starts after the first prediction: its workers are ready by then
        _run(ensemble, iter(cases), spec, options, stages, report, bar)
        finished = True
    finally:
        for stage in stages:
            stage.close(cancel=not finished)
        bar.close()
    return report


def _run(ensemble: Ensemble, cases: Iterator[CaseInput], spec: CaseSpec, options: InferenceOptions,
         stages: tuple[_Stage, _Stage], report: PredictionReport, bar: Any) -> None:
    prepare, export = stages
    ahead: deque[tuple[CaseInput, Future[Any]]] = deque()  # cases being read and preprocessed, in order
    exporting: deque[tuple[CaseInput, InferredCase, Future[Any]]] = deque()

    def record(case_input: CaseInput, result: Any) -> None:
        if isinstance(result, CaseFailure):
            if result.full_disk is not None:
                raise_full_disk(result)
            if result.details:
                log.debug("case %s failed:\n%s", case_input.case_id, result.details)
            report.failures[case_input.case_id] = result.message
            bar.write(f"viseg predict: {case_input.case_id} failed: {result.message}", file=sys.stderr)
        else:
            report.predicted.append(case_input.case_id)
        bar.update(1)

    def fill() -> None:
        """Keep the preprocessing workers busy (one case each), or prepare the next case in this process."""
        while len(ahead) < max(prepare.processes, 1):
            case_input = next(cases, None)
            if case_input is None:
                return
            ahead.append((case_input, prepare.submit(prepare_task, spec, case_input)))

    def collect(block_above: int) -> None:
        """Record finished exports in case order; wait for the oldest while more than `block_above` are out."""
        while exporting and (exporting[0][2].done() or len(exporting) > block_above):
            case_input, inferred, future = exporting.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                result = export.retry(export_task, spec, inferred, case_input)
                if isinstance(result, BrokenProcessPool):
                    result = _died(case_input, "exporting", "num_processes_export")
            record(case_input, result)

    while True:
        fill()
        if not ahead:
            break
        case_input, future = ahead.popleft()
        if prepare.pooled:
            fill()  # the next case starts in a worker while this one is predicted
        try:
            prepared = future.result()
        except BrokenProcessPool:
            prepared = prepare.retry(prepare_task, spec, case_input)
            if isinstance(prepared, BrokenProcessPool):
                prepared = _died(case_input, "reading and preprocessing", "num_processes_preprocessing")
        if isinstance(prepared, CaseFailure):
            record(case_input, prepared)
            collect(block_above=len(exporting))
            continue
        inferred = infer_task(ensemble, prepared, options, case_input)
        del prepared  # its arrays go before the next case's arrive
        if isinstance(inferred, CaseFailure):
            record(case_input, inferred)
        else:
            exporting.append((case_input, inferred, export.submit(export_task, spec, inferred, case_input)))
            del inferred
        collect(block_above=export.processes if export.pooled else 0)
    collect(block_above=0)
