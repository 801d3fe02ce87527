"""3d_lowres end to end: selected by `configuration=`, planned, preprocessed at its own spacing, trained and
predicted back to the image's geometry.

nnU-Net searches a lowres stage only when the fullres patch covers under 25 % of the median image. The demo
images are small, so the plan is made for a tiny GPU memory target (2 MB) and a network 8x narrower than
nnU-Net's (base 4 features): the planned fullres patch is then small against the image, and the demo data
gets a lowres stage (about 4 x 2 x 2 mm for 3.9 x 1 x 1, patch 12 x 16 x 20) that a CPU trains in seconds.
A patch_size= override cannot make one here: with configuration=3d_lowres it sizes the lowres patch, and
3d_fullres, whose planned patch the search starts from, keeps its default one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import compose_typed, tiny_run
from viseg.data.dataset import Case, ImageSource
from viseg.data.nifti import CaseArrays, read_case
from viseg.errors import ConfigError
from viseg.evaluation.metrics import dice_per_label
from viseg.inference.ensemble import Ensemble, load_checkpoint, load_ensemble, network_state, run_config
from viseg.inference.export import revert_geometry
from viseg.inference.predict import predict_case
from viseg.planning.network import build_model
from viseg.planning.plans import plans_from_dict
from viseg.preprocessing.prepare import configuration_name, prepare
from viseg.preprocessing.preprocess import load_case, preprocess_case, preprocessed_dir
from viseg.training.train import train

# what gives the demo data a 3d_lowres stage (see the module docstring)
LOWRES_PLAN = ("plan.gpu_memory_gb=0.002", "plan.base_num_features=4")


def _lowres(demo: Path, work: Path, *extra: str) -> list[str]:
    return tiny_run(demo, work, "configuration=3d_lowres", *LOWRES_PLAN, *extra)


# -- selecting it (composition only: fast) -------------------------------------------------------------------
def test_configuration_defaults_to_the_models_own():
    assert configuration_name(compose_typed("anatomy_config", [])) == "3d_fullres"
    assert configuration_name(compose_typed("anatomy_config", ["model=plain_conv_unet_2d"])) == "2d"
    assert configuration_name(compose_typed("anatomy_config", ["configuration=3d_lowres"])) == "3d_lowres"


@pytest.mark.parametrize(("overrides", "message", "fix"), [
    (["configuration=3d_full"], "not a configuration", "3d_lowres"),
    (["previous_stage=/tmp/lowres"], "is the input of a cascade", "configuration=3d_cascade_fullres"),
    (["configuration=2d"], "model is 3D", "model=plain_conv_unet_2d"),
    (["configuration=3d_lowres", "model=plain_conv_unet_2d"], "model is 2D", "model=plain_conv_unet_3d"),
])
def test_configuration_is_checked_at_composition(overrides: list[str], message: str, fix: str):
    with pytest.raises(ConfigError, match=message) as raised:
        compose_typed("anatomy_config", overrides)
    assert fix in raised.value.fix


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: the demo data is verified and fingerprinted once."""
    return tmp_path_factory.mktemp("lowres")


def test_lowres_on_data_without_a_stage_is_refused_at_planning(demo: Path, work: Path):
    with pytest.raises(ConfigError, match=r"no 3d_lowres stage.*already covers") as raised:
        prepare(compose_typed("anatomy_config", tiny_run(demo, work, "configuration=3d_lowres")), progress=False)
    assert "configuration=3d_fullres" in raised.value.fix


# -- plan, preprocess, train, predict ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lowres_run(demo: Path, work: Path) -> tuple[Path, Path]:
    """(run folder, work folder) of one 3d_lowres epoch of 2 iterations."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared with other jobs: one thread is the faster (test_predict.py)
    try:
        result = train(compose_typed("anatomy_config", _lowres(demo, work, "trainer.max_epochs=1")), progress=False)
    finally:
        torch.set_num_threads(threads)
    return result.run_dir, work


@pytest.mark.slow
def test_lowres_is_planned_and_preprocessed_at_its_own_spacing(demo: Path, lowres_run: tuple[Path, Path]):
    run_dir, work = lowres_run
    prepared = prepare(compose_typed("anatomy_config", _lowres(demo, work)), progress=False)
    plans = prepared.plans
    lowres, fullres = plans.configuration("3d_lowres"), plans.configuration("3d_fullres")
    assert prepared.configuration == "3d_lowres" and "-3d_lowres-" in prepared.plans_dir.name
    assert all(lo > full for lo, full in zip(lowres.spacing, fullres.spacing))
    assert lowres.next_stage == "3d_cascade_fullres" and not lowres.batch_dice and fullres.batch_dice
    folder = preprocessed_dir(prepared)
    assert folder.name.startswith("3d_lowres-")
    case_id = prepared.splits[0]["train"][0]
    data, _, properties, _ = load_case(folder, case_id)
    assert properties.spacing_after_resampling == list(lowres.spacing)
    assert list(data.shape[1:]) == properties.shape_after_resampling
    # the run trained the lowres plan, in its own plan folder: its resolved config says so
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.configuration == "3d_lowres" and list(saved.patch_size) == list(lowres.patch_size)
    assert "-3d_lowres-" in run_dir.parents[1].name
    assert (run_dir / "finished.json").is_file() and (run_dir / "validation" / "summary.json").is_file()


@pytest.mark.slow
def test_a_lowres_run_predicts_in_the_images_geometry(demo: Path, lowres_run: tuple[Path, Path]):
    """The run's network predicts a whole case in its own geometry; and a one-hot of the case's label,
    taken down to the lowres grid and back the way predictions go, lands on the label (a misplaced,
    mistransposed or misscaled revert would not: only the coarser grid's blur is lost)."""
    run_dir, _ = lowres_run
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    cfg = run_config(checkpoint, run_dir)
    configuration, plans = configuration_name(cfg), plans_from_dict(checkpoint["viseg"]["plans"])
    network = build_model(plans, configuration, deep_supervision=False)
    network.load_state_dict(network_state(checkpoint))
    # built here, not by load_ensemble: see test_predict_loads_a_lowres_run_as_lowres
    ensemble = Ensemble(run_dirs=[run_dir], networks=[network.eval()], plans=plans, configuration=configuration,
                        mirror_axes=(), device=torch.device("cpu"), pathfinder="nnunet", file_ending=".nii.gz")
    arrays = _case(demo, 0)
    probabilities = predict_case(ensemble, arrays.image, arrays.spacing)
    assert probabilities.shape == (plans.num_classes, *arrays.image.shape[1:])
    assert np.allclose(probabilities.sum(0), 1, atol=1e-3)

    _, seg, properties = preprocess_case(arrays.image, arrays.label, arrays.spacing, plans, configuration)
    assert properties.shape_after_resampling != properties.shape_after_crop  # the lowres grid is coarser
    one_hot = np.moveaxis(np.eye(plans.num_classes, dtype=np.float32)[np.clip(seg[0], 0, None)], -1, 0)
    reverted = revert_geometry(one_hot, properties, plans, configuration).argmax(0)
    assert reverted.shape == arrays.label.shape
    dice = dice_per_label(reverted, arrays.label, [1])  # the organ: the largest structure
    assert dice["1"] > 0.9, dice  # measured 0.96


@pytest.mark.slow
def test_predict_loads_a_lowres_run_as_lowres(lowres_run: tuple[Path, Path]):
    run_dir, _ = lowres_run
    assert load_ensemble([run_dir], checkpoint="last", device="cpu").configuration == "3d_lowres"


def _case(demo: Path, index: int) -> CaseArrays:
    image = sorted((demo / "imagesTr").glob("*_0000.nii.gz"))[index]
    case_id = image.name.removesuffix("_0000.nii.gz")
    return read_case(Case(case_id, (ImageSource(image),), demo / "labelsTr" / f"{case_id}.nii.gz"))
