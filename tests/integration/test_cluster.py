"""python -m viseg.sweep as a Ray job on a real two-node cluster (head + worker node on this machine),
submitted through launch/submit.sh and followed through the dashboard's Jobs REST API, as launch/README.md
does it. The cluster's "shared filesystem" is a folder both nodes see; data, cache and results live there.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ray_cluster import REPO, LocalCluster, local_cluster

pytestmark = pytest.mark.slow

# Small budget on the built-in demo dataset (generated into paths.cache): two folds, a few iterations.
TINY = ("folds=0-1", "trainer.iterations_per_epoch=2", "trainer.val_iterations=1", "resources.cpu=1")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster() as started:
        yield started


def shared_args(cluster: LocalCluster) -> tuple[str, ...]:
    """Absolute paths on the shared folder, as on a real cluster; one cache for every test (prepared once)."""
    return (f"storage_path={cluster.shared / 'sweeps'}", f"paths.cache={cluster.shared / 'cache'}")


def finished_runs(experiment: Path) -> dict[int, Path]:
    """fold -> run folder of every fold that finished (train() writes finished.json last)."""
    return {int(p.parent.name.split("_")[1]): p.parent for p in (experiment / "runs").rglob("fold_*/finished.json")}


def run_folder(experiment: Path, fold: int) -> Path | None:
    return next((p for p in (experiment / "runs").rglob(f"fold_{fold}") if p.is_dir()), None)


def tune_checkpoints(experiment: Path) -> dict[int, list[Path]]:
    """fold -> the checkpoints Tune persisted for its trial (trial folders are <variant>_fold<k>_<id>)."""
    found: dict[int, list[Path]] = {}
    for ckpt in experiment.glob("*_fold*_*/checkpoint_*/last.ckpt"):
        fold = int(ckpt.parent.parent.name.split("_fold")[1].split("_")[0])
        found.setdefault(fold, []).append(ckpt)
    return found


def final_reports(experiment: Path) -> list[dict]:
    """Each trial's last report (the one after full-case validation, which carries node_id)."""
    rows = []
    for path in experiment.glob("*_fold*_*/result.json"):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if "final/mean_dice" in row]


def epochs_in(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv") as handle:
        return [int(float(row["epoch"])) for row in csv.DictReader(handle)]


def summary(experiment: Path) -> dict[str, dict]:
    return {v["variant"]: v for v in json.loads((experiment / "summary.json").read_text())}


def assert_summary_table(logs: str, folds: str) -> None:
    assert "folds ok/failed" in logs and "* best overall mean Dice" in logs, logs[-3000:]
    assert f"* default  {folds}" in logs, logs[-3000:]


def test_dashboard_refuses_requests_without_the_token(cluster: LocalCluster):
    assert cluster.status_code_without_token("/api/jobs/") == 401
    assert cluster.api("/api/jobs/") is not None  # the same request with the token


def test_submitted_sweep_runs_trials_on_both_nodes_and_writes_to_storage(cluster: LocalCluster):
    experiment = cluster.shared / "sweeps" / "cluster"
    cluster.submit("viseg-cluster", *TINY, "trainer.max_epochs=1", *shared_args(cluster), "experiment=cluster")
    cluster.wait_for_status("viseg-cluster", "SUCCEEDED", timeout=600)

    reports = final_reports(experiment)
    assert sorted(r["config"]["fold"] for r in reports) == [0, 1]
    # one trial per node: both nodes have 1 CPU and each trial asks for 1
    assert {r["node_id"] for r in reports} == cluster.alive_node_ids(), reports
    assert sorted(finished_runs(experiment)) == [0, 1]
    assert sorted(tune_checkpoints(experiment)) == [0, 1]
    assert (experiment / "viseg_sweep.json").is_file() and (experiment / "summary.png").is_file()
    assert summary(experiment)["default"]["folds_finished"] == [0, 1]
    # the driver prepared the demo dataset once, on the shared cache, before any trial
    assert len(list((cluster.shared / "cache").glob("VisegDemo-*/preprocessed/*"))) == 1
    assert_summary_table(cluster.logs("viseg-cluster"), "2/0")


def test_stopped_job_is_resumed_by_a_new_submission(cluster: LocalCluster):
    experiment = cluster.shared / "sweeps" / "stopped"
    # one trial at a time, so that one fold finishes while the other is still training; nnU-Net's network
    # width, not the demo's 8 features, so that an epoch lasts long enough to stop the job within one
    cluster.submit("viseg-stopped", *TINY, "trainer.max_epochs=3", "max_concurrent_trials=1",
                   "plan.base_num_features=null",
                   *shared_args(cluster), "experiment=stopped")

    def one_finished_one_started() -> bool:
        finished = finished_runs(experiment)
        return len(finished) == 1 and run_folder(experiment, 1 - next(iter(finished))) is not None

    cluster.wait_while_running("viseg-stopped", one_finished_one_started, "one finished and one started fold")
    (first,) = finished_runs(experiment)
    second = 1 - first
    assert_partial_summary(experiment, first, second)

    def second_has_checkpoint() -> bool:
        run = run_folder(experiment, second)
        return second in tune_checkpoints(experiment) and run is not None and (run / "checkpoints/last.ckpt").exists()

    cluster.wait_while_running("viseg-stopped", second_has_checkpoint, f"a checkpoint of fold {second}")
    stop = cluster.ray_cli("job", "stop", "viseg-stopped")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    cluster.wait_for_status("viseg-stopped", "STOPPED", timeout=120)
    assert second not in finished_runs(experiment), "the second fold finished before the job could be stopped"

    cluster.submit("viseg-resumed", f"resume={experiment}")
    cluster.wait_for_status("viseg-resumed", "SUCCEEDED", timeout=600)
    runs = finished_runs(experiment)
    assert sorted(runs) == [0, 1]
    for run in runs.values():
        assert json.loads((run / "finished.json").read_text())["epochs"] == 3
        assert epochs_in(run) == [0, 1, 2]  # the stopped fold went on from its checkpoint: no epoch twice
    assert summary(experiment)["default"]["folds_finished"] == [0, 1]
    assert_summary_table(cluster.logs("viseg-resumed"), "2/0")


def assert_partial_summary(experiment: Path, finished: int, running: int) -> None:
    """`summary=` on the running experiment, from this machine: the finished fold counts, the other not."""
    result = subprocess.run([sys.executable, "-m", "viseg.sweep", f"summary={experiment}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "* default  1/0" in result.stdout and "still unfinished" in result.stdout, result.stdout
    partial = summary(experiment)["default"]
    assert partial["folds_finished"] == [finished] and running not in partial["folds_finished"], partial


def test_prediction_with_ray_spreads_the_cases_over_both_nodes(cluster: LocalCluster, demo: Path):
    """`viseg predict ray=true` as a driver joining the cluster: its two actors (half a CPU each, so a CPU stays
    free for reading and writing) land on both nodes, and every case is written to the shared folder."""
    from tests.helpers import compose_typed, tiny_run
    from viseg.training.train import train

    work = cluster.shared / "predict"
    run = train(compose_typed("anatomy_config", tiny_run(demo, work, "trainer.max_epochs=1")), progress=False).run_dir
    images = work / "images"
    images.mkdir()
    for image in sorted((demo / "imagesTr").glob("*_0000.nii.gz"))[:4]:
        (images / image.name).symlink_to(image)
    env = cluster.client_env() | {"RAY_ADDRESS": cluster.gcs_address, "RAY_AUTH_MODE": "token"}
    result = subprocess.run([sys.executable, "-m", "viseg.predict", f"model={run}", f"input={images}",
                             f"output={work / 'out'}", "ray=true", "ray_actors=2", "ray_cpus_per_actor=0.5",
                             "device=cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "predicted 4 case(s)" in result.stdout and "on 2 Ray node(s)" in result.stdout, result.stdout
    assert len(list((work / "out").glob("*.nii.gz"))) == 4
