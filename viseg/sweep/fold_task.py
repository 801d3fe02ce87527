"""One fold of a search trial: a Ray task that trains the fold with the shared core's train() and streams each
epoch back to its trial (a Ray streaming generator), so the trial can report the fold mean every epoch.

The task yields plain dicts, oldest epoch first:

    {"fold": k, "epoch": e, "metrics": {...}, "checkpoint": "<folder>" | None}   one per epoch
    {"fold": k, "final": {"mean_dice": ..., "mean_dice_per_class": {...}, "ema_pseudo_dice": ...,
                          "run_dir": "...", "node_id": "..."}}                    once, at the end

A checkpoint folder holds hard links to the fold's last.ckpt of that epoch and its plan and split, under the
run folder (shared storage, like every run folder of an experiment), so the trial on any node can read it; the
trial removes it once reported. Epochs that a resumed fold had already trained before its restart are yielded
again from the checkpoint's own history (without a checkpoint), so the trial sees every epoch exactly once,
whichever fold ran ahead.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from viseg.io.atomic import copy_atomically
from viseg.io.checkpoints import newest_good_checkpoint
from viseg.io.jsonio import read_json
from viseg.io.layout import CHECKPOINTS_DIR, FINISHED_MARKER, LAST_CHECKPOINT
from viseg.sweep.trial_setup import RUN_IDENTITY, checkpoint_files, link_files, trial_config

log = logging.getLogger(__name__)
REPORTED_DIR = "reported"  # <run folder>/reported/epoch_<e>/: an epoch's checkpoint until the trial took it


@dataclass(frozen=True)
class FoldJob:
    variant_yaml: str  # the composed variant (the driver composed and validated it)
    params: dict[str, Any]  # the configuration's sampled values
    fold: int
    name: str  # the run name: <variant>-<trial id>, one per configuration
    runs_dir: str
    report_from: int  # the first epoch the trial has not reported yet
    resume: str | None  # a checkpoint folder to start from (another trial's, after a PBT exploit), else own


def stage_checkpoint(run_dir: Path, epoch: int) -> Path:
    """Hard links (a copy across filesystems) of this epoch's last.ckpt and the run's plan and split."""
    stage = run_dir / REPORTED_DIR / f"epoch_{epoch:05d}"
    shutil.rmtree(stage, ignore_errors=True)
    link_files(checkpoint_files(run_dir), stage)
    return stage


def _final(run_dir: Path) -> dict[str, Any]:
    import ray

    finished = read_json(run_dir / FINISHED_MARKER)
    validation = read_json(run_dir / "validation" / "summary.json")
    return {"mean_dice": validation.get("mean_dice"), "mean_dice_per_class": validation.get("mean_dice_per_class"),
            "ema_pseudo_dice": finished.get("ema_pseudo_dice"), "run_dir": str(run_dir),
            "node_id": ray.get_runtime_context().get_node_id()}


def _replayed(checkpoint: Path | None, report_from: int, fold: int) -> list[dict[str, Any]]:
    """The epochs from `report_from` on that `checkpoint` already holds: trained before a restart, not yet seen."""
    from viseg.training.callbacks import history_rows

    if checkpoint is None:
        return []
    return [{"fold": fold, "epoch": int(row["epoch"]), "metrics": row, "checkpoint": None}
            for row in history_rows(checkpoint) if int(row["epoch"]) >= report_from]


def _resume_point(job: FoldJob, run_dir: Path) -> Path | None:
    """Another trial's checkpoint when the trial exploited one (its weights, continued in this run folder),
    else this run folder's newest good checkpoint, else nothing (a fresh start)."""
    if job.resume is not None:
        source = Path(job.resume)
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in RUN_IDENTITY:  # the same plan and fold for every trial of a search: kept when present
            if (source / name).is_file() and not (run_dir / name).is_file():
                copy_atomically(source / name, run_dir / name)
        target = run_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_atomically(source / LAST_CHECKPOINT, target)
        return target
    checkpoints = run_dir / CHECKPOINTS_DIR
    return newest_good_checkpoint(checkpoints) if checkpoints.is_dir() else None


def train_fold(job: FoldJob) -> Iterator[dict[str, Any]]:
    """The task body (wrapped with ray.remote by the trial). train() runs in a thread and hands each epoch to
    this generator through a queue: Lightning drives the loop, the generator only forwards what it reports."""
    from viseg.preprocessing.prepare import prepare
    from viseg.training.train import run_dir_for, train

    cfg = trial_config(job.variant_yaml, job.fold, job.params, job.name, job.runs_dir)
    prepared = prepare(cfg, progress=False)
    run_dir = run_dir_for(cfg, prepared)
    shutil.rmtree(run_dir / REPORTED_DIR, ignore_errors=True)  # left by an earlier attempt: never reported
    if job.resume is None and (run_dir / FINISHED_MARKER).is_file():
        for item in _replayed(run_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT, job.report_from, job.fold):
            yield item  # not `yield from`: Ray sends into the generator, which a list iterator cannot take
        yield {"fold": job.fold, "final": _final(run_dir)}
        return
    resume = _resume_point(job, run_dir)
    for item in _replayed(resume, job.report_from, job.fold):
        yield item

    reports: queue.Queue[tuple[str, Any]] = queue.Queue()

    def report(metrics: dict[str, float], checkpoint_dir: Path) -> None:
        epoch = int(metrics["epoch"])
        reports.put(("epoch", {"fold": job.fold, "epoch": epoch, "metrics": dict(metrics), "pid": os.getpid(),
                               "checkpoint": str(stage_checkpoint(run_dir, epoch))}))

    def work() -> None:
        try:
            train(cfg, prepared=prepared, report=report, resume_from=resume, run_dir=run_dir, progress=False,
                  retry=True)
            reports.put(("final", None))
        except BaseException as exc:  # handed to the generator, which raises it in the task: the trial sees it
            reports.put(("error", exc))

    threading.Thread(target=work, name=f"train-fold-{job.fold}", daemon=True).start()
    while True:
        kind, item = reports.get()
        if kind == "error":
            raise item
        if kind == "final":
            break
        yield item
    yield {"fold": job.fold, "final": _final(run_dir)}
