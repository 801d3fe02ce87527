"""Prediction of a folder across a Ray cluster, with Ray Data.

    cases -> map(read + preprocess, CPU tasks) -> map_batches(the network, an actor pool)
          -> map(revert, labels, postprocessing, NIfTI write, CPU tasks) -> one small record per case

The stages are `inference.background`'s, so the labels are those of the local paths. Each prediction actor loads
the ensemble once, in its constructor, from the run folders (never pickled networks): the run folders, the input
files and the output folder must be on storage every node reads (a cluster's shared file system).

Every row carries its case id, and a stage that fails on a case turns it into a failure record that the later
stages pass on: one case's error never fails the pipeline, and the report (and exit status) is the local path's.
A worker that dies (out of memory, a lost node) is retried a bounded number of times by Ray; a case whose row
never comes back is then reported as lost. Ray's default would retry it forever.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from viseg.data.prediction_inputs import CaseInput
from viseg.errors import ConfigError, VisegError
from viseg.inference.background import (
    CaseFailure,
    CaseSpec,
    InferredCase,
    PreparedCase,
    export_task,
    infer_task,
    prepare_task,
    raise_full_disk,
)
from viseg.inference.predict import InferenceOptions, PredictionReport
from viseg.progress import progress_bar

if TYPE_CHECKING:
    from viseg.inference.ensemble import Ensemble, Postprocessing

log = logging.getLogger(__name__)

# Bounded retries of a worker that died on a case (Ray Data's default, -1, retries it forever): the CPU tasks'
# max_retries, the actors' max_task_retries. Distinct remote args also keep Ray Data from fusing the CPU map into
# the actors (it fuses a task map into the next actor map when their remote args agree), which would put reading
# and preprocessing back in line with the network.
TASK_RETRIES = 2
ACTOR_TASK_RETRIES = 1
CPU_ACTOR_POOL = 2  # actors when the cluster has no GPU and ray_actors is unset (fewer if its CPUs are fewer)
CPUS_FOR_TASKS = 1  # CPUs the actors must leave free, in all, for the read and export tasks
# A read or export task's share of a CPU. Half: it waits on the disk part of the time, and a node whose actor takes
# half a CPU (ray_cpus_per_actor=0.5) still runs them beside it; a whole CPU each would leave such a node none.
CPU_PER_TASK = 0.5


def ray_wanted(setting: bool | None) -> bool:
    """ray=true/false as given; unset: when RAY_ADDRESS names a cluster to join (a job submitted to one sets it).
    `RAY_ADDRESS=local` asks Ray for a fresh local instance, not a cluster, so it does not switch Ray on."""
    if setting is not None:
        return setting
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return bool(address) and address != "local"


@dataclass(frozen=True)
class RaySettings:
    """ray_actors / ray_gpus_per_actor / ray_cpus_per_actor as given (None: chosen from the cluster)."""

    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0


@dataclass(frozen=True)
class ActorPool:
    """The prediction actors as started: how many, what each reserves, the torch device each predicts on."""

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    device: str

    def describe(self) -> str:
        gpus = f"{self.gpus_per_actor:g} GPU + " if self.gpus_per_actor else ""
        return f"{self.actors} actor(s) of {gpus}{self.cpus_per_actor:g} CPU, predicting on {self.device}"


def actor_pool(settings: RaySettings, device: str, cluster: dict[str, float]) -> ActorPool:
    """The actor pool for `cluster` (ray.cluster_resources()). GPUs per actor, unset: 1 when the cluster has a
    GPU and device= allows one; actors, unset: as many as the cluster's GPUs hold, else CPU_ACTOR_POOL. An actor
    with a GPU predicts on `cuda` (Ray makes its GPU the only one it sees), one without on the CPU."""
    cluster_gpus = float(cluster.get("GPU", 0.0))
    gpus = settings.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster_gpus > 0 and device != "cpu" else 0.0
    if gpus == 0 and device.startswith("cuda"):
        raise ConfigError(f"device={device}, but the Ray cluster has no GPU for the prediction actors"
                          if cluster_gpus == 0 else f"device={device} with ray_gpus_per_actor=0",
                          fix="predict on the CPU (device=auto or device=cpu), or join a cluster with GPUs "
                              "(RAY_ADDRESS) and give each actor one (ray_gpus_per_actor=1)")
    if gpus > cluster_gpus:
        raise ConfigError(f"ray_gpus_per_actor={gpus:g}, but the Ray cluster has {cluster_gpus:g} GPU(s): no actor "
                          "could start", fix="set ray_gpus_per_actor=0 (CPU actors), or join a cluster with GPUs")
    cpus, spare = settings.cpus_per_actor, float(cluster.get("CPU", 0.0)) - CPUS_FOR_TASKS
    actors = settings.actors
    if actors is None:
        actors = max(1, int(cluster_gpus // gpus)) if gpus else max(1, min(CPU_ACTOR_POOL, int(spare // cpus)))
    if actors * cpus > spare:  # Ray would start the actors and wait forever for a CPU to read the cases on
        raise ConfigError(f"{actors} prediction actor(s) of ray_cpus_per_actor={cpus:g} leave the Ray cluster's "
                          f"{spare + CPUS_FOR_TASKS:g} CPU(s) none for reading and writing the cases "
                          f"({CPUS_FOR_TASKS} needed)",
                          fix=f"use fewer actors (ray_actors={max(1, int(spare // cpus))}) or a fraction of a CPU "
                              "each (e.g. ray_cpus_per_actor=0.5), or join a larger cluster")
    if gpus and device.startswith("cuda:"):
        log.warning("device=%s: each Ray actor sees only the GPU Ray gave it, so they predict on cuda", device)
    return ActorPool(actors, gpus, settings.cpus_per_actor, "cuda" if gpus else "cpu")


# -- the rows -------------------------------------------------------------------------------------------
# A row: {"case_id": str, "failed": bool, "payload": object}, the payload a PreparedCase, InferredCase or
# CaseFailure (numpy arrays of any size and the dataclasses around them), which Ray Data keeps as a Python-object
# column: Ray's own object transport within this job moves it, as it moves any task argument. viseg itself never
# unpickles anything (tests/reliability/test_security.py).


def _row(case_id: str, result: Any) -> dict[str, Any]:
    return {"case_id": case_id, "failed": isinstance(result, CaseFailure),
            "payload": result}


def prepare_row(spec: CaseSpec, cases: dict[str, CaseInput], row: dict[str, Any]) -> dict[str, Any]:
    case_input = cases[str(row["case_id"])]
    return _row(case_input.case_id, prepare_task(spec, case_input))


UNLOADED = "could not load the model"  # in the message of a case whose actor could not load the ensemble


class PredictionActor:
    """One prediction actor: the ensemble loaded once, from the run folders, on the actor's device.

    A model the driver loaded but an actor cannot (its node does not see the run folders, or has no CUDA) is a
    failure of the cases that actor is given, each recorded as such: Ray would otherwise end the whole pipeline
    with an ActorDiedError that keeps the actor's error only as text, and the cases other actors predicted would
    be lost with it."""

    def __init__(self, run_dirs: list[str], checkpoint: str, device: str, options: InferenceOptions,
                 cases: dict[str, CaseInput]) -> None:
        from viseg.inference.ensemble import load_ensemble

        self.options = options
        self.cases = cases
        self.ensemble: Ensemble | None = None
        self.unloaded = ""
        try:
            self.ensemble = load_ensemble([Path(d) for d in run_dirs], checkpoint, device)
        except Exception as exc:
            import socket

            why = exc.message if isinstance(exc, VisegError) else f"{type(exc).__name__}: {exc}"
            self.unloaded = (f"the prediction actor on {socket.gethostname()} {UNLOADED} ({device}): {why}\n  fix: "
                             "model=, input= and output= must be on storage every Ray node reads (a model.zip or "
                             "a local folder exists on the driver's machine only), and a GPU actor needs CUDA")
            log.error("%s", self.unloaded)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        failed, payloads = [], []
        for case_id, was_failed, payload in zip(batch["case_id"], batch["failed"], batch["payload"]):
            if was_failed:  # a failure record from reading: passed on as it is
                failed.append(True)
                payloads.append(payload)
                continue
            if self.ensemble is None:
                failed.append(True)
                payloads.append(CaseFailure(str(case_id), f"case {case_id}: {self.unloaded}"))
                continue
            prepared: PreparedCase = payload
            result = infer_task(self.ensemble, prepared, self.options, self.cases[str(case_id)])
            del prepared
            failed.append(isinstance(result, CaseFailure))
            payloads.append(result)
        out = np.empty(len(payloads), dtype=object)
        out[:] = payloads
        import ray

        node = ray.get_runtime_context().get_node_id()  # which node predicted: the report says how they spread
        return {"case_id": np.asarray(batch["case_id"]), "failed": np.asarray(failed, dtype=bool), "payload": out,
                "node": np.asarray([node] * len(payloads))}


def export_row(spec: CaseSpec, cases: dict[str, CaseInput], row: dict[str, Any]) -> dict[str, Any]:
    """The last stage's record: no arrays, only what the report needs."""
    case_input = cases[str(row["case_id"])]
    result = row["payload"]
    if not row["failed"]:
        inferred: InferredCase = result
        result = export_task(spec, inferred, case_input)
        del inferred
    node = str(row.get("node", ""))
    if isinstance(result, CaseFailure):
        return {"case_id": case_input.case_id, "failed": True, "message": result.message,
                "full_disk": result.full_disk or "", "details": result.details, "node": node}
    return {"case_id": case_input.case_id, "failed": False, "message": "", "full_disk": "", "details": "",
            "node": node}


# -- the pipeline ---------------------------------------------------------------------------------------


def join_or_start_ray() -> bool:
    """Ray as it is when already initialised, else joined (RAY_ADDRESS) or started locally; whether this call
    started it (and so must shut it down). No code pinning, unlike a sweep: prediction runs in minutes, not the
    days over which a checkout may change under the trials."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=True)
    return True


def predict_on_ray(ensemble: Ensemble, run_dirs: list[Path] | tuple[Path, ...], checkpoint: str,
                   cases: list[CaseInput], output: Path, options: InferenceOptions,
                   postprocessing: Postprocessing | None = None, save_probabilities: bool = False,
                   progress: bool = True, settings: RaySettings | None = None,
                   device: str = "auto") -> PredictionReport:
    """Predict `cases` with Ray Data; the report of `predict_cases`. `ensemble` (loaded here, on any device)
    only describes the model: each actor loads its own copy from `run_dirs`."""
    output.mkdir(parents=True, exist_ok=True)
    if not cases:
        return PredictionReport()
    started = join_or_start_ray()
    try:
        return _predict(ensemble, run_dirs, checkpoint, cases, output, options, postprocessing,
                        save_probabilities, progress, settings or RaySettings(), device)
    finally:
        if started:
            import ray

            ray.shutdown()


def _predict(ensemble: Ensemble, run_dirs: list[Path] | tuple[Path, ...], checkpoint: str, cases: list[CaseInput],
             output: Path, options: InferenceOptions, postprocessing: Postprocessing | None,
             save_probabilities: bool, progress: bool, settings: RaySettings, device: str) -> PredictionReport:
    import ray

    pool = actor_pool(settings, device, ray.cluster_resources())
    if pool.actors > len(cases):  # an actor per case at most: each loads the whole ensemble
        pool = replace(pool, actors=len(cases))
    log.info("predicting %d case(s) with Ray Data: %s", len(cases), pool.describe())
    spec = CaseSpec.of(ensemble, output, postprocessing, save_probabilities)
    by_id = {c.case_id: c for c in cases}
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.max_errored_blocks
    # viseg's own progress bar; a block lost to a dead worker (after the retries) is a lost case, reported below,
    # not the end of the folder
    context.enable_progress_bars, context.max_errored_blocks = False, -1
    report = PredictionReport()
    bar = progress_bar(len(cases), "Predicting", enabled=progress)
    try:
        items = ray.data.from_items([{"case_id": c.case_id} for c in cases], override_num_blocks=len(cases))
        read = _bounded(items.map, {"max_retries": TASK_RETRIES}, partial(prepare_row, spec, by_id),
                        num_cpus=CPU_PER_TASK)
        constructor = {"run_dirs": [str(d) for d in run_dirs], "checkpoint": checkpoint, "device": pool.device,
                       "options": options, "cases": by_id}
        # SPREAD: the actors on as many nodes as the cluster has, rather than packed onto the first
        predicted = _bounded(read.map_batches, {"max_restarts": -1, "max_task_retries": ACTOR_TASK_RETRIES,
                                                "scheduling_strategy": "SPREAD"},
                             PredictionActor, batch_size=1, batch_format="numpy",
                             compute=ray.data.ActorPoolStrategy(size=pool.actors), fn_constructor_kwargs=constructor,
                             num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor)
        dataset = _bounded(predicted.map, {"max_retries": TASK_RETRIES}, partial(export_row, spec, by_id),
                           num_cpus=CPU_PER_TASK)
        for record in _records(dataset):
            _record(record, report, bar)
    finally:
        context.enable_progress_bars, context.max_errored_blocks = saved
        bar.close()
    if not report.predicted and report.failures and all(UNLOADED in m for m in report.failures.values()):
        message = next(iter(report.failures.values())).split(": ", 1)[1]  # without the case
        raise ConfigError(f"no Ray prediction actor could load the model, so no case was predicted: {message}")
    if report.nodes:
        log.info("%d case(s) predicted on %d Ray node(s)", len(report.nodes), len(set(report.nodes.values())))
    for case_id in sorted(set(by_id) - set(report.predicted) - set(report.failures)):
        report.failures[case_id] = (f"case {case_id}: lost in the Ray pipeline (a worker died on it, also when "
                                    "retried: out of memory, or its node went away; the Ray logs say which)\n  fix: "
                                    "predict it alone (input=<its files>) on a node with more memory; "
                                    "continue_prediction=true skips the cases already written")
        bar.write(f"viseg predict: {case_id} failed: {report.failures[case_id]}", file=sys.stderr)
    return report


def _bounded(method: Any, retries: dict[str, int], fn: Any, **named: Any) -> Any:
    """`method(fn, **named)` with bounded retries. Ray Data takes them only as free-form remote args, deprecated
    since Ray 2.60 (named parameters exist for resources, not for retries): the warning is silenced here, and a
    Ray that no longer takes them gets the operator without them (Ray's own unbounded retries, and the read stage
    may then run inside the actors)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            return method(fn, **named, **retries)
    except TypeError as exc:
        if not any(key in str(exc) for key in retries):
            raise
        log.warning("this Ray does not take %s for Ray Data operators: a worker that dies on a case is retried as "
                    "Ray decides", ", ".join(retries))
        return method(fn, **named)


def _records(dataset: Any) -> Iterator[dict[str, Any]]:
    """The pipeline's records as they finish. An error of the pipeline itself (not of a case: those are records)
    that carries a viseg error, e.g. actors that cannot load the run folders on their node, becomes that error,
    without Ray's traceback."""
    try:
        yield from dataset.iter_rows()
    except Exception as exc:
        cause = _viseg_cause(exc)
        if cause is None:
            raise
        shared = ("the run folders (model=), input= and output= must be on storage every Ray node reads: a "
                  "model.zip or a local folder exists on this machine only")
        raise ConfigError(f"the Ray prediction pipeline stopped: {cause.message}",
                          fix=f"{cause.fix}; {shared}" if cause.fix else shared) from None


def _viseg_cause(exc: BaseException) -> VisegError | None:
    """The VisegError behind a Ray error, the innermost: Ray keeps a worker's exception as `cause`, and the class
    it re-raises it as may itself pass for a VisegError without its attributes."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = getattr(seen, "cause", None) or seen.__cause__ or seen.__context__
    found = [e for e in chain if isinstance(e, VisegError) and hasattr(e, "message")]
    return found[-1] if found else None


def _record(record: dict[str, Any], report: PredictionReport, bar: Any) -> None:
    case_id = str(record["case_id"])
    if record.get("node"):
        report.nodes[case_id] = str(record["node"])
    if not record["failed"]:
        report.predicted.append(case_id)
    else:
        if record["full_disk"]:
            raise_full_disk(CaseFailure(case_id, str(record["message"]), str(record["full_disk"])))
        if record["details"]:
            log.debug("case %s failed:\n%s", case_id, record["details"])
        report.failures[case_id] = str(record["message"])
        bar.write(f"viseg predict: {case_id} failed: {report.failures[case_id]}", file=sys.stderr)
    bar.update(1)
