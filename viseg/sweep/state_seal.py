"""A keyed seal on Ray's experiment state, so that a resume never unpickles state that viseg did not write.

`Tuner.restore` unpickles `tuner.pkl` and the search state, and even `experiment_state-*.json` carries
cloudpickled values. The experiment folder is often shared (NFS, a cluster volume): whoever can write it could
otherwise run code as the next user who resumes. So the driver records an HMAC-SHA256 of every state file as
Ray writes it, with a key that never leaves the user's own config folder, and a resume reads only files whose
digest matches (`untrusted_state_files`). Digests come from the driver's own copy (Ray's staging folder for the
experiment state, `tuner.pkl` right after the Tuner wrote it), never from the shared folder, so a file swapped
there while the sweep runs is not sealed by mistake.

The seal file, `viseg_state_seal.json` in the experiment folder, is owned here. It keeps the last few digests of
each file name: Ray uploads its state a moment after writing it, so a driver that dies in between leaves the
previous version in the folder, which must still verify.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from viseg.errors import ConfigError
from viseg.io.jsonio import read_json, write_json_atomic

log = logging.getLogger(__name__)

SEAL_FILE = "viseg_state_seal.json"
KEY_ENV = "VISEG_STATE_KEY"  # path of the key file, e.g. a Kubernetes secret mounted into the head pod
DIGESTS_KEPT = 3
_FORMAT = 1


def key_path() -> Path:
    """`$VISEG_STATE_KEY`, else `$XDG_CONFIG_HOME/viseg/state.key` (`~/.config/viseg/state.key`)."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "viseg" / "state.key"


def _check_private(path: Path, info: os.stat_result, given: bool) -> None:
    """The default key must be the user's alone. A key given by path may be a mounted secret, owned by root and
    readable by the pod's group (Kubernetes' fsGroup), but never by everyone."""
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"the state key {path} is not a regular file", fix=f"remove it; viseg creates a new one "
                          f"(or point {KEY_ENV} at the right key file)")
    if (info.st_mode & 0o007) if given else (info.st_mode & 0o077 or info.st_uid != os.geteuid()):
        raise ConfigError(f"the state key {path} is readable or writable by others (mode "
                          f"{stat.S_IMODE(info.st_mode):o}, owner uid {info.st_uid}): anyone who can read it can "
                          "forge the seal on a sweep's Ray state",
                          fix=f"chmod 600 {path} as its owner (or remove it: viseg creates a new one, and sweeps "
                              "sealed with the old key can then no longer be resumed)")


def load_key(create: bool = True) -> bytes | None:
    """The user's key (32 random bytes), created on first use with mode 0600 in a 0700 folder. None when there
    is none yet and `create` is False: nothing was ever sealed with it."""
    path, given = key_path(), bool(os.environ.get(KEY_ENV))
    try:
        info = os.stat(path, follow_symlinks=given)
    except FileNotFoundError:
        if not create:
            return None
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:  # another driver created it just now: use theirs
            return load_key(create=False)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key)
        log.info("created the key that seals sweeps' Ray state: %s", path)
        return key
    _check_private(path, info, given)
    key = path.read_bytes()
    if len(key) < 16:
        raise ConfigError(f"the state key {path} holds {len(key)} bytes, too few to be one of viseg's keys",
                          fix=f"remove it (viseg creates a new one) or restore the right file to {KEY_ENV}")
    return key


def digest(key: bytes, name: str, data: bytes) -> str:
    """The file's name is part of the message, so one sealed file cannot stand in for another."""
    return hmac.new(key, name.encode() + b"\0" + data, hashlib.sha256).hexdigest()


def _read_seal(experiment: Path) -> dict[str, list[str]]:
    path = experiment / SEAL_FILE
    try:
        seal = read_json(path)
    except (OSError, ValueError):
        return {}
    files = seal.get("files") if isinstance(seal, dict) else None
    if not isinstance(files, dict):
        return {}
    return {name: [d for d in digests if isinstance(d, str)] for name, digests in files.items()
            if isinstance(name, str) and isinstance(digests, list)}


class StateSealer:
    """Records the digests of the state files a driver writes, in the experiment folder's seal."""

    def __init__(self, experiment: Path, key: bytes | None = None) -> None:
        self.experiment = Path(experiment)
        self.key = key if key is not None else load_key()
        self._seen: dict[Path, tuple[int, int]] = {}

    def seal_files(self, paths: list[Path]) -> None:
        """Add the digests of these files (the driver's own copies) to the seal."""
        files = _read_seal(self.experiment)
        changed = False
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            value = digest(self.key, path.name, data)
            kept = files.get(path.name, [])
            if value not in kept:
                files[path.name] = [*kept, value][-DIGESTS_KEPT:]
                changed = True
        if changed:
            write_json_atomic(self.experiment / SEAL_FILE, {"format": _FORMAT, "files": files})

    def seal_changed(self, staging: Path, is_state_file: Callable[[str], bool]) -> None:
        """Seal the state files in Ray's staging folder that changed since the last look (a stat per file).
        Which names are state files is `ray_state`'s to say."""
        fresh = []
        try:
            entries = list(staging.iterdir())
        except OSError:
            return
        for path in entries:
            if not is_state_file(path.name):
                continue
            try:
                info = path.stat()
            except OSError:
                continue
            mark = (info.st_mtime_ns, info.st_size)
            if self._seen.get(path) != mark:
                self._seen[path] = mark
                fresh.append(path)
        if fresh:
            self.seal_files(fresh)


def untrusted_state_files(experiment: Path, paths: list[Path]) -> list[str]:
    """The names among `paths` whose content this user's viseg did not seal (every one when there is no key or
    no seal). Reads the files as bytes only."""
    key = load_key(create=False)
    files = _read_seal(experiment) if key is not None else {}
    untrusted = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            untrusted.append(path.name)
            continue
        if key is None or not any(hmac.compare_digest(digest(key, path.name, data), d)
                                  for d in files.get(path.name, [])):
            untrusted.append(path.name)
    return untrusted
