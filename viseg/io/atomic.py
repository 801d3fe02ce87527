"""Files replaced atomically: written under a temporary name beside the target, then renamed over it.

A reader (a resume, a predict, someone watching a running sweep) sees the old file or the new one, never half
of one. A write that fails (a kill, a full disk) leaves the old file as it was and removes the partial one,
which would otherwise hold on to the space it took. The one place every writer of viseg goes through.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from viseg.errors import NO_SPACE_ERRNOS

# O_EXCL: never reuse a file that is already there (a planted file or link, another writer's); O_NOFOLLOW: a
# symbolic link at the temporary name is refused rather than followed to wherever it points.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_HOST_CHARS = re.compile(r"[^A-Za-z0-9-]+")


def _writer_tag() -> str:
    """`<host>.<random>.<pid>`: unique across the hosts that share a folder (a sweep's storage_path on NFS), where
    pids alone collide, and unguessable, so nobody can plant a file at the name in advance. (The preprocessing
    cache removes leftovers under its folder lock, whoever wrote them, so nothing parses these names.)"""
    host = _HOST_CHARS.sub("-", socket.gethostname())[:32] or "host"
    return f"{host}.{secrets.token_hex(4)}.{os.getpid()}"


def temporary_name(path: Path, keep_ending: bool = False) -> Path:
    """`.<name>.<host>.<random>.<pid>.tmp` beside `path`. Writers that choose the format from the file's ending
    (nibabel, matplotlib, numpy's savez) get `.<host>.<random>.<pid>.tmp.<name>`. A new name on every call."""
    path = Path(path)
    tag = _writer_tag()
    return path.with_name(f".{tag}.tmp.{path.name}" if keep_ending else f".{path.name}.{tag}.tmp")


def _create_exclusively(tmp: Path) -> None:
    """The empty temporary file, created by us or not at all: raises FileExistsError (or ELOOP) when anything,
    a symbolic link included, is already at the name, and then leaves it as it is."""
    os.close(os.open(tmp, _CREATE_FLAGS, 0o666))


def _refuse_link(tmp: Path, path: Path) -> None:
    """A writer opens the temporary file by its name: should a link have replaced it since its creation, the
    rename must not install that link as the target."""
    if stat.S_ISLNK(os.lstat(tmp).st_mode):
        raise OSError(f"refusing to replace {path}: its temporary file {tmp} became a symbolic link while "
                      "being written (is someone else writing into this folder?)")


def write_atomically(path: Path, write: Callable[[Path], Any], *, keep_ending: bool = False, fsync: bool = False,
                     before_replace: Callable[[], Any] | None = None) -> None:
    """`write(tmp)` fills the temporary file; it then replaces `path`. `fsync` forces it to disk first (for
    files a resume trusts without checking); `before_replace` runs between the two (e.g. keep the previous
    version under another name)."""
    path = Path(path)
    tmp = temporary_name(path, keep_ending)
    _create_exclusively(tmp)  # outside the try: what was at the name before is not ours to remove
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        _refuse_link(tmp, path)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in NO_SPACE_ERRNOS and not (exc.filename or exc.filename2):
            # refused at write() or close(), where Python names no file: a full disk must say which one
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str, fsync: bool = False) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""), fsync=fsync)


def copy_atomically(source: Path, target: Path) -> None:
    write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))


def link_or_copy_atomically(source: Path, target: Path) -> None:
    """`target` becomes a hard link to `source` (no bytes copied: a checkpoint kept in two run folders), or a
    copy where the two folders are on different filesystems; either appears whole, never half written."""
    tmp = temporary_name(Path(target))
    try:
        os.link(source, tmp)
    except OSError:
        copy_atomically(source, target)
        return
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
