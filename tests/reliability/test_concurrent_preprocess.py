"""Two processes preprocessing one cache folder (two trials, or two nodes on shared storage): one writes,
the other waits for the folder's lock and then finds every case done; the marker's digests catch a file
that kept its size but lost its content."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import compose_typed
from viseg.data.demo import DemoSpec, generate_demo_dataset
from viseg.io.jsonio import read_json
from viseg.preprocessing.prepare import prepare
from viseg.preprocessing.preprocess import (
    folder_lock,
    is_case_complete,
    load_case,
    preprocess_dataset,
    preprocessed_dir,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

# prepare + preprocess_dataset in a fresh interpreter, as a trial or another node's driver does
WORKER = textwrap.dedent("""
    import logging, sys
    from tests.helpers import compose_typed
    from viseg.preprocessing.prepare import prepare
    from viseg.preprocessing.preprocess import preprocess_dataset
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    preprocess_dataset(prepare(compose_typed("anatomy_config", sys.argv[1:]), progress=False),
                       num_processes=1, progress=False)
    print("done", flush=True)
""")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("concurrent") / "demo", DemoSpec(n_cases=6),
                                 progress=False)


def overrides(demo: Path, cache: Path) -> list[str]:
    return [f"dataset.basepath={demo}", f"paths.cache={cache}", "splits.n_folds=3", "num_processes=1"]


def planned_cache(demo: Path, cache: Path) -> Path:
    """A cache with the fingerprint and plan made (prepare's part) but no preprocessed arrays yet."""
    return preprocessed_dir(prepare(compose_typed("anatomy_config", overrides(demo, cache)), progress=False))


def start_worker(demo: Path, cache: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", WORKER, *overrides(demo, cache)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)


def finish(process: subprocess.Popen, log: Path) -> str:
    out, _ = process.communicate(timeout=600)
    err = log.read_text()
    assert process.returncode == 0 and "done" in out, err[-3000:]
    return err


def case_ids(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.json") if p.name != "manifest.json")


def assert_same_cache(ours: Path, reference: Path) -> None:
    assert case_ids(ours) == case_ids(reference) and len(case_ids(ours)) == 6
    for case_id in case_ids(reference):
        a, b = load_case(ours, case_id, mmap=False), load_case(reference, case_id, mmap=False)
        for x, y in zip(a[:2], b[:2], strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert a[2] == b[2] and a[3].keys() == b[3].keys()
        for label in a[3]:
            np.testing.assert_array_equal(a[3][label], b[3][label])
    assert not [p.name for p in ours.iterdir() if ".tmp" in p.name]


@pytest.fixture(scope="module")
def reference(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache one process alone writes."""
    cache = tmp_path_factory.mktemp("single")
    return preprocess_dataset(prepare(compose_typed("anatomy_config", overrides(demo, cache)), progress=False),
                              num_processes=1, progress=False)


def test_two_processes_at_once_both_end_and_the_cache_equals_a_single_run(demo: Path, reference: Path,
                                                                         tmp_path: Path):
    folder = planned_cache(demo, tmp_path / "cache")
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    workers = [start_worker(demo, tmp_path / "cache", log) for log in logs]
    for worker, log in zip(workers, logs, strict=True):
        finish(worker, log)
    assert_same_cache(folder, reference)


def test_a_second_process_waits_for_the_lock_holder_and_writes_nothing(demo: Path, reference: Path,
                                                                      tmp_path: Path):
    """While another process (here: the test, standing in for a writer on another node) holds the folder's
    lock, a second preprocessing writes nothing, not even a temporary file, and deletes nothing of the
    holder's; once the lock is free it does the work."""
    folder = planned_cache(demo, tmp_path / "cache")
    folder.mkdir(parents=True)
    lock = folder_lock(folder)
    lock.acquire()
    live_tmp = folder / ".case_000_data.npy.4000000.tmp"  # a live writer's, with a pid unknown on this node
    live_tmp.write_bytes(b"being written elsewhere")
    log = tmp_path / "waiter.log"
    try:
        waiter = start_worker(demo, tmp_path / "cache", log)
        deadline = time.monotonic() + 300
        # until it says it waits, or (without a lock) writes into the folder, or ends
        while ("waiting for another process" not in log.read_text() and len(list(folder.iterdir())) == 2
               and waiter.poll() is None and time.monotonic() < deadline):
            time.sleep(0.2)
        time.sleep(2)
        assert waiter.poll() is None, log.read_text()[-3000:]
        assert sorted(p.name for p in folder.iterdir()) == sorted([".lock", live_tmp.name])
        assert live_tmp.read_bytes() == b"being written elsewhere"
    finally:
        lock.release()
    assert "waiting for another process preprocessing" in finish(waiter, log)
    assert_same_cache(folder, reference)  # and the dead writer's temporary file was removed under the lock


def test_a_file_that_kept_its_size_but_not_its_content_is_redone(demo: Path, reference: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    shutil.copytree(reference.parents[2], cache)
    folder = cache / reference.relative_to(reference.parents[2])
    ids = case_ids(folder)
    data = folder / f"{ids[0]}_data.npy"
    with data.open("r+b") as handle:  # what a crash before the page cache reached the disk leaves
        handle.seek(data.stat().st_size // 2)
        handle.write(b"\0" * 64)
    (folder / f"{ids[1]}.json").unlink()  # something is incomplete: the locked, verifying path runs
    assert is_case_complete(folder, ids[0]) and not is_case_complete(folder, ids[0], verify=True)
    assert set(read_json(folder / f"{ids[2]}.json")["file_blake2b"]) == {
        f"{ids[2]}_data.npy", f"{ids[2]}_seg.npy", f"{ids[2]}_fg.npz"}
    preprocess_dataset(prepare(compose_typed("anatomy_config", overrides(demo, cache)), progress=False),
                       num_processes=1, progress=False)
    assert all(is_case_complete(folder, i, verify=True) for i in ids)
    assert_same_cache(folder, reference)


def test_prepare_rewrites_the_plan_folders_dataset_json_only_when_it_changed(demo: Path, tmp_path: Path):
    """Runs and predictions read the plan folder's dataset.json while another prepare may run: an unchanged
    copy is left alone, a changed one is replaced by a rename, never rewritten in place."""
    cfg = compose_typed("anatomy_config", overrides(demo, tmp_path / "cache"))
    copy = prepare(cfg, progress=False).plans_dir / "dataset.json"
    before = copy.stat()
    prepare(cfg, progress=False)
    after = copy.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    copy.write_text("{}")  # a copy that no longer matches the dataset's
    stale = copy.stat().st_ino
    prepare(cfg, progress=False)
    assert copy.read_bytes() == (demo / "dataset.json").read_bytes() and copy.stat().st_ino != stale
    assert not [p.name for p in copy.parent.iterdir() if ".tmp" in p.name]
