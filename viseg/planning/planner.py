"""Fingerprint + planner settings -> Plans: nnU-Net v2's default experiment planner as a pure function.

Target spacing (median, with nnU-Net's anisotropy rule), transpose, patch size, batch size, network
topology and the 3d_lowres stage follow nnU-Net's `ExperimentPlanner` step by step, and the GPU memory estimate is
dynamic-network-architectures' own feature-map count, so plans agree with nnU-Net's for the same data.
User overrides (patch size, spacing, batch size, transpose) enter here, so the planner keeps the
interdependent values consistent; the network topology itself is never overridden.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from viseg.data.labels import planned_labels
from viseg.errors import ConfigError
from viseg.planning.architectures import Architecture, PlannerPreset, build_network, get_architecture
from viseg.planning.fingerprint import Fingerprint
from viseg.planning.geometry import ANISOTROPY_THRESHOLD, compute_new_shape
from viseg.planning.plans import (
    CASCADE_CONFIGURATION,
    LOWRES_CONFIGURATION,
    ConfigurationPlan,
    NetworkTopology,
    Plans,
)

_NORMALIZATION_BY_CHANNEL_NAME = {
    "ct": "CTNormalization",
    "nonorm": "NoNormalization",
    "zscore": "ZScoreNormalization",
    "rescale_to_0_1": "RescaleTo01Normalization",
    "rgb_to_0_1": "RGBTo01Normalization",
}
NORMALIZATION_SCHEMES = tuple(sorted(set(_NORMALIZATION_BY_CHANNEL_NAME.values())))  # what preprocessing implements
CONFIGURATION_BY_DIM = {3: "3d_fullres", 2: "2d"}
# Every configuration the planner can emit (3d_lowres only for images large against the fullres patch);
# nnU-Net's 3d_cascade_fullres is not planned: 3d_lowres names it as its next stage for a later cascade.
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
LOWRES_NEXT_STAGE = CASCADE_CONFIGURATION
LOWRES_STAGE = LOWRES_CONFIGURATION
# nnU-Net's 3d_lowres rule (ExperimentPlanner.plan_experiment): a lowres stage is searched when the fullres
# patch covers under 25 % of the median image, by coarsening the spacing 3 % a step (1.03, not 1.01, keeps
# the number of memory estimates down), and dropped unless it shrinks the median image at least 2x.
LOWRES_CREATION_THRESHOLD = 0.25
LOWRES_SPACING_INCREASE = 1.03
LOWRES_MIN_SHRINK = 2.0


@dataclass(frozen=True)
class PlannerSettings:
    """What the user controls. patch_size and batch_size apply to `configuration` (the one a run trains);
    spacing and transpose_forward set the dataset's fullres target, from which 2d and 3d_lowres derive (as
    nnU-Net's overwrite_target_spacing also moves 3d_lowres, whose search starts at the fullres spacing)."""

    architecture: str = "PlainConvUNet"
    gpu_memory_gb: float = 8.0
    configuration: str = "3d_fullres"
    foreground_labels: tuple[int, ...] | None = None
    patch_size: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None  # network axis order (after transpose_forward)
    batch_size: int | None = None
    transpose_forward: tuple[int, ...] | None = None
    # features of the first stage, doubling per stage up to the architecture's cap; None: the architecture's
    # own (nnU-Net's UNet_base_num_features, 32). Fewer features make a network that a CPU trains in minutes.
    base_num_features: int | None = None
    # plan.from=: the digest of the source plan the configuration is transferred from (planning.transfer)
    source_plan: str | None = None


# -- nnU-Net's topology rules -----------------------------------------------------------------------------
def pad_shape(shape: list[float], divisor: np.ndarray) -> list[int]:
    """Smallest shape >= `shape` divisible by `divisor` per axis. `shape` may be fractional (a clipped
    median shape such as 48.5), exactly as nnU-Net feeds it."""
    return [int(np.ceil(s / d) * d) for s, d in zip(shape, divisor)]


def get_pool_and_conv_props(spacing: Any, patch_size: Any, min_feature_map_size: int) -> tuple[
    tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...], list[int], np.ndarray
]:
    """Pool and conv kernels for a patch: pool axes whose spacing is within 2x of the finest one, while
    the feature map stays at least `min_feature_map_size` (nnU-Net's get_pool_and_conv_props)."""
    dim = len(spacing)
    current_spacing = list(spacing)
    current_size = list(patch_size)
    pool_kernels: list[list[int]] = [[1] * dim]
    conv_kernels: list[list[int]] = []
    num_pool = [0] * dim
    kernel = [1] * dim
    while True:
        valid = [i for i in range(dim) if current_size[i] >= 2 * min_feature_map_size]
        if not valid:
            break
        min_spacing = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / min_spacing < 2]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_feature_map_size:
            break
        if not valid:
            break
        for d in range(dim):
            if kernel[d] != 3 and current_spacing[d] / min(current_spacing) < 2:
                kernel[d] = 3
        pool = [1] * dim
        for v in valid:
            pool[v] = 2
            num_pool[v] += 1
            current_spacing[v] *= 2
            current_size[v] = np.ceil(current_size[v] / 2)
        pool_kernels.append(pool)
        conv_kernels.append(deepcopy(kernel))
    divisor = 2 ** np.array(num_pool)
    conv_kernels.append([3] * dim)
    patch = pad_shape(list(patch_size), divisor)
    return (tuple(tuple(p) for p in pool_kernels), tuple(tuple(k) for k in conv_kernels), patch, divisor)


# -- dataset-level decisions ------------------------------------------------------------------------------
def fullres_target_spacing(fingerprint: Fingerprint) -> np.ndarray:
    """Median spacing; for clearly anisotropic data the coarse axis takes its 10th percentile instead,
    which avoids interpolation artefacts on cases with few slices (nnU-Net's rule)."""
    spacings = np.vstack(fingerprint.spacings)
    target = np.percentile(spacings, 50, 0)
    target_size = np.percentile(np.vstack(fingerprint.shapes_after_crop), 50, 0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    other_spacings = [target[i] for i in others]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(other_spacings)
    aniso_voxels = target_size[worst] * ANISOTROPY_THRESHOLD < min(target_size[i] for i in others)
    if aniso_spacing and aniso_voxels:
        coarse = np.percentile(spacings[:, worst], 10)
        if coarse < max(other_spacings):
            coarse = max(max(other_spacings), coarse) + 1e-5
        target[worst] = coarse
    return target


def transpose_for(target_spacing: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Put the coarsest axis first."""
    first = int(np.argmax(target_spacing))
    forward = (first, *[i for i in range(3) if i != first])
    return forward, inverse_permutation(forward)


def inverse_permutation(forward: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return tuple(int(np.argwhere(np.array(forward) == i)[0][0]) for i in range(len(forward)))


def normalization_schemes(fingerprint: Fingerprint) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    schemes = tuple(_NORMALIZATION_BY_CHANNEL_NAME.get(n.casefold(), "ZScoreNormalization")
                    for n in fingerprint.channel_names)
    # Only z-score keeps voxels outside the mask at zero; nnU-Net masks when cropping removed > 25 %.
    masked = fingerprint.median_relative_size_after_cropping < 3 / 4
    return schemes, tuple(masked and s == "ZScoreNormalization" for s in schemes)


# -- one configuration (3d_fullres, 3d_lowres or 2d) ----------------------------------------------------
@dataclass
class ConfigurationInputs:
    """What one configuration is planned from: its spacing and median image (network axis order), the
    dataset size that caps the batch, and the user's overrides when it is the configuration a run trains."""

    name: str
    spacing: np.ndarray
    median_shape: np.ndarray
    approximate_n_voxels_dataset: float
    num_input_channels: int
    num_output_channels: int
    patch_size: tuple[int, ...] | None = None  # user's initial patch size
    batch_size: int | None = None


class _Estimator:
    """Caches dynamic-network-architectures' feature-map estimate per (patch, strides), like nnU-Net."""

    def __init__(self, arch: Architecture, num_inputs: int, num_outputs: int):
        self.arch, self.num_inputs, self.num_outputs = arch, num_inputs, num_outputs
        self.cache: dict[str, float] = {}

    def __call__(self, topology: NetworkTopology, patch_size: list[int]) -> float:
        import torch

        key = f"{patch_size}_{topology.strides}"
        if key not in self.cache:
            # On the meta device: the estimate counts feature maps from layer shapes alone, and allocating and
            # initialising tens of millions of weights for every candidate patch made planning take seconds.
            with torch.device("meta"):
                net = build_network(self.arch, topology.as_kwargs(), self.num_inputs, self.num_outputs,
                                    deep_supervision=False)
            self.cache[key] = float(net.compute_conv_feature_map_size(patch_size))
        return self.cache[key]


def _vram_reference(preset: PlannerPreset, dim: int, gpu_memory_gb: float) -> float:
    """The feature-map budget of the GPU memory target (nnU-Net's reference value, scaled to the target)."""
    return (preset.reference_val_3d if dim == 3 else preset.reference_val_2d) * (gpu_memory_gb / preset.reference_gb)


def _topology(arch: Architecture, strides: Any, kernels: Any, dim: int) -> NetworkTopology:
    preset = arch.preset
    n_stages = len(strides)
    max_features = preset.max_features_3d if dim == 3 else preset.max_features_2d
    return NetworkTopology(
        architecture=arch.name,
        n_stages=n_stages,
        features_per_stage=tuple(min(max_features, preset.base_num_features * 2**i) for i in range(n_stages)),
        kernel_sizes=kernels,
        strides=strides,
        n_conv_per_stage=preset.blocks_per_stage_encoder[:n_stages],
        n_conv_per_stage_decoder=preset.blocks_per_stage_decoder[: n_stages - 1],
    )


def initial_patch_size(spacing: np.ndarray, median_shape: np.ndarray) -> np.ndarray:
    """A patch with the spacing's aspect ratio and the volume of 256^3 (2048^2 in 2D), clipped to the
    median image: certainly too large, to be shrunk until it fits the GPU memory target."""
    inverse = 1 / np.array(spacing)
    volume = 256**3 if len(spacing) == 3 else 2048**2
    size = [round(i) for i in inverse * (volume / np.prod(inverse)) ** (1 / len(spacing))]
    return np.array([min(i, j) for i, j in zip(size, median_shape[: len(spacing)])])


def snap_patch_size(spacing: np.ndarray, requested: tuple[int, ...], min_edge: int) -> list[int]:
    """The valid patch size closest to the user's: each axis rounded to a multiple of what its pooling
    requires. Pooling depends on the size itself, so iterate to a fixed point."""
    size = [int(s) for s in requested]
    for _ in range(8):
        _, _, _, divisor = get_pool_and_conv_props(spacing, size, min_edge)
        snapped = [max(int(d), int(round(r / d)) * int(d)) for r, d in zip(requested, divisor)]
        if snapped == size:
            break
        size = snapped
    return get_pool_and_conv_props(spacing, size, min_edge)[2]


def _shrink_to_fit(inputs: ConfigurationInputs, arch: Architecture, estimate: _Estimator,
                   reference: float, patch: list[int]) -> tuple[list[int], NetworkTopology]:
    """Shrink the axis that is largest relative to the median shape until the network fits."""
    preset, spacing, dim = arch.preset, inputs.spacing, len(inputs.spacing)
    strides, kernels, patch, divisor = get_pool_and_conv_props(spacing, patch, preset.featuremap_min_edge_length)
    topology = _topology(arch, strides, kernels, dim)
    ref_bs = preset.reference_bs_3d if dim == 3 else preset.reference_bs_2d
    scale = 2 / ref_bs if preset.shrink_for_batch_of_two else 1.0
    while estimate(topology, patch) * scale > reference:
        axis = int(np.argsort([p / m for p, m in zip(patch, inputs.median_shape[:dim])])[-1])
        # Subtract the divisor of the reduced shape, not the current one, so no valid size is skipped
        # (e.g. 256 -> 224 rather than 256 -> 192).
        trial = list(patch)
        trial[axis] -= divisor[axis]
        divisor = get_pool_and_conv_props(spacing, trial, preset.featuremap_min_edge_length)[3]
        patch = list(patch)
        patch[axis] -= divisor[axis]
        strides, kernels, patch, divisor = get_pool_and_conv_props(spacing, patch,
                                                                   preset.featuremap_min_edge_length)
        topology = _topology(arch, strides, kernels, dim)
    return patch, topology


def plan_configuration(inputs: ConfigurationInputs, arch: Architecture, gpu_memory_gb: float,
                       fingerprint: Fingerprint, batch_dice: bool,
                       estimate: _Estimator | None = None) -> ConfigurationPlan:
    """Patch size, topology and batch size of one configuration; `estimate` may be shared between
    configurations so that a patch already estimated is not built again (nnU-Net's cache)."""
    preset: PlannerPreset = arch.preset
    dim = len(inputs.spacing)
    estimate = estimate or _Estimator(arch, inputs.num_input_channels, inputs.num_output_channels)
    reference = _vram_reference(preset, dim, gpu_memory_gb)
    if inputs.patch_size is not None:
        if len(inputs.patch_size) != dim:
            raise ConfigError(f"patch_size={list(inputs.patch_size)} has {len(inputs.patch_size)} values but the "
                              f"{inputs.name} configuration needs {dim}",
                              fix=f"give {dim} values, in the network's (transposed) axis order")
        patch = snap_patch_size(inputs.spacing, inputs.patch_size, preset.featuremap_min_edge_length)
        strides, kernels, patch, _ = get_pool_and_conv_props(inputs.spacing, patch,
                                                             preset.featuremap_min_edge_length)
        topology = _topology(arch, strides, kernels, dim)
    else:
        patch, topology = _shrink_to_fit(inputs, arch, estimate, reference,
                                         list(initial_patch_size(inputs.spacing, inputs.median_shape)))
    vram = estimate(topology, patch)
    ref_bs = preset.reference_bs_3d if dim == 3 else preset.reference_bs_2d
    batch_size = round(reference / vram * ref_bs)
    # At most 5 % of the dataset's voxels in one batch (overfitting precaution), never below the minimum.
    cap = round(inputs.approximate_n_voxels_dataset * preset.max_dataset_covered / np.prod(patch, dtype=np.float64))
    batch_size = max(min(batch_size, cap), preset.min_batch_size)
    if inputs.batch_size is not None:
        batch_size = inputs.batch_size
    schemes, masks = normalization_schemes(fingerprint)
    return ConfigurationPlan(
        name=inputs.name,
        spacing=tuple(float(s) for s in inputs.spacing),
        patch_size=tuple(int(p) for p in patch),
        batch_size=int(batch_size),
        median_image_size_in_voxels=tuple(float(m) for m in inputs.median_shape),
        normalization_schemes=schemes,
        use_mask_for_norm=masks,
        network=topology,
        batch_dice=batch_dice,
        vram_estimate=vram,
        vram_reference=float(reference),
    )


# -- 3d_lowres: whether nnU-Net would have one ----------------------------------------------------------
def lowres_stage_inputs(fullres: ConfigurationInputs, fullres_patch: tuple[int, ...], arch: Architecture,
                        gpu_memory_gb: float, num_cases: int,
                        estimate: _Estimator | None = None) -> ConfigurationInputs | None:
    """nnU-Net's 3d_lowres search, step for step: coarsen the spacing (the fine axes first while some axis is
    over 2x finer than the coarsest, then all) until the patch the planner finds at that spacing covers 25 %
    of the median image; drop the stage if that image is not at least 2x smaller than the fullres one.

    Returns the inputs nnU-Net plans 3d_lowres with (its spacing, rounded median shape and dataset size), so
    `plan_configuration` on them gives the stage; None when nnU-Net has no 3d_lowres. Only the patch sizes
    of the candidate spacings are computed here, which is all the decision needs.
    """
    estimate = estimate or _Estimator(arch, fullres.num_input_channels, fullres.num_output_channels)
    reference = _vram_reference(arch.preset, 3, gpu_memory_gb)
    fullres_spacing = np.array(fullres.spacing, dtype=np.float64)  # a copy: the search scales it in place
    spacing = fullres_spacing.copy()
    median_voxels = float(np.prod(fullres.median_shape, dtype=np.float64))
    patch_voxels = float(np.prod(fullres_patch, dtype=np.float64))
    lowres: ConfigurationInputs | None = None
    while patch_voxels / median_voxels < LOWRES_CREATION_THRESHOLD:
        finer = max(spacing) / spacing > 2
        if np.any(finer):
            spacing[finer] *= LOWRES_SPACING_INCREASE
        else:
            spacing *= LOWRES_SPACING_INCREASE
        # nnU-Net keeps the unrounded voxel count for its decisions and plans with the rounded shape.
        median = fullres_spacing / spacing * fullres.median_shape
        median_voxels = float(np.prod(median, dtype=np.float64))
        lowres = replace(fullres, name="3d_lowres", spacing=spacing.copy(),
                         median_shape=np.array([round(float(m)) for m in median], dtype=np.float64),
                         approximate_n_voxels_dataset=median_voxels * num_cases, patch_size=None, batch_size=None)
        patch, _ = _shrink_to_fit(lowres, arch, estimate, reference,
                                  list(initial_patch_size(lowres.spacing, lowres.median_shape)))
        patch_voxels = float(np.prod(patch, dtype=np.int64))
    if float(np.prod(fullres.median_shape, dtype=np.float64)) / median_voxels < LOWRES_MIN_SHRINK:
        return None  # also when no search ran: the fullres patch already covers enough of the image
    return lowres


# -- the whole plan ---------------------------------------------------------------------------------------
def _label_fields(fingerprint: Fingerprint, settings: PlannerSettings) -> dict[str, Any]:
    """labels, foreground_labels and the regions of a region dataset (viseg.data.labels)."""
    return planned_labels(fingerprint.labels, fingerprint.regions, fingerprint.region_names,
                          fingerprint.regions_class_order, settings.foreground_labels, fingerprint.dataset_name)


def _target_spacing(default: np.ndarray, settings: PlannerSettings, forward: tuple[int, ...]) -> np.ndarray:
    """The fullres target spacing in the data's original axis order, with the user's override applied
    (given in the network's axis order, like patch_size)."""
    if settings.spacing is None:
        return default
    target = default.copy()
    axes = forward if len(settings.spacing) == 3 else forward[1:]
    if len(settings.spacing) not in (2, 3) or (len(settings.spacing) == 2 and settings.configuration != "2d"):
        raise ConfigError(f"spacing={list(settings.spacing)} must have 3 values (2 for the 2d configuration)",
                          fix="give the target spacing in mm in the network's axis order, e.g. spacing=[3,1,1]")
    for axis, value in zip(axes, settings.spacing):
        target[axis] = value
    return target


def _plan_3d(fullres: ConfigurationInputs, arch: Architecture, gpu_memory_gb: float, fingerprint: Fingerprint,
             settings: PlannerSettings) -> dict[str, ConfigurationPlan]:
    """3d_fullres and, when nnU-Net has one, 3d_lowres (plan_experiment): one lowres search decides both
    the stage and 3d_fullres's batch dice (True exactly when the stage exists; 3d_lowres itself False).

    The search starts from the fullres patch actually planned, a user's 3d_fullres patch_size included;
    the user's patch and batch size for 3d_lowres apply once its spacing is found."""
    estimate = _Estimator(arch, fullres.num_input_channels, fullres.num_output_channels)
    fullres_plan = plan_configuration(fullres, arch, gpu_memory_gb, fingerprint, batch_dice=False, estimate=estimate)
    lowres = lowres_stage_inputs(fullres, fullres_plan.patch_size, arch, gpu_memory_gb, fingerprint.num_cases,
                                 estimate)
    if lowres is None:
        if settings.configuration in (LOWRES_STAGE, LOWRES_NEXT_STAGE):
            raise _no_lowres_stage(fullres, fullres_plan, settings.configuration)
        return {"3d_fullres": fullres_plan}
    if settings.configuration == LOWRES_STAGE:
        lowres = replace(lowres, patch_size=settings.patch_size, batch_size=settings.batch_size)
    lowres_plan = plan_configuration(lowres, arch, gpu_memory_gb, fingerprint, batch_dice=False, estimate=estimate)
    fullres_plan = replace(fullres_plan, batch_dice=True)
    # nnU-Net's 3d_cascade_fullres: 3d_fullres's plan and preprocessed data, the lowres prediction as more input.
    # The user's patch and batch size for the cascade apply to it alone: 3d_fullres (and with it the lowres stage
    # searched from its patch) stays as the cascade's lowres run planned it.
    cascade = fullres_plan
    if settings.configuration == LOWRES_NEXT_STAGE and (settings.patch_size or settings.batch_size):
        chosen = replace(fullres, patch_size=settings.patch_size, batch_size=settings.batch_size)
        cascade = plan_configuration(chosen, arch, gpu_memory_gb, fingerprint, batch_dice=True, estimate=estimate)
    cascade = replace(cascade, name=LOWRES_NEXT_STAGE, inherits_from="3d_fullres", previous_stage=LOWRES_STAGE)
    return {"3d_fullres": fullres_plan, LOWRES_STAGE: replace(lowres_plan, next_stage=LOWRES_NEXT_STAGE),
            LOWRES_NEXT_STAGE: cascade}


def _no_lowres_stage(fullres: ConfigurationInputs, plan: ConfigurationPlan, asked: str) -> ConfigError:
    """Why nnU-Net plans no 3d_lowres for this dataset, in the words of its two rules."""
    coverage = float(np.prod(plan.patch_size, dtype=np.float64) / np.prod(fullres.median_shape, dtype=np.float64))
    median = [round(float(m), 1) for m in fullres.median_shape]
    if coverage >= LOWRES_CREATION_THRESHOLD:
        why = (f"the 3d_fullres patch {list(plan.patch_size)} already covers {coverage:.0%} of the median image "
               f"{median} (a lowres stage is made below {LOWRES_CREATION_THRESHOLD:.0%})")
    else:
        why = (f"the lowres stage nnU-Net searched would shrink the median image {median} less than "
               f"{LOWRES_MIN_SHRINK:g}x, so it is dropped")
    return ConfigError(f"configuration={asked}: this dataset gets no 3d_lowres stage: {why}",
                       fix="train configuration=3d_fullres (or leave configuration unset)")


def make_plans(fingerprint: Fingerprint, settings: PlannerSettings) -> Plans:
    """nnU-Net's default experiment planning for 3d_fullres, 3d_lowres (when nnU-Net has one) and 2d, with
    the user's patch and batch size applied to `settings.configuration`."""
    if settings.configuration not in CONFIGURATIONS:
        raise ConfigError(f"configuration {settings.configuration!r} is not one viseg plans",
                          fix=f"use one of {list(CONFIGURATIONS)}")
    arch = get_architecture(settings.architecture)
    if settings.base_num_features is not None:
        arch = replace(arch, preset=replace(arch.preset, base_num_features=settings.base_num_features))
    label_fields = _label_fields(fingerprint, settings)
    foreground = label_fields["foreground_labels"]
    default_target = fullres_target_spacing(fingerprint)
    if settings.transpose_forward is not None:
        forward = tuple(int(i) for i in settings.transpose_forward)
        backward = inverse_permutation(forward)
    else:
        forward, backward = transpose_for(default_target)
    target = _target_spacing(default_target, settings, forward)
    new_shapes = [compute_new_shape(shape, spacing, target)
                  for shape, spacing in zip(fingerprint.shapes_after_crop, fingerprint.spacings)]
    median_t = np.median(new_shapes, 0)[list(forward)]
    target_t = target[list(forward)]
    n_voxels = float(np.prod(median_t, dtype=np.float64) * fingerprint.num_cases)

    def inputs(name: str, dims: slice) -> ConfigurationInputs:
        chosen = name == settings.configuration
        return ConfigurationInputs(
            name=name, spacing=target_t[dims], median_shape=median_t[dims], approximate_n_voxels_dataset=n_voxels,
            num_input_channels=len(fingerprint.channel_names), num_output_channels=len(foreground) + 1,
            patch_size=settings.patch_size if chosen else None, batch_size=settings.batch_size if chosen else None)

    configurations: dict[str, ConfigurationPlan] = {}
    if median_t[0] != 1:
        configurations |= _plan_3d(inputs("3d_fullres", slice(0, 3)), arch, settings.gpu_memory_gb, fingerprint,
                                   settings)
    configurations["2d"] = plan_configuration(inputs("2d", slice(1, 3)), arch, settings.gpu_memory_gb, fingerprint,
                                              batch_dice=True)
    if settings.configuration not in configurations:
        raise ConfigError(f"configuration {settings.configuration} cannot be planned for this dataset "
                          f"(median shape {median_t.tolist()} is 2D)", fix="use model=plain_conv_unet_2d")
    planner = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}
    return Plans(
        dataset_name=fingerprint.dataset_name,
        dataset_signature=fingerprint.dataset_signature,
        channel_names=tuple(fingerprint.channel_names),
        **label_fields,
        transpose_forward=forward,
        transpose_backward=backward,
        original_median_spacing_after_transp=tuple(
            float(s) for s in np.median(fingerprint.spacings, 0)[list(forward)]),
        original_median_shape_after_transp=tuple(
            int(round(s)) for s in np.median(fingerprint.shapes_after_crop, 0)[list(forward)]),
        foreground_intensity_properties_per_channel=fingerprint.foreground_intensity_properties_per_channel,
        planner=planner,
        configurations=configurations,
    )
