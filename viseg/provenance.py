"""Which code trained a run: the viseg version, and for a source checkout its git commit, whether the tree
was dirty and a hash of that diff. A run folder keeps the code it started with (`io/layout.CODE_VERSION`), so
a continued run can say when the code changed under it, and results can be traced back to a commit.

A sweep's trials run a snapshot of the package (sweep/code_pin.py), which is no git checkout: the driver
records the code version at launch and hands it to them in VISEG_CODE_VERSION."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from viseg import __version__

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parent
CODE_VERSION_ENV = "VISEG_CODE_VERSION"  # a CodeVersion as JSON: the code this process runs, recorded elsewhere


@dataclass(frozen=True)
class CodeVersion:
    version: str
    commit: str | None  # None: not a git checkout (an installed wheel)
    dirty: bool | None  # uncommitted changes to tracked files (as `git describe --dirty`)
    diff_sha256: str | None  # of `git diff HEAD`: two dirty trees told apart
    source: str  # where the package was imported from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def _pinned_version() -> CodeVersion | None:
    text = os.environ.get(CODE_VERSION_ENV)
    if not text:
        return None
    try:
        return CodeVersion(**json.loads(text))
    except (ValueError, TypeError):
        log.warning("%s is not a code version (%.80s): asking git instead", CODE_VERSION_ENV, text)
        return None


def code_version(package_dir: Path | None = None) -> CodeVersion:
    """The code of `package_dir`; by default this process's viseg, which VISEG_CODE_VERSION describes when set
    (a sweep trial: its package folder is the launch's snapshot, and the launch's checkout may have moved on)."""
    if package_dir is None:
        pinned = _pinned_version()
        if pinned is not None:
            return pinned
        package_dir = PACKAGE_DIR
    root = _git(package_dir, "rev-parse", "--show-toplevel")
    commit = _git(package_dir, "rev-parse", "HEAD") if root else None
    if not root or not commit:
        return CodeVersion(__version__, None, None, None, str(package_dir))
    diff = _git(package_dir, "diff", "HEAD") or ""
    dirty = bool(diff.strip())
    digest = hashlib.sha256(diff.encode()).hexdigest() if dirty else None
    return CodeVersion(__version__, commit.strip(), dirty, digest, str(package_dir))


def code_changes(started: dict[str, Any], now: CodeVersion) -> list[str]:
    """What differs between the code a run started with and the code now (empty when they are the same)."""
    changes = []
    if started.get("version") != now.version:
        changes.append(f"viseg {started.get('version')} -> {now.version}")
    if started.get("commit") != now.commit:
        changes.append(f"commit {str(started.get('commit'))[:12]} -> {str(now.commit)[:12]}")
    elif started.get("diff_sha256") != now.diff_sha256:
        changes.append("uncommitted changes differ" if now.dirty else "the uncommitted changes are gone")
    return changes
