"""`plan.from=`: plan a dataset with another model's plan, so that the model's weights fit (fine-tuning).

nnU-Net's "transfer the plans" step (`nnUNetv2_move_plans_between_datasets`) copies the source's plans to the
target dataset and changes only the dataset name. viseg does the same for the configuration a run trains:
spacing, patch, network, normalisation (the source's intensity statistics included: CT normalisation must
clip and scale the new images as it did the source's), resampling and transpose come from the source. What
describes the new dataset itself comes from its own fingerprint and dataset.json: name, signature, channel
and label names, the labels to predict (a different number of classes re-initialises only the heads) and
the median spacing and shape. The batch size may still be overridden; the values that decide the topology
may not, since they would undo the transfer.

A source is a viseg run folder (its plans.json), a trained nnU-Net model folder (its plans.json and
dataset.json; the configuration from the folder's name) or an nnU-Net plans file such as
`nnUNet_preprocessed/<Dataset>/nnUNetPlans.json` (the configuration the run trains, by name).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from viseg.data.labels import planned_labels
from viseg.errors import ConfigError
from viseg.io.jsonio import read_json
from viseg.io.layout import is_run_dir
from viseg.planning.fingerprint import Fingerprint
from viseg.planning.nnunet_plans import (
    DATASET_FILE,
    PLANS_FILE,
    is_nnunet_model_dir,
    model_dir_configuration,
    plans_from_nnunet,
)
from viseg.planning.plans import Plans

# what a transferred plan takes from its source; overriding them would plan another network
TOPOLOGY_OVERRIDES = ("patch_size", "spacing", "transpose_forward", "plan.base_num_features")


@dataclass(frozen=True)
class PlanSource:
    path: Path
    plans: Plans  # the source's plan, holding the configuration to transfer
    configuration: str  # viseg's name for it
    digest: str  # of the source's plan: a transferred plan's folder is named by it

    @property
    def kind(self) -> str:
        return "nnU-Net" if self.plans.planner.get("source") == "nnU-Net" else "viseg"


def load_plan_source(plan_from: str, configuration: str) -> PlanSource:
    """The plan `plan.from=` names, for the configuration (2d or 3d_fullres) this run trains."""
    path = Path(plan_from).expanduser()
    if is_run_dir(path):
        plans = Plans.load(path / PLANS_FILE)
        name = configuration
    elif is_nnunet_model_dir(path):
        nnunet_name = model_dir_configuration(path) or configuration
        plans = plans_from_nnunet(read_json(path / PLANS_FILE), read_json(path / DATASET_FILE), nnunet_name,
                                  str(path))
        name = next(iter(plans.configurations))
    elif path.is_file() and path.suffix == ".json":
        raw = read_json(path)
        if not (isinstance(raw, dict) and "plans_name" in raw and "configurations" in raw):
            raise ConfigError(f"plan.from={plan_from} is not an nnU-Net plans file (no plans_name, configurations)",
                              fix="pass nnUNet_preprocessed/<Dataset>/<plans>.json, a run folder or a model folder")
        dataset_json = path.parent / DATASET_FILE
        if not dataset_json.is_file():
            raise ConfigError(f"plan.from={plan_from}: no {DATASET_FILE} beside it to read its channels and labels",
                              fix="pass the plans file of nnUNet_preprocessed/<Dataset>/, which has one")
        plans = plans_from_nnunet(raw, read_json(dataset_json), configuration, str(path))
        name = configuration
    else:
        raise ConfigError(f"plan.from={plan_from} is neither a viseg run folder, an nnU-Net model folder nor an "
                          "nnU-Net plans file", fix="pass results/<dataset>/<plan>/<name>/fold_<k>, "
                          "nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>, or a plans .json")
    if name not in plans.configurations:
        raise ConfigError(f"plan.from={plan_from} has no {configuration} configuration "
                          f"(it has {', '.join(sorted(plans.configurations))})",
                          fix="train the source's configuration: model=plain_conv_unet_2d for 2d, a 3D model else")
    digest = hashlib.sha256(json.dumps(plans.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
    return PlanSource(path=path, plans=plans, configuration=name, digest=digest)


def transfer_plans(source: PlanSource, fingerprint: Fingerprint, configuration: str, architecture: str,
                   foreground_labels: tuple[int, ...] | None, batch_size: int | None) -> Plans:
    """The source's `configuration` as this dataset's plan (see the module docstring for what comes from where)."""
    plan = source.plans.configuration(source.configuration)
    if plan.network.architecture != architecture:
        raise ConfigError(f"plan.from={source.path} plans a {plan.network.architecture}, but this run's model is "
                          f"a {architecture}", fix="pick the model= whose architecture the source has")
    if len(fingerprint.channel_names) != source.plans.num_channels:
        raise ConfigError(f"plan.from={source.path} normalises {source.plans.num_channels} channel(s) "
                          f"({', '.join(source.plans.channel_names)}), this dataset has "
                          f"{len(fingerprint.channel_names)} ({', '.join(fingerprint.channel_names)})",
                          fix="fine-tune on data with the source's channels, or plan this dataset on its own")
    if batch_size is not None:
        plan = replace(plan, batch_size=batch_size)
    forward = list(source.plans.transpose_forward)
    return Plans(
        dataset_name=fingerprint.dataset_name,
        dataset_signature=fingerprint.dataset_signature,
        channel_names=tuple(fingerprint.channel_names),
        **planned_labels(fingerprint.labels, fingerprint.regions, fingerprint.region_names,
                         fingerprint.regions_class_order, foreground_labels, fingerprint.dataset_name),
        transpose_forward=source.plans.transpose_forward,
        transpose_backward=source.plans.transpose_backward,
        original_median_spacing_after_transp=tuple(float(s) for s in np.median(fingerprint.spacings, 0)[forward]),
        original_median_shape_after_transp=tuple(
            int(round(s)) for s in np.median(fingerprint.shapes_after_crop, 0)[forward]),
        foreground_intensity_properties_per_channel=source.plans.foreground_intensity_properties_per_channel,
        planner={"plan_from": str(source.path), "plan_from_kind": source.kind, "plan_from_digest": source.digest,
                 "architecture": architecture, "configuration": configuration, "batch_size": batch_size,
                 "foreground_labels": list(foreground_labels) if foreground_labels is not None else None},
        configurations={configuration: replace(plan, name=configuration)},
    )
