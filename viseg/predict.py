"""`python -m viseg.predict`: sliding-window inference with fold ensembles, written as NIfTI.

    python -m viseg.predict model=<run folder | run,run,... | experiment folder | model.zip | nnU-Net model folder>
        [variant=<name>] [folds=0,1,2,3,4] input=<folder | file,file,...> output=<folder>
        [checkpoint=final|best|last] [mirror=true] [step=0.5] [batch_size=2] [save_probabilities=false] [device=auto]

Per case: the same `preprocess_case` as training -> `predict_volume` per network (Gaussian-weighted sliding
window, test-time mirroring along the axes training mirrored) -> softmax averaged over the ensemble ->
`revert_geometry` back to the input's grid -> class -> label value -> postprocessing.json, if any -> NIfTI
with the input's affine and header. The Python API (`load_ensemble`, `predict_case`) serves model selection,
which predicts validation cases without the command line.

Each case's inputs are checked before its voxels are read (`check_case_headers`: readable, a size the file
can hold and memory allows, dimensions, channels, spacing), then for NaN and infinite voxels. A case that fails
in any way, a MemoryError or a bug included, fails alone: the others are predicted, the failures are listed at
the end (naming the case and its files) and the exit status is 1. Errors about the model itself stop before any
case (status 2).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

from viseg.cli import quote_values, run_app
from viseg.config import PredictConfig, register_predict_configs
from viseg.data.prediction_inputs import find_cases
from viseg.inference.ensemble import Ensemble, Postprocessing, load_ensemble, resolve_model
from viseg.inference.predict import InferenceOptions, PredictionReport, check_postprocessing, predict_cases
from viseg.io.layout import describe_weights

log = logging.getLogger(__name__)
PATH_KEYS = ("model", "input", "output", "postprocessing")
QUOTED_KEYS = (*PATH_KEYS, "folds")  # folds=0,1,2 is one value, not a Hydra sweep over folds


def _describe(ensemble: Ensemble, cfg: PredictConfig, postprocessing: Postprocessing | None) -> None:
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
    log.info("device %s, mirror axes %s, step %s, postprocessing %s", ensemble.device, mirror, cfg.step,
             f"{postprocessing.source} (largest component of {list(postprocessing.largest_component_labels)})"
             if postprocessing else "none")
    unmirrored = [m.configuration for m in members if not m.mirror_axes]
    if cfg.mirror and unmirrored:
        which = "" if len(members) == 1 else f" ({', '.join(unmirrored)})"
        log.warning("mirror=true, but training did not mirror%s: predicting without test-time mirroring", which)


def _print_report(report: PredictionReport, output: Path) -> int:
    print(f"predicted {len(report.predicted)} case(s) into {output}")
    if not report.failures:
        return 0
    total = len(report.predicted) + len(report.failures)
    lines = "\n".join(f"  {case}: {message}" for case, message in sorted(report.failures.items()))
    print(f"viseg predict: {len(report.failures)} of {total} case(s) failed:\n{lines}", file=sys.stderr)
    return 1


def predict_command(cfg: PredictConfig, progress: bool = True) -> int:
    """`python -m viseg.predict`: 0 when every case was predicted, 1 when some failed."""
    selection = resolve_model(cfg.model, cfg.variant, cfg.folds, cfg.checkpoint)
    if cfg.postprocessing:  # explicit (e.g. an ensemble chosen by best=): wins over what sits beside the runs
        selection = replace(selection, postprocessing=Postprocessing.load(Path(cfg.postprocessing).expanduser()))
    ensemble = load_ensemble(selection.run_dirs, cfg.checkpoint, cfg.device)
    check_postprocessing(selection.postprocessing, ensemble)
    cases = find_cases(cfg.input, ensemble.plans.channel_names, ensemble.pathfinder)
    _describe(ensemble, cfg, selection.postprocessing)
    options = InferenceOptions(mirror=cfg.mirror, step=cfg.step, batch_size=cfg.batch_size)
    output = Path(cfg.output).expanduser()
    report = predict_cases(ensemble, cases, output, options, selection.postprocessing, cfg.save_probabilities,
                           progress)
    return _print_report(report, output)


def main(argv: list[str] | None = None) -> None:
    run_app(predict_command, app="predict", argv=quote_values(sys.argv[1:] if argv is None else argv, QUOTED_KEYS),
            config_name="predict", register=register_predict_configs)


if __name__ == "__main__":
    main()
