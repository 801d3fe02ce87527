"""nnU-Net v2's plans.json and dataset.json as a viseg plan, for what viseg reproduces exactly and nothing else.

A trained nnU-Net model folder carries its plan (`plans.json`) and labels (`dataset.json`). viseg predicts with
such a model, starts fine-tuning from it and plans new datasets like it (`plan.from=`) through this one
translation, so that every consumer agrees on what an nnU-Net plan means. The translation refuses, naming
the key and its value, whatever viseg would run differently from nnU-Net: another network class, norm,
nonlinearity or dropout than `build_network` builds, another preprocessor or resampling function, another
image reader (the axis order of the arrays depends on it), region labels and cascade stages (not supported
yet). Reading is data only: class names stay strings, compared with what viseg itself would build.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from viseg.data.labels import class_labels
from viseg.errors import ConfigError
from viseg.io.layout import is_run_dir
from viseg.planning.architectures import ARCHITECTURES
from viseg.planning.planner import CONFIGURATION_BY_DIM, NORMALIZATION_SCHEMES
from viseg.planning.plans import ConfigurationPlan, NetworkTopology, Plans, ResamplingPlan

PLANS_FILE = "plans.json"
DATASET_FILE = "dataset.json"
FOLD_DIR = re.compile(r"^fold_(\d+|all)$")
NNUNET_NETWORK_MODULE = "dynamic_network_architectures.architectures.unet"
CASCADE_CONFIGURATIONS = ("3d_lowres", "3d_cascade_fullres")
RESAMPLING_FUNCTION = "resample_data_or_seg_to_shape"
PROBABILITY_ORDER = 1  # viseg.inference.export resamples probabilities linearly, as nnU-Net's plans do
# The image reader fixes the array axis order that spacing, patch and transpose refer to: viseg reads NIfTI in
# SimpleITK's (z, y, x) order, so only plans made with SimpleITKIO mean the same axes.
IMAGE_READER = "SimpleITKIO"


def fold_dirs(model_dir: Path) -> list[Path]:
    """The fold_<k> folders of an nnU-Net model folder, fold_all last."""
    return sorted((p for p in model_dir.iterdir() if p.is_dir() and FOLD_DIR.match(p.name)), key=_fold_key)


def _fold_key(path: Path) -> tuple[int, int]:
    name = FOLD_DIR.match(path.name).group(1)  # type: ignore[union-attr]
    return (1, 0) if name == "all" else (0, int(name))


def is_nnunet_model_dir(path: Path) -> bool:
    """A folder nnU-Net's training writes: plans.json and dataset.json beside fold_<k> folders."""
    return (path.is_dir() and not is_run_dir(path) and (path / PLANS_FILE).is_file()
            and (path / DATASET_FILE).is_file() and any(fold_dirs(path)))


def model_dir_configuration(model_dir: Path) -> str | None:
    """The configuration in an nnU-Net model folder's name, `<trainer>__<plans>__<configuration>`."""
    parts = model_dir.name.split("__")
    return parts[2] if len(parts) == 3 else None


def _fixed_arch_kwargs(dim: int) -> dict[str, Any]:
    """What viseg's `build_network` passes besides the topology, spelled as nnU-Net's plans spell it."""
    return {
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
        "conv_bias": True,
    }


# nnU-Net writes the class path of an op as `torch.nn.X` or by its defining module: both name the same class.
_OP_ALIASES = {"torch.nn.modules.activation.LeakyReLU": "torch.nn.LeakyReLU",
               "torch.nn.Conv2d": "torch.nn.modules.conv.Conv2d", "torch.nn.Conv3d": "torch.nn.modules.conv.Conv3d",
               "torch.nn.InstanceNorm2d": "torch.nn.modules.instancenorm.InstanceNorm2d",
               "torch.nn.InstanceNorm3d": "torch.nn.modules.instancenorm.InstanceNorm3d"}


def resolve_configuration(plans: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    """A configuration with its `inherits_from` chain applied, as nnU-Net's PlansManager resolves it (a
    shallow update of the parent by the child)."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or name not in configurations:
        known = sorted(configurations) if isinstance(configurations, dict) else []
        raise ConfigError(f"{source} has no configuration {name!r}", fix=f"use one of {known}")
    chain: list[str] = []
    current = name
    while True:
        if current in chain:
            raise ConfigError(f"{source}: configuration {name!r} inherits in a circle ({' -> '.join(chain)})",
                              fix="fix inherits_from in plans.json")
        chain.append(current)
        parent = configurations[current].get("inherits_from")
        if parent is None:
            break
        if parent not in configurations:
            raise ConfigError(f"{source}: configuration {current!r} inherits from {parent!r}, which it lacks",
                              fix="fix inherits_from in plans.json")
        current = parent
    resolved: dict[str, Any] = {}
    for step in reversed(chain):
        resolved.update(configurations[step])
    resolved.pop("inherits_from", None)
    return resolved


def _refuse(source: str, what: str, fix: str) -> ConfigError:
    return ConfigError(f"{source}: {what}; viseg reproduces nnU-Net models exactly or not at all", fix=fix)


def _check_labels(dataset_json: dict[str, Any], source: str) -> dict[str, int]:
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ConfigError(f"{source}: dataset.json has no labels",
                          fix="use the dataset.json the model was trained with")
    regions = [name for name, value in labels.items() if isinstance(value, (list, tuple))]
    if regions or "regions_class_order" in dataset_json:
        raise _refuse(source, f"region-based labels ({', '.join(regions) or 'regions_class_order'}) are not "
                      "supported yet", fix="use a model trained on plain labels (region training: issue 18)")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise ConfigError(f"{source}: dataset.json labels must be integers, got {labels}",
                          fix="use the dataset.json the model was trained with")
    values = [0, *class_labels(labels)]
    if values != list(range(len(values))):
        raise _refuse(source, f"label values {values} are not consecutive, which nnU-Net requires",
                      fix="use the dataset.json the model was trained with")
    return dict(labels)


def _channel_names(dataset_json: dict[str, Any], source: str) -> tuple[str, ...]:
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise ConfigError(f"{source}: dataset.json has no channel_names", fix="use the model's own dataset.json")
    try:
        return tuple(str(channels[str(i)]) for i in range(len(channels)))
    except KeyError:
        raise ConfigError(f"{source}: dataset.json channel_names {channels} are not numbered 0..{len(channels) - 1}",
                          fix="use the model's own dataset.json") from None


def _topology(configuration: dict[str, Any], dim: int, source: str, where: str) -> NetworkTopology:
    architecture = configuration.get("architecture")
    if not isinstance(architecture, dict) or "network_class_name" not in architecture:
        raise _refuse(source, f"{where} has no architecture.network_class_name (plans of nnU-Net before 2.4)",
                      fix="re-plan with nnU-Net >= 2.4, or plan with viseg")
    class_path = str(architecture["network_class_name"])
    module, _, class_name = class_path.rpartition(".")
    if module != NNUNET_NETWORK_MODULE or class_name not in ARCHITECTURES:
        raise _refuse(source, f"{where}: network class {class_path} is not one viseg builds",
                      fix=f"use a model of {', '.join(f'{NNUNET_NETWORK_MODULE}.{n}' for n in ARCHITECTURES)}")
    kwargs = dict(architecture.get("arch_kwargs") or {})
    blocks_key = ARCHITECTURES[class_name].encoder_blocks_kwarg
    topology_keys = ("n_stages", "features_per_stage", "kernel_sizes", "strides", blocks_key,
                     "n_conv_per_stage_decoder")
    missing = [k for k in topology_keys if k not in kwargs]
    if missing:
        raise _refuse(source, f"{where}: arch_kwargs of {class_name} lack {', '.join(missing)}",
                      fix="use the plans.json nnU-Net wrote for the model")
    fixed = _fixed_arch_kwargs(dim)
    for key, expected in fixed.items():
        value = kwargs.get(key)
        value = _OP_ALIASES.get(value, value) if isinstance(value, str) else value
        if value != expected:
            raise _refuse(source, f"{where}: arch_kwargs.{key} is {kwargs.get(key)!r}, viseg builds {expected!r}",
                          fix="use a model with nnU-Net's default network settings")
    extra = sorted(set(kwargs) - set(topology_keys) - set(fixed))
    if extra:
        raise _refuse(source, f"{where}: arch_kwargs {', '.join(extra)} are not ones viseg passes",
                      fix="use a model with nnU-Net's default network settings")

    def nested(key: str) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(int(v) for v in item) for item in kwargs[key])

    return NetworkTopology(
        architecture=class_name, n_stages=int(kwargs["n_stages"]),
        features_per_stage=tuple(int(v) for v in kwargs["features_per_stage"]),
        kernel_sizes=nested("kernel_sizes"), strides=nested("strides"),
        n_conv_per_stage=tuple(int(v) for v in kwargs[blocks_key]),
        n_conv_per_stage_decoder=tuple(int(v) for v in kwargs["n_conv_per_stage_decoder"]))


def _resampling(configuration: dict[str, Any], source: str, where: str) -> ResamplingPlan:
    kinds = ("data", "seg", "probabilities")
    for kind in kinds:
        function = configuration.get(f"resampling_fn_{kind}")
        if function != RESAMPLING_FUNCTION:
            raise _refuse(source, f"{where}: resampling_fn_{kind} is {function!r}",
                          fix=f"use a model planned with nnU-Net's {RESAMPLING_FUNCTION}")
    kwargs = {kind: dict(configuration.get(f"resampling_fn_{kind}_kwargs") or {}) for kind in kinds}
    data, seg, probabilities = kwargs["data"], kwargs["seg"], kwargs["probabilities"]
    for kind in ("seg", "probabilities"):
        for key in ("order_z", "force_separate_z"):
            if kwargs[kind].get(key) != data.get(key):
                raise _refuse(source, f"{where}: resampling_fn_{kind}_kwargs.{key} ({kwargs[kind].get(key)}) "
                              f"differs from the data's ({data.get(key)})",
                              fix="use a model whose resampling keeps nnU-Net's defaults")
    if probabilities.get("order") != PROBABILITY_ORDER:
        raise _refuse(source, f"{where}: resampling_fn_probabilities_kwargs.order is {probabilities.get('order')}, "
                      f"viseg resamples probabilities with order {PROBABILITY_ORDER}",
                      fix="use a model whose resampling keeps nnU-Net's defaults")
    return ResamplingPlan(data_order=int(data["order"]), seg_order=int(seg["order"]), order_z=int(data["order_z"]),
                          force_separate_z=data.get("force_separate_z"))


def _configuration_plan(configuration: dict[str, Any], name: str, source: str) -> ConfigurationPlan:
    where = f"configuration {name}"
    if configuration.get("previous_stage") or configuration.get("next_stage"):
        raise _refuse(source, f"{where} is a cascade stage", fix="use a 2d or 3d_fullres model (cascade: issue 18)")
    preprocessor = configuration.get("preprocessor_name")
    if preprocessor != "DefaultPreprocessor":
        raise _refuse(source, f"{where}: preprocessor {preprocessor!r} is not nnU-Net's DefaultPreprocessor",
                      fix="use a model preprocessed with DefaultPreprocessor")
    schemes = tuple(str(s) for s in configuration["normalization_schemes"])
    unknown = [s for s in schemes if s not in NORMALIZATION_SCHEMES]
    if unknown:
        raise _refuse(source, f"{where}: normalization {', '.join(unknown)} is not one viseg implements",
                      fix=f"use a model normalised with one of {', '.join(NORMALIZATION_SCHEMES)}")
    spacing = tuple(float(v) for v in configuration["spacing"])
    topology = _topology(configuration, len(spacing), source, where)
    if topology.conv_dim != len(spacing) or len(configuration["patch_size"]) != len(spacing):
        raise ConfigError(f"{source}: {where} mixes dimensions (spacing {list(spacing)}, patch "
                          f"{configuration['patch_size']}, kernels {topology.conv_dim}D)",
                          fix="use the plans.json nnU-Net wrote for the model")
    return ConfigurationPlan(
        name=CONFIGURATION_BY_DIM[len(spacing)], spacing=spacing,
        patch_size=tuple(int(v) for v in configuration["patch_size"]),
        batch_size=int(configuration["batch_size"]),
        median_image_size_in_voxels=tuple(float(v) for v in configuration["median_image_size_in_voxels"]),
        normalization_schemes=schemes,
        use_mask_for_norm=tuple(bool(v) for v in configuration["use_mask_for_norm"]),
        network=topology, batch_dice=bool(configuration["batch_dice"]),
        vram_estimate=0.0, vram_reference=0.0,  # nnU-Net does not record them; nothing downstream reads them
        resampling=_resampling(configuration, source, where))


def plans_from_nnunet(plans: dict[str, Any], dataset_json: dict[str, Any], configuration: str,
                      source: str) -> Plans:
    """The viseg plan of one nnU-Net configuration (`2d`, `3d_fullres` or one inheriting from them), stored
    under viseg's name for its dimension. `source` names the model folder in every error."""
    try:
        return _plans_from_nnunet(plans, dataset_json, configuration, source)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ConfigError(f"{source}: plans.json or dataset.json is not as nnU-Net v2 writes it "
                          f"({type(exc).__name__}: {exc})", fix="use the files nnU-Net wrote for the model") from None


def _plans_from_nnunet(plans: dict[str, Any], dataset_json: dict[str, Any], configuration: str,
                       source: str) -> Plans:
    if configuration in CASCADE_CONFIGURATIONS:
        raise _refuse(source, f"configuration {configuration} is a stage of nnU-Net's cascade",
                      fix="use the model's 2d or 3d_fullres configuration (3d_lowres and the cascade: issue 18)")
    reader = plans.get("image_reader_writer", IMAGE_READER)
    if reader != IMAGE_READER:
        raise _refuse(source, f"plans.json was made with image reader {reader}, whose axis order viseg does not use",
                      fix=f"use a model planned with nnU-Net's {IMAGE_READER} (its default for NIfTI)")
    if plans.get("label_manager", "LabelManager") != "LabelManager":
        raise _refuse(source, f"label manager {plans['label_manager']} is not nnU-Net's LabelManager",
                      fix="use a model with nnU-Net's default label handling")
    labels = _check_labels(dataset_json, source)
    channels = _channel_names(dataset_json, source)
    plan = _configuration_plan(resolve_configuration(plans, configuration, source), configuration, source)
    if len(plan.normalization_schemes) != len(channels):
        raise ConfigError(f"{source}: plans.json normalises {len(plan.normalization_schemes)} channels, dataset.json "
                          f"has {len(channels)}", fix="use the plans.json and dataset.json of the same model")
    forward = tuple(int(v) for v in plans["transpose_forward"])
    signature = hashlib.sha256(json.dumps([plans, dataset_json], sort_keys=True).encode()).hexdigest()
    return Plans(
        dataset_name=str(plans["dataset_name"]),
        dataset_signature=f"nnunet:{signature}",
        channel_names=channels,
        labels=labels,
        foreground_labels=class_labels(labels),
        transpose_forward=forward,
        transpose_backward=tuple(int(v) for v in plans["transpose_backward"]),
        original_median_spacing_after_transp=tuple(float(v) for v in plans["original_median_spacing_after_transp"]),
        original_median_shape_after_transp=tuple(int(round(v)) for v in plans["original_median_shape_after_transp"]),
        foreground_intensity_properties_per_channel=plans["foreground_intensity_properties_per_channel"],
        planner={"source": "nnU-Net", "plans_name": plans.get("plans_name"), "configuration": configuration,
                 "experiment_planner_used": plans.get("experiment_planner_used"),
                 "architecture": plan.network.architecture},
        configurations={plan.name: plan},
    )
