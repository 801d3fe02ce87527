"""The cluster launch files in launch/, checked with Ray's own parsers where Ray has one (the job itself runs
on a real two-node cluster in tests/integration/test_cluster.py)."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"


def load(name: str) -> dict:
    return yaml.safe_load((LAUNCH / name).read_text())


def test_runtime_env_is_valid_and_keeps_the_upload_small(tmp_path: Path):
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    env = load("runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's validation of the fields
    package = tmp_path / "working_dir.zip"
    # without .gitignore: the excludes alone must keep environments, results and caches out
    create_package(str(REPO), package, include_gitignore=False, excludes=env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    assert {"viseg/sweep/__main__.py", "conf/anatomy_config.yaml", "sweeps/demo.yaml"} <= set(names)
    assert not [n for n in names if n.split("/")[0] in {".venv", ".git", "results", ".viseg_cache", "tests"}]
    assert package.stat().st_size < 5 * 2**20  # Ray 2.60 refuses 512 MiB and warns from 256 MiB


def test_cluster_yaml_passes_ray_up_validation_and_keeps_the_head_free_of_trials():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("cluster.yaml")
    validate_config(prepare_config(config))  # what `ray up` runs before it starts anything
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    starts = config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]
    assert all("RAY_AUTH_MODE=token" in command for command in starts)
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==2.13.0" in c)
    viseg_at = next(i for i, c in enumerate(setup) if c.rstrip().endswith("-e ~/viseg"))
    assert torch_at < viseg_at  # torch first, so viseg's dependencies never replace it


def test_rayjob_runs_the_sweep_with_everything_on_the_shared_volume():
    claim, job = yaml.safe_load_all((LAUNCH / "rayjob.yaml").read_text())
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith("python -m viseg.sweep ")
    for key in ("storage_path=/shared/", "paths.cache=/shared/", "dataset.basepath=/shared/"):
        assert key in entrypoint
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["serviceType"] == "ClusterIP"
    pods = [head["template"]["spec"]] + [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert {"name": "shared", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in pod["volumes"]
        assert {"name": "shared", "mountPath": "/shared"} in pod["containers"][0]["volumeMounts"]
    assert all(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
               for g in cluster["workerGroupSpecs"])


def test_submit_script_explains_itself():
    script = str(LAUNCH / "submit.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    shown = subprocess.run(["bash", script, "-h"], capture_output=True, text=True)
    assert shown.returncode == 0 and "Usage: launch/submit.sh" in shown.stdout and "--no-wait" in shown.stdout
    assert subprocess.run(["bash", script], capture_output=True, text=True).returncode == 2
