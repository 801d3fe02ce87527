"""model.zip: trained runs as one file to share, and the only reader and writer of that format.

Inside, each run is a run folder as prediction reads one (`fold_<k>/` with config.yaml, plans.json,
dataset.json, splits.json, finished.json and the chosen checkpoint; a cascade's also its `previous_stage/`, the
lowres run with its final weights), next to the postprocessing.json of the
selection, if any, and `manifest.json`: the format, the checkpoint chosen, the code that trained the runs and
the sha256 of every other entry. Opening an archive checks it before anything is used: an entry the manifest
does not list, one whose sum differs, a link, or a name that would land outside the target folder (absolute,
`..`) refuses the whole archive. It is unpacked once per content into a folder named by its manifest's sum;
the checkpoints inside are still loaded with `weights_only=True` like any other.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from viseg.errors import ConfigError
from viseg.io.atomic import temporary_name, write_atomically
from viseg.io.layout import CHECKPOINTS_DIR, CODE_VERSION, FINISHED_MARKER, PREVIOUS_STAGE_DIR, weights_file

MANIFEST = "manifest.json"
FORMAT = "viseg-model"
FORMAT_VERSION = 1
RUN_FILES = ("config.yaml", "plans.json", "dataset.json", "splits.json", FINISHED_MARKER, CODE_VERSION)
POSTPROCESSING = "postprocessing.json"
UNPACKED_DIR = "viseg-models"  # under the system's temporary folder: <sum of the archive>/


@dataclass(frozen=True)
class OpenedArchive:
    run_dirs: tuple[Path, ...]
    checkpoint: str  # which of WEIGHTS the runs carry
    postprocessing: Path | None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_archive(run_dirs: list[Path], target: Path, checkpoint: str, postprocessing: Path | None,
                  code: dict[str, Any]) -> dict[str, Any]:
    """Write `target` (atomically) from run folders; returns the manifest."""
    entries: dict[str, bytes] = {}
    names = []
    for index, run_dir in enumerate(run_dirs):
        name = run_dir.name if run_dir.name not in names else f"{run_dir.name}_{index}"
        names.append(name)
        for file in RUN_FILES:
            if (run_dir / file).is_file():
                entries[f"{name}/{file}"] = (run_dir / file).read_bytes()
        weights = run_dir / CHECKPOINTS_DIR / weights_file(checkpoint)
        entries[f"{name}/{CHECKPOINTS_DIR}/{weights.name}"] = weights.read_bytes()
        previous = run_dir / PREVIOUS_STAGE_DIR  # a cascade's lowres run, predicted with its final weights
        if previous.is_dir():
            for file in (*RUN_FILES, f"{CHECKPOINTS_DIR}/{weights_file('final')}"):
                if (previous / file).is_file():
                    entries[f"{name}/{PREVIOUS_STAGE_DIR}/{file}"] = (previous / file).read_bytes()
    if postprocessing is not None:
        entries[POSTPROCESSING] = postprocessing.read_bytes()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "checkpoint": checkpoint, "runs": names,
                "postprocessing": POSTPROCESSING if postprocessing is not None else None, "code": code,
                "sha256": {path: _sha256(data) for path, data in sorted(entries.items())}}

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(MANIFEST, json.dumps(manifest, indent=2) + "\n")
            for path, data in sorted(entries.items()):
                archive.writestr(path, data)

    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, write, keep_ending=True)
    return manifest


def _refuse(archive: Path, why: str) -> ConfigError:
    return ConfigError(f"refusing the model archive {archive}: {why}",
                       fix="use the archive exactly as viseg export-model wrote it; ask its author for a new copy")


def _safe_name(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name and ":" not in name


def _read_checked(path: Path) -> tuple[bytes, dict[str, Any], dict[str, bytes]]:
    """The manifest (raw and parsed) and every entry it lists, each checked against its sum."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise _refuse(path, f"not a readable zip ({exc})") from None
    with archive:
        infos = archive.infolist()
        for info in infos:
            if not _safe_name(info.filename):
                raise _refuse(path, f"its entry {info.filename!r} would be written outside the model's folder")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise _refuse(path, f"its entry {info.filename!r} is a link")
        if MANIFEST not in archive.namelist():
            raise _refuse(path, f"it has no {MANIFEST}")
        raw = archive.read(MANIFEST)
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise _refuse(path, f"its {MANIFEST} is not JSON ({exc})") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise _refuse(path, f"it is not a {FORMAT} archive of version {FORMAT_VERSION}")
        sums: dict[str, str] = manifest.get("sha256") or {}
        listed = set(sums) | {MANIFEST}
        extra = sorted(info.filename for info in infos if info.filename not in listed and not info.is_dir())
        if extra:
            raise _refuse(path, f"it holds entries its manifest does not list: {', '.join(extra)}")
        contents = {}
        for name, expected in sums.items():
            if not _safe_name(name):
                raise _refuse(path, f"its manifest names {name!r}, outside the model's folder")
            try:
                data = archive.read(name)
            except KeyError:
                raise _refuse(path, f"{name} is listed in its manifest but missing") from None
            if _sha256(data) != expected:
                raise _refuse(path, f"{name} does not match its sha256 in the manifest (changed after export)")
            contents[name] = data
    return raw, manifest, contents


def open_archive(path: Path) -> OpenedArchive:
    """Check `path` and unpack it, once per content, into `<temporary folder>/viseg-models/<sum>/`; the run
    folders inside. The sum is the manifest's, which holds every entry's: the archive is read only once."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model archive {path} does not exist", fix="pass the .zip written by viseg export-model")
    raw, manifest, contents = _read_checked(path)
    root = Path(tempfile.gettempdir()) / UNPACKED_DIR / _sha256(raw)[:16]
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        stage = temporary_name(root)
        try:
            for name, data in contents.items():
                target = stage / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            try:
                stage.rename(root)
            except OSError:  # unpacked by another process meanwhile
                if not root.is_dir():
                    raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    runs = tuple(root / name for name in manifest["runs"])
    post = root / manifest["postprocessing"] if manifest.get("postprocessing") else None
    return OpenedArchive(runs, str(manifest["checkpoint"]), post)


def is_archive(path: Path) -> bool:
    return Path(path).suffix == ".zip"
