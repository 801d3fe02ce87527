"""The end-of-training validation: every validation case of the fold predicted whole, scored per class.

It goes through inference/ (the same sliding window as prediction) and evaluation/ (the one Dice and its
rules for empty masks and the ignore label), so its numbers mean what `viseg evaluate`'s mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from viseg.config import BaseConfig
from viseg.io.jsonio import write_json_atomic
from viseg.preprocessing.prepare import PreparedDataset
from viseg.preprocessing.preprocess import load_case
from viseg.preprocessing.previous_stage import load_previous, one_hot_previous
from viseg.progress import track


def validate_full_cases(network: Any, cfg: BaseConfig, prepared: PreparedDataset, folder: Path,
                        run_dir: Path, progress: bool = True, previous_dir: Path | None = None) -> dict[str, Any]:
    """Sliding-window prediction of every validation case of the fold, Dice per class (or region) per case;
    voxels of the ignore label are not scored.

    Evaluated on the preprocessed grid (after resampling to the plan's spacing); exporting to the original
    grid is the job of `python -m viseg.predict`. Scored in label values, like `viseg evaluate`: outputs
    become a label map as prediction makes it (argmax, or regions by regions_class_order). A cascade
    (`previous_dir`) sees each case's previous-stage labels as more input channels, as in training.
    """
    from viseg.evaluation.metrics import dice_per_label, mean_ignoring_none, mean_over_cases, region_key
    from viseg.inference.export import probabilities_to_labels
    from viseg.inference.sliding_window import predict_volume
    plans = prepared.plans
    plan = plans.configuration(prepared.configuration)
    labels = plans.label_encoding()
    device = next(network.parameters()).device
    network.eval()
    cases: dict[str, dict[str, float | None]] = {}
    for case_id in track(prepared.splits[cfg.fold]["val"], "Validating", enabled=progress):
        data, seg, _, _ = load_case(folder, case_id)
        data = np.asarray(data)
        if previous_dir is not None:
            previous = load_previous(previous_dir, case_id, data.shape[1:])
            data = np.concatenate([data, one_hot_previous(previous, labels.foreground_labels, data.dtype)])
        probabilities = predict_volume(network, data, plan.patch_size, labels.num_outputs, device,
                                       regions=labels.has_regions)
        prediction = probabilities_to_labels(probabilities.cpu().numpy(), (0, *labels.foreground_labels),
                                             labels.regions_class_order)
        target = np.maximum(np.asarray(seg)[0], 0)  # outside the nonzero mask (-1) is background
        cases[case_id] = dice_per_label(prediction, target, labels.scored, labels.ignore_label)
    per_class = mean_over_cases(cases.values(), map(region_key, labels.scored))
    summary = {"fold": cfg.fold, "cases": cases, "mean_dice_per_class": per_class,
               "mean_dice": mean_ignoring_none(per_class.values())}
    write_json_atomic(run_dir / "validation" / "summary.json", summary)
    return summary
