"""nnU-Net's cascade end to end on tiny data: 3d_lowres on two folds, their predictions of each fold's cases as
next-stage inputs, 3d_cascade_fullres trained on them, and a folder predicted through both stages.

The demo data gets a lowres stage under test_lowres.py's tiny plan (2 MB GPU target, base 4 features).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import compose_typed, tiny_run
from viseg.config import PredictConfig
from viseg.data.dataset import Case, ImageSource
from viseg.data.nifti import read_case
from viseg.errors import ConfigError
from viseg.inference.ensemble import load_ensemble
from viseg.inference.predict import predict_case, segment
from viseg.io.layout import PREVIOUS_STAGE_DIR
from viseg.predict import predict_command
from viseg.preprocessing.prepare import prepare
from viseg.preprocessing.preprocess import load_arrays, preprocess_case, preprocessed_dir
from viseg.preprocessing.previous_stage import load_previous, next_stage_dir, one_hot_previous
from viseg.training.train import train

LOWRES_PLAN = ("plan.gpu_memory_gb=0.002", "plan.base_num_features=4")
FOLDS = (0, 1)
CASCADE = "3d_cascade_fullres"


def _overrides(demo: Path, work: Path, configuration: str, *extra: str) -> list[str]:
    return tiny_run(demo, work, f"configuration={configuration}", *LOWRES_PLAN, "trainer.max_epochs=1",
                    "splits.n_folds=2", *extra)


@pytest.fixture(scope="module")
def cascade(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, Path]]:
    """Run folders by stage and fold: lowres on folds 0 and 1, then the cascade of each fold on its lowres."""
    work = tmp_path_factory.mktemp("cascade")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs: dict[str, dict[int, Path]] = {"3d_lowres": {}, CASCADE: {}}
    try:
        for fold in FOLDS:
            cfg = compose_typed("anatomy_config", _overrides(demo, work, "3d_lowres", f"fold={fold}", "name=low"))
            runs["3d_lowres"][fold] = train(cfg, progress=False).run_dir
        lowres_variant = runs["3d_lowres"][0].parent  # …/low/: the cascade finds fold_<k> in it
        for fold in FOLDS:
            cfg = compose_typed("anatomy_config", _overrides(demo, work, CASCADE, f"fold={fold}", "name=cascade",
                                                             f"previous_stage={lowres_variant}"))
            runs[CASCADE][fold] = train(cfg, progress=False).run_dir
    finally:
        torch.set_num_threads(threads)
    runs["work"] = {0: work}
    return runs


def _cascade_prepared(demo: Path, work: Path):
    return prepare(compose_typed("anatomy_config", _overrides(demo, work, CASCADE)), progress=False)


@pytest.mark.slow
def test_next_stage_inputs_are_each_folds_lowres_predictions_on_the_fullres_grid(demo: Path, cascade):
    prepared = _cascade_prepared(demo, cascade["work"][0])
    plan = prepared.plans.configuration(CASCADE)
    assert plan.previous_stage == "3d_lowres" and plan.inherits_from == "3d_fullres"
    fullres = preprocessed_dir(prepared)
    assert fullres.name.startswith("3d_fullres-")  # the cascade trains on 3d_fullres's arrays: no second copy
    for fold in FOLDS:
        lowres_run = cascade["3d_lowres"][fold]
        folder = next_stage_dir(lowres_run, CASCADE)
        split = prepared.splits[fold]
        cases = sorted([*split["train"], *split["val"]])
        assert sorted(p.stem for p in folder.glob("*.npy")) == cases
        for case_id in cases:
            shape = load_arrays(fullres, case_id)[0].shape[1:]
            labels = load_previous(folder, case_id, shape)  # raises if not on the fullres grid
            assert set(np.unique(labels)) <= {0, *prepared.plans.foreground_labels}
        # the cascade run keeps the lowres run it trained on, so that it predicts alone
        adopted = cascade[CASCADE][fold] / PREVIOUS_STAGE_DIR
        assert (adopted / "finished.json").is_file() and (adopted / "checkpoints" / "last.ckpt").is_file()
        assert (adopted / "checkpoints" / "last.ckpt").read_bytes() == \
            (lowres_run / "checkpoints" / "last.ckpt").read_bytes()


@pytest.mark.slow
def test_the_cascade_network_sees_the_lowres_prediction_as_input(demo: Path, cascade):
    """Its first convolution takes image + one channel per foreground label, and at prediction those channels
    are exactly the one-hot lowres prediction of the case, preprocessed like a label map."""
    run_dir = cascade[CASCADE][0]
    ensemble = load_ensemble([run_dir], device="cpu")
    plans = ensemble.plans
    assert ensemble.configuration == CASCADE and ensemble.previous is not None
    assert ensemble.previous.configuration == "3d_lowres"
    k = len(plans.foreground_labels)
    first_conv = next(m for m in ensemble.networks[0].modules() if isinstance(m, torch.nn.Conv3d))
    assert first_conv.in_channels == plans.num_channels + k

    image_path = sorted((demo / "imagesTr").glob("*_0000.nii.gz"))[0]
    case_id = image_path.name.removesuffix("_0000.nii.gz")
    arrays = read_case(Case(case_id, (ImageSource(image_path),), None), with_label=False)
    seen: list[torch.Tensor] = []
    hook = ensemble.networks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        predict_case(ensemble, arrays.image, arrays.spacing)
    finally:
        hook.remove()
    lowres = ensemble.previous
    lowres_labels = segment(predict_case(lowres, arrays.image, arrays.spacing), lowres.label_values)
    _, previous_seg, _ = preprocess_case(arrays.image, lowres_labels, arrays.spacing, plans, CASCADE)
    expected = one_hot_previous(previous_seg[0], plans.foreground_labels)
    assert expected.sum() > 0  # the lowres model predicts some foreground: the check below is not vacuous
    windows = torch.cat(seen)  # every window (and its mirrors) the cascade network saw
    assert windows.shape[1] == plans.num_channels + k
    extra = windows[:, plans.num_channels:]
    assert set(torch.unique(extra).tolist()) <= {0.0, 1.0} and extra.sum(1).max() <= 1
    # the windows cover the case: together they hold exactly as many foreground voxels per channel as the
    # one-hot prediction (or more, where windows overlap), and none where it has none
    assert all(extra[:, c].sum() >= expected[c].sum() for c in range(k))
    assert all((extra[:, c].sum() == 0) == (expected[c].sum() == 0) for c in range(k))


@pytest.mark.slow
def test_a_folder_is_predicted_through_both_stages_in_the_images_geometry(demo: Path, cascade, tmp_path: Path):
    images = sorted((demo / "imagesTr").glob("*_0000.nii.gz"))[:2]
    output = tmp_path / "out"
    model = ",".join(str(cascade[CASCADE][fold]) for fold in FOLDS)
    status = predict_command(PredictConfig(model=model, input=",".join(map(str, images)), output=str(output),
                                           device="cpu"), progress=False)
    assert status == 0
    for image in images:
        written = nib.load(output / image.name.replace("_0000", ""))
        source = nib.load(image)
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3}


@pytest.mark.slow
def test_a_cascade_without_its_lowres_run_is_refused_before_any_run_folder(demo: Path, cascade, tmp_path: Path):
    work = cascade["work"][0]
    cfg = compose_typed("anatomy_config", _overrides(demo, work, CASCADE, "name=orphan"))
    with pytest.raises(ConfigError, match="previous_stage= names none") as raised:
        train(cfg, progress=False)
    assert "configuration=3d_lowres fold=0" in raised.value.fix
    assert not list((work / "results").rglob("orphan"))
    # a lowres run of another fold split is refused: its validation cases would not be out-of-fold
    wrong = compose_typed("anatomy_config", _overrides(demo, work, CASCADE, "name=wrong", "splits.n_folds=3",
                                                       f"previous_stage={cascade['3d_lowres'][0]}"))
    with pytest.raises(ConfigError, match="other cases than this cascade"):
        train(wrong, progress=False)


@pytest.mark.slow
def test_a_cascade_model_zip_carries_its_lowres_stage(demo: Path, cascade, tmp_path: Path):
    from viseg.export_model import export
    from viseg.inference.ensemble import resolve_model

    archive = tmp_path / "cascade.zip"
    export(str(cascade[CASCADE][0]), archive)
    (unpacked,) = resolve_model(str(archive)).run_dirs
    ensemble = load_ensemble([unpacked], device="cpu")
    assert ensemble.previous is not None and ensemble.previous.run_dirs == [unpacked / PREVIOUS_STAGE_DIR]
    arrays = read_case(Case("c", (ImageSource(sorted((demo / "imagesTr").glob("*_0000.nii.gz"))[0]),), None),
                       with_label=False)
    original = load_ensemble([cascade[CASCADE][0]], device="cpu")
    assert np.allclose(predict_case(ensemble, arrays.image, arrays.spacing),
                       predict_case(original, arrays.image, arrays.spacing), atol=1e-5)
