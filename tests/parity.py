"""Helpers to compare viseg's fingerprints and plans with nnU-Net v2's reference files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from viseg.planning.fingerprint import Fingerprint
from viseg.planning.plans import ConfigurationPlan

REFERENCE_DATASET_JSON = {
    "acdc": ("data", "acdc", "dataset.json"),
    "synth_aniso": ("reference", "synth_aniso", "raw_dataset.json"),
    "synth_iso": ("reference", "synth_iso", "raw_dataset.json"),
}


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def fingerprint_from_reference(shared: Path, name: str) -> Fingerprint:
    """nnU-Net's dataset_fingerprint.json as a viseg Fingerprint (nnU-Net stores no case ids or labels)."""
    return fingerprint_from_files(name, shared / "reference" / name / "dataset_fingerprint.json",
                                  shared.joinpath(*REFERENCE_DATASET_JSON[name]))


def fingerprint_from_files(name: str, fingerprint_json: Path, dataset_json_path: Path) -> Fingerprint:
    """A dataset_fingerprint.json in nnU-Net's format and its dataset.json as a viseg Fingerprint."""
    ref = load_json(fingerprint_json)
    dataset_json = load_json(dataset_json_path)
    channels = dataset_json["channel_names"]
    n = len(ref["spacings"])
    return Fingerprint(
        dataset_name=name, dataset_signature="nnunet-reference",
        channel_names=[channels[str(i)] for i in range(len(channels))], labels=dataset_json["labels"],
        case_ids=[f"case_{i:03d}" for i in range(n)], spacings=ref["spacings"],
        shapes_before_crop=ref["shapes_after_crop"], shapes_after_crop=ref["shapes_after_crop"],
        median_relative_size_after_cropping=ref["median_relative_size_after_cropping"],
        foreground_intensity_properties_per_channel=ref["foreground_intensity_properties_per_channel"],
        class_voxel_counts={},
    )


def configuration_differences(ours: ConfigurationPlan, reference: dict[str, Any]) -> dict[str, tuple]:
    """Every training-relevant field that differs, as {field: (viseg, nnU-Net)}; empty when they agree."""
    arch = reference["architecture"]["arch_kwargs"]
    blocks_key = "n_conv_per_stage" if "n_conv_per_stage" in arch else "n_blocks_per_stage"
    net = ours.network
    pairs = {
        "patch_size": (list(ours.patch_size), reference["patch_size"]),
        "batch_size": (ours.batch_size, reference["batch_size"]),
        "normalization_schemes": (list(ours.normalization_schemes), reference["normalization_schemes"]),
        "use_mask_for_norm": (list(ours.use_mask_for_norm), reference["use_mask_for_norm"]),
        "batch_dice": (ours.batch_dice, reference["batch_dice"]),
        "n_stages": (net.n_stages, arch["n_stages"]),
        "features_per_stage": (list(net.features_per_stage), arch["features_per_stage"]),
        "kernel_sizes": ([list(k) for k in net.kernel_sizes], arch["kernel_sizes"]),
        "strides": ([list(s) for s in net.strides], arch["strides"]),
        "n_conv_per_stage": (list(net.n_conv_per_stage), arch[blocks_key]),
        "n_conv_per_stage_decoder": (list(net.n_conv_per_stage_decoder), arch["n_conv_per_stage_decoder"]),
    }
    diffs = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if not np.allclose(ours.spacing, reference["spacing"], rtol=1e-6):
        diffs["spacing"] = (list(ours.spacing), reference["spacing"])
    return diffs


def fingerprint_differences(ours: Fingerprint, reference: dict[str, Any]) -> dict[str, Any]:
    diffs: dict[str, Any] = {}
    if not np.allclose(ours.spacings, reference["spacings"], rtol=1e-6):
        diffs["spacings"] = "differ"
    if ours.shapes_after_crop != reference["shapes_after_crop"]:
        diffs["shapes_after_crop"] = "differ"
    if not np.isclose(ours.median_relative_size_after_cropping, reference["median_relative_size_after_cropping"]):
        diffs["median_relative_size_after_cropping"] = (ours.median_relative_size_after_cropping,
                                                       reference["median_relative_size_after_cropping"])
    for channel, stats in reference["foreground_intensity_properties_per_channel"].items():
        for key, value in stats.items():
            mine = ours.foreground_intensity_properties_per_channel[channel][key]
            if not np.isclose(mine, value, rtol=1e-4, atol=1e-6):
                diffs[f"intensity[{channel}].{key}"] = (mine, value)
    return diffs
