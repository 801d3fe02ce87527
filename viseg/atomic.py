"""Files replaced atomically: written under a temporary name beside the target, then renamed over it.

A reader (a resume, a predict, someone watching a running sweep) sees the old file or the new one, never half
of one. A write that fails (a kill, a full disk) leaves the old file as it was and removes the partial one,
which would otherwise hold on to the space it took. The one place every writer of viseg goes through.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temporary_name(path: Path, keep_ending: bool = False) -> Path:
    """`.<name>.<pid>.tmp` beside `path`. Writers that choose the format from the file's ending (nibabel,
    matplotlib, numpy's savez) get `.<pid>.tmp.<name>`. The pid lets a later run tell a dead writer's
    leftovers from a live writer's file."""
    path = Path(path)
    pid = os.getpid()
    return path.with_name(f".{pid}.tmp.{path.name}" if keep_ending else f".{path.name}.{pid}.tmp")


def write_atomically(path: Path, write: Callable[[Path], Any], *, keep_ending: bool = False, fsync: bool = False,
                     before_replace: Callable[[], Any] | None = None) -> None:
    """`write(tmp)` fills the temporary file; it then replaces `path`. `fsync` forces it to disk first (for
    files a resume trusts without checking); `before_replace` runs between the two (e.g. keep the previous
    version under another name)."""
    path = Path(path)
    tmp = temporary_name(path, keep_ending)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str, fsync: bool = False) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""), fsync=fsync)


def copy_atomically(source: Path, target: Path) -> None:
    write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))
