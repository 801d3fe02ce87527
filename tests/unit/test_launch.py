"""The cluster launch files in launch/, checked with Ray's own parsers where Ray has one (the job itself runs
on a real two-node cluster in tests/integration/test_cluster.py)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from tests.helpers import WHEEL_INPUTS, build_wheel

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"


def load(name: str) -> dict:
    return yaml.safe_load((LAUNCH / name).read_text())


def test_runtime_env_is_valid_and_the_upload_is_viseg_as_its_wheel_installs_it(tmp_path: Path):
    """What submit.sh uploads: the wheel built from the checkout, unpacked without dependencies."""
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    env = load("runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's validation of the fields
    assert "working_dir" not in env and "py_modules" not in env  # submit.sh gives the staged wheel
    script = (LAUNCH / "submit.sh").read_text()
    assert "pip wheel --no-deps" in script and '--working-dir "$stage/job"' in script
    assert all(name in script for name in WHEEL_INPUTS)  # submit.sh copies the same inputs
    stage = tmp_path / "job"
    wheel = build_wheel(tmp_path / "build")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(stage), str(wheel)],
                   check=True, capture_output=True)
    package = tmp_path / "working_dir.zip"
    create_package(str(stage), package, include_gitignore=False, excludes=env["excludes"])
    names = set(zipfile.ZipFile(package).namelist())
    assert {"viseg/sweep/__main__.py", "viseg/conf/anatomy_config.yaml", "viseg/sweeps/demo.yaml"} <= names
    assert {n.split("/")[0] for n in names} <= {"viseg", "bin"} | {n.split("/")[0] for n in names if ".dist-info" in n}
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
    viseg_at = next(i for i, c in enumerate(setup) if c.rstrip().endswith("constraints.txt ~/viseg"))
    assert not [c for c in setup if "-e ~/viseg" in c]  # a normal install: jobs bring their own viseg
    assert torch_at < viseg_at  # torch first, so viseg's dependencies never replace it


def rayjob_documents() -> dict[str, list[dict]]:
    documents: dict[str, list[dict]] = {}
    for document in yaml.safe_load_all((LAUNCH / "rayjob.yaml").read_text()):
        documents.setdefault(document["kind"], []).append(document)
    return documents


def test_rayjob_runs_the_sweep_with_everything_on_the_shared_volume():
    documents = rayjob_documents()
    (claim,), (job,) = documents["PersistentVolumeClaim"], documents["RayJob"]
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


def test_rayjob_fences_the_dashboard_in_with_network_policies_and_keeps_the_token():
    """KubeRay binds the dashboard to 0.0.0.0: only the cluster's own pods reach its Ray ports, and the
    Jobs API (8265) also only the submitter and the operator; the token stays in front of it."""
    documents = rayjob_documents()
    (job,) = documents["RayJob"]
    name = job["metadata"]["name"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    # every Ray pod carries the label the policies select, named after the RayJob
    own = {"viseg.io/sweep": name}
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    assert all(t["metadata"]["labels"] == own for t in templates)

    policies = {p["metadata"]["name"]: p["spec"] for p in documents["NetworkPolicy"]}
    assert set(policies) == {f"{name}-ray", f"{name}-dashboard"}
    # kubectl applies the file in order: the fences exist before the cluster's pods do
    kinds = [d["kind"] for d in yaml.safe_load_all((LAUNCH / "rayjob.yaml").read_text())]
    assert kinds.index("NetworkPolicy") < kinds.index("RayJob")

    ray = policies[f"{name}-ray"]
    assert ray["podSelector"] == {"matchLabels": own} and ray["policyTypes"] == ["Ingress"]
    assert ray["ingress"] == [{"from": [{"podSelector": {"matchLabels": own}}]}]  # any port, own pods only

    dashboard = policies[f"{name}-dashboard"]
    assert dashboard["podSelector"] == {"matchLabels": {**own, "ray.io/node-type": "head"}}
    assert dashboard["policyTypes"] == ["Ingress"]
    (rule,) = dashboard["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8265}]
    submitter, operator = rule["from"]
    assert submitter == {"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name": name}}}
    assert operator["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    assert set(operator["namespaceSelector"]["matchLabels"]) == {"kubernetes.io/metadata.name"}
    # no rule admits everything: no empty selector, no ipBlock, no rule without a source
    for spec in policies.values():
        for ingress in spec["ingress"]:
            assert ingress.get("from") and all(peer and "ipBlock" not in peer for peer in ingress["from"])
            assert all(sel.get("matchLabels") for peer in ingress["from"] for sel in peer.values())


def test_submit_script_refuses_an_object_store_uri_for_storage_path():
    script = str(LAUNCH / "submit.sh")
    refused = subprocess.run(["bash", script, "folds=0", "storage_path=s3://bucket/sweeps"],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "storage_path=s3://bucket/sweeps is a URI" in refused.stderr


def test_sweep_refuses_a_uri_storage_path_before_any_work():
    """A trial writes its run folder with plain file I/O: on s3:// it would land on the node's own disk."""
    import sys

    result = subprocess.run([sys.executable, "-m", "viseg.sweep", "storage_path=s3://b/x", "dry_run=true"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "storage_path='s3://b/x' is a URI" in result.stderr and "mounted" in result.stderr
    assert "NFS" in result.stderr and "fix:" in result.stderr and "Traceback" not in result.stderr


def test_a_file_uri_storage_path_is_its_local_path():
    from viseg.errors import ConfigError
    from viseg.sweep.spec import SweepConfig, storage_path_on_disk

    assert storage_path_on_disk("file:///mnt/shared/sweeps") == "/mnt/shared/sweeps"
    assert storage_path_on_disk("/mnt/shared/sweeps") == "/mnt/shared/sweeps"
    assert SweepConfig(storage_path="file:///mnt/x").storage_path == "/mnt/x"
    for uri in ("s3://b/x", "gs://b/x", "GS://b/x", "hdfs://nn/x", "file://otherhost/x"):
        try:
            SweepConfig(storage_path=uri)
        except ConfigError as error:
            assert error.fix and "storage_path" in error.message
        else:
            raise AssertionError(f"{uri} was accepted")
