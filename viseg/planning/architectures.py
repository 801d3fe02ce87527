"""Registry of network architectures and the planner constants that belong to each.

Names in configs and checkpoints resolve only through this registry (never through import paths). The
constants are nnU-Net v2's, so that viseg's plans agree with nnU-Net's for the same data: the default
`ExperimentPlanner` for PlainConvUNet and `nnUNetPlannerResEncM` for the residual encoder U-Net.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from viseg.errors import ConfigError


@dataclass(frozen=True)
class PlannerPreset:
    """nnU-Net planner constants for one architecture family."""

    reference_val_3d: float
    reference_val_2d: float
    reference_gb: float
    blocks_per_stage_encoder: tuple[int, ...]
    blocks_per_stage_decoder: tuple[int, ...]
    # PlainConvUNet's planner shrinks the patch until a batch of 2 fits the reference; the ResEnc planner
    # compares the raw estimate with the reference (nnU-Net's two planners differ exactly here).
    shrink_for_batch_of_two: bool
    base_num_features: int = 32
    max_features_2d: int = 512
    max_features_3d: int = 320
    reference_bs_2d: int = 12
    reference_bs_3d: int = 2
    featuremap_min_edge_length: int = 4
    min_batch_size: int = 2
    max_dataset_covered: float = 0.05


@dataclass(frozen=True)
class Architecture:
    name: str  # the class of that name in dynamic_network_architectures.architectures.unet
    encoder_blocks_kwarg: str  # PlainConvUNet: n_conv_per_stage; ResidualEncoderUNet: n_blocks_per_stage
    preset: PlannerPreset

    def network_class(self) -> Any:
        # A literal import: no string of a config, a registry or a checkpoint ever becomes an import path.
        from dynamic_network_architectures.architectures import unet

        return getattr(unet, self.name)

ARCHITECTURES: dict[str, Architecture] = {
    "PlainConvUNet": Architecture(
        name="PlainConvUNet",
        encoder_blocks_kwarg="n_conv_per_stage",
        preset=PlannerPreset(
            reference_val_3d=560_000_000,
            reference_val_2d=85_000_000,
            reference_gb=8,
            blocks_per_stage_encoder=(2,) * 14,
            blocks_per_stage_decoder=(2,) * 13,
            shrink_for_batch_of_two=True,
        ),
    ),
    "ResidualEncoderUNet": Architecture(
        name="ResidualEncoderUNet",
        encoder_blocks_kwarg="n_blocks_per_stage",
        preset=PlannerPreset(
            reference_val_3d=680_000_000,
            reference_val_2d=135_000_000,
            reference_gb=8,
            blocks_per_stage_encoder=(1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6),
            blocks_per_stage_decoder=(1,) * 12,
            shrink_for_batch_of_two=False,
        ),
    ),
}


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:

        raise ConfigError(f"unknown architecture {name!r}", fix=f"use one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def build_network(
    arch: Architecture,
    topology: dict[str, Any],
    num_input_channels: int,
    num_classes: int,
    deep_supervision: bool = True,
) -> Any:
    """Instantiate the network for a planned topology (nnU-Net's fixed choices for norm and nonlin)."""
    import torch.nn as nn

    conv_dim = len(topology["kernel_sizes"][0])
    conv_op = nn.Conv3d if conv_dim == 3 else nn.Conv2d
    norm_op = nn.InstanceNorm3d if conv_dim == 3 else nn.InstanceNorm2d
    kwargs = {
        "input_channels": num_input_channels,
        "n_stages": topology["n_stages"],
        "features_per_stage": list(topology["features_per_stage"]),
        "conv_op": conv_op,
        "kernel_sizes": [list(k) for k in topology["kernel_sizes"]],
        "strides": [list(s) for s in topology["strides"]],
        arch.encoder_blocks_kwarg: list(topology["n_conv_per_stage"]),
        "num_classes": num_classes,
        "n_conv_per_stage_decoder": list(topology["n_conv_per_stage_decoder"]),
        "conv_bias": True,
        "norm_op": norm_op,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": nn.LeakyReLU,
        "nonlin_kwargs": {"inplace": True},
        "deep_supervision": deep_supervision,
    }
    return arch.network_class()(**kwargs)
