"""A sweep runs the code it was launched with: its trials import a snapshot of viseg taken as Ray starts.

Ray's workers import viseg when each trial starts, hours after the launch for a long sweep. From a source
checkout (the editable install maps viseg, viseg.conf and viseg.sweeps onto the repository's folders) a branch
checked out or a file saved mid-sweep would change every trial that starts after it, and their code.json would
still name the launch's commit. So the driver copies the package as it is installed into the experiment folder
(`code/<content hash>/viseg`: the *.py modules and the *.yaml/*.md package data a wheel carries, the configs of
viseg.conf and viseg.sweeps resolved through importlib.resources, no __pycache__), records the code version of
that moment, and hands both to `ray.init` as the job's runtime_env, which every trial and fold task inherits.

The snapshot is Ray's `working_dir`, not `py_modules`: without a working_dir Ray puts the driver's current
directory first on every worker's sys.path, and from the repository root that is the live checkout, found before
any py_modules entry. A working_dir replaces it and comes first on PYTHONPATH, ahead of the editable install's
finder (which Python consults after sys.path).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from viseg.io.atomic import temporary_name
from viseg.io.layout import CODE_SNAPSHOTS
from viseg.noise import VERBOSE_ENV
from viseg.provenance import CODE_VERSION_ENV, PACKAGE_DIR, CodeVersion, code_version
from viseg.resources import conf_dir, sweeps_dir

log = logging.getLogger(__name__)

PACKAGE_SUFFIXES = (".py", ".yaml", ".md")  # modules and pyproject.toml's package data
RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray's job manager gives a job's driver its job config here
RAY_PACKAGE_PREFIX = "_ray_pkg_"  # the folder Ray unpacks a runtime_env's working_dir or py_modules into


@dataclass(frozen=True)
class CodePin:
    snapshot: Path  # <experiment>/code/<hash>/viseg: what the trials run, kept beside their results
    version: CodeVersion  # the launch's code, which every trial's code.json records
    runtime_env: dict[str, Any]  # for ray.init; Ray merges it with a job's own runtime_env


def package_sources() -> list[tuple[str, Path]]:
    """(folder inside the package, folder on disk): viseg itself, and its configs where they are not inside it
    (an editable install maps viseg.conf and viseg.sweeps onto the repository's conf/ and sweeps/)."""
    sources = [("", PACKAGE_DIR)]
    for name, folder in (("conf", conf_dir()), ("sweeps", sweeps_dir())):
        folder = folder.resolve()
        if not folder.is_relative_to(PACKAGE_DIR):
            sources.append((name, folder))
    return sources


def _package_files() -> dict[str, Path]:
    """Path inside the package -> file on disk, for every file a wheel of viseg would hold."""
    found = {}
    for inside, folder in package_sources():
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if path.suffix in PACKAGE_SUFFIXES and "__pycache__" not in relative.parts and path.is_file():
                found[str(Path(inside, relative))] = path
    return found


def snapshot_package(code_dir: Path) -> Path:
    """Copy the installed viseg into `code_dir/<hash>/viseg`, the hash over its file names and contents: a resume
    with unchanged code finds its snapshot there, a changed one adds another. Each file is read once, so the
    hash is of what was copied, and the folder is renamed into place complete."""
    code_dir.mkdir(parents=True, exist_ok=True)
    stage = temporary_name(code_dir / "snapshot")
    digest = hashlib.sha256()
    try:
        for inside, source in sorted(_package_files().items()):
            try:
                data = source.read_bytes()
            except FileNotFoundError:  # removed since the listing: not part of the package any more
                continue
            digest.update(f"{inside}\0{len(data)}\0".encode())
            digest.update(data)
            target = stage / "viseg" / inside
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        final = code_dir / digest.hexdigest()[:16]
        if not final.is_dir():
            try:
                stage.rename(final)
            except OSError:  # another driver published the same snapshot first
                if not final.is_dir():
                    raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final / "viseg"


def job_runtime_env() -> dict[str, Any] | None:
    """The runtime_env of the Ray job this driver runs in (`ray job submit`), None outside a job."""
    config = os.environ.get(RAY_JOB_CONFIG)
    if not config:
        return None
    return json.loads(config).get("runtime_env") or {}


def _imported_from_ray_package() -> bool:
    return any(part.startswith(RAY_PACKAGE_PREFIX) for part in PACKAGE_DIR.parts)


def _code_key(job_env: dict[str, Any] | None) -> str | None:
    """The runtime_env field that pins the snapshot, or None when nothing needs to (or can) be added.

    In a job (launch/submit.sh) the driver itself imports viseg from the job's working_dir, which Ray unpacked
    from the upload made at submission: that already is a snapshot, and every trial of the job runs it, so the
    pin adds nothing but the code version (Ray refuses a second working_dir anyway). A job that brings no viseg
    of its own (a driver importing a checkout on the head node) gets the snapshot as working_dir, or as
    py_modules beside a working_dir of its own, which keeps the driver's folder off the workers' sys.path."""
    if job_env is None:
        return "working_dir"
    if _imported_from_ray_package():
        return None
    if "working_dir" not in job_env:
        return "working_dir"
    if "py_modules" not in job_env:
        return "py_modules"
    log.warning("this Ray job's runtime_env has both a working_dir and py_modules, neither with viseg in it: "
                "its trials import viseg as the nodes have it installed, which a change there would change")
    return None


def pin_code(experiment_dir: Path) -> CodePin:
    """Snapshot the package into the experiment and say how Ray's workers run it (see the module docstring).

    The code version is taken with the snapshot: the commit, dirty flag and diff of the checkout at launch,
    with `source` naming the snapshot (a worker's own copy lives in Ray's session folder, which goes with it).
    Workers read it from VISEG_CODE_VERSION (provenance.code_version), since a snapshot is no git checkout."""
    job_env = job_runtime_env()
    snapshot = snapshot_package(Path(experiment_dir) / CODE_SNAPSHOTS)
    version = code_version()
    if CODE_VERSION_ENV not in os.environ:  # one a job sets (by its env_vars) stays, and reaches the trials
        version = replace(version, source=str(snapshot))
    runtime_env: dict[str, Any] = {}
    key = _code_key(job_env)
    if key is not None:
        runtime_env[key] = str(snapshot.parent) if key == "working_dir" else [str(snapshot)]
    job_vars = (job_env or {}).get("env_vars") or {}
    env_vars = {CODE_VERSION_ENV: json.dumps(version.to_dict())}
    if VERBOSE_ENV in os.environ:  # the console level of this command reaches trials on other nodes too
        env_vars[VERBOSE_ENV] = os.environ[VERBOSE_ENV]
    env_vars = {key: value for key, value in env_vars.items() if key not in job_vars}  # Ray refuses duplicates
    if env_vars:
        runtime_env["env_vars"] = env_vars
    where = f"{key} {snapshot}" if key else f"the job's own upload (a copy in {snapshot})"
    log.info("trials run the code as launched: commit %s%s, from %s", (version.commit or "none")[:12],
             " (dirty)" if version.dirty else "", where)
    return CodePin(snapshot, version, runtime_env)
