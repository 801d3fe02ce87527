"""Properties of the pure functions, on generated inputs: the planner and the sweep's override parsing.

The reference tests check the planner against nnU-Net on three datasets; here any plausible fingerprint
(isotropic or strongly anisotropic, small or large, 1-4 channels, 2-5 classes, CT or not) must give a plan
whose values fit together. The sweep parser must turn every fold selection and grid into exactly what it
says, and every malformed request into a ConfigError, never another exception (which would be a traceback).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from viseg.errors import ConfigError
from viseg.planning.architectures import ARCHITECTURES, get_architecture
from viseg.planning.fingerprint import Fingerprint
from viseg.planning.planner import PlannerSettings, make_plans
from viseg.planning.plans import ConfigurationPlan, Plans, plans_from_dict
from viseg.sweep.parse import parse_request
from viseg.sweep.spec import SWEEP_KEYS, parse_folds, variant_name

# database=None: no .hypothesis folder in the checkout; planning costs up to ~1 s per example, hence 30
PLANNER = settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
PARSER = settings(max_examples=60, deadline=None, database=None)
CHANNEL_NAMES = ("CT", "MRI", "T1", "T2", "FLAIR", "noNorm")


# -- the planner ------------------------------------------------------------------------------------------
@st.composite
def fingerprints(draw: st.DrawFn) -> Fingerprint:
    """A dataset of 2-6 cases around one median shape and spacing; each case varies by up to 25 %."""
    n_cases = draw(st.integers(2, 6))
    spacing = [draw(st.floats(0.3, 8.0)) for _ in range(3)]
    shape = [draw(st.integers(8, 600)) for _ in range(3)]
    jitter = draw(st.lists(st.tuples(st.floats(0.8, 1.25), st.floats(0.8, 1.25)), min_size=n_cases,
                           max_size=n_cases))
    channels = draw(st.lists(st.sampled_from(CHANNEL_NAMES), min_size=1, max_size=4))
    n_classes = draw(st.integers(2, 5))
    stats = {"mean": 100.0, "median": 99.0, "std": 20.0, "min": 0.0, "max": 400.0,
             "percentile_99_5": 300.0, "percentile_00_5": 5.0}
    shapes = [[int(min(600, max(8, round(s * shape_factor)))) for s in shape] for _, shape_factor in jitter]
    return Fingerprint(
        dataset_name="generated", dataset_signature="hypothesis", channel_names=channels,
        labels={"background": 0, **{f"class{i}": i for i in range(1, n_classes)}},
        case_ids=[f"case_{i:03d}" for i in range(n_cases)],
        spacings=[[min(8.0, max(0.3, s * spacing_factor)) for s in spacing] for spacing_factor, _ in jitter],
        shapes_before_crop=shapes, shapes_after_crop=shapes,
        median_relative_size_after_cropping=draw(st.floats(0.3, 1.0)),
        foreground_intensity_properties_per_channel={str(i): dict(stats) for i in range(len(channels))},
        class_voxel_counts={})


planner_settings = st.builds(PlannerSettings, architecture=st.sampled_from(sorted(ARCHITECTURES)),
                             gpu_memory_gb=st.sampled_from([4.0, 8.0, 24.0]))


def divisor(plan: ConfigurationPlan) -> np.ndarray:
    """What every patch axis must be divisible by: the product of the strides, i.e. 2 ** poolings."""
    return np.prod(np.array(plan.network.strides), axis=0)


def check_topology(plan: ConfigurationPlan, dim: int, architecture: str) -> None:
    net, preset = plan.network, get_architecture(architecture).preset
    assert net.architecture == architecture
    assert len(plan.patch_size) == len(plan.spacing) == len(plan.median_image_size_in_voxels) == dim
    assert net.n_stages == len(net.strides) == len(net.kernel_sizes) == len(net.features_per_stage) >= 1
    assert len(net.n_conv_per_stage) == net.n_stages and len(net.n_conv_per_stage_decoder) == net.n_stages - 1
    assert all(len(s) == dim and set(s) <= {1, 2} for s in net.strides)
    assert all(len(k) == dim and set(k) <= {1, 3} for k in net.kernel_sizes)
    assert net.strides[0] == (1,) * dim  # the first stage never pools
    assert list(net.features_per_stage) == sorted(net.features_per_stage)
    assert max(net.features_per_stage) <= (preset.max_features_3d if dim == 3 else preset.max_features_2d)
    pools = np.array([[int(math.log2(v)) for v in s] for s in net.strides]).sum(axis=0)
    assert list(divisor(plan)) == [2**p for p in pools]


def check_patch_and_batch(plan: ConfigurationPlan, architecture: str) -> None:
    preset, d = get_architecture(architecture).preset, divisor(plan)
    patch, median = np.array(plan.patch_size), np.array(plan.median_image_size_in_voxels)
    assert all(patch % d == 0), (plan.patch_size, d)
    # no larger than needed: one pooling step less would no longer cover the median image
    assert all(patch - d < median), (plan.patch_size, d, plan.median_image_size_in_voxels)
    # every pooled axis keeps at least the minimum feature-map edge at the bottleneck
    assert all((p // v >= preset.featuremap_min_edge_length) or v == 1 for p, v in zip(patch, d))
    assert plan.batch_size >= preset.min_batch_size >= 2
    ref_bs = preset.reference_bs_3d if len(patch) == 3 else preset.reference_bs_2d
    scale = 2 / ref_bs if preset.shrink_for_batch_of_two else 1.0
    assert plan.vram_estimate * scale <= plan.vram_reference * (1 + 1e-9)  # the planned patch fits the target
    assert all(np.isfinite(plan.spacing)) and min(plan.spacing) > 0


def check_plans(plans: Plans, fingerprint: Fingerprint, architecture: str) -> None:
    forward, backward = list(plans.transpose_forward), list(plans.transpose_backward)
    assert sorted(forward) == [0, 1, 2]
    assert [forward[b] for b in backward] == [0, 1, 2] and [backward[f] for f in forward] == [0, 1, 2]
    # every generated median has > 1 slice; large images also get nnU-Net's 3d_lowres stage and its cascade
    assert set(plans.configurations) in ({"3d_fullres", "2d"}, {"3d_fullres", "2d", "3d_lowres", "3d_cascade_fullres"})
    if "3d_cascade_fullres" in plans.configurations:  # 3d_fullres's plan, after the lowres stage
        cascade = plans.configuration("3d_cascade_fullres")
        assert cascade.previous_stage == "3d_lowres"
        assert cascade.patch_size == plans.configuration("3d_fullres").patch_size
    full, flat = plans.configuration("3d_fullres"), plans.configuration("2d")
    for plan in plans.configurations.values():
        check_topology(plan, len(plan.patch_size), architecture)
        check_patch_and_batch(plan, architecture)
    if "3d_lowres" in plans.configurations:
        lowres = plans.configuration("3d_lowres")
        assert all(lo >= fu for lo, fu in zip(lowres.spacing, full.spacing)) and full.batch_dice
        assert np.prod(lowres.median_image_size_in_voxels) * 2 <= np.prod(full.median_image_size_in_voxels) * 1.01
    assert full.spacing[0] == max(full.spacing)  # the coarsest axis goes first
    assert flat.spacing == full.spacing[1:] and flat.median_image_size_in_voxels == full.median_image_size_in_voxels[1:]
    assert plans.num_classes == len(fingerprint.labels) and plans.num_channels == len(fingerprint.channel_names)
    for plan in (full, flat):
        assert len(plan.normalization_schemes) == len(plan.use_mask_for_norm) == plans.num_channels
        for name, scheme, masked in zip(fingerprint.channel_names, plan.normalization_schemes, plan.use_mask_for_norm):
            assert (scheme == "CTNormalization") == (name == "CT")
            assert not masked or scheme == "ZScoreNormalization"


@PLANNER
@given(fingerprint=fingerprints(), planner=planner_settings)
def test_plans_are_consistent_for_any_plausible_fingerprint(fingerprint: Fingerprint, planner: PlannerSettings):
    plans = make_plans(fingerprint, planner)
    check_plans(plans, fingerprint, planner.architecture)
    assert plans_from_dict(json.loads(json.dumps(plans.to_dict()))) == plans  # survives plans.json


# -- fold selections --------------------------------------------------------------------------------------
N_FOLDS = st.integers(2, 10)


@st.composite
def fold_selections(draw: st.DrawFn) -> tuple[object, list[int] | None, int]:
    """(selection as the command line or a spec gives it, the folds it means or None if invalid, n_folds)."""
    n = draw(N_FOLDS)
    fold = st.integers(-2, n + 2)
    kind = draw(st.sampled_from(["range", "comma", "list", "int", "all"]))
    if kind == "all":
        return "all", list(range(n)), n
    if kind == "range":
        a, b = draw(st.integers(0, n + 2)), draw(st.integers(0, n + 2))
        folds = list(range(a, b + 1))
        value: object = f"{a}-{b}"
    elif kind == "int":
        folds = [draw(fold)]
        value = folds[0]
    else:
        folds = draw(st.lists(fold, min_size=1, max_size=6))
        if kind == "comma" and any(f < 0 for f in folds):
            return ",".join(map(str, folds)), None, n  # "-1" is no fold number: not a selection
        value = ",".join(map(str, folds)) if kind == "comma" else list(folds)
    valid = bool(folds) and all(0 <= f < n for f in folds)
    return value, sorted(set(folds)) if valid else None, n


@PARSER
@given(selection=fold_selections())
def test_fold_selection_parses_or_is_a_config_error(selection: tuple[object, list[int] | None, int]):
    value, expected, n_folds = selection
    if expected is None:
        with pytest.raises(ConfigError):
            parse_folds(value, n_folds)
    else:
        assert parse_folds(value, n_folds) == expected


@PARSER
@given(selection=fold_selections())
def test_fold_selection_on_the_command_line(selection: tuple[object, list[int] | None, int]):
    """The same selections as `python -m viseg.sweep folds=...` passes them on."""
    value, expected, n_folds = selection
    text = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)
    request = parse_request([f"folds={text}"], sweeps_dir=Path("/nonexistent-sweeps"))
    if expected is None:
        with pytest.raises(ConfigError):
            parse_folds(request.settings.folds, n_folds)
    else:
        assert parse_folds(request.settings.folds, n_folds) == expected


# -- grid axes --------------------------------------------------------------------------------------------
# Training keys as a user writes them (any dotted name: the driver validates them later); never a sweep key.
keys = st.from_regex(r"[a-z][a-z_]{0,8}(\.[a-z][a-z_]{0,8}){0,2}", fullmatch=True).filter(
    lambda k: k.split(".")[0] not in SWEEP_KEYS and not k.startswith("hydra"))
# Values as grids hold them: numbers and names (option names, optimizer types, ...), each spelt the one way
# Hydra writes it back (it reads `true`, `null`, `nan` and `007` as other types, a property of Hydra, not viseg)
HYDRA_WORDS = {"true", "false", "null", "inf", "nan"}
names = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,10}", fullmatch=True).filter(lambda v: v.lower() not in HYDRA_WORDS)
values = st.one_of(st.integers(-1000, 10**6).map(str), names, st.sampled_from(["0.01", "0.0003", "0.003", "1.5"]))
grids = st.lists(st.tuples(keys, st.lists(values, min_size=2, max_size=4, unique=True)), min_size=1, max_size=3,
                 unique_by=lambda axis: axis[0])


@PARSER
@given(grid=grids)
def test_grid_axes_give_the_cartesian_product_with_unique_names(grid: list[tuple[str, list[str]]]):
    args = [f"{key}={','.join(vals)}" for key, vals in grid]
    request = parse_request(args, sweeps_dir=Path("/nonexistent-sweeps"))
    assert [axis.key for axis in request.axes] == [key for key, _ in grid]
    assert [len(axis.values) for axis in request.axes] == [len(vals) for _, vals in grid]
    variants = request.variants()
    product = list(itertools.product(*[[(a.key, v) for v in a.values] for a in request.axes]))
    assert len(variants) == len(product) == math.prod(len(vals) for _, vals in grid)  # names are unique
    assert sorted(map(sorted, variants.values())) == sorted(sorted(f"{k}={v}" for k, v in c) for c in product)
    assert list(variants) == [variant_name(combo) for combo in product]  # in product order
    assert all(re.fullmatch(r"[A-Za-z0-9_.=-]+", name) for name in variants)  # usable as folder names
    assert parse_request(args, sweeps_dir=Path("/nonexistent-sweeps")).variants() == variants  # deterministic


# -- junk never escapes as anything but a ConfigError -----------------------------------------------------
junk = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", keys, st.text(max_size=20)),
    st.builds(lambda v: f"folds={v}", st.text(alphabet="0123456789-,[] ", max_size=12)),
    st.builds(lambda v: f"sweep={v}", st.text(alphabet="abc./_-", min_size=1, max_size=12)),
)


@PARSER
@given(args=st.lists(junk, min_size=1, max_size=3))
def test_junk_requests_raise_config_error_only(args: list[str]):
    """Anything else would reach the user as a traceback: the sweep's main catches only VisegError."""
    try:
        request = parse_request(args, sweeps_dir=Path("/nonexistent-sweeps"))
        parse_folds(request.settings.folds, 5)
    except ConfigError:
        pass


# -- ill-typed sweep settings are ConfigErrors; variants never collide ---------------------------------------
@pytest.mark.parametrize("args", [
    ["folds=0,x"],  # ValueError from int('x')
    ["folds=[0,x]"],
    ["folds=[[0]]"],  # TypeError from int([0])
    ["folds=true"],  # bool is an int: accepted as fold True
    ["folds=[1.5]"],  # silently truncated to fold 1
    ["folds=interval(0,1)"],  # HydraException
    ["num_samples=abc"],  # omegaconf ValidationError
    ["dry_run=maybe"],
    ["resources=abc"],
], ids=lambda a: a[0])
def test_ill_typed_sweep_settings_are_config_errors(args: list[str]):
    with pytest.raises(ConfigError):
        request = parse_request(args, sweeps_dir=Path("/nonexistent-sweeps"))
        parse_folds(request.settings.folds, 5)


def test_values_differing_only_in_special_characters_stay_two_variants():
    request = parse_request(["dataset.basepath=/data/a,/data_a"], sweeps_dir=Path("/nonexistent-sweeps"))
    assert len(request.variants()) == 2
