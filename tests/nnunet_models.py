"""nnU-Net v2 model folders for tests, written as nnU-Net 2.8.1 writes them, without nnU-Net installed.

Layout (nnunetv2/run/run_training.py and nnUNetTrainer): `<results>/<dataset>/<trainer>__<plans>__<configuration>/`
with `plans.json`, `dataset.json` and `fold_<k>/checkpoint_final.pth`. The checkpoint is the dict of
`nnUNetTrainer.save_checkpoint`: network_weights (the network's state_dict), optimizer_state, grad_scaler_state,
logging (nnU-Net's MetaLogger: lists of numpy float64/float32 per epoch), _best_ema (numpy float64),
current_epoch, init_args (plans, configuration, fold, dataset_json, a torch.device), trainer_name and
inference_allowed_mirroring_axes, saved with torch.save. The plans start from nnU-Net's own plans file for ACDC
(`../shared/reference/acdc/nnUNetPlans.json`), so every key nnU-Net writes is there; the configuration under
test gets the values of the network it holds. The network is built the way nnU-Net's get_network_from_plans
builds it: the class and ops located from the strings in plans.json, the topology from arch_kwargs.
"""

from __future__ import annotations

import copy
import json
import pydoc
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.conftest import shared_dir
from viseg.planning.plans import Plans

SHARED = shared_dir()
REFERENCE_PLANS = SHARED / "reference" / "acdc" / "nnUNetPlans.json"


def nnunet_plans(plans: Plans, configuration: str, name: str = "3d_fullres") -> dict[str, Any]:
    """nnU-Net's ACDC plans with configuration `name` carrying viseg plan `plans`' `configuration`."""
    template = json.loads(REFERENCE_PLANS.read_text())
    plan = plans.configuration(configuration)
    net = plan.network
    dim = len(plan.spacing)
    conf = copy.deepcopy(template["configurations"]["3d_fullres" if dim == 3 else "2d"])
    blocks = "n_conv_per_stage" if net.architecture == "PlainConvUNet" else "n_blocks_per_stage"
    conf["architecture"]["network_class_name"] = f"dynamic_network_architectures.architectures.unet.{net.architecture}"
    conf["architecture"]["arch_kwargs"].pop("n_conv_per_stage")
    conf["architecture"]["arch_kwargs"].update({
        "n_stages": net.n_stages, "features_per_stage": list(net.features_per_stage),
        "kernel_sizes": [list(k) for k in net.kernel_sizes], "strides": [list(s) for s in net.strides],
        blocks: list(net.n_conv_per_stage), "n_conv_per_stage_decoder": list(net.n_conv_per_stage_decoder)})
    conf.update({"data_identifier": f"nnUNetPlans_{name}", "batch_size": plan.batch_size,
                 "patch_size": list(plan.patch_size), "spacing": list(plan.spacing),
                 "median_image_size_in_voxels": list(plan.median_image_size_in_voxels),
                 "normalization_schemes": list(plan.normalization_schemes),
                 "use_mask_for_norm": list(plan.use_mask_for_norm), "batch_dice": plan.batch_dice})
    for kind, order in (("data", plan.resampling.data_order), ("seg", plan.resampling.seg_order),
                        ("probabilities", 1)):
        conf[f"resampling_fn_{kind}_kwargs"].update(order=order, order_z=plan.resampling.order_z,
                                                    force_separate_z=plan.resampling.force_separate_z)
    out = dict(template)
    out.update({"dataset_name": plans.dataset_name, "plans_name": "nnUNetPlans",
                "original_median_spacing_after_transp": list(plans.original_median_spacing_after_transp),
                "original_median_shape_after_transp": list(plans.original_median_shape_after_transp),
                "transpose_forward": list(plans.transpose_forward),
                "transpose_backward": list(plans.transpose_backward),
                "foreground_intensity_properties_per_channel": plans.foreground_intensity_properties_per_channel})
    out["configurations"] = {**{k: v for k, v in template["configurations"].items() if k != name}, name: conf}
    return out


def build_nnunet_network(plans: dict[str, Any], configuration: str, dataset_json: dict[str, Any]) -> torch.nn.Module:
    """nnU-Net's get_network_from_plans, for plans without inherits_from: located classes, arch_kwargs."""
    arch = plans["configurations"][configuration]["architecture"]
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    network_class = pydoc.locate(arch["network_class_name"])
    n_classes = len([v for k, v in dataset_json["labels"].items() if k != "ignore"])
    return network_class(input_channels=len(dataset_json["channel_names"]), num_classes=n_classes,
                         deep_supervision=True, **kwargs)


def write_nnunet_model(results: Path, plans: dict[str, Any], dataset_json: dict[str, Any], configuration: str,
                       weights: dict[str, torch.Tensor] | None = None, trainer: str = "nnUNetTrainer",
                       folds: tuple[int, ...] = (0,), mirror_axes: tuple[int, ...] | None = None,
                       extra: dict[str, Any] | None = None) -> Path:
    """The model folder; `weights` (a state_dict) are loaded strictly into the network the plans describe,
    random (seeded) weights when None. `mirror_axes` None: every axis of the patch, as nnUNetTrainer mirrors."""
    model = results / plans["dataset_name"] / f"{trainer}__{plans['plans_name']}__{configuration}"
    model.mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps(plans, indent=4))
    (model / "dataset.json").write_text(json.dumps(dataset_json, indent=4))
    torch.manual_seed(0)
    network = build_nnunet_network(plans, configuration, dataset_json)
    if weights is not None:
        network.load_state_dict(weights, strict=True)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    logging = {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.45)],
               "dice_per_class_or_region": [[np.float64(0.4), np.float64(0.5), np.float64(0.6)]],
               "train_losses": [np.float32(-0.2)], "val_losses": [np.float32(-0.1)], "lrs": [0.01],
               "epoch_start_timestamps": [1.0], "epoch_end_timestamps": [2.0]}
    if mirror_axes is None:
        mirror_axes = tuple(range(len(plans["configurations"][configuration]["patch_size"])))
    for fold in folds:
        (model / f"fold_{fold}").mkdir()
        checkpoint = {
            "network_weights": network.state_dict(), "optimizer_state": optimizer.state_dict(),
            "grad_scaler_state": None, "logging": logging, "_best_ema": np.float64(0.45), "current_epoch": 1,
            "init_args": {"plans": plans, "configuration": configuration, "fold": fold, "dataset_json": dataset_json,
                          "device": torch.device("cpu")},
            "trainer_name": trainer, "inference_allowed_mirroring_axes": mirror_axes, **(extra or {})}
        torch.save(checkpoint, model / f"fold_{fold}" / "checkpoint_final.pth")
    return model
