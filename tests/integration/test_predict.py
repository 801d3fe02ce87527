"""Prediction end to end on real ACDC cases: geometry, learning, ensembles, mirroring, postprocessing, errors.

Two short runs of the 2d configuration are trained once for the module on six ACDC volumes (left ventricle
only, at 6.25 mm in-plane so that a CPU learns it in seconds). Their run folder root doubles as a sweep
experiment folder (`<experiment>/runs/<dataset>/<plan>/<variant>/fold_<k>`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import generate_binary_structure
from scipy.ndimage import label as connected_components

from tests.helpers import compose_typed
from viseg.config import PredictConfig
from viseg.data.dataset import Case, ImageSource
from viseg.data.nifti import read_case
from viseg.data.prediction_inputs import find_cases
from viseg.errors import ConfigError
from viseg.inference.ensemble import load_ensemble, resolve_model
from viseg.inference.export import keep_largest_component, probabilities_to_labels, revert_geometry
from viseg.planning.network import build_model
from viseg.planning.plans import plans_from_dict
from viseg.predict import predict_command
from viseg.preprocessing.prepare import prepare
from viseg.preprocessing.preprocess import preprocess_case
from viseg.training.train import train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CASES = ("patient001_frame01", "patient001_frame02", "patient002_frame01", "patient002_frame02",
         "patient003_frame01", "patient003_frame02")
LV = 3  # ACDC's left ventricle: large and bright, learnt first; a value != its class index (1) on purpose
VARIANT = "lv"
# Dice of the left ventricle on a case the run trained on. Measured: about 0.87 trained (50 iterations) and
# below 0.1 for the same network untrained; a pipeline that misplaces, mistransposes or mislabels the
# prediction stays near the untrained value.
DICE_FLOOR = 0.6


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """Every test of this module with one torch thread (conftest.py says why)."""


@pytest.fixture(scope="module")
def acdc(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real ACDC volumes in the nnU-Net layout (symlinks), dataset.json with numTraining adjusted."""
    source, root = shared / "data" / "acdc", tmp_path_factory.mktemp("data") / "acdc6"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in CASES:
        (root / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(source / "imagesTr" / f"{case}_0000.nii.gz")
        (root / "labelsTr" / f"{case}.nii.gz").symlink_to(source / "labelsTr" / f"{case}.nii.gz")
    raw = json.loads((source / "dataset.json").read_text())
    keep = ("channel_names", "labels", "file_ending", "name")
    (root / "dataset.json").write_text(json.dumps({k: raw[k] for k in keep} | {"numTraining": len(CASES)}))
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


def train_overrides(acdc: Path, work: Path, *extra: str) -> list[str]:
    """2d, LV only, 6.25 mm in-plane (about 64 x 58 voxels a slice), AdamW: learns the LV in 50 iterations
    (under a minute of one CPU core), which SGD's slow start does not."""
    return [f"dataset.basepath={acdc}", f"paths.cache={work / 'cache'}",
            f"paths.results={work / 'experiment' / 'runs'}", f"name={VARIANT}", "model=plain_conv_unet_2d",
            f"foreground_labels=[{LV}]", "spacing=[6.25,6.25]", "patch_size=[64,64]", "batch_size=4",
            "optimizer.type=AdamW", "optimizer.lr=0.003", "splits.n_folds=3", "num_processes=1",
            "loader.num_workers=0", "trainer.val_iterations=1", *extra]


@dataclass
class Trained:
    experiment: Path
    run_a: Path  # fold 0, trained for 50 iterations
    run_b: Path  # fold 1, 2 iterations: a second, different member for the ensemble
    training_case: str  # a case run_a trained on


@pytest.fixture(scope="module")
def trained(acdc: Path, work: Path) -> Trained:
    a = train(compose_typed("anatomy_config", train_overrides(
        acdc, work, "fold=0", "trainer.max_epochs=5", "trainer.iterations_per_epoch=10")), progress=False)
    b = train(compose_typed("anatomy_config", train_overrides(
        acdc, work, "fold=1", "trainer.max_epochs=1", "trainer.iterations_per_epoch=2")), progress=False)
    splits = json.loads((a.run_dir / "splits.json").read_text())
    return Trained(work / "experiment", a.run_dir, b.run_dir, sorted(splits[0]["train"])[0])


# -- helpers --------------------------------------------------------------------------------------------


def image_file(acdc: Path, case: str) -> Path:
    return acdc / "imagesTr" / f"{case}_0000.nii.gz"


def label_array(acdc: Path, case: str) -> np.ndarray:
    return np.asanyarray(nib.load(acdc / "labelsTr" / f"{case}.nii.gz").dataobj)


def input_folder(tmp: Path, files: dict[str, Path]) -> Path:
    """A folder of symlinks named name -> file (nnU-Net imagesTs naming)."""
    folder = tmp / "input"
    folder.mkdir()
    for name, target in files.items():
        (folder / name).symlink_to(target)
    return folder


def predict(model: str | Path, inputs: Path | str, output: Path, **options: Any) -> int:
    cfg = PredictConfig(model=str(model), input=str(inputs), output=str(output),
                        **{"mirror": False, "device": "cpu", **options})
    return predict_command(cfg, progress=False)


def dice(prediction: np.ndarray, truth: np.ndarray, value: int) -> float:
    pred, true = prediction == value, truth == value
    return float(2 * (pred & true).sum() / max(int(pred.sum() + true.sum()), 1))


def linked_run(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    """A copy of a run folder made of symlinks (checkpoints are large), leaving out `skip` (relative paths)."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or relative.as_posix() in skip:
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        (target / relative).symlink_to(path)
    return target


def rewritten_checkpoint(source: Path, target: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A linked run whose last.ckpt (the final weights, predict's default) is `edit(checkpoint)` of the
    source's (saved as plain tensors and values)."""
    linked_run(source, target, skip=("checkpoints/last.ckpt",))
    checkpoint = torch.load(source / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, target / "checkpoints" / "last.ckpt")
    return target


def components(segmentation: np.ndarray, value: int) -> int:
    return connected_components(segmentation == value, structure=generate_binary_structure(3, 3))[1]


def viseg_predict(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "viseg.predict", *args, "mirror=false", "device=cpu"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300, check=False)


# -- geometry -------------------------------------------------------------------------------------------


def test_reverting_the_geometry_recovers_the_label_map(acdc: Path, work: Path):
    """A one-hot of the case's own preprocessed label, as 'probabilities', must come back as the original label
    map. The plan transposes, resamples in plane and the image is cropped, so every step is exercised."""
    cfg = compose_typed("anatomy_config", [f"dataset.basepath={acdc}", f"paths.cache={work / 'cache'}",
                                           "num_processes=1", "transpose_forward=[2,0,1]", "spacing=[1.25,10,1.25]"])
    plans = prepare(cfg, progress=False).plans
    assert plans.transpose_forward == (2, 0, 1) and plans.transpose_backward == (1, 2, 0)
    case = CASES[2]
    arrays = read_case(Case(case, (ImageSource(image_file(acdc, case)),), acdc / "labelsTr" / f"{case}.nii.gz"))
    image, label = arrays.image.copy(), arrays.label
    # zero two borders (pure background there) so that cropping to the nonzero box removes something
    assert not label[:, :20].any() and not label[:, :, -15:].any()
    image[:, :, :20] = 0
    image[:, :, :, -15:] = 0
    _, seg, properties = preprocess_case(image, label, arrays.spacing, plans, "3d_fullres")
    assert properties.bbox[1][0] >= 20 and properties.bbox[2][1] <= label.shape[2] - 15
    assert properties.shape_after_resampling != properties.shape_after_crop
    one_hot = np.moveaxis(np.eye(4, dtype=np.float32)[np.clip(seg[0], 0, None)], -1, 0)

    reverted = revert_geometry(one_hot, properties, plans, "3d_fullres")

    assert reverted.shape == (4, *label.shape)
    np.testing.assert_allclose(reverted.sum(0), 1.0, atol=1e-5)
    recovered = probabilities_to_labels(reverted, (0, 1, 2, 3))
    assert (recovered == label).mean() > 0.99
    assert min(dice(recovered, label, v) for v in (1, 2, 3)) > 0.9


def test_input_files_are_grouped_into_cases_by_the_training_layout(tmp_path: Path):
    for name in ("b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "c_0001.nii.gz", "d_0000.nii.gz",
                 "d_0002.nii.gz", "e.nii.gz", "notes.txt", ".hidden_0000.nii.gz"):
        (tmp_path / name).touch()
    cases = {c.case_id: c for c in find_cases(str(tmp_path), ("T1", "T2"))}
    assert sorted(cases) == ["a", "b", "c", "d", "e"]
    assert [s.path.name for s in cases["b"].case.images] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    assert cases["a"].case is None and f"{tmp_path / 'a_0001.nii.gz'} missing" in cases["a"].problem
    assert f"{tmp_path / 'd_0002.nii.gz'}: channel 0002 does not exist" in cases["d"].problem
    assert "does not follow the naming <case>_<XXXX>.nii.gz" in cases["e"].problem
    # Decathlon layout: one (4D) file per case, each channel read from it
    [case] = find_cases(str(tmp_path / "e.nii.gz"), ("T1", "T2"), pathfinder="decathlon")
    assert [(s.path.name, s.channel_index) for s in case.case.images] == [("e.nii.gz", 0), ("e.nii.gz", 1)]


# -- prediction -----------------------------------------------------------------------------------------


def test_predictions_keep_the_input_geometry_and_the_trained_run_segments(trained: Trained, acdc: Path,
                                                                         tmp_path: Path):
    case = trained.training_case
    # a second case with an oblique affine (rotated, shifted): the output must carry it unchanged
    source = nib.load(image_file(acdc, CASES[5]))
    affine = np.array([[0.0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]) @ source.affine
    affine[:3, 3] += [5.0, -7.0, 11.0]
    oblique = nib.Nifti1Image(np.asanyarray(source.dataobj), affine)
    nib.save(oblique, tmp_path / "oblique_0000.nii.gz")
    inputs = input_folder(tmp_path, {f"{case}_0000.nii.gz": image_file(acdc, case),
                                     "oblique_0000.nii.gz": tmp_path / "oblique_0000.nii.gz"})
    untrained = rewritten_checkpoint(trained.run_a, tmp_path / "untrained" / "fold_0", untrained_weights)

    assert predict(trained.run_a, inputs, tmp_path / "out") == 0
    assert predict(untrained, inputs / f"{case}_0000.nii.gz", tmp_path / "untrained_out") == 0

    for name in (case, "oblique"):
        reference, written = nib.load(inputs / f"{name}_0000.nii.gz"), nib.load(tmp_path / "out" / f"{name}.nii.gz")
        assert written.shape == reference.shape
        np.testing.assert_array_equal(written.affine, reference.affine)
        assert written.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(written.dataobj))) <= {0, LV}
    prediction = np.asanyarray(nib.load(tmp_path / "out" / f"{case}.nii.gz").dataobj)
    untrained_prediction = np.asanyarray(nib.load(tmp_path / "untrained_out" / f"{case}.nii.gz").dataobj)
    truth = label_array(acdc, case)
    trained_dice, untrained_dice = dice(prediction, truth, LV), dice(untrained_prediction, truth, LV)
    print(f"LV Dice on {case}: trained {trained_dice:.3f}, untrained {untrained_dice:.3f}")
    assert trained_dice > DICE_FLOOR > untrained_dice


def untrained_weights(checkpoint: dict[str, Any]) -> None:
    """Replace the network's weights by a fresh He initialisation (what training starts from)."""
    torch.manual_seed(0)
    network = build_model(plans_from_dict(checkpoint["viseg"]["plans"]), "2d", deep_supervision=False)
    checkpoint["state_dict"].update({f"network.{k}": v for k, v in network.state_dict().items()})


def test_an_ensemble_averages_its_members_probabilities(trained: Trained, acdc: Path, tmp_path: Path):
    inputs = input_folder(tmp_path, {f"{CASES[4]}_0000.nii.gz": image_file(acdc, CASES[4])})
    for name, model in (("a", trained.run_a), ("b", trained.run_b), ("both", trained.experiment)):
        assert predict(model, inputs, tmp_path / name, save_probabilities=True) == 0  # experiment: one variant
    a, b, both = (np.load(tmp_path / name / f"{CASES[4]}.npz") for name in ("a", "b", "both"))
    assert list(both["labels"]) == [0, LV]
    assert not np.allclose(a["probabilities"], b["probabilities"], atol=1e-2)  # two different members
    np.testing.assert_allclose(both["probabilities"], (a["probabilities"] + b["probabilities"]) / 2, atol=1e-5)
    written = np.asanyarray(nib.load(tmp_path / "both" / f"{CASES[4]}.nii.gz").dataobj)
    np.testing.assert_array_equal(written, both["labels"][both["probabilities"].argmax(0)])


def test_mirroring_gives_a_valid_prediction(trained: Trained, acdc: Path, tmp_path: Path):
    case = trained.training_case
    inputs = input_folder(tmp_path, {f"{case}_0000.nii.gz": image_file(acdc, case)})
    assert load_ensemble([trained.run_a], device="cpu").mirror_axes == (0, 1)  # training mirrored both axes
    assert predict(trained.run_a, inputs, tmp_path / "plain", save_probabilities=True) == 0
    assert predict(trained.run_a, inputs, tmp_path / "mirrored", save_probabilities=True, mirror=True) == 0
    plain, mirrored = (np.load(tmp_path / name / f"{case}.npz")["probabilities"] for name in ("plain", "mirrored"))
    assert mirrored.shape == plain.shape and not np.allclose(mirrored, plain)
    np.testing.assert_allclose(mirrored.sum(0), 1.0, atol=1e-5)
    mirrored_labels = np.asanyarray(nib.load(tmp_path / "mirrored" / f"{case}.nii.gz").dataobj)
    assert dice(mirrored_labels, label_array(acdc, case), LV) > DICE_FLOOR


def test_postprocessing_json_keeps_the_largest_component(trained: Trained, acdc: Path, tmp_path: Path):
    """Two hearts side by side: the raw prediction has (at least) two left ventricles, the postprocessed one
    only the larger."""
    source = nib.load(image_file(acdc, trained.training_case))
    doubled = np.concatenate([np.asanyarray(source.dataobj)] * 2, axis=0)
    nib.save(nib.Nifti1Image(doubled, source.affine), tmp_path / "twohearts_0000.nii.gz")
    inputs = input_folder(tmp_path, {"twohearts_0000.nii.gz": tmp_path / "twohearts_0000.nii.gz"})
    postprocessed_run = linked_run(trained.run_a, tmp_path / "postprocessed" / "fold_0")
    (postprocessed_run / "postprocessing.json").write_text(json.dumps({"largest_component_labels": [LV]}))

    assert predict(trained.run_a, inputs, tmp_path / "raw") == 0
    assert predict(postprocessed_run, inputs, tmp_path / "post") == 0

    raw, post = (np.asanyarray(nib.load(tmp_path / name / "twohearts.nii.gz").dataobj) for name in ("raw", "post"))
    assert components(raw, LV) >= 2 and components(post, LV) == 1
    np.testing.assert_array_equal(post, keep_largest_component(raw, [LV]))
    half = raw.shape[0] // 2  # the kept ventricle lies in one of the two hearts
    assert (post[:half] == LV).any() != (post[half:] == LV).any()


# -- errors ---------------------------------------------------------------------------------------------


def test_bad_cases_fail_alone_with_messages_naming_their_files(trained: Trained, acdc: Path, tmp_path: Path):
    good, other = image_file(acdc, CASES[0]), image_file(acdc, CASES[1])
    (tmp_path / "twochannels_0000.nii.gz").symlink_to(good)
    (tmp_path / "twochannels_0001.nii.gz").symlink_to(other)
    (tmp_path / "broken_0000.nii.gz").write_bytes(good.read_bytes()[:2000])  # truncated gzip stream
    files = [good, tmp_path / "twochannels_0000.nii.gz", tmp_path / "twochannels_0001.nii.gz",
             tmp_path / "broken_0000.nii.gz"]

    result = viseg_predict(f"model={trained.run_a}", f"input={','.join(map(str, files))}",
                           f"output={tmp_path / 'out'}", cwd=tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "2 of 3 case(s) failed" in result.stderr
    assert "twochannels_0001.nii.gz: channel 0001 does not exist, the model takes 1 channel(s)" in result.stderr
    assert f"{tmp_path / 'broken_0000.nii.gz'}" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{CASES[0]}.nii.gz"]


def test_model_errors_name_the_folder_and_the_fix(trained: Trained, acdc: Path, tmp_path: Path):
    no_best = linked_run(trained.run_b, tmp_path / "no_best" / "fold_1", skip=("checkpoints/best.ckpt",))
    result = viseg_predict(f"model={no_best}", f"input={image_file(acdc, CASES[0])}", f"output={tmp_path / 'out'}",
                           "checkpoint=best", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"run folder {no_best} has no checkpoints/best.ckpt (best weights)" in result.stderr
    assert "train it" in result.stderr and "checkpoint=final" in result.stderr

    unfinished = linked_run(trained.run_b, tmp_path / "unfinished" / "fold_1", skip=("finished.json",))
    result = viseg_predict(f"model={unfinished}", f"input={image_file(acdc, CASES[0])}",
                           f"output={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert f"run folder {unfinished} has not finished training" in result.stderr
    assert "checkpoint=last" in result.stderr
    last = viseg_predict(f"model={unfinished}", f"input={image_file(acdc, CASES[0])}",
                         f"output={tmp_path / 'out'}", "checkpoint=last", cwd=tmp_path)
    assert last.returncode == 0, last.stdout + last.stderr
    assert "last weights (latest epoch, finished or not: checkpoints/last.ckpt)" in last.stderr + last.stdout

    def other_patch(checkpoint: dict[str, Any]) -> None:
        checkpoint["viseg"]["plans"]["configurations"]["2d"]["patch_size"] = [32, 32]

    # another plan that predicts the same labels from the same channels: a second group, averaged in the
    # image's geometry
    other_plan = rewritten_checkpoint(trained.run_b, tmp_path / "other_plan" / "fold_1", other_patch)
    mixed = load_ensemble(resolve_model(f"{trained.run_a},{other_plan}").run_dirs, device="cpu")
    assert [g.run_dirs for g in mixed.groups] == [[trained.run_a], [other_plan]]
    assert [g.plans.configuration("2d").patch_size for g in mixed.groups] == [(64, 64), (32, 32)]

    def other_labels(checkpoint: dict[str, Any]) -> None:  # LV renamed: the same network, another meaning
        labels = checkpoint["viseg"]["plans"]["labels"]
        labels["left ventricle"] = labels.pop("LV")

    renamed = rewritten_checkpoint(trained.run_b, tmp_path / "other_labels" / "fold_1", other_labels)
    with pytest.raises(ConfigError, match=f"{trained.run_a} and {renamed} take different input channels or "
                                          r"predict different labels \(labels.LV: 3 vs None; labels.left "
                                          r"ventricle: None vs 3\)") as error:
        load_ensemble(resolve_model(f"{trained.run_a},{renamed}").run_dirs, device="cpu")
    assert "same label settings" in error.value.fix

    experiment = tmp_path / "experiment"
    shutil.copytree(trained.experiment, experiment, symlinks=True, ignore=lambda d, names: [
        n for n in names if n.endswith(".ckpt") or n == "tensorboard"])
    variant_dir = next(experiment.rglob(VARIANT))
    shutil.copytree(variant_dir, variant_dir.with_name("other"), symlinks=True)
    with pytest.raises(ConfigError, match="holds 2 variants: lv, other") as error:
        resolve_model(str(experiment))
    assert "variant=<name>" in str(error.value)
    assert resolve_model(str(experiment), "other").run_dirs == tuple(sorted((variant_dir.with_name("other")).iterdir()))
