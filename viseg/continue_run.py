"""Continue an interrupted or finished run (replaces the training docs' ClearML `continue_task_id`).

The run folder's saved, fully resolved config.yaml is reloaded; command-line overrides may change only
trainer, loader and device settings. Model and plan values are locked: the checkpoint's weights belong to
them. Training resumes from checkpoints/last.ckpt with optimizer, scheduler, epoch and callback state.
"""

from __future__ import annotations

import logging
from pathlib import Path

from viseg.config import BaseConfig
from viseg.errors import ConfigError
from viseg.schedulers import HORIZON_SCHEDULERS

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

    from viseg.cli import to_typed

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
    """The newest checkpoint that loads: last.ckpt, or previous.ckpt when last.ckpt is damaged."""
    from viseg.checkpoints import newest_good_checkpoint

    path = newest_good_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise ConfigError(f"{run_dir} has no checkpoints/last.ckpt to continue from",
                          fix="the run stopped before its first epoch ended: start it again without "
                              "continue_from (remove the folder first)")
    return path
