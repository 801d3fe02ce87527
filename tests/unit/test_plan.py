"""The planner: nnU-Net parity from nnU-Net's own fingerprints, and how overrides are applied."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tests.parity import configuration_differences, fingerprint_from_files, fingerprint_from_reference, load_json
from viseg.config import CONFIGURATION_NAMES
from viseg.errors import ConfigError
from viseg.plan import render_plan
from viseg.planning.architectures import get_architecture
from viseg.planning.fingerprint import Fingerprint
from viseg.planning.planner import (
    CONFIGURATIONS,
    ConfigurationInputs,
    PlannerSettings,
    get_pool_and_conv_props,
    lowres_stage_inputs,
    make_plans,
    plan_configuration,
)
from viseg.planning.plans import Plans, plans_from_dict

REFERENCES = ["acdc", "synth_aniso", "synth_iso"]
# nnU-Net's plans for synthetic fingerprints of large images (bench/make_lowres_plan_references.py): two that
# get a 3d_lowres stage (one isotropic, one whose search coarsens only the in-plane axes) and one whose
# lowres search runs but ends in nnU-Net dropping the stage.
LOWRES_DATA = Path(__file__).resolve().parents[1] / "data" / "nnunet_lowres"
LOWRES_REFERENCES = ["ct_large", "mr_aniso_large", "ct_drop"]


@pytest.fixture(scope="module")
def plans_by_reference(shared: Path) -> dict[str, tuple[Plans, dict]]:
    result = {}
    for name in REFERENCES:
        plans = make_plans(fingerprint_from_reference(shared, name), PlannerSettings())
        result[name] = (plans, load_json(shared / "reference" / name / "nnUNetPlans.json"))
    return result


@pytest.mark.parametrize("name", REFERENCES)
@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_plan_matches_nnunet(plans_by_reference, name: str, configuration: str):
    plans, reference = plans_by_reference[name]
    diffs = configuration_differences(plans.configuration(configuration),
                                      reference["configurations"][configuration])
    assert diffs == {}


@pytest.mark.parametrize("name", REFERENCES)
def test_transpose_and_medians_match_nnunet(plans_by_reference, name: str):
    plans, reference = plans_by_reference[name]
    assert list(plans.transpose_forward) == reference["transpose_forward"]
    assert list(plans.transpose_backward) == reference["transpose_backward"]
    assert np.allclose(plans.original_median_spacing_after_transp, reference["original_median_spacing_after_transp"])
    assert list(plans.original_median_shape_after_transp) == reference["original_median_shape_after_transp"]


def test_plans_round_trip_through_json(plans_by_reference, tmp_path: Path):
    plans, _ = plans_by_reference["acdc"]
    plans.save(tmp_path / "plans.json")
    assert Plans.load(tmp_path / "plans.json") == plans


def test_old_schema_is_refused(plans_by_reference, tmp_path: Path):
    plans, _ = plans_by_reference["acdc"]
    data = plans.to_dict() | {"schema_version": 0}
    (tmp_path / "plans.json").write_text(__import__("json").dumps(data))
    with pytest.raises(ConfigError, match="schema_version"):
        Plans.load(tmp_path / "plans.json")


def test_plans_without_cascade_links_still_load(plans_by_reference):
    """plans.json files written before previous_stage/next_stage existed load with both unset."""
    plans, _ = plans_by_reference["acdc"]
    data = plans.to_dict()
    for configuration in data["configurations"].values():
        del configuration["previous_stage"], configuration["next_stage"]
    loaded = plans_from_dict(data)
    assert loaded == plans
    assert all(c.previous_stage is None and c.next_stage is None for c in loaded.configurations.values())


def test_the_config_schema_names_the_planners_configurations():
    assert CONFIGURATION_NAMES == CONFIGURATIONS


def _acdc(shared: Path, **settings) -> Plans:
    return make_plans(fingerprint_from_reference(shared, "acdc"), PlannerSettings(**settings))


def _divisible(plan) -> bool:
    divisor = np.prod(np.array(plan.network.strides), axis=0)
    return all(p % d == 0 for p, d in zip(plan.patch_size, divisor))


@pytest.mark.parametrize("requested", [(10, 250, 230), (8, 100, 100), (12, 129, 97), (5, 64, 64)])
def test_patch_size_override_snaps_to_closest_valid(shared: Path, requested):
    plan = _acdc(shared, patch_size=requested).configuration("3d_fullres")
    assert _divisible(plan)
    divisor = np.prod(np.array(plan.network.strides), axis=0)
    assert all(abs(p - r) <= d / 2 + 1e-9 or p == d for p, r, d in zip(plan.patch_size, requested, divisor))
    # the topology is the one nnU-Net's rules derive for the snapped patch
    strides, kernels, patch, _ = get_pool_and_conv_props(plan.spacing, plan.patch_size, 4)
    assert strides == plan.network.strides and kernels == plan.network.kernel_sizes
    assert tuple(patch) == plan.patch_size


def test_patch_size_override_only_touches_the_trained_configuration(shared: Path):
    default, overridden = _acdc(shared), _acdc(shared, patch_size=(8, 96, 96))
    assert overridden.configuration("3d_fullres").patch_size == (8, 96, 96)
    assert overridden.configuration("3d_fullres").batch_size > default.configuration("3d_fullres").batch_size
    assert overridden.configuration("2d") == default.configuration("2d")


def test_patch_size_with_wrong_dimensionality_is_an_error(shared: Path):
    with pytest.raises(ConfigError, match="needs 3"):
        _acdc(shared, patch_size=(128, 128))


def test_batch_size_override(shared: Path):
    assert _acdc(shared, batch_size=3).configuration("3d_fullres").batch_size == 3


def test_spacing_override_changes_target_and_topology(shared: Path):
    plan = _acdc(shared, spacing=(5.0, 1.5625, 1.5625)).configuration("3d_fullres")
    assert plan.spacing == (5.0, 1.5625, 1.5625)
    assert plan.median_image_size_in_voxels[0] == pytest.approx(2 * 9, abs=2)
    assert _divisible(plan)


def test_transpose_override_updates_backward(shared: Path):
    plans = _acdc(shared, transpose_forward=(2, 0, 1))
    assert plans.transpose_forward == (2, 0, 1) and plans.transpose_backward == (1, 2, 0)
    assert plans.configuration("3d_fullres").spacing == (1.5625, 10.0, 1.5625)


def test_foreground_labels_restrict_classes(shared: Path):
    plans = _acdc(shared, foreground_labels=(3,))
    assert plans.foreground_labels == (3,) and plans.num_classes == 2
    with pytest.raises(ConfigError, match=r"\[7\]"):
        _acdc(shared, foreground_labels=(7,))


def test_larger_gpu_target_gives_larger_patches_or_batches(shared: Path):
    small = make_plans(fingerprint_from_reference(shared, "synth_iso"), PlannerSettings())
    large = make_plans(fingerprint_from_reference(shared, "synth_iso"), PlannerSettings(gpu_memory_gb=24))
    s, b = small.configuration("3d_fullres"), large.configuration("3d_fullres")
    assert np.prod(b.patch_size) * b.batch_size > np.prod(s.patch_size) * s.batch_size
    assert large.planner["gpu_memory_gb"] == 24


def test_residual_encoder_plan_uses_resenc_blocks(shared: Path):
    plan = _acdc(shared, architecture="ResidualEncoderUNet").configuration("3d_fullres")
    assert plan.network.architecture == "ResidualEncoderUNet"
    assert plan.network.n_conv_per_stage == (1, 3, 4, 6, 6, 6)[: plan.network.n_stages]
    assert set(plan.network.n_conv_per_stage_decoder) == {1}
    assert _divisible(plan)


def test_planning_is_pure(shared: Path):
    fingerprint = fingerprint_from_reference(shared, "synth_aniso")
    before = dataclasses.asdict(fingerprint)
    assert make_plans(fingerprint, PlannerSettings()) == make_plans(fingerprint, PlannerSettings())
    assert dataclasses.asdict(fingerprint) == before


# -- 3d_lowres: the stage and the batch dice of 3d_fullres ---------------------------------------------------
def _lowres_fingerprint(name: str) -> Fingerprint:
    return fingerprint_from_files(name, LOWRES_DATA / name / "dataset_fingerprint.json",
                                  LOWRES_DATA / name / "dataset.json")


def _lowres_reference(name: str) -> tuple[Plans, dict]:
    return (make_plans(_lowres_fingerprint(name), PlannerSettings()),
            load_json(LOWRES_DATA / name / "nnUNetPlans.json"))


@pytest.fixture(scope="module")
def lowres_plans() -> dict[str, tuple[Plans, dict]]:
    return {name: _lowres_reference(name) for name in LOWRES_REFERENCES}


@pytest.mark.parametrize("name", LOWRES_REFERENCES)
@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_plan_matches_nnunet_on_large_images(lowres_plans, name: str, configuration: str):
    plans, reference = lowres_plans[name]
    assert list(plans.transpose_forward) == reference["transpose_forward"]
    assert configuration_differences(plans.configuration(configuration),
                                     reference["configurations"][configuration]) == {}


def test_fullres_batch_dice_exactly_when_nnunet_has_a_lowres_stage(lowres_plans, plans_by_reference):
    every = lowres_plans | plans_by_reference
    has_lowres = {name: "3d_lowres" in reference["configurations"] for name, (_, reference) in every.items()}
    # the references cover both branches of nnU-Net's rule (and a search that ends in a drop: ct_drop)
    assert has_lowres == {"ct_large": True, "mr_aniso_large": True, "ct_drop": False,
                          "acdc": False, "synth_aniso": False, "synth_iso": False}
    for name, (plans, reference) in every.items():
        assert plans.configuration("3d_fullres").batch_dice is has_lowres[name], name
        assert reference["configurations"]["3d_fullres"]["batch_dice"] is has_lowres[name], name
        assert plans.configuration("2d").batch_dice is True
        assert set(plans.configurations) == set(reference["configurations"]), name


@pytest.mark.parametrize("name", ["ct_large", "mr_aniso_large"])
def test_cascade_stage_is_nnunets(lowres_plans, name: str):
    """nnU-Net's 3d_cascade_fullres: inherits 3d_fullres (its plan and data), previous_stage 3d_lowres, and one
    more input channel per foreground label."""
    plans, reference = lowres_plans[name]
    theirs = reference["configurations"]["3d_cascade_fullres"]
    cascade, fullres = plans.configuration("3d_cascade_fullres"), plans.configuration("3d_fullres")
    assert (cascade.inherits_from, cascade.previous_stage) == (theirs["inherits_from"], theirs["previous_stage"])
    assert cascade.data_configuration == "3d_fullres" and cascade.next_stage is None
    assert configuration_differences(cascade, reference["configurations"]["3d_fullres"]) == {}
    assert dataclasses.replace(cascade, name="3d_fullres", inherits_from=None, previous_stage=None) == fullres
    assert plans.input_channels("3d_cascade_fullres") == plans.num_channels + len(plans.foreground_labels)
    assert plans.input_channels("3d_fullres") == plans.num_channels


@pytest.mark.parametrize("name", ["ct_large", "mr_aniso_large"])
def test_lowres_stage_matches_nnunet(lowres_plans, name: str):
    plans, reference = lowres_plans[name]
    ours, theirs = plans.configuration("3d_lowres"), reference["configurations"]["3d_lowres"]
    assert configuration_differences(ours, theirs) == {}  # spacing, patch, batch, dice, topology, normalisation
    assert list(ours.median_image_size_in_voxels) == theirs["median_image_size_in_voxels"]
    assert ours.batch_dice is False and plans.configuration("3d_fullres").batch_dice is True
    assert ours.next_stage == theirs["next_stage"] == "3d_cascade_fullres" and ours.previous_stage is None
    assert reference["configurations"]["3d_cascade_fullres"]["previous_stage"] == "3d_lowres"
    assert plans.configuration("3d_fullres").next_stage is None


def test_a_dropped_lowres_stage_is_absent_in_both(lowres_plans):
    plans, reference = lowres_plans["ct_drop"]
    assert "3d_lowres" not in plans.configurations and "3d_lowres" not in reference["configurations"]
    assert "3d_cascade_fullres" not in reference["configurations"]
    assert "3d_cascade_fullres" not in plans.configurations
    with pytest.raises(ConfigError, match="configuration=3d_cascade_fullres: this dataset gets no 3d_lowres"):
        make_plans(_lowres_fingerprint("ct_drop"), PlannerSettings(configuration="3d_cascade_fullres"))


def test_lowres_plans_round_trip_through_json(lowres_plans, tmp_path: Path):
    plans, _ = lowres_plans["ct_large"]
    plans.save(tmp_path / "plans.json")
    assert Plans.load(tmp_path / "plans.json") == plans


def test_lowres_overrides_apply_to_lowres_only(lowres_plans):
    default, _ = lowres_plans["ct_large"]
    plans = make_plans(_lowres_fingerprint("ct_large"),
                       PlannerSettings(configuration="3d_lowres", patch_size=(96, 96, 96), batch_size=3))
    lowres = plans.configuration("3d_lowres")
    assert lowres.patch_size == (96, 96, 96) and lowres.batch_size == 3
    # same stage (the search started from the default fullres patch), only the patch and batch differ
    assert lowres.spacing == default.configuration("3d_lowres").spacing
    assert lowres.median_image_size_in_voxels == default.configuration("3d_lowres").median_image_size_in_voxels
    assert lowres.patch_size != default.configuration("3d_lowres").patch_size
    assert plans.configuration("3d_fullres") == default.configuration("3d_fullres")
    assert plans.configuration("2d") == default.configuration("2d")


def test_a_fullres_patch_override_leaves_lowres_at_its_default_patch(lowres_plans):
    default, _ = lowres_plans["ct_large"]
    plans = make_plans(_lowres_fingerprint("ct_large"), PlannerSettings(patch_size=(96, 96, 96)))
    assert plans.configuration("3d_fullres").patch_size == (96, 96, 96)
    # the search from a smaller fullres patch takes the same steps: only whether it starts depends on it
    assert plans.configuration("3d_lowres") == default.configuration("3d_lowres")


@pytest.mark.parametrize(("name", "why"), [("acdc", "already covers"), ("ct_drop", "less than 2x")])
def test_lowres_without_a_stage_is_an_error(shared: Path, name: str, why: str):
    fingerprint = fingerprint_from_reference(shared, name) if name == "acdc" else _lowres_fingerprint(name)
    with pytest.raises(ConfigError, match=f"no 3d_lowres stage.*{why}") as raised:
        make_plans(fingerprint, PlannerSettings(configuration="3d_lowres"))
    assert "3d_fullres" in raised.value.fix


def test_an_unknown_configuration_is_an_error(shared: Path):
    with pytest.raises(ConfigError, match="3d_cascade_fullres"):
        _acdc(shared, configuration="3d_cascade_fullres")


@pytest.mark.parametrize("name", LOWRES_REFERENCES)
def test_lowres_search_ends_where_nnunets_does(name: str):
    """From nnU-Net's own 3d_fullres plan, the search reaches nnU-Net's 3d_lowres spacing and median shape,
    and planning those inputs gives nnU-Net's 3d_lowres configuration (or None where nnU-Net has none)."""
    reference = load_json(LOWRES_DATA / name / "nnUNetPlans.json")["configurations"]
    fullres = reference["3d_fullres"]
    fingerprint = fingerprint_from_files(name, LOWRES_DATA / name / "dataset_fingerprint.json",
                                         LOWRES_DATA / name / "dataset.json")
    median = np.array(fullres["median_image_size_in_voxels"])
    inputs = ConfigurationInputs(
        name="3d_fullres", spacing=np.array(fullres["spacing"]), median_shape=median,
        approximate_n_voxels_dataset=float(np.prod(median) * fingerprint.num_cases),
        num_input_channels=len(fingerprint.channel_names), num_output_channels=len(fingerprint.labels))
    arch = get_architecture("PlainConvUNet")
    lowres = lowres_stage_inputs(inputs, tuple(fullres["patch_size"]), arch, 8.0, fingerprint.num_cases)
    if "3d_lowres" not in reference:
        assert lowres is None
        return
    assert lowres is not None
    assert np.allclose(lowres.spacing, reference["3d_lowres"]["spacing"], rtol=1e-9)
    assert list(lowres.median_shape) == reference["3d_lowres"]["median_image_size_in_voxels"]
    plan = plan_configuration(lowres, arch, 8.0, fingerprint, batch_dice=False)
    assert configuration_differences(plan, reference["3d_lowres"]) == {}


def test_base_num_features_scales_the_network_and_nothing_else(shared: Path):
    default, small = _acdc(shared), _acdc(shared, base_num_features=8, patch_size=(10, 128, 128))
    reference = _acdc(shared, patch_size=(10, 128, 128)).configuration("3d_fullres")
    plan = small.configuration("3d_fullres")
    assert plan.network.features_per_stage == tuple(min(320, 8 * 2**i) for i in range(plan.network.n_stages))
    assert plan.network.strides == reference.network.strides and plan.patch_size == reference.patch_size
    assert default.configuration("3d_fullres").network.features_per_stage[0] == 32  # nnU-Net's own


def test_plan_folder_names_of_existing_caches_do_not_change():
    """Settings added later enter a plan folder's name only when set: caches and run folders made before
    keep their names (these are the names the first release gave)."""
    from viseg.preprocessing.prepare import plans_dir_for

    assert plans_dir_for(Path("c"), PlannerSettings()).name == "PlainConvUNet-3d_fullres-84849d37"
    assert plans_dir_for(Path("c"), PlannerSettings(architecture="ResidualEncoderUNet", patch_size=(16, 32, 32))
                         ).name == "ResidualEncoderUNet-3d_fullres-63a5541c"
    assert plans_dir_for(Path("c"), PlannerSettings(base_num_features=8)).name != "PlainConvUNet-3d_fullres-84849d37"


def test_the_plan_table_lists_lowres_and_the_cascade_when_planned(lowres_plans):
    table = render_plan(lowres_plans["ct_large"][0], "3d_lowres").splitlines()
    assert table[0].split() == ["3d_fullres", "3d_lowres", "*", "3d_cascade_fullres", "2d"]
    assert table[-1].split() == ["stage", "-", "before", "3d_cascade_fullres", "after", "3d_lowres", "-"]
    assert render_plan(lowres_plans["ct_drop"][0], "3d_fullres").splitlines()[0].split() == ["3d_fullres", "*", "2d"]


def test_cascade_overrides_apply_to_the_cascade_only(lowres_plans):
    """The cascade trains on a lowres run planned without its overrides: 3d_fullres (whose patch the lowres
    search starts from) and 3d_lowres stay as that run's plan has them."""
    default, _ = lowres_plans["ct_large"]
    plans = make_plans(_lowres_fingerprint("ct_large"),
                       PlannerSettings(configuration="3d_cascade_fullres", patch_size=(64, 64, 64), batch_size=3))
    cascade = plans.configuration("3d_cascade_fullres")
    assert cascade.patch_size == (64, 64, 64) and cascade.batch_size == 3
    assert cascade.previous_stage == "3d_lowres" and cascade.inherits_from == "3d_fullres"
    assert {n: plans.configuration(n) for n in ("3d_fullres", "3d_lowres", "2d")} == \
        {n: default.configuration(n) for n in ("3d_fullres", "3d_lowres", "2d")}
