"""Which code trained a run: version, commit and dirty flag of a real git checkout, and what a continued run
says when its code changed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from viseg import __version__
from viseg.provenance import CODE_VERSION_ENV, PACKAGE_DIR, CodeVersion, code_changes, code_version


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout


def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "viseg").mkdir(parents=True)
    (root / "viseg" / "module.py").write_text("x = 1\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "start")
    return root


def test_a_clean_checkout_then_a_dirty_one_then_a_new_commit(tmp_path: Path):
    root = checkout(tmp_path)
    clean = code_version(root / "viseg")
    assert clean.version == __version__ and clean.commit == git(root, "rev-parse", "HEAD").strip()
    assert clean.dirty is False and clean.diff_sha256 is None

    (root / "viseg" / "module.py").write_text("x = 2\n")
    dirty = code_version(root / "viseg")
    assert dirty.commit == clean.commit and dirty.dirty is True and len(dirty.diff_sha256 or "") == 64
    assert code_changes(clean.to_dict(), dirty) == ["uncommitted changes differ"]
    assert code_changes(dirty.to_dict(), clean) == ["the uncommitted changes are gone"]
    (root / "viseg" / "module.py").write_text("x = 3\n")
    assert code_changes(dirty.to_dict(), code_version(root / "viseg")) == ["uncommitted changes differ"]

    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "next")
    later = code_version(root / "viseg")
    assert code_changes(clean.to_dict(), later) == [f"commit {clean.commit[:12]} -> {later.commit[:12]}"]
    assert code_changes(later.to_dict(), code_version(root / "viseg")) == []


def test_an_installed_package_has_a_version_but_no_commit(tmp_path: Path):
    folder = tmp_path / "site-packages" / "viseg"
    folder.mkdir(parents=True)
    installed = code_version(folder)
    assert (installed.version, installed.commit, installed.dirty) == (__version__, None, None)
    assert code_changes({**installed.to_dict(), "version": "0.0.1"}, installed) == [f"viseg 0.0.1 -> {__version__}"]


def test_a_sweep_trial_records_the_code_version_its_driver_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A trial runs a snapshot of the package (sweep/code_pin.py), no git checkout: VISEG_CODE_VERSION says
    which code that is. A folder asked about by name is still asked about itself."""
    pinned = CodeVersion(__version__, "0" * 40, False, None, str(tmp_path / "code" / "0123" / "viseg"))
    monkeypatch.setenv(CODE_VERSION_ENV, json.dumps(pinned.to_dict()))
    assert code_version() == pinned
    root = checkout(tmp_path)
    assert code_version(root / "viseg").commit == git(root, "rev-parse", "HEAD").strip()

    monkeypatch.setenv(CODE_VERSION_ENV, '{"commit": "abc"}')  # not a whole CodeVersion: git answers
    assert code_version().source == str(PACKAGE_DIR)
