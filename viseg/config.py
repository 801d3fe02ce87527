"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore.

Schema in Python, values in YAML (`conf/`). `OmegaConf.to_object` turns a composed config into these
dataclasses and runs every `__post_init__`, so type errors, unknown keys and invalid values fail at
composition time, before any work starts. This is the only module that knows Hydra's config groups.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from viseg.data.pathfinders import PATHFINDERS
from viseg.errors import ConfigError
from viseg.io.layout import WEIGHTS, WEIGHTS_HELP
from viseg.planning.architectures import ARCHITECTURES
from viseg.planning.plans import CASCADE_CONFIGURATION
from viseg.schedulers import METRIC_SCHEDULERS, SCHEDULERS

OPTIMIZERS = ("SGD", "AdamW")
_PARENT_KEYS = {"name": "paths.results", "experiment": "storage_path"}  # where each name goes


def check_folder_name(key: str, value: object) -> str:
    """`value` as one folder name: `name=` becomes a folder under paths.results and `experiment=` one under
    storage_path, so a separator, `..` or a leading dot (`.`, `..`, a hidden folder) would put the run (and
    everything it writes and deletes) somewhere else, and an empty name would write into the parent itself.
    Returns the value; raises ConfigError naming the key."""
    text = "" if value is None else str(value)
    separators = {"/", "\\", os.sep, *([os.altsep] if os.altsep else [])}
    problem = ("is empty" if not text.strip() else
               "holds a path separator" if any(s in text for s in separators) else
               "starts with a dot" if text.startswith(".") else
               "holds '..'" if ".." in text else
               "holds a NUL byte or line break" if any(c in text for c in "\0\n\r") else None)
    if problem is not None:
        raise ConfigError(f"{key}={text!r} {problem}: it names one folder and may not point anywhere else",
                          fix=f"use a plain folder name such as {key}=my_run; choose the folder it goes in with "
                              f"{_PARENT_KEYS.get(key, 'the path settings')}")
    return text


@dataclass
class LRSchedulerConfig:
    type: str = MISSING  # a key of viseg.schedulers.SCHEDULERS, never an import path
    kwargs: dict[str, Any] = field(default_factory=dict)
    monitor: str | None = None  # metric stepped on by ReduceLROnPlateau-style schedulers

    def __post_init__(self) -> None:
        if self.type not in SCHEDULERS:
            raise ConfigError(
                f"lr_scheduler.type={self.type!r} is not a registered scheduler",
                fix=f"use one of {sorted(SCHEDULERS)} (or pick lr_scheduler=step_lr|poly|cosine|plateau)",
            )
        if self.type in METRIC_SCHEDULERS and not self.monitor:
            raise ConfigError(
                f"lr_scheduler.type={self.type} steps on a metric but lr_scheduler.monitor is empty",
                fix="set lr_scheduler.monitor, e.g. lr_scheduler.monitor=val/loss",
            )


TRACKERS = ("none", "mlflow", "wandb")
WANDB_MODES = ("online", "offline")


@dataclass
class TrackingConfig:
    """Opt-in experiment tracking (viseg.training.tracking): beside TensorBoard, each run is also one MLflow or
    W&B run. A config group (`tracking=none|mlflow|wandb`) so that one word turns it on; the libraries are
    optional extras, checked when training starts, never here: a tracked run's config must still load for
    prediction where they are not installed."""

    type: str = "none"  # none, mlflow or wandb
    # MLflow: sqlite:///<file>, file:<folder> or http(s)://<server>; null: MLFLOW_TRACKING_URI, else
    # sqlite:///<paths.results>/mlflow.db. W&B: the server's base URL; null: WANDB_BASE_URL, else W&B's own.
    uri: str | None = None
    # MLflow experiment / W&B project; null or empty: the sweep's experiment name, for a single run its dataset
    experiment: str | None = None
    mode: str | None = None  # W&B only: online or offline; null: WANDB_MODE, else online

    def __post_init__(self) -> None:
        if self.type not in TRACKERS:
            raise ConfigError(f"tracking.type={self.type!r} is not a tracker",
                              fix=f"use one of {list(TRACKERS)} (tracking=mlflow or tracking=wandb)")
        if self.mode is not None and self.mode not in WANDB_MODES:
            raise ConfigError(f"tracking.mode={self.mode!r} is not a W&B mode",
                              fix=f"use one of {list(WANDB_MODES)}, or null for WANDB_MODE (else online)")


@dataclass
class NetworkArgs:
    """Network topology. Every value is derived by the planner and written back from plans.json.

    The YAML leaves them empty; setting one by hand is rejected (see `reject_derived_overrides`),
    because patch size, strides, kernel sizes and stage count only make sense together.
    """

    conv_dim: int = 3
    n_stages: int | None = None
    features_per_stage: list[int] | None = None
    kernel_sizes: list[list[int]] | None = None
    strides: list[list[int]] | None = None
    n_conv_per_stage: list[int] | None = None  # residual encoders: residual blocks per stage
    n_conv_per_stage_decoder: list[int] | None = None
    deep_supervision: bool = True  # a training choice, not derived: may be overridden

    def __post_init__(self) -> None:
        if self.conv_dim not in (2, 3):
            raise ConfigError(f"model.model_args.conv_dim must be 2 or 3, got {self.conv_dim}")


@dataclass
class PlainConvUnet3DArgs(NetworkArgs):
    conv_dim: int = 3


@dataclass
class PlainConvUnet2DArgs(NetworkArgs):
    conv_dim: int = 2


@dataclass
class ResEncUnet3DArgs(NetworkArgs):
    conv_dim: int = 3


@dataclass
class ModelConfig:
    model_cls: str = MISSING  # a key of viseg.planning.architectures.ARCHITECTURES
    model_args: NetworkArgs = field(default_factory=NetworkArgs)

    def __post_init__(self) -> None:

        if self.model_cls not in ARCHITECTURES:
            raise ConfigError(
                f"model.model_cls={self.model_cls!r} is not a registered architecture",
                fix=f"use one of {sorted(ARCHITECTURES)} (or pick model=plain_conv_unet_3d|...)",
            )


@dataclass
class PlainConvUnet3DConfig(ModelConfig):
    model_cls: str = "PlainConvUNet"
    model_args: NetworkArgs = field(default_factory=PlainConvUnet3DArgs)


@dataclass
class PlainConvUnet2DConfig(ModelConfig):
    model_cls: str = "PlainConvUNet"
    model_args: NetworkArgs = field(default_factory=PlainConvUnet2DArgs)


@dataclass
class ResEncUnet3DConfig(ModelConfig):
    """nnU-Net's recommended residual-encoder U-Net (ResEnc M at the default 8 GB target)."""

    model_cls: str = "ResidualEncoderUNet"
    model_args: NetworkArgs = field(default_factory=ResEncUnet3DArgs)


@dataclass
class DatasetConfig:
    basepath: str | None = None  # None: the built-in demo dataset, generated on first use
    pathfinder: str = "nnunet"  # a key of viseg.data.pathfinders.PATHFINDERS, never an import path
    img_foldername: str = "imagesTr"
    seg_foldername: str = "labelsTr"

    def __post_init__(self) -> None:
        # At composition, like scheduler and model names: later, the demo dataset would already be written.

        if self.pathfinder not in PATHFINDERS:
            raise ConfigError(f"dataset.pathfinder={self.pathfinder!r} is not a registered layout",
                              fix=f"use one of {sorted(PATHFINDERS)}")


@dataclass
class PathsConfig:
    cache: str = ".viseg_cache"  # fingerprints, plans, splits, preprocessed arrays, the demo dataset
    results: str = "results"  # run folders


@dataclass
class PlannerConfig:
    gpu_memory_gb: float = 8.0  # nnU-Net's reference target; raise it like the ResEnc L/XL presets
    # first-stage features (doubling per stage, capped); null: the architecture's own, nnU-Net's 32
    base_num_features: int | None = None
    # plan.from=<run folder | nnU-Net model folder | nnU-Net plans .json>: plan this dataset with that plan
    # (planning.transfer). Stored as from_model since `from` is a Python keyword; the command line takes both.
    from_model: str | None = None

    def __post_init__(self) -> None:
        if not self.gpu_memory_gb > 0:
            raise ConfigError(f"plan.gpu_memory_gb must be positive, got {self.gpu_memory_gb}")
        if self.base_num_features is not None and self.base_num_features < 1:
            raise ConfigError(f"plan.base_num_features must be at least 1, got {self.base_num_features}",
                              fix="use e.g. plan.base_num_features=8, or null for the architecture's own (32)")


@dataclass
class SplitsConfig:
    n_folds: int = 5
    seed: int = 12345  # nnU-Net's seed: the same ids give nnU-Net's splits_final.json
    group_pattern: str | None = None  # regex whose first group names a patient, e.g. '(patient\d+)'

    def __post_init__(self) -> None:
        if self.n_folds < 2:
            raise ConfigError(f"splits.n_folds must be at least 2, got {self.n_folds}")


@dataclass
class OptimizerConfig:
    type: str = "SGD"
    lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    nesterov: bool = True

    def __post_init__(self) -> None:
        if self.type not in OPTIMIZERS:
            raise ConfigError(f"optimizer.type={self.type!r} is not supported", fix=f"use one of {OPTIMIZERS}")
        if not self.lr > 0:
            raise ConfigError(f"optimizer.lr must be positive, got {self.lr}")


@dataclass
class TrainerConfig:
    max_epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    gradient_clip_val: float = 12.0
    precision: str = "auto"  # bf16 autocast on GPU, fp32 on CPU

    def __post_init__(self) -> None:
        for key in ("max_epochs", "iterations_per_epoch", "val_iterations"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key} must be at least 1, got {getattr(self, key)}")


@dataclass
class SamplingConfig:
    oversample_foreground_percent: float = 0.33  # nnU-Net: a third of each batch centred on foreground

    def __post_init__(self) -> None:
        if not 0.0 <= self.oversample_foreground_percent <= 1.0:
            raise ConfigError(
                "sampling.oversample_foreground_percent must lie in [0, 1], "
                f"got {self.oversample_foreground_percent}"
            )


@dataclass
class AugmentationConfig:
    """nnU-Net's default augmentation recipe; probabilities are per sample. Runs batched on the training
    device (viseg.training.augment)."""

    enabled: bool = True
    p_rotation: float = 0.2
    rotation_degrees: float = 30.0  # 3D; anisotropic patches rotate in-plane only
    p_scaling: float = 0.2
    scaling_range: list[float] = field(default_factory=lambda: [0.7, 1.4])
    p_gaussian_noise: float = 0.1
    noise_variance: list[float] = field(default_factory=lambda: [0.0, 0.1])
    p_gaussian_blur: float = 0.2
    blur_sigma: list[float] = field(default_factory=lambda: [0.5, 1.0])
    p_brightness: float = 0.15
    brightness_range: list[float] = field(default_factory=lambda: [0.75, 1.25])
    p_contrast: float = 0.15
    contrast_range: list[float] = field(default_factory=lambda: [0.75, 1.25])
    p_low_resolution: float = 0.25
    low_resolution_zoom: list[float] = field(default_factory=lambda: [0.5, 1.0])
    p_gamma: float = 0.3
    p_gamma_inverted: float = 0.1
    gamma_range: list[float] = field(default_factory=lambda: [0.7, 1.5])
    p_mirror: float = 0.5  # per mirrored axis
    mirror_axes: list[int] | None = None  # spatial axes of the patch; None = all

    def __post_init__(self) -> None:
        for name in ("p_rotation", "p_scaling", "p_gaussian_noise", "p_gaussian_blur", "p_brightness",
                     "p_contrast", "p_low_resolution", "p_gamma", "p_gamma_inverted", "p_mirror"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augmentation.{name} must lie in [0, 1], got {value}")
        for name in ("scaling_range", "noise_variance", "blur_sigma", "brightness_range", "contrast_range",
                     "low_resolution_zoom", "gamma_range"):
            low, high = getattr(self, name)
            if low > high or low < 0:
                raise ConfigError(f"augmentation.{name}={[low, high]} must be [low, high] with 0 <= low <= high")


@dataclass
class LoaderConfig:
    num_workers: int = 2  # background processes sampling patches (augmentation itself runs on the device)
    prefetch_factor: int = 2
    pin_memory: bool = True

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"loader.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class FinetuneConfig:
    """How a run started from other weights (`init_from=`) adapts them. The first `freeze_encoder_epochs`
    epochs train everything but the encoder (whose features the source learned on more data), at `lr` when
    given (a warm-up for the new heads) instead of the schedule's; then all of it trains on the schedule."""

    freeze_encoder_epochs: int = 0
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.freeze_encoder_epochs < 0:
            raise ConfigError(f"finetune.freeze_encoder_epochs={self.freeze_encoder_epochs} must be 0 or more")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"finetune.lr={self.lr} must be positive", fix="e.g. finetune.lr=1e-3, or leave it null")


@dataclass
class LossConfig:
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    class_weights: list[float] | None = None  # cross-entropy weights, background first


# What `configuration=` may name: viseg.planning.planner.CONFIGURATIONS, repeated because importing the
# planner here would load scipy and nibabel for every --help (tests/unit/test_plan.py keeps the two equal).
CONFIGURATION_NAMES = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")

# Plan values a user may set (the planner keeps them consistent) and values that are always derived.
PLAN_OVERRIDE_KEYS = ("patch_size", "spacing", "batch_size", "transpose_forward", "transpose_backward")
DERIVED_TOP_LEVEL_KEYS = ("num_channels", "num_classes")
DERIVED_NETWORK_KEYS = (
    "n_stages",
    "features_per_stage",
    "kernel_sizes",
    "strides",
    "n_conv_per_stage",
    "n_conv_per_stage_decoder",
)


@dataclass
class BaseConfig:
    """The full training configuration. After planning, the plan-derived values are filled in and the
    result is saved as the run's `config.yaml`, so a run folder describes itself completely."""

    name: str = "anatomy"  # names the run folder together with dataset, plan and fold
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = MISSING
    lr_scheduler: LRSchedulerConfig = MISSING
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    plan: PlannerConfig = field(default_factory=PlannerConfig)
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # a default, not MISSING: config.yaml files written before tracking existed still load
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    fold: int = 0
    seed: int = 12345
    devices: Any = "auto"
    num_processes: int | None = None  # worker processes for verify/fingerprint/preprocess; None = all cores
    # the planned configuration this run trains: 2d, 3d_fullres, 3d_lowres (nnU-Net's, for images large
    # against the fullres patch) or 3d_cascade_fullres (full resolution, given the lowres prediction as input);
    # None: by the model, 2d for a 2D one and 3d_fullres for a 3D one
    configuration: str | None = None
    # the cascade's 3d_lowres run of the same fold: its run folder (…/fold_<k>) or the folder holding its
    # fold_<k>/ folders. A sweep sets it for its cascade trials.
    previous_stage: str | None = None

    # Dataset-dependent values (training docs' table). Left empty they are planned from the data.
    foreground_labels: list[int] | None = None  # None: every dataset.json label but background and 'ignore'
    patch_size: list[int] | None = None  # an initial size: snapped to the closest valid one
    spacing: list[float] | None = None  # target spacing in the network's (transposed) axis order
    batch_size: int | None = None
    transpose_forward: list[int] | None = None
    transpose_backward: list[int] | None = None
    num_channels: int | None = None  # derived from dataset.json
    num_classes: int | None = None  # derived: len(foreground_labels) + 1

    continue_from: str | None = None  # a run folder to resume (replaces ClearML's continue_task_id)
    # a run folder or checkpoint whose weights start this new run (fine-tuning; training/init_weights.py)
    init_from: str | None = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        check_folder_name("name", self.name)
        self._check_fold()
        if self.finetune.freeze_encoder_epochs and not self.init_from:
            raise ConfigError("finetune.freeze_encoder_epochs freezes weights loaded by init_from=, which is not set",
                              fix="add init_from=<run folder or checkpoint>, or drop finetune.*")
        if self.finetune.lr is not None and not self.finetune.freeze_encoder_epochs:
            raise ConfigError("finetune.lr is the learning rate of the frozen-encoder epochs, and there are none",
                              fix="set finetune.freeze_encoder_epochs=N too, or change optimizer.lr instead")
        self._check_configuration()
        self._check_plan_values()

    def _check_configuration(self) -> None:
        """Here, not in the planner: a 2D network cannot train a 3D plan (nor the reverse), and by then the
        dataset would be verified and fingerprinted for nothing."""
        if self.previous_stage and self.configuration != CASCADE_CONFIGURATION:
            raise ConfigError(f"previous_stage={self.previous_stage} is the input of a cascade, but configuration="
                              f"{self.configuration} is not one", fix=f"add configuration={CASCADE_CONFIGURATION}, "
                              "or drop previous_stage=")
        if self.configuration is None:
            return
        if self.configuration not in CONFIGURATION_NAMES:
            raise ConfigError(f"configuration={self.configuration!r} is not a configuration viseg plans",
                              fix=f"use one of {list(CONFIGURATION_NAMES)}, or null for the model's own")
        dim = getattr(getattr(self.model, "model_args", None), "conv_dim", None)
        if dim == 3 and self.configuration == "2d":
            raise ConfigError("configuration=2d trains a 2D network, but the model is 3D",
                              fix="add model=plain_conv_unet_2d, or use configuration=3d_fullres|3d_lowres|"
                                  "3d_cascade_fullres")
        if dim == 2 and self.configuration != "2d":
            raise ConfigError(f"configuration={self.configuration} trains a 3D network, but the model is 2D",
                              fix="add model=plain_conv_unet_3d (or residual_encoder_unet_3d), or use "
                                  "configuration=2d")

    def _check_fold(self) -> None:
        if not 0 <= self.fold < self.splits.n_folds:
            raise ConfigError(
                f"fold={self.fold} is out of range for splits.n_folds={self.splits.n_folds}",
                fix=f"use a fold in 0..{self.splits.n_folds - 1}",
            )

    def _check_plan_values(self) -> None:
        if self.foreground_labels is not None:
            labels = list(self.foreground_labels)
            if not labels or any(v <= 0 for v in labels) or len(set(labels)) != len(labels):
                raise ConfigError(
                    f"foreground_labels={labels} must be distinct positive label values",
                    fix="list the dataset.json label values to predict, e.g. foreground_labels=[1,2]",
                )
        if self.patch_size is not None and any(v < 1 for v in self.patch_size):
            raise ConfigError(f"patch_size={list(self.patch_size)} must contain positive integers")
        dim = getattr(getattr(self.model, "model_args", None), "conv_dim", None)
        if self.patch_size is not None and dim is not None and len(self.patch_size) != dim:
            # here, not in the planner: by then the dataset would be verified and fingerprinted for nothing
            raise ConfigError(f"patch_size={list(self.patch_size)} has {len(self.patch_size)} values but the "
                              f"model is {dim}D", fix=f"give {dim} values, in the network's (transposed) axis order")
        if self.spacing is not None and any(not v > 0 for v in self.spacing):
            raise ConfigError(f"spacing={list(self.spacing)} must contain positive values (mm)")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
        for key in ("transpose_forward", "transpose_backward"):
            value = getattr(self, key)
            if value is not None and sorted(value) != [0, 1, 2]:
                raise ConfigError(f"{key}={list(value)} must be a permutation of [0, 1, 2]")
        forward, backward = self.transpose_forward, self.transpose_backward
        if forward is not None and backward is not None and [forward[i] for i in backward] != [0, 1, 2]:
            raise ConfigError(
                f"transpose_forward={list(forward)} and transpose_backward={list(backward)} are not inverse",
                fix="set only transpose_forward; transpose_backward is updated with it",
            )


def reject_derived_overrides(cfg: BaseConfig) -> None:
    """Fail if a freshly composed config sets a value that only the planner may derive."""
    offending = [key for key in DERIVED_TOP_LEVEL_KEYS if getattr(cfg, key) is not None]
    offending += [
        f"model.model_args.{key}"
        for key in DERIVED_NETWORK_KEYS
        if getattr(cfg.model.model_args, key) is not None
    ]
    if offending:
        raise ConfigError(
            f"{', '.join(offending)} cannot be set: derived from the dataset and the plan",
            fix="remove the override; to change the network, override patch_size, spacing or "
            "plan.gpu_memory_gb and let the planner derive a consistent topology",
        )


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


@dataclass
class PredictConfig:
    """`python -m viseg.predict`: which trained runs predict which images, and how.

    A separate schema from BaseConfig: prediction needs nothing of the training config, which every run
    folder carries itself. `model` and `input` take comma lists as one string (the command line quotes
    them, since Hydra would read an unquoted `a,b` as a sweep)."""

    model: str = MISSING  # run folder(s), a sweep experiment folder, a model.zip or an nnU-Net model folder
    variant: str | None = None  # with an experiment folder: the variant whose finished folds form the ensemble
    folds: str | None = None  # with an experiment or an nnU-Net model folder: which folds (e.g. 0,1,2; all folds)
    input: str = MISSING  # a folder of <case>_<XXXX>.nii.gz files, or a comma list of files
    output: str = MISSING  # folder for <case>.nii.gz (and <case>.npz with save_probabilities)
    checkpoint: str = "final"  # final (end of training), best (moving-average pseudo-Dice) or last: WEIGHTS
    mirror: bool = True  # test-time mirroring along the axes training mirrored (nnU-Net's default)
    step: float = 0.5  # sliding-window step as a fraction of the patch (0.5: half a patch of overlap)
    batch_size: int = 2  # windows per forward pass
    save_probabilities: bool = False
    device: str = "auto"  # auto (CUDA when available, else CPU), cpu, cuda or cuda:<index>
    postprocessing: str | None = None  # a postprocessing.json to apply instead of the one found beside the runs
    # skip cases whose <case><file_ending> (and, with save_probabilities, <case>.npz) is already in output=;
    # every output is written under a temporary name and renamed, so an existing one is complete
    continue_prediction: bool = False
    # this process predicts cases[part_id::num_parts] of the cases sorted by id (nnU-Net's rule): start
    # num_parts processes, part_id=0 ... num_parts-1, on one output folder
    num_parts: int = 1
    part_id: int = 0
    # worker processes that read and preprocess the next cases, and revert, postprocess and write finished
    # ones, while the network predicts (nnU-Net's -npp / -nps); 0 or 1: that step runs in this process; unset:
    # 2 each when the network runs on a GPU, 0 on the CPU (where the workers would compete with its threads)
    num_processes_preprocessing: int | None = None
    num_processes_export: int | None = None
    # predict with Ray Data across the cluster: true, false, or unset = when RAY_ADDRESS names a cluster
    ray: bool | None = None
    # prediction actors; unset: the cluster's GPUs / ray_gpus_per_actor, without GPUs 2 (fewer on fewer CPUs)
    ray_actors: int | None = None
    ray_gpus_per_actor: float | None = None  # unset: 1 when the cluster has GPUs (and device is not cpu), else 0
    ray_cpus_per_actor: float = 1.0  # also the torch threads of a CPU actor (Ray sets OMP_NUM_THREADS)

    def __post_init__(self) -> None:
        if self.checkpoint not in WEIGHTS:
            raise ConfigError(f"checkpoint={self.checkpoint!r} is not a checkpoint name", fix=f"use {WEIGHTS_HELP}")
        if not 0.0 < self.step <= 1.0:
            raise ConfigError(f"step={self.step} must lie in (0, 1]", fix="use e.g. step=0.5 (nnU-Net's default)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
        if not _DEVICE.match(self.device):
            raise ConfigError(f"device={self.device!r} is not a device", fix="use auto, cpu, cuda or cuda:<index>")
        self._check_parts()
        for key in ("num_processes_preprocessing", "num_processes_export"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be 0 or more",
                                  fix=f"use {key}=0 (or 1) to run that step in the command's own process, or e.g. "
                                      f"{key}=2 for two worker processes")
        self._check_ray()

    def _check_parts(self) -> None:
        """nnU-Net's -num_parts/-part_id: a part outside 0..num_parts-1 would silently predict nothing."""
        if self.num_parts < 1:
            raise ConfigError(f"num_parts={self.num_parts} must be at least 1",
                              fix="use num_parts=1 (the whole folder), or num_parts=N with part_id=0 ... N-1")
        if not 0 <= self.part_id < self.num_parts:
            raise ConfigError(f"part_id={self.part_id} is not a part of num_parts={self.num_parts} (parts are "
                              f"numbered 0 to {self.num_parts - 1})",
                              fix=f"use part_id=0 ... part_id={self.num_parts - 1}, one process per part"
                                  + ("" if self.num_parts > 1 else ", or raise num_parts="))

    def _check_ray(self) -> None:
        if self.ray_actors is not None and self.ray_actors < 1:
            raise ConfigError(f"ray_actors={self.ray_actors} must be at least 1",
                              fix="use e.g. ray_actors=2, or leave it unset (one per GPU of the cluster)")
        if self.ray_cpus_per_actor <= 0:
            raise ConfigError(f"ray_cpus_per_actor={self.ray_cpus_per_actor} must be more than 0",
                              fix="use e.g. ray_cpus_per_actor=1 (a CPU actor's torch threads)")
        gpus = self.ray_gpus_per_actor
        if gpus is not None and gpus < 0:
            raise ConfigError(f"ray_gpus_per_actor={gpus} must be 0 or more",
                              fix="use ray_gpus_per_actor=1 (one GPU per actor), a fraction such as 0.5 to share "
                                  "one, or 0 for CPU actors")
        if gpus and self.device == "cpu":
            raise ConfigError(f"ray_gpus_per_actor={gpus} with device=cpu reserves GPUs the actors would not use",
                              fix="drop device=cpu (the actors then predict on their GPU), or set "
                                  "ray_gpus_per_actor=0")
        if gpus == 0 and self.device.startswith("cuda"):
            raise ConfigError(f"device={self.device} with ray_gpus_per_actor=0: Ray gives the actors no GPU",
                              fix="set ray_gpus_per_actor=1 (or a fraction), or device=auto / device=cpu")


MODEL_OPTIONS: dict[str, type[ModelConfig]] = {
    "plain_conv_unet_3d": PlainConvUnet3DConfig,
    "plain_conv_unet_2d": PlainConvUnet2DConfig,
    "residual_encoder_unet_3d": ResEncUnet3DConfig,
}


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore. Called by each `main()`, never at import time."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="base_config", node=BaseConfig)
    for name, node in MODEL_OPTIONS.items():
        store.store(group="model", name=name, node=node)
    store.store(group="lr_scheduler", name="base_lr_scheduler", node=LRSchedulerConfig)
    store.store(group="tracking", name="base_tracking", node=TrackingConfig)


def register_predict_configs() -> None:
    """Store only the prediction schema. The training groups stay out on purpose: with a `model` config
    group registered, Hydra would read `model=<run folder>` as a choice of that group."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="predict_base", node=PredictConfig)
