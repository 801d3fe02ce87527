"""What every kind of sweep trial builds first: its typed config from the composed variant, and the files a
checkpoint of its run carries (hard links, so staging one for Ray copies no bytes)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from viseg.cli import to_typed
from viseg.config import BaseConfig
from viseg.io.layout import CHECKPOINTS_DIR, LAST_CHECKPOINT


def with_params(variant_yaml: str, params: dict[str, Any], extra: dict[str, Any] | None = None) -> BaseConfig:
    """A composed variant with searched values (and trial specifics) applied, validated like any config."""
    from omegaconf import OmegaConf

    dotlist = [f"{key}={value}" for key, value in params.items()]
    merged = OmegaConf.merge(OmegaConf.structured(BaseConfig), OmegaConf.create(variant_yaml),
                             OmegaConf.from_dotlist(dotlist), extra or {})
    return to_typed(merged)


def trial_config(variant_yaml: str, fold: int, params: dict[str, Any], name: str, results: str) -> BaseConfig:
    return with_params(variant_yaml, params, {"fold": fold, "name": name, "paths": {"results": results}})


RUN_IDENTITY = ("plans.json", "splits.json")  # what a run continues with, wherever it continues


def link_files(sources: list[Path], folder: Path) -> None:
    """Hard links of the files that exist (a copy across filesystems) into `folder`: a checkpoint staged for Ray
    without copying its bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        if not source.is_file():
            continue
        try:
            os.link(source, folder / source.name)
        except OSError:
            shutil.copy2(source, folder / source.name)


def checkpoint_files(run_dir: Path) -> list[Path]:
    """What a checkpoint of a run must carry: last.ckpt and the run's own plan and split."""
    return [run_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT, *(run_dir / name for name in RUN_IDENTITY)]
