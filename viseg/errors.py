"""Errors a user can act on: each says what is wrong, where, and how to fix it.

Entry points catch `VisegError` and print its message without a traceback; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

# "disk full" and "quota exceeded" read the same to a user: nothing more can be written there
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class VisegError(Exception):
    """Base class for errors caused by user input (configs, datasets, folders)."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")


class ConfigError(VisegError, ValueError):
    """An invalid configuration value or override."""


class DatasetError(VisegError):
    """A dataset that cannot be read or does not pass verification."""


class TrainingError(VisegError):
    """Training cannot go on (e.g. the loss diverged); the run folder keeps its last good checkpoint."""


class StorageFullError(VisegError):
    """A write failed because its volume (or quota) is full. What was complete before stays complete: every
    checkpoint and state file is written beside its target and renamed, and the partial file is removed."""


def _chain(exc: BaseException) -> list[BaseException]:
    """An exception and what it wraps (Ray keeps a worker's exception as `cause`)."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 20:  # a chain, not a cycle
        chain.append(seen)
        seen = getattr(seen, "cause", None) or seen.__cause__ or seen.__context__
    return chain


def is_storage_full(exc: BaseException) -> bool:
    """Whether an exception, or anything it wraps, is a full disk or quota. Ray re-raises a worker's error as
    a new class and pyarrow only keeps the errno in its text, so the text counts too."""
    return any((isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS)
               or "No space left on device" in str(e) or "Disk quota exceeded" in str(e) for e in _chain(exc))


def unwritable_file(exc: BaseException) -> str | None:
    """The file a full disk refused: a copy's destination (filename2) before its source."""
    for error in _chain(exc):
        if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS and (error.filename2 or error.filename):
            return str(error.filename2 or error.filename)
    return None


def free_space_then(step: str) -> str:
    """The fix for every full volume: what to free, what to run next, and that nothing complete is lost."""
    return (f"free space on that volume (or point the path at a larger one), then {step}; finished work and every "
            "complete checkpoint are kept")


def storage_full(what: str, where: Path, fix: str) -> StorageFullError:
    """The error for a full volume: what could not be written, how much room is left there, what to do."""
    folder = Path(where)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
        room = f" ({usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.0f} MiB there)"
    except OSError:
        room = ""
    return StorageFullError(f"no space left on device writing {what}: {where}{room}", fix=fix)
