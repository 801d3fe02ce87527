"""Errors a user can act on: each says what is wrong, where, and how to fix it.

Entry points catch `VisegError` and print its message without a traceback; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


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
