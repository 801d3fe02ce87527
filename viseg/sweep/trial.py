"""One Ray Tune trial = one (variant, fold): rebuild the typed config, call the shared core's train().

Workers never call Hydra: the driver composed and validated every variant and ships it as YAML. A trial
resumes from the newest checkpoint it can find: its run folder's last.ckpt (written atomically, so always
complete; previous.ckpt when last.ckpt is damaged or caught mid-replacement) when that folder is on this node,
else the checkpoint Ray restored into the trial. A resumed trial goes on with its run's own plan and split,
never a re-made one (train() sees to it).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from viseg.config import BaseConfig
from viseg.errors import (
    ConfigError,
    StorageFullError,
    free_space_then,
    is_storage_full,
    storage_full,
    unwritable_file,
)
from viseg.io.atomic import copy_atomically
from viseg.io.checkpoints import newest_good_checkpoint
from viseg.io.layout import CHECKPOINTS_DIR, FINISHED_MARKER, LAST_CHECKPOINT
from viseg.sweep import stages, train_workers
from viseg.sweep.trial_setup import RUN_IDENTITY, checkpoint_files, link_files, trial_config

log = logging.getLogger(__name__)


def _stage_checkpoint(checkpoint_dir: Path) -> str:
    """A folder for Ray to persist: last.ckpt and the run's own plan and split, so that a trial continued on
    another node (from Ray's copy) still trains on its own split."""
    stage = tempfile.mkdtemp(prefix="viseg-ckpt-")
    link_files(checkpoint_files(checkpoint_dir.parent), Path(stage))
    return stage


def _report(metrics: dict[str, float], checkpoint_dir: Path) -> None:
    import ray.tune

    stage = _stage_checkpoint(checkpoint_dir)
    try:
        ray.tune.report(dict(metrics), checkpoint=ray.tune.Checkpoint.from_directory(stage))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _resume_checkpoint(run_dir: Path) -> Path | None:
    """The run folder's newest good checkpoint (last.ckpt, else previous.ckpt), else Ray's copy of the last
    report, restored into the run folder with the plan and split it was trained with."""
    import ray.tune

    local = run_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT
    try:
        found = newest_good_checkpoint(local.parent) if local.parent.is_dir() else None
    except ConfigError as exc:  # both local files damaged: Ray's copy of the last report is the way back
        log.warning("%s; trying the checkpoint Ray kept", exc)
        found = None
    if found is not None:
        return found
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        return None
    local.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as folder:
        for name in RUN_IDENTITY:
            if (Path(folder) / name).is_file() and not (run_dir / name).is_file():
                copy_atomically(Path(folder) / name, run_dir / name)
        copy_atomically(Path(folder) / LAST_CHECKPOINT, local)
    return local


def run_trial(config: dict[str, Any], variants: dict[str, str], runs_dir: str,
              previous_stages: dict[str, str] | None = None, workers: dict[str, Any] | None = None) -> None:
    """The Tune trainable. A full disk anywhere in the trial (checkpoint, metrics, Ray's own copies) ends it
    with one error that says where and how to go on, recorded like any trial error. `previous_stages`: cascade
    variant -> its lowres variant (sweep/stages.py). `workers`: the sweep's resources.workers, cpu, gpu and
    max_failures, for variants that train on several Ray Train workers (sweep/train_workers.py)."""
    try:
        _train_trial(config, variants, runs_dir, previous_stages or {}, workers or {})
    except Exception as exc:
        if is_storage_full(exc) and not isinstance(exc, StorageFullError):
            experiment = Path(runs_dir).parent
            raise storage_full("the trial's results", Path(unwritable_file(exc) or experiment),
                               fix=free_space_then(f"python -m viseg.sweep resume={experiment}")) from exc
        raise


def _variant_of(config: dict[str, Any], variants: dict[str, str], runs_dir: str) -> str:
    """The trial's variant, or a clear error when Ray started a trial that is none of this sweep's: what it
    does when its experiment state fails to load and it restarts from a param space it did not keep."""
    variant = config.get("variant")
    if variant not in variants or config.get("fold") is None:
        experiment = Path(runs_dir).parent
        raise ConfigError(f"Ray started a trial with config {config!r}, which is none of this sweep's (variant, "
                          "fold) trials: its experiment state was lost or damaged",
                          fix=f"run python -m viseg.sweep resume={experiment} again (a grid rebuilds its trials "
                              f"from viseg's own state); a search cannot continue: cross_validate={experiment} "
                              "what it found, or start it again under a new experiment=...")
    return variant


def _trial_run(variant: str, fold: int, variants: dict[str, str], runs_dir: str) -> tuple[BaseConfig, Any, Path]:
    """A grid trial's config, prepared dataset and run folder (named by variant and fold)."""
    from viseg.preprocessing.prepare import prepare
    from viseg.training.train import run_dir_for

    cfg = trial_config(variants[variant], fold, {}, variant, runs_dir)
    prepared = prepare(cfg, progress=False)
    return cfg, prepared, run_dir_for(cfg, prepared)


def _train_trial(config: dict[str, Any], variants: dict[str, str], runs_dir: str,
                 previous_stages: dict[str, str], workers: dict[str, Any]) -> None:
    import ray.tune

    from viseg.preprocessing.prepare import prepare
    from viseg.training.train import run_dir_for, train

    variant, params = _variant_of(config, variants, runs_dir), dict(config.get("params") or {})
    fold = int(config["fold"])
    name = variant if not params else f"{variant}-{ray.tune.get_context().get_trial_id()}"
    cfg = trial_config(variants[variant], fold, params, name, runs_dir)
    prepared = prepare(cfg, progress=False)
    run_dir = run_dir_for(cfg, prepared)
    is_stage = variant in previous_stages.values()
    if (run_dir / FINISHED_MARKER).is_file():
        if is_stage:
            ray.get(stages.board(runs_dir).finished.remote(stages.stage_key(variant, fold), str(run_dir)))
        return  # finished before a driver restart: never train it again
    if variant in previous_stages:  # a cascade: its fold's lowres run first (a Ray call that returns when done)
        lowres = previous_stages[variant]
        cfg.previous_stage = str(stages.wait_for_previous_stage(runs_dir, lowres, fold,
                                                                _trial_run(lowres, fold, variants, runs_dir)[2]))
    if is_stage:
        ray.get(stages.board(runs_dir).started.remote(stages.stage_key(variant, fold)))
    count = train_workers.trial_workers(variants[variant], int(workers.get("workers", 1)))
    try:
        if count > 1:  # Ray Train workers train it; their rank 0 reports to Tune
            job = train_workers.WorkerJob(variants[variant], fold, name, runs_dir, cfg.previous_stage)
            train_workers.run_on_workers(job, count, workers.get("cpu", 1.0), workers.get("gpu", 0.0),
                                         int(workers.get("max_failures", 0)), Path(runs_dir).parent / "ray_train")
            if is_stage:
                ray.get(stages.board(runs_dir).finished.remote(stages.stage_key(variant, fold), str(run_dir)))
            return
        # retry: the folder is this trial's own; the run goes on with its own plan and split (train() reads them)
        result = train(cfg, prepared=prepared, report=_report, resume_from=_resume_checkpoint(run_dir),
                       run_dir=run_dir, progress=False, retry=True)
    except BaseException as exc:
        if is_stage:
            ray.get(stages.board(runs_dir).failed.remote(stages.stage_key(variant, fold), f"{type(exc).__name__}: "
                                                         f"{exc}"))
        raise
    if is_stage:
        ray.get(stages.board(runs_dir).finished.remote(stages.stage_key(variant, fold), str(run_dir)))
    final = {f"final/dice_{label}": value for label, value in result.validation["mean_dice_per_class"].items()
             if value is not None}
    # node_id: which Ray node trained the fold (the cluster test checks that trials spread over nodes)
    ray.tune.report({"val/ema_pseudo_dice": result.ema_pseudo_dice or 0.0, "final/mean_dice":
                     result.validation["mean_dice"] or 0.0, "run_dir": str(run_dir),
                     "node_id": ray.get_runtime_context().get_node_id(), **final})
