"""A grid trial on several Ray Train workers: the same `train()` in every worker, DDP across them.

The Tune trial itself only launches a Ray Train `TorchTrainer` and waits (a sliver of a CPU); the workers,
`workers` of them with resources.cpu/gpu each, may sit on different nodes. In each worker Lightning runs with
Ray's DDP strategy and cluster environment (`RayDDPStrategy`, `RayLightningEnvironment`, `prepare_trainer`),
over the process group Ray Train has set up. Rank 0 writes the run folder as in any run; every rank reports
each epoch to Ray Train (rank 0 with the checkpoint), and `TuneReportCallback` hands rank 0's report to Tune.

A worker that dies makes Ray Train restart the group (`FailureConfig(max_failures)`); the new workers resume
from the run folder's newest good checkpoint, so a resumed run may also run on another worker count (its
checkpoint holds nothing per rank). The run layout is the same as a single-process trial's.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from viseg.errors import ConfigError
from viseg.io.checkpoints import newest_good_checkpoint
from viseg.io.layout import CHECKPOINTS_DIR
from viseg.sweep.trial_setup import checkpoint_files, link_files, trial_config

log = logging.getLogger(__name__)
HEAD_CPU = 0.01  # the trial's own process only waits for its workers; Tune refuses a bundle of nothing


@dataclass(frozen=True)
class WorkerJob:
    variant_yaml: str
    fold: int
    name: str
    runs_dir: str
    previous_stage: str | None  # a cascade's lowres run, found by the trial before the workers start


def trial_workers(variant_yaml: str, default: int) -> int:
    """How many workers a variant's trial trains on: its devices= when that is a count above 1, else
    resources.workers."""
    from omegaconf import OmegaConf

    devices = OmegaConf.create(variant_yaml).get("devices")
    return devices if isinstance(devices, int) and not isinstance(devices, bool) and devices > 1 else default


def _train_report(metrics: dict[str, float], checkpoint_dir: Path) -> None:
    """Every rank reports (Ray Train's report is collective); rank 0 with the epoch's checkpoint. Which process
    and how many: the console and the tests see a trial's workers."""
    import ray.train

    context = ray.train.get_context()
    metrics = {**metrics, "worker_pid": os.getpid(), "workers": context.get_world_size()}
    if context.get_world_rank() != 0:
        ray.train.report(metrics)
        return
    stage = Path(tempfile.mkdtemp(prefix="viseg-ckpt-"))
    try:
        link_files(checkpoint_files(checkpoint_dir.parent), stage)
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(str(stage)))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _resume_point(run_dir: Path) -> Path | None:
    """The run folder's newest good checkpoint (shared storage): a restarted worker group goes on from it."""
    checkpoints = run_dir / CHECKPOINTS_DIR
    return newest_good_checkpoint(checkpoints) if checkpoints.is_dir() else None


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: rebuild the trial's config and train (train() knows its rank)."""
    import ray.train

    job: WorkerJob = config["job"]
    from viseg.preprocessing.prepare import prepare
    from viseg.training.train import run_dir_for, train

    cfg = trial_config(job.variant_yaml, job.fold, {}, job.name, job.runs_dir)
    if job.previous_stage:
        cfg.previous_stage = job.previous_stage
    prepared = prepare(cfg, progress=False)
    run_dir = run_dir_for(cfg, prepared)
    result = train(cfg, prepared=prepared, report=_train_report, resume_from=_resume_point(run_dir),
                   run_dir=run_dir, progress=False, retry=True, ray_train=True)
    if ray.train.get_context().get_world_rank() == 0:
        final = {f"final/dice_{label}": value for label, value in result.validation["mean_dice_per_class"].items()
                 if value is not None}
        ray.train.report({"val/ema_pseudo_dice": result.ema_pseudo_dice or 0.0,
                          "final/mean_dice": result.validation["mean_dice"] or 0.0, "run_dir": str(run_dir),
                          "node_id": ray.get_runtime_context().get_node_id(), **final})
    else:
        ray.train.report({})


def check_capacity(variants: dict[str, str], default_workers: int, cpu: float, gpu: float) -> None:
    """A local Ray cannot grow: a trial whose workers need more than it has would wait forever, so say it now.
    (A cluster may autoscale; there Ray reports the pending demand itself.)"""
    import ray

    total = ray.cluster_resources()
    needs = {name: trial_workers(text, default_workers) for name, text in variants.items()}
    for name, count in needs.items():
        if count < 2:
            continue
        need_cpu, need_gpu = HEAD_CPU + count * cpu, count * gpu
        if need_cpu > total.get("CPU", 0) + 1e-9 or need_gpu > total.get("GPU", 0) + 1e-9:
            raise ConfigError(f"variant {name} trains on {count} Ray Train workers of resources.cpu={cpu:g} "
                              f"resources.gpu={gpu:g} each (plus {HEAD_CPU} CPU for the trial), {need_cpu:g} CPU "
                              f"and {need_gpu:g} GPU in all; this Ray has {total.get('CPU', 0):g} CPU and "
                              f"{total.get('GPU', 0):g} GPU", fix="lower resources.cpu / resources.gpu per worker, or "
                              "the workers (resources.workers=, devices=), or submit the sweep to a larger cluster")


def run_on_workers(job: WorkerJob, workers: int, cpu: float, gpu: float, max_failures: int,
                   storage: Path) -> dict[str, Any]:
    """Launch the workers from the Tune trial and wait for them; rank 0's reports reach Tune as they come."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    per_worker = {"CPU": float(cpu), **({"GPU": float(gpu)} if gpu else {})}
    trainer = TorchTrainer(
        train_worker, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu > 0, resources_per_worker=per_worker),
        run_config=RunConfig(name=f"{job.name}-fold_{job.fold}", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=max_failures),
                             callbacks=[TuneReportCallback()]))
    result = trainer.fit()
    return dict(result.metrics or {})

