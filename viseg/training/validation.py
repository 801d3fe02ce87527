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
from viseg.progress import track


def validate_full_cases(network: Any, cfg: BaseConfig, prepared: PreparedDataset, folder: Path,
                        run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Sliding-window prediction of every validation case of the fold, Dice per class per case; voxels of
    the ignore label are not scored.

    Evaluated on the preprocessed grid (after resampling to the plan's spacing); exporting to the original
    grid is the job of `python -m viseg.predict`.
    """
    from viseg.evaluation.metrics import dice_per_label, mean_ignoring_none, mean_over_cases
    from viseg.inference.sliding_window import predict_volume
    plan = prepared.plans.configuration(prepared.configuration)
    labels = prepared.plans.label_encoding()
    device = next(network.parameters()).device
    network.eval()
    cases: dict[str, list[float | None]] = {}
    for case_id in track(prepared.splits[cfg.fold]["val"], "Validating", enabled=progress):
        data, seg, _, _ = load_case(folder, case_id)
        probabilities = predict_volume(network, np.asarray(data), plan.patch_size, labels.num_classes, device)
        prediction = probabilities.argmax(0).cpu().numpy()
        target = labels.encode(np.asarray(seg)[0], keep_outside=False)  # outside the mask is background
        # classes 1..K-1 of the encoded maps, reported under their dataset label values
        by_class = dice_per_label(prediction, target, range(1, labels.num_classes), labels.ignore_index)
        cases[case_id] = {str(label): by_class[str(k)] for k, label in enumerate(cfg.foreground_labels, 1)}
    per_class = mean_over_cases(cases.values(), map(str, cfg.foreground_labels))
    summary = {"fold": cfg.fold, "cases": cases, "mean_dice_per_class": per_class,
               "mean_dice": mean_ignoring_none(per_class.values())}
    write_json_atomic(run_dir / "validation" / "summary.json", summary)
    return summary
