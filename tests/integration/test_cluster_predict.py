"""Folder prediction at scale on tiny demo runs: the overlapped local path (worker processes for reading and
export), Ray Data across a real local Ray with two prediction actors, continue_prediction and num_parts/part_id.

Every path must write the labels the sequential path writes, voxel for voxel, and a bad case must fail alone,
named in the report, with exit status 1. One module fixture trains the runs (fold 0 of a 3d_fullres and of a 2d
configuration, 1 epoch of 2 iterations each, on the demo data); the sequential labels are predicted once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import compose_typed, tiny_run
from viseg.config import PredictConfig
from viseg.data.prediction_inputs import CaseInput, find_cases
from viseg.errors import ConfigError
from viseg.inference.cluster import ActorPool, RaySettings, actor_pool, predict_on_ray, ray_wanted
from viseg.inference.ensemble import load_ensemble
from viseg.inference.predict import InferenceOptions, select_part
from viseg.predict import predict_command
from viseg.training.train import train

CASES = ("demo_000", "demo_001", "demo_002")
SEQUENTIAL = {"num_processes_preprocessing": 0, "num_processes_export": 0}
OVERLAPPED = {"num_processes_preprocessing": 2, "num_processes_export": 2}


@dataclass
class Runs:
    vol: Path  # 3d_fullres, fold 0
    flat: Path  # 2d, fold 0: with vol, a mixed ensemble (two groups averaged in the image's geometry)
    inputs: Path  # CASES' images, nnU-Net imagesTs naming
    sequential: dict[str, np.ndarray]  # vol's labels, predicted one case after the other in this process


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """Every test of this module with one torch thread (conftest.py says why)."""


@pytest.fixture(scope="module")
def runs(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    work = tmp_path_factory.mktemp("cluster_predict")

    def run(name: str, *extra: str) -> Path:
        overrides = tiny_run(demo, work, f"name={name}", "fold=0", "trainer.max_epochs=1", *extra)
        return train(compose_typed("anatomy_config", overrides), progress=False).run_dir

    vol, flat = run("vol"), run("flat", "model=plain_conv_unet_2d")
    inputs = work / "inputs"
    inputs.mkdir()
    for case in CASES:
        (inputs / f"{case}_0000.nii.gz").symlink_to(demo / "imagesTr" / f"{case}_0000.nii.gz")
    assert predict(vol, inputs, work / "sequential", **SEQUENTIAL) == 0
    return Runs(vol, flat, inputs, labels(work / "sequential"))


def predict(model: Path | str, inputs: Path, output: Path, **options: Any) -> int:
    cfg = PredictConfig(model=str(model), input=str(inputs), output=str(output),
                        **{"mirror": False, "device": "cpu", "ray": False, **options})
    return predict_command(cfg, progress=False)


def labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name.removesuffix(".nii.gz"): np.asanyarray(nib.load(p).dataobj)
            for p in sorted(folder.glob("*.nii.gz")) if not p.name.startswith(".")}


def assert_same_labels(written: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(written) == sorted(expected)
    for case, array in expected.items():
        assert written[case].dtype == array.dtype and np.array_equal(written[case], array), case


def with_bad_cases(runs: Runs, folder: Path) -> Path:
    """The good cases plus a truncated .nii.gz (fails while read) and a case with a channel the model does not
    take (fails before it is read)."""
    folder.mkdir()
    for image in runs.inputs.iterdir():
        (folder / image.name).symlink_to(image.resolve())
    good = (runs.inputs / f"{CASES[0]}_0000.nii.gz").resolve()
    (folder / "broken_0000.nii.gz").write_bytes(good.read_bytes()[:2000])
    (folder / "twochannels_0000.nii.gz").symlink_to(good)
    (folder / "twochannels_0001.nii.gz").symlink_to(good)
    return folder


def assert_bad_cases_failed_alone(status: int, stderr: str, runs: Runs, output: Path, folder: Path) -> None:
    assert status == 1
    assert "2 of 5 case(s) failed" in stderr
    assert f"{folder / 'broken_0000.nii.gz'}" in stderr
    assert "twochannels_0001.nii.gz: channel 0001 does not exist, the model takes 1 channel(s)" in stderr
    assert_same_labels(labels(output), runs.sequential)


# -- the local paths ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_overlapped_path_writes_the_sequential_labels_and_probabilities(runs: Runs, tmp_path: Path):
    for name, options in (("sequential", SEQUENTIAL), ("overlapped", OVERLAPPED)):
        assert predict(runs.vol, runs.inputs, tmp_path / name, save_probabilities=True, **options) == 0
    assert_same_labels(labels(tmp_path / "overlapped"), runs.sequential)
    for case in CASES:
        sequential, overlapped = (np.load(tmp_path / name / f"{case}.npz") for name in ("sequential", "overlapped"))
        assert np.array_equal(sequential["probabilities"], overlapped["probabilities"])
    # only one step in workers (the other in this process) is the same pipeline
    assert predict(runs.vol, runs.inputs, tmp_path / "export_only", num_processes_preprocessing=0,
                   num_processes_export=2) == 0
    assert_same_labels(labels(tmp_path / "export_only"), runs.sequential)


@pytest.mark.slow
def test_a_mixed_ensemble_overlaps_as_it_predicts_sequentially(runs: Runs, tmp_path: Path):
    """2d + 3d_fullres: each group is preprocessed onto its own grid in the workers and reverted there, and the
    groups' probabilities are averaged as predict_case averages them."""
    mixed = f"{runs.vol},{runs.flat}"
    assert predict(mixed, runs.inputs, tmp_path / "sequential", **SEQUENTIAL) == 0
    assert predict(mixed, runs.inputs, tmp_path / "overlapped", **OVERLAPPED) == 0
    sequential = labels(tmp_path / "sequential")
    assert_same_labels(labels(tmp_path / "overlapped"), sequential)
    assert any(not np.array_equal(sequential[c], runs.sequential[c]) for c in CASES)  # 2d changed something


@pytest.mark.slow
def test_a_bad_case_fails_alone_in_the_overlapped_path(runs: Runs, tmp_path: Path, capsys):
    folder = with_bad_cases(runs, tmp_path / "inputs")
    status = predict(runs.vol, folder, tmp_path / "out", **OVERLAPPED)
    assert_bad_cases_failed_alone(status, capsys.readouterr().err, runs, tmp_path / "out", folder)


@pytest.mark.slow
def test_continue_prediction_skips_the_cases_already_written(runs: Runs, tmp_path: Path, capsys):
    output = tmp_path / "out"
    assert predict(runs.vol, runs.inputs, output, **SEQUENTIAL) == 0
    kept = {case: (output / f"{case}.nii.gz").stat().st_mtime_ns for case in CASES[1:]}
    (output / f"{CASES[0]}.nii.gz").unlink()
    # what an interrupted write leaves: a hidden temporary file, never <case>.nii.gz itself
    (output / f".host.0123.1.tmp.{CASES[0]}.nii.gz").write_bytes(b"half a file")
    capsys.readouterr()

    assert predict(runs.vol, runs.inputs, output, continue_prediction=True, **SEQUENTIAL) == 0

    out = capsys.readouterr().out
    assert "predicted 1 case(s)" in out and "2 already there, skipped (continue_prediction=true)" in out
    assert {case: (output / f"{case}.nii.gz").stat().st_mtime_ns for case in CASES[1:]} == kept
    assert_same_labels(labels(output), runs.sequential)
    assert predict(runs.vol, runs.inputs, output, continue_prediction=True, **OVERLAPPED) == 0
    out = capsys.readouterr().out
    assert "predicted 0 case(s)" in out and "3 already there, skipped" in out


@pytest.mark.slow
def test_two_parts_predict_the_folder_exactly_once(runs: Runs, tmp_path: Path):
    for part in (0, 1):
        assert predict(runs.vol, runs.inputs, tmp_path / f"part{part}", num_parts=2, part_id=part, **SEQUENTIAL) == 0
    part0, part1 = labels(tmp_path / "part0"), labels(tmp_path / "part1")
    assert sorted(part0) == [CASES[0], CASES[2]] and sorted(part1) == [CASES[1]]  # cases[K::N], sorted by id
    assert_same_labels(part0 | part1, runs.sequential)


# -- Ray ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A real local Ray of 3 CPUs, of its own (address="local": never a cluster someone runs here): two actors of
    one CPU each and a CPU left for the reading and export tasks."""
    import ray

    address = os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=3, include_dashboard=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
        if address is not None:
            os.environ["RAY_ADDRESS"] = address


@pytest.mark.slow
def test_ray_predicts_the_folder_as_one_process_does_and_continues(runs: Runs, local_ray, tmp_path: Path,
                                                                   capsys, caplog):
    caplog.set_level("INFO", logger="viseg")
    output = tmp_path / "out"
    assert predict(runs.vol, runs.inputs, output, ray=True, ray_actors=2) == 0
    assert "predicting 3 case(s) with Ray Data: 2 actor(s) of 1 CPU, predicting on cpu" in caplog.text
    assert_same_labels(labels(output), runs.sequential)

    kept = {case: (output / f"{case}.nii.gz").stat().st_mtime_ns for case in CASES[:2]}
    (output / f"{CASES[2]}.nii.gz").unlink()
    capsys.readouterr()
    assert predict(runs.vol, runs.inputs, output, ray=True, ray_actors=2, continue_prediction=True) == 0
    assert "predicted 1 case(s)" in capsys.readouterr().out
    assert {case: (output / f"{case}.nii.gz").stat().st_mtime_ns for case in CASES[:2]} == kept
    assert_same_labels(labels(output), runs.sequential)


@pytest.mark.slow
def test_a_bad_case_fails_alone_on_ray(runs: Runs, local_ray, tmp_path: Path, capsys):
    folder = with_bad_cases(runs, tmp_path / "inputs")
    status = predict(runs.vol, folder, tmp_path / "out", ray=True, ray_actors=2)
    assert_bad_cases_failed_alone(status, capsys.readouterr().err, runs, tmp_path / "out", folder)


@pytest.mark.slow
def test_actors_that_cannot_load_the_model_say_why(runs: Runs, local_ray, tmp_path: Path):
    """The driver loads the model, the actors cannot (on a cluster: the run folders are not on shared storage):
    a ConfigError naming the folder and the fix, not Ray's ActorDiedError traceback."""
    ensemble = load_ensemble([runs.vol], device="cpu")
    cases = find_cases(str(runs.inputs), ensemble.plans.channel_names, ensemble.pathfinder)
    elsewhere = tmp_path / "elsewhere" / "fold_0"
    with pytest.raises(ConfigError, match="no Ray prediction actor could load the model") as raised:
        predict_on_ray(ensemble, [elsewhere], "final", cases, tmp_path / "out", InferenceOptions(mirror=False),
                       settings=RaySettings(actors=1), device="cpu", progress=False)
    assert f"run folder {elsewhere} has no checkpoints/last.ckpt" in str(raised.value)
    assert "must be on storage every Ray node reads" in str(raised.value)


# -- settings -------------------------------------------------------------------------------------------


def test_a_part_outside_num_parts_is_refused_with_the_parts_to_use():
    with pytest.raises(ConfigError, match=r"part_id=3 is not a part of num_parts=3 \(parts are numbered 0 to 2\)") \
            as raised:
        PredictConfig(model="m", input="i", output="o", num_parts=3, part_id=3)
    assert "part_id=0 ... part_id=2" in raised.value.fix
    with pytest.raises(ConfigError, match="num_parts=0 must be at least 1"):
        PredictConfig(model="m", input="i", output="o", num_parts=0)
    with pytest.raises(ConfigError, match="num_processes_export=-1 must be 0 or more"):
        PredictConfig(model="m", input="i", output="o", num_processes_export=-1)
    with pytest.raises(ConfigError, match="with device=cpu reserves GPUs"):
        PredictConfig(model="m", input="i", output="o", device="cpu", ray_gpus_per_actor=1)
    cases = [CaseInput(c) for c in ("c", "a", "e", "b", "d")]
    parts = [[c.case_id for c in select_part(cases, 2, k)] for k in (0, 1)]
    assert parts == [["a", "c", "e"], ["b", "d"]]


def test_ray_is_used_when_asked_or_when_ray_address_names_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray_wanted(None) and ray_wanted(True)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert ray_wanted(None) and not ray_wanted(False)
    monkeypatch.setenv("RAY_ADDRESS", "local")  # a fresh local Ray, not a cluster
    assert not ray_wanted(None)


def test_the_actor_pool_follows_the_clusters_gpus_and_leaves_a_cpu_for_the_tasks():
    gpu_cluster = {"CPU": 32.0, "GPU": 4.0}
    assert actor_pool(RaySettings(), "auto", gpu_cluster) == ActorPool(4, 1.0, 1.0, "cuda")
    assert actor_pool(RaySettings(gpus_per_actor=0.5), "auto", gpu_cluster) == ActorPool(8, 0.5, 1.0, "cuda")
    assert actor_pool(RaySettings(), "cpu", gpu_cluster) == ActorPool(2, 0.0, 1.0, "cpu")
    assert actor_pool(RaySettings(), "auto", {"CPU": 2.0}) == ActorPool(1, 0.0, 1.0, "cpu")
    with pytest.raises(ConfigError, match="leave the Ray cluster's 2 CPU") as raised:
        actor_pool(RaySettings(actors=2), "auto", {"CPU": 2.0})
    assert "ray_actors=1" in raised.value.fix
    with pytest.raises(ConfigError, match="the Ray cluster has no GPU"):
        actor_pool(RaySettings(), "cuda", {"CPU": 8.0})
