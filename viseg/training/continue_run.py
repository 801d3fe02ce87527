"""Continue an interrupted or finished run (replaces the training docs' ClearML `continue_task_id`).

The run folder's saved, fully resolved config.yaml is reloaded; command-line overrides may change only
trainer, loader and device settings. Model and plan values are locked: the checkpoint's weights belong to
them. Training resumes from checkpoints/last.ckpt (previous.ckpt when that is missing or damaged) with
optimizer, scheduler, epoch and callback state.

A started run (this, a sweep's resume, a retried trial) always goes on with its own plans.json and
splits.json: re-planning or re-splitting would validate weights on cases they were trained on. What changed
in the dataset since the start is said, never mixed in silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from viseg.cli import to_typed
from viseg.config import BaseConfig
from viseg.data.splits import Split
from viseg.errors import ConfigError, DatasetError
from viseg.io.checkpoints import newest_good_checkpoint
from viseg.io.jsonio import read_json
from viseg.io.layout import CHECKPOINTS_DIR, RESUMABLE_CHECKPOINTS
from viseg.planning.plans import Plans
from viseg.schedulers import HORIZON_SCHEDULERS

if TYPE_CHECKING:
    from viseg.data.splits import Split
    from viseg.planning.plans import Plans
    from viseg.preprocessing.prepare import PreparedDataset

log = logging.getLogger(__name__)
ALLOWED_PREFIXES = ("trainer.", "loader.", "devices", "num_processes", "continue_from", "paths.results",
                    "hydra.", "hydra/")


def override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def check_overrides(overrides: list[str]) -> list[str]:
    """The overrides that may apply to a continued run; anything else is a clear error."""
    locked = [override_key(o) for o in overrides if not override_key(o).startswith(ALLOWED_PREFIXES)]
    if locked:
        raise ConfigError(
            f"{', '.join(locked)} cannot change when continuing a run: the checkpoint's weights were trained "
            "with the saved model and plan values",
            fix="only override trainer.*, loader.*, devices or num_processes with continue_from; start a new "
                "run (a different name=...) to change anything else")
    return [o for o in overrides if not override_key(o).startswith(("continue_from", "hydra.", "hydra/"))]


def continue_config(run_dir: Path, overrides: list[str]) -> BaseConfig:
    """The saved config with the allowed overrides applied, validated like a fresh one."""
    from omegaconf import OmegaConf

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a viseg run folder (no config.yaml)",
                          fix="pass the run folder printed by python -m viseg.train (…/fold_<k>)")
    saved = OmegaConf.load(config_path)
    allowed = check_overrides(overrides)
    merged = OmegaConf.merge(OmegaConf.structured(BaseConfig), saved, OmegaConf.from_dotlist(allowed))
    cfg = to_typed(merged)
    cfg.continue_from = str(run_dir)
    old_epochs = int(saved.trainer.max_epochs)
    if cfg.trainer.max_epochs > old_epochs and cfg.lr_scheduler.type in HORIZON_SCHEDULERS:
        log.warning("trainer.max_epochs grows from %d to %d but %s keeps the horizon it was built with: the "
                    "learning rate reached its end value at epoch %d and stays there, so the extra epochs "
                    "learn little. Train with more epochs from the start for a different schedule.",
                    old_epochs, cfg.trainer.max_epochs, cfg.lr_scheduler.type, old_epochs)
    return cfg


def last_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint that loads: last.ckpt, or previous.ckpt when last.ckpt is damaged or missing."""

    path = newest_good_checkpoint(run_dir / CHECKPOINTS_DIR)
    if path is None:
        raise ConfigError(f"{run_dir} has no {' or '.join(f'{CHECKPOINTS_DIR}/{n}' for n in RESUMABLE_CHECKPOINTS)} "
                          "to continue from",
                          fix="the run stopped before its first epoch ended: start it again without "
                              "continue_from (remove the folder first)")
    return path


def is_started(run_dir: Path) -> bool:
    """Whether train() wrote the run's own plan and split (it does so before the first epoch)."""
    return (run_dir / "plans.json").is_file() and (run_dir / "splits.json").is_file()


def own_prepared(cfg: BaseConfig, run_dir: Path, now: PreparedDataset) -> PreparedDataset:
    """A started run's own plan and split with the dataset as it is now (`now`: prepare()'s result, or
    prepared_from_run's). A warning names cases that moved between training and validation or were added,
    and a plan that differs; cases of the run's fold that are gone are an error (they cannot be loaded)."""

    from viseg.preprocessing.prepare import current_splits
    plans, splits = Plans.load(run_dir / "plans.json"), read_json(run_dir / "splits.json")
    changes: list[str] = []
    if now.plans_dir == run_dir:  # prepared_from_run: the run's own already; the dataset's split is still to make
        plans_now = None
        try:
            splits_now = current_splits(cfg, now)
        except DatasetError as exc:  # e.g. a splits_final.json naming a removed case: the run's own still holds
            splits_now = splits
            changes.append(f"the dataset's own split does not load now ({exc.message})")
    else:
        splits_now, plans_now = now.splits, now.plans
    case_ids = [c.case_id for c in now.cases]
    changes += split_changes(splits, splits_now, cfg.fold, case_ids) + plan_changes(plans, plans_now, now)
    if changes:
        log.warning("the dataset changed since %s started: %s. The run goes on with its own plan and split (its "
                    "plans.json and splits.json); start a new run (a different name=...) to train on the dataset "
                    "as it is now.", run_dir, "; ".join(changes))
    return dataclasses.replace(now, plans=plans, plans_dir=run_dir, splits=splits)


def _names(case_ids: list[str], limit: int = 10) -> str:
    shown = ", ".join(case_ids[:limit])
    return shown if len(case_ids) <= limit else f"{shown} and {len(case_ids) - limit} more"


def split_changes(own: list[Split], now: list[Split], fold: int, case_ids: list[str]) -> list[str]:
    """What differs for the run's fold between its own split and the dataset's split now."""
    mine = own[fold]
    gone = sorted((set(mine["train"]) | set(mine["val"])) - set(case_ids))
    if gone:
        raise DatasetError(f"{len(gone)} case(s) of this run's fold {fold} are no longer in the dataset: "
                           f"{_names(gone)}",
                           fix="restore them to continue the run, or start a new run (a different name=...) on "
                               "the dataset as it is now")
    changes = []
    added = sorted(set(case_ids) - set(mine["train"]) - set(mine["val"]))
    if added:
        changes.append(f"{len(added)} case(s) added, not in the run's split: {_names(added)}")
    if fold >= len(now):
        return [*changes, f"the dataset's split has no fold {fold} now ({len(now)} folds)"]
    for source, target in (("train", "val"), ("val", "train")):
        moved = sorted(set(mine[source]) & set(now[fold][target]))
        if moved:
            changes.append(f"fold {fold}'s split now puts {len(moved)} case(s) from {source} into {target}: "
                           f"{_names(moved)}")
    return changes


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def plan_changes(own: Plans, now: Plans | None, prepared: PreparedDataset) -> list[str]:
    """Whether a plan made now would differ (which top-level entries), or at least whether the dataset's
    files changed since the run's plan was made (the plan records the dataset's signature)."""
    if now is not None:
        mine, theirs = _plain(own.to_dict()), _plain(now.to_dict())
        differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        return [f"the plan made from the dataset now differs from the run's plans.json ({', '.join(differing)})"] \
            if differing else []
    if own.dataset_signature != prepared.fingerprint.dataset_signature:
        return ["the dataset's files changed since the run's plan was made (its dataset_signature differs)"]
    return []
