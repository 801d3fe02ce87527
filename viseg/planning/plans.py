"""The plan: a data contract written once to plans.json and read by everything downstream.

Preprocessing, training and inference read these values; none of them re-derives spacing, patch size or
topology. The JSON carries a schema_version so that an old plans.json is refused with a clear message
instead of being misread.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from viseg.data.labels import LabelEncoding, ignore_label
from viseg.errors import ConfigError
from viseg.io.jsonio import read_json, write_json_atomic

PLANS_SCHEMA_VERSION = 1
# nnU-Net's two cascade stages, named once: the planner, the config checks and the sweep read these
LOWRES_CONFIGURATION = "3d_lowres"
CASCADE_CONFIGURATION = "3d_cascade_fullres"


@dataclass(frozen=True)
class NetworkTopology:
    architecture: str  # a key of viseg.planning.architectures.ARCHITECTURES
    n_stages: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    n_conv_per_stage: tuple[int, ...]  # residual encoders: residual blocks per stage
    n_conv_per_stage_decoder: tuple[int, ...]

    @property
    def conv_dim(self) -> int:
        return len(self.kernel_sizes[0])

    def as_kwargs(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("architecture")
        return data


@dataclass(frozen=True)
class ResamplingPlan:
    """nnU-Net's defaults: cubic spline for images, linear on one-hot labels, out-of-plane axis by nearest
    neighbour (order_z 0) when the spacing is anisotropic."""

    data_order: int = 3
    seg_order: int = 1
    order_z: int = 0
    force_separate_z: bool | None = None


@dataclass(frozen=True)
class ConfigurationPlan:
    name: str  # "3d_fullres", "3d_lowres" or "2d"
    spacing: tuple[float, ...]  # network axis order (after transpose_forward)
    patch_size: tuple[int, ...]
    batch_size: int
    median_image_size_in_voxels: tuple[float, ...]
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    network: NetworkTopology
    batch_dice: bool
    vram_estimate: float  # dynamic-network-architectures' feature-map size for one sample
    vram_reference: float  # what fits the plan's GPU memory target
    resampling: ResamplingPlan = field(default_factory=ResamplingPlan)
    # nnU-Net's cascade links, by configuration name: 3d_lowres names "3d_cascade_fullres" as its next stage
    # (a cascade stage would name its previous one). Defaults, so plans.json files written before still load.
    previous_stage: str | None = None
    next_stage: str | None = None
    # the configuration whose preprocessed data this one trains on (nnU-Net's inherits_from): the cascade's
    # is 3d_fullres; None: its own
    inherits_from: str | None = None

    @property
    def data_configuration(self) -> str:
        """Whose preprocessed arrays this configuration reads: preprocessing is done once per data configuration."""
        return self.inherits_from or self.name


@dataclass(frozen=True)
class Plans:
    dataset_name: str
    dataset_signature: str
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    foreground_labels: tuple[int, ...]
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    original_median_spacing_after_transp: tuple[float, ...]
    original_median_shape_after_transp: tuple[int, ...]
    foreground_intensity_properties_per_channel: dict[str, dict[str, float]]
    planner: dict[str, Any]  # the settings the plan was made with (architecture, GPU target, overrides)
    configurations: dict[str, ConfigurationPlan]
    schema_version: int = PLANS_SCHEMA_VERSION
    # region-based training (dataset.json regions, see viseg.data.labels): each region's label values, its
    # name, and the label value each writes back; empty for label-based plans (and plans written before)
    regions: tuple[tuple[int, ...], ...] = ()
    region_names: tuple[str, ...] = ()
    regions_class_order: tuple[int, ...] = ()

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Network outputs: background and the foreground labels (the ignore label has none), or one sigmoid
        output per region."""
        return self.label_encoding().num_outputs

    @property
    def ignore_label(self) -> int | None:
        """dataset.json's `ignore` value (unannotated voxels), if any; see viseg.data.labels."""
        return ignore_label(self.labels)

    def input_channels(self, configuration: str) -> int:
        """The network's input channels: the image's, and for a cascade stage one more per foreground label
        (the previous stage's prediction, one-hot, as nnU-Net's determine_num_input_channels)."""
        extra = len(self.foreground_labels) if self.configuration(configuration).previous_stage else 0
        return self.num_channels + extra

    def label_encoding(self) -> LabelEncoding:
        """How this plan's label maps are encoded for the loss (classes, and the ignore label if any)."""
        return LabelEncoding(tuple(self.foreground_labels), self.ignore_label, tuple(self.regions),
                             tuple(self.regions_class_order))

    def configuration(self, name: str) -> ConfigurationPlan:
        if name not in self.configurations:
            raise ConfigError(f"the plan has no configuration {name!r}",
                              fix=f"use one of {sorted(self.configurations)}")
        return self.configurations[name]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> Plans:
        return plans_from_dict(read_json(path), source=str(path))


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def plans_from_dict(data: dict[str, Any], source: str = "plans") -> Plans:
    version = data.get("schema_version")
    if version != PLANS_SCHEMA_VERSION:
        raise ConfigError(f"{source} has schema_version {version}; this viseg reads {PLANS_SCHEMA_VERSION}",
                          fix="re-run `python -m viseg.plan` to write a current plan")
    configurations = {}
    for name, raw in data["configurations"].items():
        raw = dict(raw)
        network = NetworkTopology(**{k: _tuples(v) for k, v in raw.pop("network").items()})
        resampling = ResamplingPlan(**raw.pop("resampling"))
        configurations[name] = ConfigurationPlan(
            network=network, resampling=resampling, **{k: _tuples(v) for k, v in raw.items()}
        )
    top = {k: _tuples(v) for k, v in data.items() if k not in ("configurations", "labels", "planner",
                                                               "foreground_intensity_properties_per_channel")}
    return Plans(
        labels=dict(data["labels"]),
        planner=dict(data["planner"]),
        foreground_intensity_properties_per_channel=data["foreground_intensity_properties_per_channel"],
        configurations=configurations,
        **top,
    )
