"""A sweep pins its code at launch (viseg/sweep/code_pin.py): a source file changed while the sweep runs changes
no trial, and every trial's code.json names the launch's commit and the snapshot it ran.

The sweep runs from a copy of this checkout, a git repository of its own (commit and dirty flag are real), with
viseg imported from it through PYTHONPATH and started from its root, as a user starts a sweep in a checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sweep_runs import TINY, kill_session, run_folders, wait_for
from viseg.io.layout import CODE_SNAPSHOTS, CODE_VERSION
from viseg.provenance import CODE_VERSION_ENV, code_version
from viseg.sweep import code_pin
from viseg.sweep.code_pin import RAY_JOB_CONFIG, pin_code

REPO = Path(__file__).resolve().parents[2]
# two trials of one epoch each, one after the other, on the built-in demo dataset
SWEEP = ("folds=0-1", "trainer.max_epochs=1", "trainer.iterations_per_epoch=2", *TINY, "experiment=pinned")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout


def package_checkout(tmp_path: Path, committed_tail: str) -> Path:
    """viseg as this working tree has it (uncommitted edits and new files included) in a new git repository,
    laid out as its wheel installs it: with conf/ and sweeps/ inside the package, nothing of it resolves to
    this checkout through the editable install. `committed_tail` is appended to viseg/sweep/trial.py first."""
    root = tmp_path / "checkout"
    listed = git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "viseg", "conf", "sweeps")
    for name in filter(None, listed.split("\0")):
        if not (REPO / name).is_file():  # deleted in the working tree
            continue
        parts = Path(name).parts
        target = root / (Path(name) if parts[0] == "viseg" else Path("viseg", *parts))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    with open(root / "viseg" / "sweep" / "trial.py", "a") as module:
        module.write(committed_tail)
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "launch")
    return root


def writes_file_at_import(folder: Path, name: str) -> str:
    """Module-level lines that write this module's __file__ into folder/<name> when it is imported."""
    return (f"\nimport os as _os\nfrom pathlib import Path as _Path\n"
            f"_Path({str(folder)!r}, {name}).write_text(__file__)\n")


def published(experiment: Path) -> list[Path]:
    return [p for p in (experiment / CODE_SNAPSHOTS).glob("*/viseg") if not p.parent.name.startswith(".")]


@pytest.mark.slow
def test_a_change_during_the_sweep_reaches_no_trial_and_code_json_names_the_launch(tmp_path: Path):
    imports, marker = tmp_path / "imports", tmp_path / "changed_code_ran"
    imports.mkdir()
    # every process that imports viseg.sweep.trial says where from: the driver, then each trial's worker
    checkout = package_checkout(tmp_path, writes_file_at_import(imports, "str(_os.getpid())"))
    env = os.environ | {"PYTHONPATH": str(checkout)}
    where = subprocess.run([sys.executable, "-c", "import viseg, viseg.resources as r; "
                            "print(viseg.__file__, r.conf_dir(), r.sweeps_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(checkout) for p in where), where  # the copy, configs included
    head = git(checkout, "rev-parse", "HEAD").strip()

    experiment = tmp_path / "results" / "pinned"
    process = subprocess.Popen([sys.executable, "-m", "viseg.sweep", *SWEEP, f"storage_path={tmp_path / 'results'}",
                                f"paths.cache={tmp_path / 'cache'}"], cwd=checkout, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # The change lands as soon as the snapshot exists, before the first trial's worker imports viseg. Later
        # is no stricter: a grid's trials share one reused worker, which never re-reads a module it imported.
        # (published snapshots only: pathlib's glob also matches the hidden folder the copy is staged in)
        wait_for(lambda: bool(published(experiment)), process, timeout=300, what="the snapshot")
        with open(checkout / "viseg" / "sweep" / "trial.py", "a") as module:
            module.write(writes_file_at_import(marker.parent, repr(marker.name)))
        output, _ = process.communicate(timeout=600)
    finally:
        kill_session(process)
    assert process.returncode == 0, output[-4000:]
    assert git(checkout, "status", "--porcelain", "viseg").strip(), "the checkout was not changed"

    assert not marker.exists(), f"a trial ran the code changed after the launch: {marker.read_text()}"
    origins = {int(p.name): p.read_text() for p in imports.iterdir()}
    assert Path(origins.pop(process.pid)).is_relative_to(checkout)  # the driver: the checkout it started from
    assert origins, "no trial worker imported viseg.sweep.trial"
    assert not [p for p in origins.values() if Path(p).is_relative_to(checkout)], origins
    (snapshot,) = published(experiment)
    assert (snapshot / "conf" / "anatomy_config.yaml").is_file() and (snapshot / "sweeps" / "demo.yaml").is_file()
    assert not list(snapshot.rglob("__pycache__"))

    runs = run_folders(experiment)
    assert sorted(runs) == ["default/fold_0", "default/fold_1"]
    for run in runs.values():
        recorded = json.loads((run / CODE_VERSION).read_text())
        assert (recorded["commit"], recorded["dirty"], recorded["source"]) == (head, False, str(snapshot)), run


def test_a_local_sweep_pins_the_snapshot_as_working_dir_and_hands_on_the_code_version(tmp_path: Path,
                                                                                      monkeypatch):
    monkeypatch.delenv(RAY_JOB_CONFIG, raising=False)
    monkeypatch.delenv(CODE_VERSION_ENV, raising=False)
    pin = pin_code(tmp_path)
    assert pin.snapshot.parent.parent == tmp_path / CODE_SNAPSHOTS
    assert (pin.snapshot / "sweep" / "code_pin.py").is_file()
    assert pin.runtime_env["working_dir"] == str(pin.snapshot.parent)
    recorded = json.loads(pin.runtime_env["env_vars"][CODE_VERSION_ENV])
    now = code_version()
    assert (recorded["commit"], recorded["source"]) == (now.commit, str(pin.snapshot))
    assert pin_code(tmp_path).snapshot == pin.snapshot  # unchanged code: the same snapshot, no second copy


def test_a_job_that_uploaded_viseg_adds_only_the_code_version(tmp_path: Path, monkeypatch):
    """launch/submit.sh: the job's working_dir is viseg's wheel, unpacked by Ray; a second one would conflict."""
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip", "env_vars": {"MPLBACKEND": "Agg"}}}
    monkeypatch.setenv(RAY_JOB_CONFIG, json.dumps(job))
    monkeypatch.delenv(CODE_VERSION_ENV, raising=False)
    monkeypatch.setattr(code_pin, "_imported_from_ray_package", lambda: True)
    assert list(pin_code(tmp_path).runtime_env) == ["env_vars"]

    # a job that brings no viseg: the snapshot, beside the job's own working_dir
    monkeypatch.setattr(code_pin, "_imported_from_ray_package", lambda: False)
    pin = pin_code(tmp_path)
    assert pin.runtime_env["py_modules"] == [str(pin.snapshot)] and "working_dir" not in pin.runtime_env

    # a code version the job sets itself reaches the trials as it is: Ray refuses a second value of the variable
    submitted = {"version": "0.1.0", "commit": "abc", "dirty": False, "diff_sha256": None, "source": "submitted"}
    job["runtime_env"]["env_vars"][CODE_VERSION_ENV] = json.dumps(submitted)
    monkeypatch.setenv(RAY_JOB_CONFIG, json.dumps(job))
    monkeypatch.setenv(CODE_VERSION_ENV, json.dumps(submitted))  # the job's env_vars reach its driver too
    pin = pin_code(tmp_path)
    assert "env_vars" not in pin.runtime_env and pin.version.commit == "abc"
