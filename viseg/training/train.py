"""`train(cfg)`: from a typed config to a trained network in a self-contained run folder.

The same function serves `python -m viseg.train` and every sweep trial: it needs no Ray, and reports
per-epoch metrics and the checkpoint folder through an optional `report` callable. The run folder is
named from (dataset, plan, config name, fold), never from a timestamp, so resuming finds it again:

    <paths.results>/<dataset>/<plans folder>/<name>/fold_<k>/
        plans.json  dataset.json  config.yaml (fully resolved)  metrics.csv  progress.png
        checkpoints/last.ckpt  checkpoints/best.ckpt  tensorboard/  validation/summary.json
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from viseg.config import BaseConfig
from viseg.data.labels import LabelEncoding
from viseg.errors import ConfigError
from viseg.io.atomic import copy_atomically, write_text_atomically
from viseg.io.jsonio import read_json, write_json_atomic
from viseg.io.layout import (
    BEST_CHECKPOINT,
    CHECKPOINTS_DIR,
    CODE_VERSION,
    FINISHED_MARKER,
    RESUMABLE_CHECKPOINTS,
)
from viseg.noise import quiet_libraries
from viseg.planning.plans import Plans
from viseg.preprocessing.prepare import PreparedDataset, prepare
from viseg.preprocessing.preprocess import preprocess_dataset
from viseg.provenance import code_changes, code_version
from viseg.training.cascade import is_cascade, prepare_previous_stage
from viseg.training.continue_run import is_started, own_prepared
from viseg.training.init_weights import INIT_REPORT, InitReport, encoder_parameters, initialise_from, source_checkpoint
from viseg.training.ranks import process_rank
from viseg.training.resolve import resolve_config
from viseg.training.tracking import check_store, finish_tracking, tracking_loggers
from viseg.training.validation import validate_full_cases

if TYPE_CHECKING:  # callbacks import Lightning: a config error must not wait for it (nor must --help)
    from viseg.training.callbacks import ReportFn

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    ema_pseudo_dice: float | None
    validation: dict[str, Any]


def run_dir_for(cfg: BaseConfig, prepared: PreparedDataset) -> Path:
    return (Path(cfg.paths.results) / prepared.cache_dir.name / prepared.plans_dir.name / cfg.name
            / f"fold_{cfg.fold}")


def config_yaml(cfg: BaseConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def accelerator_and_devices(devices: Any) -> tuple[str, Any]:
    """`devices` as in the training docs ('auto', a count, or a list of GPU indices); CPU when no GPU, where a
    count above 1 runs DDP on that many CPU processes (gloo), as tests and CPU clusters do."""
    from viseg.inference.device import resolve_device

    if resolve_device("auto").type != "cuda":
        if isinstance(devices, int) and not isinstance(devices, bool) and devices > 1:
            log.info("no CUDA GPU found: DDP on %d CPU processes (gloo)", devices)
            return "cpu", devices
        log.info("no CUDA GPU found: training on CPU")
        return "cpu", 1
    if devices in ("auto", None):
        return "gpu", 1
    return "gpu", list(devices) if isinstance(devices, list | tuple) else devices


def _write_run_files(run_dir: Path, cfg: BaseConfig, prepared: PreparedDataset) -> None:
    """Everything a run needs besides the images: the plan, splits, dataset.json and the resolved config. A
    continued run's prepared dataset is its own folder (plans_dir == run_dir): its plan and split stay."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if prepared.plans_dir != run_dir:
        for name in ("plans.json", "splits.json", "dataset.json"):
            copy_atomically(prepared.plans_dir / name, run_dir / name)
    write_text_atomically(run_dir / "config.yaml", config_yaml(cfg))
    _record_code(run_dir)


def _record_code(run_dir: Path) -> None:
    """code.json keeps the code a run started with; a continued run compares and says when it differs."""
    now, path = code_version(), run_dir / CODE_VERSION
    if not path.is_file():
        write_json_atomic(path, now.to_dict())
        return
    try:
        started = read_json(path)
    except (OSError, ValueError):
        log.warning("%s is unreadable: this run's starting code is unknown", path)
        return
    changes = code_changes(started, now)
    if changes:
        log.warning("%s continues with other code than it started with (%s): its epochs from here on are "
                    "trained by the code now in %s", run_dir, "; ".join(changes), now.source)


def existing_run_files(run_dir: Path) -> list[str]:
    """What makes a folder an existing run: its config, its finished marker or any checkpoint. last.ckpt alone
    is not enough: a kill between the two renames that replace it leaves only previous.ckpt."""
    names = [FINISHED_MARKER, "config.yaml",
             *(f"{CHECKPOINTS_DIR}/{n}" for n in (*RESUMABLE_CHECKPOINTS, BEST_CHECKPOINT))]
    return [name for name in names if (run_dir / name).exists()]


def _refuse_existing_run(run_dir: Path) -> None:
    """Never overwrite a run: a finished or interrupted run is continued explicitly, not restarted (training
    from epoch 0 in its folder would overwrite best.ckpt and metrics.csv)."""
    found = existing_run_files(run_dir)
    if not found:
        return
    if any((run_dir / CHECKPOINTS_DIR / name).is_file() for name in RESUMABLE_CHECKPOINTS):
        fix = (f"continue it with continue_from={run_dir} (trainer.max_epochs=... to train longer), or start a "
               "new one with a different name=...")
    else:
        fix = (f"it stopped before its first checkpoint, so there is nothing to continue: remove {run_dir} to "
               "train it again, or start a new one with a different name=...")
    raise ConfigError(f"run folder {run_dir} already holds a run ({', '.join(found)})", fix=fix)


def build_datamodule(cfg: BaseConfig, prepared: PreparedDataset, folder: Path, input_size: tuple[int, ...],
                     previous_dir: Path | None = None) -> Any:

    from viseg.training.loader import SegmentationDataModule
    split = prepared.splits[cfg.fold]
    return SegmentationDataModule(
        folder=folder, train_ids=split["train"], val_ids=split["val"], input_patch_size=input_size,
        batch_size=cfg.batch_size, foreground_labels=list(cfg.foreground_labels), sampling=cfg.sampling,
        loader=cfg.loader, iterations_per_epoch=cfg.trainer.iterations_per_epoch,
        val_iterations=cfg.trainer.val_iterations, conv_dim=cfg.model.model_args.conv_dim, seed=cfg.seed,
        network_patch_size=tuple(cfg.patch_size), ignore_label=prepared.plans.ignore_label,
        oversample_keys=prepared.plans.label_encoding().scored if prepared.plans.regions else None,
        previous_dir=previous_dir)


def build_module(cfg: BaseConfig, prepared: PreparedDataset) -> tuple[Any, tuple[int, ...]]:
    """The LightningModule and the (larger) input size the loader must sample for augmentation."""

    from viseg.planning.network import build_model
    from viseg.training.augment import BatchAugmenter, augmentation_input_size, is_anisotropic
    from viseg.training.loss import DeepSupervisionLoss, deep_supervision_scales
    from viseg.training.module import SegmentationModule
    plan = prepared.plans.configuration(prepared.configuration)
    patch = tuple(plan.patch_size)
    deep = cfg.model.model_args.deep_supervision
    network = build_model(prepared.plans, prepared.configuration, deep_supervision=deep)
    n_outputs = len(deep_supervision_scales(plan.network.strides)) if deep else 1
    labels = prepared.plans.label_encoding()
    loss = DeepSupervisionLoss(_loss(cfg, plan.batch_dice, labels), n_outputs)
    anisotropic = is_anisotropic(patch, plan.spacing)
    disabled = type(cfg.augmentation)(enabled=False)
    cascade = plan.previous_stage is not None
    module = SegmentationModule(
        network, loss, labels.num_classes, cfg.optimizer, cfg.lr_scheduler, cfg.trainer.max_epochs,
        train_transform=BatchAugmenter(patch, cfg.augmentation, anisotropic, labels, plan.use_mask_for_norm, cascade),
        val_transform=BatchAugmenter(patch, disabled, anisotropic, labels, plan.use_mask_for_norm, cascade),
        ignore_index=labels.ignore_index, region_codes=labels.region_codes)
    return module, augmentation_input_size(patch, cfg.augmentation, anisotropic)


def _loss(cfg: BaseConfig, batch_dice: bool, labels: LabelEncoding) -> Any:
    """nnU-Net's DC_and_CE_loss, or DC_and_BCE_loss for a region plan."""
    from viseg.training.loss import DiceCELoss, RegionDiceBCELoss
    if not labels.has_regions:
        return DiceCELoss(batch_dice, cfg.loss.dice_weight, cfg.loss.ce_weight, cfg.loss.class_weights,
                          ignore_index=labels.ignore_index)
    if cfg.loss.class_weights:
        raise ConfigError(f"loss.class_weights={list(cfg.loss.class_weights)} weighs the classes of a softmax; "
                          "this plan trains regions (one sigmoid output each)", fix="drop loss.class_weights")
    return RegionDiceBCELoss(batch_dice, labels.region_codes, cfg.loss.dice_weight, cfg.loss.ce_weight,
                             ignore_index=labels.ignore_index)


def build_trainer(cfg: BaseConfig, run_dir: Path, report: ReportFn | None, progress: bool,
                  extra_callbacks: tuple[Any, ...] = (), notes: tuple[str, ...] = (), plans: Plans | None = None,
                  ray_train: bool = False) -> Any:
    """`plans`: the run's plan (default: its plans.json). `ray_train`: this process is one Ray Train worker of a
    multi-worker sweep trial, DDP over the process group Ray set up (sweep/train_workers.py)."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from viseg.training.callbacks import (
        AdoptOptimizerSettings,
        EpochSeeder,
        MetricsHistory,
        ReportHook,
        RunCheckpoints,
        TrainingLog,
    )

    accelerator, devices = accelerator_and_devices(cfg.devices if not ray_train else "auto")
    several = (devices if isinstance(devices, int) else len(devices)) > 1
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    checkpoint_dir = run_dir / "checkpoints"
    history = MetricsHistory(run_dir)
    # order matters: the history records the epoch, the checkpoint saves it, then the report sees both
    plans_dict = (plans or Plans.load(run_dir / "plans.json")).to_dict()
    # `python -m viseg.train` off a terminal prints the log's lines; a sweep trial (report given) does not
    echo = report is None and not sys.stdout.isatty()
    momentum = cfg.optimizer.momentum if cfg.optimizer.type == "SGD" else None
    # AdoptOptimizerSettings before TrainingLog: the start line then shows the learning rate trained with
    callbacks = [AdoptOptimizerSettings(cfg.optimizer.lr, cfg.optimizer.weight_decay, momentum), history,
                 TrainingLog(run_dir, history, echo, notes),
                 RunCheckpoints(checkpoint_dir, config_yaml(cfg), plans_dict),
                 EpochSeeder(), *extra_callbacks]
    if report is not None:
        callbacks.append(ReportHook(report, history, checkpoint_dir))
    distributed: dict[str, Any] = {"strategy": "ddp" if several else "auto"}
    if ray_train:
        from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment

        distributed = {"strategy": RayDDPStrategy(), "plugins": [RayLightningEnvironment()]}
    trainer = L.Trainer(
        accelerator=accelerator, devices="auto" if ray_train else devices, **distributed, precision=precision,
        max_epochs=cfg.trainer.max_epochs,
        limit_train_batches=cfg.trainer.iterations_per_epoch, limit_val_batches=cfg.trainer.val_iterations,
        gradient_clip_val=cfg.trainer.gradient_clip_val, num_sanity_val_steps=0, callbacks=callbacks,
        logger=[TensorBoardLogger(run_dir, name="tensorboard", version=""), *tracking_loggers(cfg, run_dir)],
        enable_checkpointing=False,
        enable_progress_bar=progress, enable_model_summary=False, deterministic=False, log_every_n_steps=1)
    if ray_train:
        from ray.train.lightning import prepare_trainer

        trainer = prepare_trainer(trainer)
    return trainer


def _initial_weights(cfg: BaseConfig, module: Any, run_dir: Path, source: Path | None) -> InitReport | None:
    """init_from=: the source checkpoint's weights into a new run's network, what was loaded kept in the run
    folder. A resumed run (no `source`) has its own weights in its checkpoint; it only reads back what was loaded
    (for finetune's freezing)."""
    if not cfg.init_from:
        return None
    path = run_dir / INIT_REPORT
    if source is None:
        return InitReport.from_dict(read_json(path)) if path.is_file() else None
    started_from = initialise_from(module.network, source, cfg.init_from)
    write_json_atomic(path, started_from.to_dict())
    for line in started_from.lines():
        log.info(line)
    return started_from


def _finetune_note(cfg: BaseConfig) -> list[str]:
    epochs, lr = cfg.finetune.freeze_encoder_epochs, cfg.finetune.lr
    if not epochs:
        return []
    return [f"encoder frozen for the first {epochs} epoch(s)" + (f", which train at lr {lr:g}" if lr else "")]


def _finetune_callbacks(cfg: BaseConfig, module: Any, started_from: InitReport | None) -> tuple[Any, ...]:
    from viseg.training.callbacks import FreezeEncoder

    if not cfg.finetune.freeze_encoder_epochs:
        return ()
    return (FreezeEncoder(encoder_parameters(module.network, started_from), cfg.finetune.freeze_encoder_epochs,
                          cfg.finetune.lr),)


def _wait_for_rank_zero() -> None:
    """A barrier, where a process group already exists (Ray Train sets it up before train() starts; Lightning's
    own launcher only in trainer.fit, after rank 0 has written the run folder)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fit(trainer: Any, module: Any, datamodule: Any, resume_from: Path | None) -> None:
    """trainer.fit, resuming from `resume_from` if given. weights_only: a checkpoint is data, never code
    (viseg checkpoints hold only tensors and plain values), so one that asks to import or call anything is
    refused, and said so instead of a traceback."""
    import pickle

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None,
                    weights_only=True)
    except pickle.UnpicklingError as exc:
        if resume_from is None:
            raise
        raise ConfigError(f"refusing to resume from {resume_from}: it holds more than tensors and plain values "
                          f"({str(exc).splitlines()[0]})",
                          fix="resume only from checkpoints written by viseg; this one was altered or "
                              "replaced: delete it and start the run again (or under a new name=...)") from None


def train(cfg: BaseConfig, prepared: PreparedDataset | None = None, report: ReportFn | None = None,
          resume_from: Path | None = None, run_dir: Path | None = None, progress: bool = True,
          retry: bool = False, ray_train: bool = False) -> TrainResult:
    """Plan and preprocess if needed, train one fold, validate it on whole cases.

    `resume_from` (a Lightning checkpoint) continues a run with its optimizer, scheduler, epoch and
    callback state; `run_dir` then names the run folder to continue in, and the run goes on with its own
    plan and split whatever `prepared` holds (see continue_run.own_prepared). `retry`: the caller owns
    `run_dir` (a sweep trial run again), so a folder with nothing to resume from is trained from the start
    instead of refused. `ray_train`: one worker of a multi-worker sweep trial (sweep/train_workers.py).
    """
    import lightning as L

    quiet_libraries()
    check_store(cfg)  # tracking=mlflow|wandb: its package and store, before any work
    # init_from= of a new run: its checkpoint found (a model.zip checked and unpacked) once, before any work
    source = source_checkpoint(cfg.init_from) if cfg.init_from and resume_from is None else None
    started = time.perf_counter()
    prepared = prepared or prepare(cfg, progress)
    run_dir = run_dir or run_dir_for(cfg, prepared)
    # under DDP, ranks 1.. start from trainer.fit on rank 0, which has written the run folder by then
    writer = process_rank() == 0
    if resume_from is None and not retry and writer:
        _refuse_existing_run(run_dir)
    if resume_from is not None and is_started(run_dir):
        prepared = own_prepared(cfg, run_dir, prepared)
    cfg = resolve_config(cfg, prepared.plans, prepared.configuration)
    folder = preprocess_dataset(prepared, cfg.num_processes, progress)
    # a cascade's previous-stage inputs are data too: checked and predicted before the run folder exists
    cascade = is_cascade(prepared)
    previous = prepare_previous_stage(cfg, prepared, run_dir, progress) if cascade and writer else None
    # the run folder is written once its data is ready: a failed or killed preprocessing leaves no run behind
    # (the same command then simply runs again), while any later stop leaves one to continue, never to redo
    if writer:
        _write_run_files(run_dir, cfg, prepared)
    _wait_for_rank_zero()  # Ray Train starts every rank at once: the others go on once the folder is written
    if cascade and not writer:
        previous = prepare_previous_stage(cfg, prepared, run_dir, progress)  # rank 0 predicted them: found
    L.seed_everything(cfg.seed + cfg.fold, workers=True, verbose=False)
    module, input_size = build_module(cfg, prepared)
    started_from = _initial_weights(cfg, module, run_dir, source)
    datamodule = build_datamodule(cfg, prepared, folder, input_size, previous)
    notes = [*started_from.lines(), *_finetune_note(cfg)] if started_from and source is not None else []
    trainer = build_trainer(cfg, run_dir, report, progress, _finetune_callbacks(cfg, module, started_from),
                            tuple(notes), prepared.plans, ray_train)
    _fit(trainer, module, datamodule, resume_from)
    if not writer:  # rank 0 validates and marks the run finished
        return TrainResult(run_dir=run_dir, epochs=trainer.current_epoch, ema_pseudo_dice=module.ema_pseudo_dice,
                           validation={"mean_dice": None, "mean_dice_per_class": {}})
    validation_started = time.perf_counter()
    validation = validate_full_cases(module.network, cfg, prepared, folder, run_dir, progress, previous)
    validation_seconds = time.perf_counter() - validation_started
    result = TrainResult(run_dir=run_dir, epochs=trainer.current_epoch, ema_pseudo_dice=module.ema_pseudo_dice,
                         validation=validation)
    # seconds: this call's own time (a resumed run counts only its last part), for the sweep-overhead bench;
    # validation_seconds: the full-case validation's part of it, for the quality bench (nnU-Net's is timed apart)
    write_json_atomic(run_dir / FINISHED_MARKER, {"epochs": result.epochs, "ema_pseudo_dice": result.ema_pseudo_dice,
                                                  "mean_dice": validation["mean_dice"],
                                                  "seconds": time.perf_counter() - started,
                                                  "validation_seconds": validation_seconds})
    finish_tracking(trainer, run_dir, validation)
    return result
