"""What viseg takes from an nnU-Net v2 model folder, and what it refuses: anything it would not reproduce
exactly is an error that names the trainer, configuration, class or key; a checkpoint is data only."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from tests.nnunet_models import REFERENCE_PLANS, SHARED, write_nnunet_model
from viseg.errors import ConfigError
from viseg.inference.nnunet_model import TRAINERS, read_fold
from viseg.planning.nnunet_plans import plans_from_nnunet

DATASET_JSON = json.loads((SHARED / "data" / "acdc" / "dataset.json").read_text())


def tiny_plans() -> dict:
    """nnU-Net's ACDC plans, its 2d network made small enough to save in milliseconds."""
    plans = json.loads(REFERENCE_PLANS.read_text())
    plans["configurations"]["2d"]["patch_size"] = [32, 32]
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"].update(
        n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]],
        n_conv_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2])
    return plans


def refusal(plans: dict, configuration: str = "2d", dataset_json: dict | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        plans_from_nnunet(plans, dataset_json or DATASET_JSON, configuration, "model")
    return error.value


def test_the_reference_plans_translate_to_the_values_nnunet_planned():
    plans = json.loads(REFERENCE_PLANS.read_text())
    fullres = plans_from_nnunet(plans, DATASET_JSON, "3d_fullres", "model").configuration("3d_fullres")
    reference = plans["configurations"]["3d_fullres"]
    assert list(fullres.patch_size) == reference["patch_size"] and fullres.batch_size == reference["batch_size"]
    assert [list(s) for s in fullres.network.strides] == reference["architecture"]["arch_kwargs"]["strides"]
    assert fullres.network.architecture == "PlainConvUNet" and fullres.batch_dice == reference["batch_dice"]


def test_a_configuration_inherits_as_in_nnunets_plans_manager():
    plans = tiny_plans()
    plans["configurations"]["2d_bs4"] = {"inherits_from": "2d", "batch_size": 4}
    translated = plans_from_nnunet(plans, DATASET_JSON, "2d_bs4", "model")
    assert translated.configuration("2d").batch_size == 4
    assert translated.configuration("2d").patch_size == (32, 32)


def test_cascade_stages_other_networks_and_other_settings_are_refused_by_name():
    assert "3d_lowres" in refusal(tiny_plans(), "3d_lowres").message
    cascade = tiny_plans()
    cascade["configurations"]["3d_cascade"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    assert "cascade" in refusal(cascade, "3d_cascade").message
    primus = tiny_plans()
    primus["configurations"]["2d"]["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.primus.Primus"
    assert "dynamic_network_architectures.architectures.primus.Primus" in refusal(primus).message
    dropout = tiny_plans()
    dropout["configurations"]["2d"]["architecture"]["arch_kwargs"]["dropout_op"] = "torch.nn.Dropout2d"
    assert "arch_kwargs.dropout_op" in refusal(dropout).message
    nibabel = tiny_plans()
    nibabel["image_reader_writer"] = "NibabelIO"
    assert "NibabelIO" in refusal(nibabel).message
    regions = copy.deepcopy(DATASET_JSON)
    regions["labels"] = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
    regions["regions_class_order"] = [1, 2, 3]
    assert "region" in refusal(tiny_plans(), dataset_json=regions).message
    norm = tiny_plans()
    norm["configurations"]["2d"]["normalization_schemes"] = ["MyNormalization"]
    assert "MyNormalization" in refusal(norm).message


def test_a_custom_trainer_is_refused_naming_it(tmp_path: Path):
    model = write_nnunet_model(tmp_path, tiny_plans(), DATASET_JSON, "2d", trainer="nnUNetTrainerDA5")
    with pytest.raises(ConfigError) as error:
        read_fold(model / "fold_0")
    assert "nnUNetTrainerDA5" in error.value.message and "nnUNetTrainer_<N>epochs" in error.value.fix


def test_mirror_axes_outside_the_patch_are_refused(tmp_path: Path):
    model = write_nnunet_model(tmp_path, tiny_plans(), DATASET_JSON, "2d", mirror_axes=(0, 1, 2))
    with pytest.raises(ConfigError) as error:
        read_fold(model / "fold_0")
    assert "inference_allowed_mirroring_axes" in error.value.message


def test_nnunets_own_training_length_variants_load_with_their_mirroring(tmp_path: Path):
    assert "nnUNetTrainer_1epoch" in TRAINERS and "nnUNetTrainer_250epochs_NoMirroring" in TRAINERS
    model = write_nnunet_model(tmp_path, tiny_plans(), DATASET_JSON, "2d",
                               trainer="nnUNetTrainer_250epochs_NoMirroring",
                               extra={"inference_allowed_mirroring_axes": None})  # as NoMirroring saves it
    fold = read_fold(model / "fold_0")
    assert fold.mirror_axes == () and fold.configuration == "2d" and fold.plans.foreground_labels == (1, 2, 3)
    assert fold.weights and all(hasattr(v, "shape") for v in fold.weights.values())


class _RunsCode:
    """Unpickling this would run a shell command: what a checkpoint from a shared folder must never do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_naming_the_global(tmp_path: Path):
    marker = tmp_path / "ran"
    model = write_nnunet_model(tmp_path, tiny_plans(), DATASET_JSON, "2d", extra={"hook": _RunsCode(marker)})
    with pytest.raises(ConfigError) as error:
        read_fold(model / "fold_0")
    named = error.value.message.split(" besides ")[0]  # the globals it would need, allowlisted ones left out
    assert named.endswith(".system") and "numpy" not in named and not marker.exists()


def test_a_residual_encoder_model_loads_into_the_network_viseg_builds(tmp_path: Path):
    """nnU-Net's ResEnc presets (nnUNetResEncUNet{M,L,XL}Plans) plan ResidualEncoderUNet with n_blocks_per_stage."""
    from viseg.inference.ensemble import load_ensemble

    plans = tiny_plans()
    arch = plans["configurations"]["2d"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    arch["arch_kwargs"].pop("n_conv_per_stage")
    arch["arch_kwargs"].update(n_blocks_per_stage=[1, 2, 2], n_conv_per_stage_decoder=[1, 1])
    model = write_nnunet_model(tmp_path, plans, DATASET_JSON, "2d", mirror_axes=(0, 1))
    ensemble = load_ensemble([model / "fold_0"], device="cpu")  # a strict load_state_dict
    assert ensemble.plans.configuration("2d").network.n_conv_per_stage == (1, 2, 2)
    assert type(ensemble.networks[0]).__name__ == "ResidualEncoderUNet" and ensemble.mirror_axes == (0, 1)
