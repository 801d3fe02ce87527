"""Write the plan's values back into the config, giving the fully resolved config a run folder keeps.

This is the training docs' `update_config_from_dataset`: after it, config.yaml alone says which spacing,
patch, batch, transpose and topology a run used.
"""

from __future__ import annotations

import copy

from viseg.config import BaseConfig
from viseg.planning.plans import Plans


def resolve_config(cfg: BaseConfig, plans: Plans, configuration: str) -> BaseConfig:
    plan = plans.configuration(configuration)
    resolved = copy.deepcopy(cfg)
    resolved.foreground_labels = list(plans.foreground_labels)
    resolved.patch_size = list(plan.patch_size)
    resolved.spacing = list(plan.spacing)
    resolved.batch_size = plan.batch_size
    resolved.transpose_forward = list(plans.transpose_forward)
    resolved.transpose_backward = list(plans.transpose_backward)
    resolved.num_channels = plans.num_channels
    resolved.num_classes = plans.num_classes
    args = resolved.model.model_args
    net = plan.network
    args.n_stages = net.n_stages
    args.features_per_stage = list(net.features_per_stage)
    args.kernel_sizes = [list(k) for k in net.kernel_sizes]
    args.strides = [list(s) for s in net.strides]
    args.n_conv_per_stage = list(net.n_conv_per_stage)
    args.n_conv_per_stage_decoder = list(net.n_conv_per_stage_decoder)
    return resolved
