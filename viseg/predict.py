"""`python -m viseg.predict`: sliding-window inference with fold ensembles, written as NIfTI.

    python -m viseg.predict model=<run folder | run,run,... | experiment folder | model.zip | nnU-Net model folder>
        [variant=<name>] [folds=0,1,2,3,4] input=<folder | file,file,...> output=<folder>
        [checkpoint=final|best|last] [mirror=true] [step=0.5] [batch_size=2] [save_probabilities=false] [device=auto]
        [continue_prediction=false] [num_parts=1 part_id=0] [num_processes_preprocessing=N] [num_processes_export=N]
        [ray=<unset: when RAY_ADDRESS is set>] [ray_actors=N] [ray_gpus_per_actor=1] [ray_cpus_per_actor=1]

Per case: the same `preprocess_case` as training -> `predict_volume` per network (Gaussian-weighted sliding
window, test-time mirroring along the axes training mirrored) -> softmax averaged over the ensemble ->
`revert_geometry` back to the input's grid -> class -> label value -> postprocessing.json, if any -> NIfTI
with the input's affine and header. The Python API (`load_ensemble`, `predict_case`) serves model selection,
which predicts validation cases without the command line.

Speed (nnU-Net's most requested): `continue_prediction=true` skips cases already in output=; `num_parts=N
part_id=K` predicts the K-th of N shares of the folder (one process, machine or job per part); reading and
preprocessing of the next cases and export of finished ones run in worker processes while the network predicts
(`num_processes_preprocessing`, `num_processes_export`, `inference.background`); `ray=true` (or RAY_ADDRESS set)
predicts across a Ray cluster, an actor per GPU (`inference.cluster`). The labels are the same on every path.

Each case's inputs are checked before its voxels are read (`check_case_headers`: readable, a size the file
can hold and memory allows, dimensions, channels, spacing), then for NaN and infinite voxels. A case that fails
in any way, a MemoryError or a bug included, fails alone: the others are predicted, the failures are listed at
the end (naming the case and its files) and the exit status is 1. Errors about the model itself stop before any
case (status 2).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from viseg.cli import quote_values, run_app
from viseg.config import PredictConfig, register_predict_configs
from viseg.data.prediction_inputs import CaseInput, find_cases
from viseg.inference.background import default_processes, predict_overlapped
from viseg.inference.cluster import RaySettings, predict_on_ray, ray_wanted
from viseg.inference.ensemble import Ensemble, Postprocessing, load_ensemble, resolve_model
from viseg.inference.predict import (
    InferenceOptions,
    PredictionReport,
    check_postprocessing,
    select_part,
    split_finished,
)
from viseg.io.layout import describe_weights

log = logging.getLogger(__name__)
PATH_KEYS = ("model", "input", "output", "postprocessing")
QUOTED_KEYS = (*PATH_KEYS, "folds")  # folds=0,1,2 is one value, not a Hydra sweep over folds


def _describe(ensemble: Ensemble, cfg: PredictConfig, postprocessing: Postprocessing | None,
              device: str | None = None) -> None:
    """The log's account of what predicts: runs, weights, configuration(s) and mirroring. A mixed ensemble
    names each group's configuration and mirror axes, since they differ from group to group."""
    runs = "\n".join(f"  {d}" for d in ensemble.run_dirs)
    members = ensemble.members
    configurations = (f"{ensemble.configuration} configuration" if len(members) == 1 else
                      f"{len(members)} groups averaged alike ({' + '.join(m.configuration for m in members)})")
    log.info("ensemble of %d run(s), %s, %s, predicting labels %s:\n%s", len(ensemble.run_dirs),
             describe_weights(cfg.checkpoint, ensemble.weights_file), configurations,
             list(ensemble.label_values[1:]), runs)

    def axes(member: Ensemble) -> list[int] | str:
        return list(member.mirror_axes) if cfg.mirror and member.mirror_axes else "off"

    mirror = axes(ensemble) if len(members) == 1 else ", ".join(f"{m.configuration} {axes(m)}" for m in members)
    log.info("device %s, mirror axes %s, step %s, postprocessing %s", device or ensemble.device, mirror, cfg.step,
             f"{postprocessing.source} (largest component of {list(postprocessing.largest_component_labels)})"
             if postprocessing else "none")
    unmirrored = [m.configuration for m in members if not m.mirror_axes]
    if cfg.mirror and unmirrored:
        which = "" if len(members) == 1 else f" ({', '.join(unmirrored)})"
        log.warning("mirror=true, but training did not mirror%s: predicting without test-time mirroring", which)


def _print_report(report: PredictionReport, output: Path) -> int:
    skipped = (f"; {len(report.skipped)} already there, skipped (continue_prediction=true)"
               if report.skipped else "")
    nodes = f" on {len(set(report.nodes.values()))} Ray node(s)" if report.nodes else ""
    print(f"predicted {len(report.predicted)} case(s) into {output}{nodes}{skipped}")
    if not report.failures:
        return 0
    total = len(report.predicted) + len(report.failures)
    lines = "\n".join(f"  {case}: {message}" for case, message in sorted(report.failures.items()))
    print(f"viseg predict: {len(report.failures)} of {total} case(s) failed:\n{lines}", file=sys.stderr)
    return 1


def predict_command(cfg: PredictConfig, progress: bool = True) -> int:
    """`python -m viseg.predict`: 0 when every case was predicted (or was already there), 1 when some failed."""
    selection = resolve_model(cfg.model, cfg.variant, cfg.folds, cfg.checkpoint)
    if cfg.postprocessing:  # explicit (e.g. an ensemble chosen by best=): wins over what sits beside the runs
        selection = replace(selection, postprocessing=Postprocessing.load(Path(cfg.postprocessing).expanduser()))
    on_ray = ray_wanted(cfg.ray)
    # on Ray the actors load their own copies; this one checks the model and names its plan, so the CPU will do
    ensemble = load_ensemble(selection.run_dirs, cfg.checkpoint, "cpu" if on_ray else cfg.device)
    check_postprocessing(selection.postprocessing, ensemble)
    output = Path(cfg.output).expanduser()
    cases = _cases_to_predict(cfg, ensemble, output)
    _describe(ensemble, cfg, selection.postprocessing, device="per Ray actor" if on_ray else None)
    options = InferenceOptions(mirror=cfg.mirror, step=cfg.step, batch_size=cfg.batch_size)
    if on_ray:
        settings = RaySettings(cfg.ray_actors, cfg.ray_gpus_per_actor, cfg.ray_cpus_per_actor)
        report = predict_on_ray(ensemble, selection.run_dirs, cfg.checkpoint, cases.todo, output, options,
                                selection.postprocessing, cfg.save_probabilities, progress, settings, cfg.device)
    else:
        device = ensemble.device.type
        report = predict_overlapped(ensemble, cases.todo, output, options, selection.postprocessing,
                                    cfg.save_probabilities, progress,
                                    default_processes(cfg.num_processes_preprocessing, device),
                                    default_processes(cfg.num_processes_export, device))
    report.skipped = cases.skipped
    return _print_report(report, output)


@dataclass(frozen=True)
class _Cases:
    todo: list[CaseInput]
    skipped: list[str]


def _cases_to_predict(cfg: PredictConfig, ensemble: Ensemble, output: Path) -> _Cases:
    """input='s cases, this part of them (num_parts/part_id), less those already in output= (continue_prediction).
    The part is taken first, so that a part's rerun covers the same cases."""
    cases = find_cases(cfg.input, ensemble.plans.channel_names, ensemble.pathfinder)
    total = len(cases)
    cases = select_part(cases, cfg.num_parts, cfg.part_id)
    if cfg.num_parts > 1:
        log.info("part %d of %d (part_id=%d): %d of the %d case(s)", cfg.part_id + 1, cfg.num_parts, cfg.part_id,
                 len(cases), total)
    skipped: list[str] = []
    if cfg.continue_prediction:
        cases, skipped = split_finished(cases, output, ensemble.file_ending, cfg.save_probabilities)
        if skipped:
            log.info("continue_prediction: %d case(s) already in %s are skipped, %d to predict", len(skipped),
                     output, len(cases))
    return _Cases(cases, skipped)


def main(argv: list[str] | None = None) -> None:
    run_app(predict_command, app="predict", argv=quote_values(sys.argv[1:] if argv is None else argv, QUOTED_KEYS),
            config_name="predict", register=register_predict_configs)


if __name__ == "__main__":
    main()
