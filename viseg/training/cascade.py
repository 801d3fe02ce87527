"""What a 3d_cascade_fullres run needs from its 3d_lowres run before it trains.

`previous_stage=` names the lowres run of the same fold (its fold folder, or the folder holding its fold_<k>/
folders). It must have finished, trained on the same fold's split (else the cascade's validation cases would
carry the predictions of a model that trained on them) and come from the same dataset and labels. The cascade
run keeps a copy of it in `previous_stage/` (hard links where possible), so that its run folder alone predicts
a folder through both stages, and the lowres run writes its predictions of the fold's cases for the cascade
(`viseg.inference.next_stage`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from viseg.config import BaseConfig
from viseg.errors import ConfigError
from viseg.inference.next_stage import write_next_stage_inputs
from viseg.io.atomic import link_or_copy_atomically
from viseg.io.jsonio import read_json
from viseg.io.layout import (
    CHECKPOINTS_DIR,
    CODE_VERSION,
    FINISHED_MARKER,
    LAST_CHECKPOINT,
    PREVIOUS_STAGE_DIR,
    RUN_CONFIG,
    is_run_dir,
)
from viseg.planning.plans import Plans
from viseg.preprocessing.prepare import PreparedDataset

log = logging.getLogger(__name__)

# what a finished run folder holds that predicting with it needs; the finished marker last (it means complete)
ADOPTED_FILES = ("plans.json", "splits.json", "dataset.json", RUN_CONFIG, CODE_VERSION,
                 f"{CHECKPOINTS_DIR}/{LAST_CHECKPOINT}", FINISHED_MARKER)


def is_cascade(prepared: PreparedDataset) -> bool:
    return prepared.plans.configuration(prepared.configuration).previous_stage is not None


def previous_stage_run(cfg: BaseConfig, previous_configuration: str) -> Path:
    """The lowres run folder of `cfg.fold` named by `previous_stage=`."""
    if not cfg.previous_stage:
        raise ConfigError(f"configuration={cfg.configuration} trains on the predictions of a {previous_configuration} "
                          "run of the same fold, and previous_stage= names none",
                          fix=f"train configuration={previous_configuration} fold={cfg.fold} first, then add "
                              "previous_stage=<its run folder> (a sweep over configuration= does both for you)")
    given = Path(cfg.previous_stage).expanduser()
    run = given / f"fold_{cfg.fold}" if (given / f"fold_{cfg.fold}").is_dir() else given
    if not is_run_dir(run):
        raise ConfigError(f"previous_stage={cfg.previous_stage}: {run} is not a run folder (no {RUN_CONFIG})",
                          fix=f"pass the {previous_configuration} run of fold {cfg.fold} (…/fold_{cfg.fold}) or the "
                              "folder holding its fold_<k>/ folders")
    return run


def check_previous_run(run: Path, cfg: BaseConfig, prepared: PreparedDataset, previous_configuration: str) -> None:
    """Finished, the same fold's split, the same dataset, labels and preprocessing contract (the top of plans.json;
    its configurations may differ where overrides applied to one stage only)."""
    from viseg.inference.ensemble import plan_differences

    if not (run / FINISHED_MARKER).is_file():
        raise ConfigError(f"previous_stage {run} has not finished training (no {FINISHED_MARKER})",
                          fix=f"let it finish (continue_from={run}), then start the cascade")
    import yaml

    plans = Plans.load(run / "plans.json")
    trained = (yaml.safe_load((run / RUN_CONFIG).read_text(encoding="utf-8")) or {}).get("configuration")
    if trained != previous_configuration or previous_configuration not in plans.configurations:
        raise ConfigError(f"previous_stage {run} is not a {previous_configuration} run (it trained "
                          f"{trained or 'the model default configuration'})",
                          fix=f"pass the run trained with configuration={previous_configuration} fold={cfg.fold}")
    ours, theirs = prepared.plans.to_dict(), plans.to_dict()
    differences = plan_differences({k: v for k, v in ours.items() if k not in ("planner", "configurations")},
                                   {k: v for k, v in theirs.items() if k not in ("planner", "configurations")})
    if differences:
        raise ConfigError(f"previous_stage {run} was planned for other data than this cascade "
                          f"({'; '.join(differences[:3])})",
                          fix="train the lowres run on this dataset with the same labels and plan settings")
    split = read_json(run / "splits.json")[cfg.fold]
    if sorted(split["train"]) != sorted(prepared.splits[cfg.fold]["train"]):
        raise ConfigError(f"previous_stage {run} trained fold {cfg.fold} on other cases than this cascade's fold "
                          f"{cfg.fold}: its predictions of the validation cases would not be out-of-fold",
                          fix="train both stages with the same splits (the dataset's splits_final.json or the "
                              "same splits.* settings)")


def adopt_previous_stage(run: Path, run_dir: Path) -> Path:
    """`<run_dir>/previous_stage/`: the lowres run's files, the finished marker last."""
    target = run_dir / PREVIOUS_STAGE_DIR
    for name in ADOPTED_FILES:
        if (run / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy_atomically(run / name, target / name)
    return target


def prepare_previous_stage(cfg: BaseConfig, prepared: PreparedDataset, run_dir: Path, progress: bool = True
                           ) -> Path:
    """The folder of previous-stage labels this cascade run trains on, predicted where missing. A run that has
    begun keeps the lowres run it adopted; a new one checks and adopts `previous_stage=`."""
    from viseg.preprocessing.preprocess import preprocess_dataset, preprocessed_dir

    previous_configuration = prepared.plans.configuration(prepared.configuration).previous_stage
    adopted = run_dir / PREVIOUS_STAGE_DIR
    given = previous_stage_run(cfg, previous_configuration) if cfg.previous_stage else None
    if not (adopted / FINISHED_MARKER).is_file():
        run = given or previous_stage_run(cfg, previous_configuration)  # raises: none given
        check_previous_run(run, cfg, prepared, previous_configuration)
        adopt_previous_stage(run, run_dir)
        log.info("cascade: previous stage %s (copied into %s)", run, adopted)
    # predict with the lowres run itself when it is still there, so other cascades of that fold share the work
    predictor = given if given is not None and (given / FINISHED_MARKER).is_file() else adopted
    lowres = replace(prepared, plans=Plans.load(adopted / "plans.json"), configuration=previous_configuration)
    lowres_folder = preprocess_dataset(lowres, cfg.num_processes, progress)
    split = prepared.splits[cfg.fold]
    return write_next_stage_inputs(predictor, [*split["train"], *split["val"]], lowres_folder,
                                   preprocessed_dir(prepared), prepared.configuration, progress=progress)
