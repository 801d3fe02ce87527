"""One Ray Tune trial = one (variant, fold): rebuild the typed config, call the shared core's train().

Workers never call Hydra: the driver composed and validated every variant and ships it as YAML. A trial
resumes from the newest checkpoint it can find: its run folder's last.ckpt (written atomically, so always
complete) when that folder is on this node, else the checkpoint Ray restored into the trial.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from viseg.atomic import copy_atomically
from viseg.config import BaseConfig
from viseg.errors import (
    ConfigError,
    StorageFullError,
    free_space_then,
    is_storage_full,
    storage_full,
    unwritable_file,
)
from viseg.run_layout import FINISHED_MARKER

log = logging.getLogger(__name__)


def with_params(variant_yaml: str, params: dict[str, Any], extra: dict[str, Any] | None = None) -> BaseConfig:
    """A composed variant with searched values (and trial specifics) applied, validated like any config."""
    from omegaconf import OmegaConf

    from viseg.cli import to_typed

    dotlist = [f"{key}={value}" for key, value in params.items()]
    merged = OmegaConf.merge(OmegaConf.structured(BaseConfig), OmegaConf.create(variant_yaml),
                             OmegaConf.from_dotlist(dotlist), extra or {})
    return to_typed(merged)


def trial_config(variant_yaml: str, fold: int, params: dict[str, Any], name: str, results: str) -> BaseConfig:
    return with_params(variant_yaml, params, {"fold": fold, "name": name, "paths": {"results": results}})


def _stage_checkpoint(checkpoint_dir: Path) -> str:
    """A folder holding just last.ckpt for Ray to persist (hard link when possible: no copy)."""
    stage = tempfile.mkdtemp(prefix="viseg-ckpt-")
    source, target = checkpoint_dir / "last.ckpt", Path(stage) / "last.ckpt"
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return stage


def _report(metrics: dict[str, float], checkpoint_dir: Path) -> None:
    import ray.tune

    stage = _stage_checkpoint(checkpoint_dir)
    try:
        ray.tune.report(dict(metrics), checkpoint=ray.tune.Checkpoint.from_directory(stage))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _resume_checkpoint(run_dir: Path) -> Path | None:
    import ray.tune

    from viseg.checkpoints import newest_good_checkpoint

    local = run_dir / "checkpoints" / "last.ckpt"
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
        copy_atomically(Path(folder) / "last.ckpt", local)
    return local


def run_trial(config: dict[str, Any], variants: dict[str, str], runs_dir: str) -> None:
    """The Tune trainable. A full disk anywhere in the trial (checkpoint, metrics, Ray's own copies) ends it
    with one error that says where and how to go on, recorded like any trial error."""
    try:
        _train_trial(config, variants, runs_dir)
    except Exception as exc:
        if is_storage_full(exc) and not isinstance(exc, StorageFullError):
            experiment = Path(runs_dir).parent
            raise storage_full("the trial's results", Path(unwritable_file(exc) or experiment),
                               fix=free_space_then(f"python -m viseg.sweep resume={experiment}")) from exc
        raise


def _train_trial(config: dict[str, Any], variants: dict[str, str], runs_dir: str) -> None:
    import ray.tune

    from viseg.prepare import prepare
    from viseg.train import run_dir_for, train

    variant, params = config["variant"], dict(config.get("params") or {})
    name = variant if not params else f"{variant}-{ray.tune.get_context().get_trial_id()}"
    cfg = trial_config(variants[variant], int(config["fold"]), params, name, runs_dir)
    prepared = prepare(cfg, progress=False)
    run_dir = run_dir_for(cfg, prepared)
    if (run_dir / FINISHED_MARKER).is_file():
        return  # finished before a driver restart: never train it again
    result = train(cfg, prepared=prepared, report=_report, resume_from=_resume_checkpoint(run_dir),
                   run_dir=run_dir, progress=False)
    final = {f"final/dice_{label}": value for label, value in result.validation["mean_dice_per_class"].items()
             if value is not None}
    # node_id: which Ray node trained the fold (the cluster test checks that trials spread over nodes)
    ray.tune.report({"val/ema_pseudo_dice": result.ema_pseudo_dice or 0.0, "final/mean_dice":
                     result.validation["mean_dice"] or 0.0, "run_dir": str(run_dir),
                     "node_id": ray.get_runtime_context().get_node_id(), **final})
