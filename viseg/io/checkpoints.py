"""Which checkpoint a resume may trust.

Checkpoints are written atomically (temporary file, fsync, rename), so a kill never leaves a half-written
`last.ckpt`. Disks, copies and people still can: before each new `last.ckpt`, the previous one is kept as
`previous.ckpt`, and a resume takes the newest of the two that loads as plain tensors (`weights_only=True`:
a file that asks to import or run anything counts as unreadable), saying so when it falls back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from viseg.errors import ConfigError
from viseg.io.layout import LAST_CHECKPOINT, PREVIOUS_CHECKPOINT, RESUMABLE_CHECKPOINTS

log = logging.getLogger(__name__)


def keep_previous(checkpoint_dir: Path) -> None:
    """Move last.ckpt aside before a new one replaces it (a rename: atomic, no copy)."""
    last = checkpoint_dir / LAST_CHECKPOINT
    if last.is_file():
        os.replace(last, checkpoint_dir / PREVIOUS_CHECKPOINT)


def unreadable_reason(path: Path) -> str | None:
    """None when the file loads as a checkpoint of plain tensors and values; else why not."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bit rot, a pickle that wants code: all mean "do not resume"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "not a Lightning checkpoint (no state_dict)"
    return None


def newest_good_checkpoint(checkpoint_dir: Path) -> Path | None:
    """last.ckpt if it loads, else previous.ckpt if that loads (with a warning: damaged, or missing after a
    kill between the two renames of keep_previous and the save); None when neither exists."""
    problems = []
    if not (checkpoint_dir / LAST_CHECKPOINT).is_file() and (checkpoint_dir / PREVIOUS_CHECKPOINT).is_file():
        problems.append(f"{checkpoint_dir / LAST_CHECKPOINT} is missing (stopped while it was being replaced)")
    for name in RESUMABLE_CHECKPOINTS:
        path = checkpoint_dir / name
        if not path.is_file():
            continue
        reason = unreadable_reason(path)
        if reason is None:
            if problems:
                log.warning("%s: resuming from %s instead (one epoch earlier)", "; ".join(problems), path)
            return path
        problems.append(f"{path} is unreadable ({reason})")
    if problems:
        raise ConfigError("no readable checkpoint to resume from: " + "; ".join(problems),
                          fix=f"restore {checkpoint_dir} from a backup, or start the run again (remove the folder "
                              "or use a new name=...)")
    return None
