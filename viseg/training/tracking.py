"""Opt-in experiment tracking: `tracking=mlflow` or `tracking=wandb` makes each run (a single run, every sweep
trial) also one MLflow or W&B run, through Lightning's own MLFlowLogger and WandbLogger beside TensorBoard.

What one run records: the resolved config as params (MLflow: flattened, `optimizer.lr`; W&B: its nested
config), every per-epoch metric the module logs (train/loss, val/loss, pseudo-Dice, EMA pseudo-Dice, lr),
`final/mean_dice` and `final/dice_<label>` from the whole-case validation, tags (variant = `name`, fold,
dataset, plan, configuration, run folder, whether resumed, and the code version of viseg/provenance.py) and
the run folder's config.yaml, plans.json, progress.png, metrics.csv and validation/summary.json as artifacts.
The run is named `<name>_fold<k>`.

A resumed run (continue_from=, a resumed or restarted sweep trial) starts a new tracking run with the same name
and the tag `resumed=true`, logging on from the checkpoint's epoch (the step is Lightning's global step, so the
two runs' curves line up). Not the old run continued: its params would have to change (MLflow refuses that for
e.g. a raised trainer.max_epochs), and a W&B run continued at a lower step than it had reached drops the
values.

The libraries are optional extras (`viseg[mlflow]`, `viseg[wandb]`) and imported only here, inside functions.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from viseg.config import BaseConfig, TrackingConfig
from viseg.errors import ConfigError
from viseg.io.layout import CHECKPOINTS_DIR, RESUMABLE_CHECKPOINTS
from viseg.preprocessing.prepare import configuration_name
from viseg.provenance import code_version

log = logging.getLogger(__name__)
PACKAGES = {"mlflow": ("mlflow", "viseg[mlflow]"), "wandb": ("wandb", "viseg[wandb]")}  # module, extra
ARTIFACTS = ("config.yaml", "plans.json", "progress.png", "metrics.csv", "validation/summary.json")
MLFLOW_DB = "mlflow.db"  # the default store, in paths.results


def require(tracking: TrackingConfig) -> None:
    """Fail before any work when the tracker's library is not installed (find_spec: nothing is imported)."""
    if tracking.type == "none":
        return
    module, extra = PACKAGES[tracking.type]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"tracking={tracking.type} needs the {module} package, which is not installed",
                          fix=f"pip install '{extra}' (or choose tracking=none)")


def absolute_uri(uri: str) -> str:
    """A local store's URI with an absolute path: sweep trials run in their own working folders (and on other
    nodes), so a relative `sqlite:///mlflow.db` would give each trial its own store. Servers are kept as given."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        return uri if path in ("", ":memory:") else f"sqlite:///{Path(path).expanduser().resolve()}"
    if uri.startswith("file:"):
        path = uri.removeprefix("file:")
        path = path[2:] if path.startswith("//") else path  # file:///abs: an empty host
        return Path(path).expanduser().resolve().as_uri()
    if ":" not in uri:  # a bare folder, which MLflow reads as a file store
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def store_uri(tracking: TrackingConfig, results: str) -> str | None:
    """Where the runs go: tracking.uri, else the library's environment variable, else (MLflow) a local sqlite
    store beside the run folders. None: W&B's own default."""
    if tracking.type == "mlflow":
        uri = tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(results) / MLFLOW_DB}"
        return absolute_uri(uri)
    return tracking.uri or os.environ.get("WANDB_BASE_URL") or None


def sweep_variant(variant_yaml: str, experiment: str) -> str:
    """A composed sweep variant with its tracking settings fixed by the driver: one tracking experiment per
    sweep (unless tracking.experiment names one) and one absolute store for every trial, the driver's default
    store when tracking.uri is empty (trials get their own paths.results, which would split it)."""
    from omegaconf import OmegaConf

    node = OmegaConf.create(variant_yaml)
    tracking = TrackingConfig(**OmegaConf.to_container(node.get("tracking") or {}))
    if tracking.type == "none":
        return variant_yaml
    require(tracking)
    node.tracking.experiment = tracking.experiment or experiment
    node.tracking.uri = store_uri(tracking, str(node.paths.results))
    return OmegaConf.to_yaml(node)


def check_store(cfg: BaseConfig) -> None:
    """Before training: the library is there and (MLflow) its store opens, so that a wrong tracking.uri fails
    before the data is prepared and a run folder written. Creates a local sqlite store on first use."""
    require(cfg.tracking)
    if cfg.tracking.type == "mlflow":
        uri = store_uri(cfg.tracking, cfg.paths.results)
        with _mlflow_store(uri):
            pass


@contextlib.contextmanager
def _mlflow_store(uri: str) -> Iterator[Any]:
    """An MlflowClient on `uri`, its errors said as the user's to fix. A local store is opened under a file
    lock: sweep trials start together, and two processes creating one sqlite store's tables (or one experiment)
    at once make one of them fail."""
    from filelock import FileLock
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    local = _local_path(uri)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{local}.lock") if local is not None else contextlib.nullcontext()
    try:
        with lock:
            yield MlflowClient(uri)
    except MlflowException as exc:
        raise ConfigError(f"the MLflow store tracking.uri={uri} cannot be used: {str(exc).splitlines()[0]}",
                          fix="use sqlite:///<file> or http://<server>; MLflow 3 opens a file: store only with "
                              "MLFLOW_ALLOW_FILE_STORE=true") from None


def _local_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://"))
    return None


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local sqlite store go beside it (MLflow's own default is ./mlruns in each process's
    working folder, a different one for each sweep trial); a file store and a server keep their own."""
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None


def _ensure_experiment(uri: str, name: str) -> None:
    with _mlflow_store(uri) as client:
        found = client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "deleted":
            raise ConfigError(f"the MLflow experiment {name!r} in {uri} is deleted",
                              fix=f"restore it (mlflow experiments restore --experiment-id {found.experiment_id}) "
                                  "or set another tracking.experiment=...")
        if found is None:
            try:
                client.create_experiment(name, artifact_location=_artifact_location(uri))
            except Exception:  # a server: another trial created it first
                if client.get_experiment_by_name(name) is None:
                    raise


def run_tags(cfg: BaseConfig, run_dir: Path) -> dict[str, str]:
    """What a tracking run is: the variant and fold, the dataset and plan (from the run folder's place,
    `<results>/<dataset>/<plan>/<name>/fold_<k>`), whether it resumes, and the code that trains it."""
    run_dir = Path(run_dir).resolve()
    resumed = any((run_dir / CHECKPOINTS_DIR / name).is_file() for name in RESUMABLE_CHECKPOINTS)
    code = code_version()
    tags = {"variant": cfg.name, "fold": str(cfg.fold), "dataset": run_dir.parents[2].name,
            "plan": run_dir.parents[1].name, "configuration": configuration_name(cfg),
            "run_dir": str(run_dir), "resumed": str(resumed).lower(), "viseg.version": code.version}
    tags |= {f"viseg.{key}": str(value) for key, value in
             (("commit", code.commit), ("dirty", code.dirty), ("diff_sha256", code.diff_sha256)) if value is not None}
    return tags


def flat_params(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as `section.key` params, as the command line names them; lists stay one value."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat |= flat_params(value, f"{prefix}{key}.")
    return flat


def tracking_loggers(cfg: BaseConfig, run_dir: Path) -> list[Any]:
    """The tracking logger of `cfg.tracking` (none: an empty list), its run started and the config logged now,
    so that a store or account problem stops the run before its first epoch."""
    from omegaconf import OmegaConf

    if cfg.tracking.type == "none":
        return []
    require(cfg.tracking)
    tags = run_tags(cfg, run_dir)
    experiment = cfg.tracking.experiment or tags["dataset"]
    config = OmegaConf.to_container(OmegaConf.structured(cfg))
    name = f"{cfg.name}_fold{cfg.fold}"
    if cfg.tracking.type == "mlflow":
        return [_mlflow_logger(cfg, experiment, name, tags, flat_params(config))]
    return [_wandb_logger(cfg, run_dir, experiment, name, tags, config)]


def _mlflow_logger(cfg: BaseConfig, experiment: str, name: str, tags: dict[str, str],
                   params: dict[str, Any]) -> Any:
    from lightning.pytorch.loggers import MLFlowLogger

    uri = store_uri(cfg.tracking, cfg.paths.results)
    _ensure_experiment(uri, experiment)
    logger = MLFlowLogger(experiment_name=experiment, run_name=name, tracking_uri=uri, tags=tags,
                          artifact_location=_artifact_location(uri))
    with _mlflow_store(uri):  # the run is created here: its errors read like the store's
        logger.log_hyperparams(params)
    return logger


@functools.cache
def _closing_wandb_logger() -> type:
    """Lightning's WandbLogger, closing its W&B run when training fails. Lightning's leaves it open, and the next
    WandbLogger in the process (a Hydra multirun's next fold) would then log into the failed run."""
    from lightning.pytorch.loggers import WandbLogger

    class ClosingWandbLogger(WandbLogger):
        def finalize(self, status: str) -> None:
            super().finalize(status)
            if status != "success" and self._experiment is not None:
                self._experiment.finish(exit_code=1)

    return ClosingWandbLogger


def _wandb_logger(cfg: BaseConfig, run_dir: Path, project: str, name: str, tags: dict[str, str],
                  config: dict[str, Any]) -> Any:
    """A W&B run grouped by variant (its folds side by side). Its files go to WANDB_DIR when set, else into the
    run folder (`<run folder>/wandb/`, where an offline run waits for `wandb sync`), never into a sweep trial's
    working folder."""
    import wandb

    uri = store_uri(cfg.tracking, cfg.paths.results)
    labels = [tags["variant"], f"fold_{cfg.fold}", tags["configuration"], *(["resumed"] if tags["resumed"] == "true"
                                                                            else [])]
    logger = _closing_wandb_logger()(
        name=name, project=project, save_dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
        group=cfg.name, tags=[label[:64] for label in labels], mode=cfg.tracking.mode,
        config={"run": tags}, settings=wandb.Settings(base_url=uri) if uri else None)
    try:
        logger.log_hyperparams(config)
    except (wandb.errors.Error, OSError) as exc:
        raise ConfigError(f"W&B could not start the run in project {project!r}: {str(exc).splitlines()[0]}",
                          fix="log in (wandb login, or set WANDB_API_KEY), or track without an account: "
                              "tracking.mode=offline") from None
    return logger


def finish_tracking(trainer: Any, run_dir: Path, validation: dict[str, Any]) -> None:
    """After the whole-case validation: its Dice as final metrics, the run folder's files as artifacts, and the
    tracking run closed (MLflow: its end time set again, after the validation; W&B: finished)."""
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    if not trainer.is_global_zero:
        return
    final = {"final/mean_dice": validation.get("mean_dice")}
    # a region's key, "(1, 2)", as a name every tracker takes: "1_2"
    final |= {f"final/dice_{re.sub(r'[^0-9A-Za-z]+', '_', label).strip('_')}": value
              for label, value in validation.get("mean_dice_per_class", {}).items()}
    final = {key: float(value) for key, value in final.items() if value is not None}
    files = [Path(run_dir) / name for name in ARTIFACTS if (Path(run_dir) / name).is_file()]
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            client, run_id = logger.experiment, logger.run_id
            for key, value in final.items():
                client.log_metric(run_id, key, value, step=trainer.global_step)
            for path in files:
                client.log_artifact(run_id, str(path), artifact_path=str(path.parent.relative_to(run_dir))
                                    if path.parent != Path(run_dir) else None)
            client.set_terminated(run_id, "FINISHED")
        elif isinstance(logger, WandbLogger):
            run = logger.experiment
            run.summary.update(final)
            for path in files:
                run.save(str(path), base_path=str(run_dir), policy="now")
            run.finish()
