"""Ensembles across configurations (nnU-Net's 2d + 3d_fullres ensembles) on tiny demo runs: prediction averages
the configurations in the image's geometry, runs that predict other labels are refused, and best= pairs the
best variant of each configuration.

One module fixture trains, on the demo data, fold 0 of three variants of a sweep-like experiment
(`<experiment>/runs/<dataset>/<plan>/<variant>/fold_0`): two of the 2d configuration and one of 3d_fullres,
1 epoch of 2 iterations each; and, outside it, a 3d_fullres run of the organ label only.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import compose_typed, tiny_run
from viseg.config import PredictConfig
from viseg.data.dataset import Case, ImageSource
from viseg.data.nifti import read_case
from viseg.errors import ConfigError
from viseg.inference.ensemble import load_ensemble, resolve_model
from viseg.inference.predict import InferenceOptions, ensemble_probabilities, predict_case
from viseg.predict import predict_command as run_predict
from viseg.sweep.best import Candidate, predict_command, render, select_best
from viseg.training.train import train

pytestmark = pytest.mark.slow

FLAT = ("model=plain_conv_unet_2d",)  # the 2d configuration


@dataclass
class Runs:
    experiment: Path
    flat: Path  # 2d, variant "flat"
    flat_slow: Path  # 2d, variant "flat_slow" (another learning rate)
    vol: Path  # 3d_fullres, variant "vol"
    organ: Path  # 3d_fullres, foreground_labels=[1], outside the experiment


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread: None) -> None:
    """Every test of this module with one torch thread (conftest.py says why)."""


@pytest.fixture(scope="module")
def runs(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    work = tmp_path_factory.mktemp("mixed")
    experiment = work / "experiment"

    def run(name: str, results: Path, *extra: str) -> Path:
        overrides = tiny_run(demo, work, f"paths.results={results}", f"name={name}", "fold=0",
                             "trainer.max_epochs=1", *extra)
        return train(compose_typed("anatomy_config", overrides), progress=False).run_dir

    return Runs(experiment, run("flat", experiment / "runs", *FLAT),
                run("flat_slow", experiment / "runs", *FLAT, "optimizer.lr=0.001"),
                run("vol", experiment / "runs"), run("organ", work / "other", "foreground_labels=[1]"))


def demo_case(demo: Path, index: int = 0) -> tuple[Path, np.ndarray, tuple[float, ...]]:
    image = sorted((demo / "imagesTr").glob("*_0000.nii.gz"))[index]
    arrays = read_case(Case(image.name.removesuffix("_0000.nii.gz"), (ImageSource(image),), None), with_label=False)
    return image, arrays.image, arrays.spacing


def test_a_2d_and_a_3d_run_average_their_probabilities_in_the_images_geometry(runs: Runs, demo: Path,
                                                                            tmp_path: Path, caplog):
    caplog.set_level("INFO")
    ensemble = load_ensemble([runs.flat, runs.vol], device="cpu")
    assert [g.configuration for g in ensemble.groups] == ["2d", "3d_fullres"]
    assert [g.run_dirs for g in ensemble.groups] == [[runs.flat], [runs.vol]] and not ensemble.groups[0].groups
    assert ensemble.run_dirs == [runs.flat, runs.vol] and len(ensemble.networks) == 2
    assert ensemble.configuration == "2d" and ensemble.previous is None  # the first group's
    assert "ensemble of 2 groups" in caplog.text and f"3d_fullres (1 run(s): {runs.vol})" in caplog.text
    image_file, image, spacing = demo_case(demo)
    options = InferenceOptions(mirror=False)

    both = predict_case(ensemble, image, spacing, options)
    singles = [predict_case(load_ensemble([run], device="cpu"), image, spacing, options)
               for run in (runs.flat, runs.vol)]

    assert both.shape == singles[0].shape == singles[1].shape == (4, *image.shape[1:])
    assert not np.allclose(singles[0], singles[1], atol=1e-2)  # two different members
    assert np.allclose(both, (singles[0] + singles[1]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match=r"2 groups \(2d, 3d_fullres\).*predict_case"):
        ensemble_probabilities(ensemble, image, options)

    # the command line: model= lists both runs, and the written probabilities are the same average
    output = tmp_path / "out"
    assert run_predict(PredictConfig(model=f"{runs.flat},{runs.vol}", input=str(image_file), output=str(output),
                                     mirror=False, device="cpu", save_probabilities=True), progress=False) == 0
    assert "2 groups averaged alike (2d + 3d_fullres)" in caplog.text
    written = np.load(output / f"{image_file.name.removesuffix('_0000.nii.gz')}.npz")["probabilities"]
    assert np.allclose(written, both.transpose(0, 3, 2, 1), atol=1e-6)


def test_runs_that_predict_other_labels_are_refused_naming_both_folders(runs: Runs):
    with pytest.raises(ConfigError, match=re.escape(f"{runs.vol} and {runs.organ} take different input channels "
                                                    "or predict different labels (foreground_labels: (1, 2, 3) "
                                                    "vs (1,)")) as raised:
        load_ensemble(resolve_model(f"{runs.vol},{runs.organ}").run_dirs, device="cpu")
    assert "same label settings" in raised.value.fix
    # the same refusal whatever the configurations: a 2d run and the organ-only 3d run
    with pytest.raises(ConfigError, match=re.escape(f"{runs.flat} and {runs.organ}")):
        load_ensemble([runs.flat, runs.organ], device="cpu")


def test_best_pairs_the_best_variant_of_each_configuration_and_its_command_predicts(runs: Runs, demo: Path,
                                                                                    tmp_path: Path):
    report = select_best(runs.experiment, mirror=False, progress=False)

    singles = [c for c in report["candidates"] if len(c["members"]) == 1]  # best first
    assert {c["name"]: c["configuration"] for c in singles} == {"flat": "2d", "flat_slow": "2d",
                                                                "vol": "3d_fullres"}
    best_2d = next(c for c in singles if c["configuration"] == "2d")
    ensembles = {frozenset(c["members"]): c for c in report["candidates"] if len(c["members"]) == 2}
    # the two best overall, and the best 2d with the (only) 3d_fullres variant; the same pair once
    assert set(ensembles) == {frozenset(c["name"] for c in singles[:2]), frozenset((best_2d["name"], "vol"))}
    assert len(report["candidates"]) == len(singles) + len(ensembles)
    cross = ensembles[frozenset((best_2d["name"], "vol"))]
    assert sorted(cross["configuration"].split("+")) == ["2d", "3d_fullres"]
    assert sorted(cross["run_dirs"]) == sorted([best_2d["run_dirs"][0], str(runs.vol)])
    assert cross["configuration"] in render(report)

    # the command that would deploy the cross-configuration ensemble lists every fold of both members, and runs
    candidate = Candidate(**cross)
    command = shlex.split(predict_command(runs.experiment, candidate, tmp_path / "post.json", "final"))
    model = next(a.removeprefix("model=") for a in command if a.startswith("model="))
    assert model.split(",") == cross["run_dirs"]
    (tmp_path / "post.json").write_text('{"largest_component_labels": []}')
    assert f"postprocessing={tmp_path / 'post.json'}" in command
    ensemble = load_ensemble(resolve_model(model).run_dirs, device="cpu")
    assert sorted(g.configuration for g in ensemble.groups) == ["2d", "3d_fullres"]
    image_file, _, _ = demo_case(demo, 1)
    status = run_predict(PredictConfig(model=model, postprocessing=str(tmp_path / "post.json"),
                                       input=str(image_file), output=str(tmp_path / "out"), mirror=False,
                                       device="cpu"), progress=False)
    assert status == 0 and (tmp_path / "out" / image_file.name.replace("_0000", "")).is_file()
