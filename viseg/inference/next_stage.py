"""A 3d_lowres run's predictions of its fold's cases, as the cascade's next-stage input.

nnU-Net writes them in the lowres run's validation: each case's lowres prediction, resampled to the next
stage's preprocessed grid (`resample_and_save`), then turned into labels. viseg makes them when the cascade
first needs them: the cascade of fold k reads the prediction of fold k's lowres model for every case of that
fold (training and validation cases), so it needs only its own fold's lowres run, not all five. Cases already
written are kept, so a second cascade on the same lowres run predicts nothing again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from viseg.errors import ConfigError
from viseg.preprocessing.previous_stage import next_stage_dir, previous_file, save_previous
from viseg.progress import track

log = logging.getLogger(__name__)


def write_next_stage_inputs(lowres_run: Path, case_ids: Sequence[str], lowres_folder: Path, target_folder: Path,
                            next_stage: str, device: str = "auto", progress: bool = True) -> Path:
    """Predict every case of `case_ids` not yet in `<lowres_run>/predicted_next_stage/<next_stage>/` from its
    preprocessed lowres arrays (`lowres_folder`) with the run's final weights, resample the probabilities to
    the case's grid in `target_folder` (the next stage's preprocessed arrays) and save the label map."""
    from viseg.inference.ensemble import load_ensemble
    from viseg.inference.export import PROBABILITY_ORDER, probabilities_to_labels
    from viseg.inference.predict import InferenceOptions, ensemble_probabilities
    from viseg.preprocessing.preprocess import load_arrays
    from viseg.preprocessing.resampling import resample_image

    out = next_stage_dir(lowres_run, next_stage)
    missing = [case for case in case_ids if not previous_file(out, case).is_file()]
    if not missing:
        log.info("next-stage inputs of %d case(s) already in %s", len(case_ids), out)
        return out
    ensemble = load_ensemble([lowres_run], "final", device)
    plans = ensemble.plans
    source = plans.configuration(ensemble.configuration)
    if source.next_stage != next_stage:
        raise ConfigError(f"{lowres_run} trained {ensemble.configuration}, whose next stage is "
                          f"{source.next_stage or 'none'}, not {next_stage}",
                          fix=f"pass the run of the configuration {next_stage} follows (3d_lowres) as previous_stage=")
    labels = plans.label_encoding()
    for case_id in track(missing, f"Predicting {next_stage} inputs", enabled=progress):
        data, _, _ = load_arrays(lowres_folder, case_id)
        probabilities = ensemble_probabilities(ensemble, np.asarray(data), InferenceOptions())
        shape = load_arrays(target_folder, case_id)[0].shape[1:]
        # nnU-Net resamples from and to the lowres spacing's axes rule (its resample_and_save passes the lowres
        # spacing twice): the separate-z decision is the lowres stage's, the shape the next stage's
        resampled = resample_image(probabilities, source.spacing, source.spacing, shape, order=PROBABILITY_ORDER,
                                   order_z=source.resampling.order_z,
                                   force_separate_z=source.resampling.force_separate_z)
        save_previous(out, case_id, probabilities_to_labels(resampled, (0, *labels.foreground_labels),
                                                            labels.regions_class_order))
    log.info("predicted the %s inputs of %d case(s) with %s into %s", next_stage, len(missing), lowres_run, out)
    return out
