"""Lightning callbacks for a run folder: atomic checkpoints that carry provenance, the metrics history
(CSV and progress.png, both rebuilt from state saved in the checkpoint so they survive a resume), epoch
timing and an optional per-epoch report hook (the Ray Tune adapter uses it)."""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch

from viseg.errors import free_space_then, is_storage_full, storage_full
from viseg.io.atomic import write_atomically, write_text_atomically
from viseg.io.checkpoints import keep_previous as keep_previous_checkpoint
from viseg.io.layout import BEST_CHECKPOINT, LAST_CHECKPOINT, TRAINING_LOG

ReportFn = Callable[[dict[str, float], Path], None]
BEST_METRIC = "val/ema_pseudo_dice"


def atomic_save_checkpoint(trainer: L.Trainer, path: Path, keep_previous: bool = False) -> None:
    """Lightning writes checkpoints in place; a kill mid-write would leave a truncated file that a later
    resume trusts. Write beside it, flush to disk, then rename over the old one (after moving the old one to
    previous.ckpt when asked: renames only, so every moment has at least one complete checkpoint). Under DDP
    every rank must call save_checkpoint (it synchronises them), and only rank 0 writes."""
    if not trainer.is_global_zero:
        trainer.save_checkpoint(path, weights_only=False)  # writes nothing off rank 0
        return
    try:
        # the full state (weights_only=False): resuming needs the optimizer too
        write_atomically(path, lambda tmp: trainer.save_checkpoint(tmp, weights_only=False), fsync=True,
                         before_replace=(lambda: keep_previous_checkpoint(path.parent)) if keep_previous else None)
    except Exception as exc:
        if is_storage_full(exc):
            # the run folder exists now, so the same `viseg.train` command would refuse it: continue it instead
            # (a sweep rewrites this advice into its own resume=)
            run_dir = path.parent.parent
            raise storage_full("a checkpoint", path, fix=free_space_then(
                f"continue the run: python -m viseg.train continue_from={run_dir} (it resumes from "
                f"{path.parent / LAST_CHECKPOINT})")) from exc
        raise


class RunCheckpoints(L.Callback):
    """`last.ckpt` after every epoch, `best.ckpt` when the moving-average pseudo-Dice improves. Every
    checkpoint carries the fully resolved config and the plan, so it alone suffices to resume or predict."""

    def __init__(self, directory: Path, config_yaml: str, plans: dict[str, Any]):
        self.directory = Path(directory)
        self.config_yaml, self.plans = config_yaml, plans
        self.best: float | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint["viseg"] = {"config_yaml": self.config_yaml, "plans": self.plans}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        score = trainer.callback_metrics.get(BEST_METRIC)
        improved = score is not None and (self.best is None or float(score) > self.best)
        if improved:
            self.best = float(score)
        # previous.ckpt: a resume falls back to it should last.ckpt ever be damaged
        atomic_save_checkpoint(trainer, self.directory / LAST_CHECKPOINT, keep_previous=True)
        if improved:
            atomic_save_checkpoint(trainer, self.directory / BEST_CHECKPOINT)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")


class MetricsHistory(L.Callback):
    """One row per epoch: written to metrics.csv and plotted to progress.png after every epoch.

    Must run before RunCheckpoints so that the checkpoint's copy of the history includes its own epoch."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.rows: list[dict[str, float]] = []
        self._epoch_start = 0.0
        self.writes = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resumed run's files start from its checkpoint's history (restored by now): after a fallback to
        previous.ckpt, or a PBT exploit of another trial's checkpoint, the folder's own copy is not the run's."""
        self.writes = trainer.is_global_zero  # under DDP, rank 0 alone writes the run's files
        if self.rows and self.writes:
            self._write_csv()
            plot_progress(self.rows, self.run_dir / "progress.png")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row = {"epoch": float(trainer.current_epoch), "epoch_time": time.perf_counter() - self._epoch_start}
        row |= {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        self.rows.append(row)
        if self.writes:
            self._write_csv()
            plot_progress(self.rows, self.run_dir / "progress.png")

    def _write_csv(self) -> None:
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomically(self.run_dir / "metrics.csv", text.getvalue())

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))


class TrainingLog(L.Callback):
    """training_log.txt, as nnU-Net users read it: the start (device, precision, epochs), one plain line per
    epoch from the history's row (losses, pseudo-Dice per class, EMA, learning rate, epoch time, "new best"),
    and the end. Appended, so a continued run adds to it. With `echo` the lines also go to stdout: for
    `python -m viseg.train` off a terminal (a log file, a batch job), where a progress bar comes out garbled.

    Must run after MetricsHistory, whose row of the epoch it formats."""

    def __init__(self, run_dir: Path, history: MetricsHistory, echo: bool = False, notes: tuple[str, ...] = ()):
        self.path, self.history, self.echo = Path(run_dir) / TRAINING_LOG, history, echo
        self.notes = notes  # said once before training starts (e.g. which weights init_from= loaded)
        self.writes = True

    def _write(self, text: str) -> None:
        if not self.writes:  # under DDP, rank 0 alone keeps the log
            return
        line = f"{datetime.now().isoformat(sep=' ', timespec='seconds')}  {text}"
        with self.path.open("a", encoding="utf-8") as log:
            log.write(line + "\n")
        if self.echo:
            print(line, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.writes = trainer.is_global_zero
        for note in self.notes:
            self._write(note)
        start = "continuing at" if trainer.current_epoch else "training from"
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan
        adopted = next((c.changes for c in trainer.callbacks if isinstance(c, AdoptOptimizerSettings)), [])
        processes = f" x {trainer.world_size} processes (DDP)" if trainer.world_size > 1 else ""
        self._write(f"{start} epoch {trainer.current_epoch} of {trainer.max_epochs} on {pl_module.device}{processes} "
                    f"({trainer.precision} precision), lr {lr:.4g}"
                    + (f"; changed from the checkpoint: {', '.join(adopted)}" if adopted else ""))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.history.rows:
            self._write(epoch_line(self.history.rows, trainer.max_epochs))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        emas = [(r.get(BEST_METRIC, math.nan), int(r["epoch"])) for r in self.history.rows]
        best = max((e for e in emas if not math.isnan(e[0])), default=None)
        self._write(f"training ended after epoch {trainer.current_epoch - 1}"
                    + (f"; best EMA pseudo-Dice {best[0]:.4f} at epoch {best[1]}" if best else ""))


def epoch_line(rows: list[dict[str, float]], max_epochs: int | None) -> str:
    """The last row of the history as one line; "new best" when its EMA pseudo-Dice beats every earlier one."""
    row = rows[-1]
    per_class = [v for k, v in sorted(row.items()) if k.startswith("val/pseudo_dice_")]
    earlier = [r[BEST_METRIC] for r in rows[:-1] if BEST_METRIC in r]
    ema = row.get(BEST_METRIC)
    fields = [f"epoch {int(row['epoch'])}" + (f"/{max_epochs - 1}" if max_epochs else ""),
              f"train_loss {row.get('train/loss', math.nan):.4f}", f"val_loss {row.get('val/loss', math.nan):.4f}",
              "pseudo_dice [" + " ".join(f"{v:.4f}" for v in per_class) + "]",
              f"ema {ema:.4f}" if ema is not None else "ema -", f"lr {row.get('lr', math.nan):.3g}",
              f"time {row['epoch_time']:.1f} s"]
    if ema is not None and all(ema > e for e in earlier):
        fields.append("new best")
    return "  ".join(fields)


def plot_progress(rows: list[dict[str, float]], path: Path) -> None:
    """nnU-Net-style progress plot: losses and pseudo-Dice, learning rate, epoch time. A bare Figure on the
    Agg canvas: no pyplot, no backend switch, nothing global in a Ray worker that is reused across trials."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in rows]

    def series(key: str) -> list[float]:
        return [r.get(key, math.nan) for r in rows]

    fig = Figure(figsize=(9, 10))
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    axes[0].plot(epochs, series("train/loss"), label="train loss", color="tab:blue")
    axes[0].plot(epochs, series("val/loss"), label="val loss", color="tab:red")
    dice_axis = axes[0].twinx()
    dice_axis.plot(epochs, series("val/mean_pseudo_dice"), ":", label="pseudo Dice", color="tab:green")
    dice_axis.plot(epochs, series("val/ema_pseudo_dice"), label="pseudo Dice (EMA)", color="tab:green")
    dice_axis.set_ylabel("pseudo Dice")
    axes[0].set_ylabel("loss")
    axes[0].legend(loc="upper left")
    dice_axis.legend(loc="upper right")
    axes[1].plot(epochs, series("lr"), color="tab:purple")
    axes[1].set_ylabel("learning rate")
    axes[2].plot(epochs, series("epoch_time"), color="tab:gray")
    axes[2].set_ylabel("epoch time (s)")
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=80), keep_ending=True)


class ReportHook(L.Callback):
    """Hands each epoch's metrics and the checkpoint folder to `report` once the checkpoint is on disk."""

    def __init__(self, report: ReportFn, history: MetricsHistory, checkpoint_dir: Path):
        self.report, self.history, self.checkpoint_dir = report, history, Path(checkpoint_dir)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report(dict(self.history.rows[-1]), self.checkpoint_dir)


class AdoptOptimizerSettings(L.Callback):
    """A resumed run trains on with the config's optimizer values, not the checkpoint's: what Population Based
    Training's explore step relies on (it restarts a trial from a better trial's checkpoint with a perturbed
    learning rate). Lightning restores the optimizer and LR-scheduler state before `on_train_start`, so this runs
    then, before TrainingLog writes the start line that shows the learning rate. The schedule is rescaled, not
    restarted: lr, initial_lr and the scheduler's base_lrs are all multiplied by new / old base learning rate, so
    poly or step decay goes on from the epoch reached. A fresh run, or one resumed unchanged, is left as it is."""

    def __init__(self, lr: float, weight_decay: float, momentum: float | None):
        self.lr, self.weight_decay, self.momentum = lr, weight_decay, momentum
        self.changes: list[str] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0 or not trainer.optimizers:
            return
        optimizer = trainer.optimizers[0]
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        base = getattr(schedulers[0], "base_lrs", None) if schedulers else None
        old_lr = base[0] if base else optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        factor = self.lr / old_lr if old_lr else 1.0
        if not math.isclose(factor, 1.0, rel_tol=1e-9):
            for group in optimizer.param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
            for scheduler in schedulers:
                if hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
                if hasattr(scheduler, "_last_lr"):
                    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
            self.changes.append(f"optimizer.lr {old_lr:.4g} -> {self.lr:.4g}")
        for key, value in (("weight_decay", self.weight_decay), ("momentum", self.momentum)):
            old = optimizer.param_groups[0].get(key)
            if value is None or old is None or math.isclose(old, value, rel_tol=1e-9):
                continue
            for group in optimizer.param_groups:
                group[key] = value
            self.changes.append(f"optimizer.{key} {old:.4g} -> {value:.4g}")


def history_rows(checkpoint: Path) -> list[dict[str, float]]:
    """The per-epoch rows a checkpoint's MetricsHistory holds (the epochs it has trained), read as plain data."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key, value in (state.get("callbacks") or {}).items():
        if str(key).startswith(MetricsHistory.__qualname__) and isinstance(value, dict):
            return list(value.get("rows", []))
    return []


class EpochSeeder(L.Callback):
    """Tell the data module which epoch starts, so every epoch draws new patches, reproducibly."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(trainer.current_epoch)


class FreezeEncoder(L.Callback):
    """finetune.freeze_encoder_epochs / finetune.lr for a run started from other weights: for the first `epochs`
    epochs the encoder's loaded parameters get no gradient (the optimizer then skips them, weight decay too), and
    each optimizer step takes `lr` when given. The learning rate is swapped around the step only, so the
    schedule (chained ones such as StepLR included) never sees it and goes on as if there were no warm-up."""

    def __init__(self, parameters: list[torch.nn.Parameter], epochs: int, lr: float | None):
        self.parameters, self.epochs, self.lr = parameters, epochs, lr
        self._scheduled: list[float] | None = None

    def _frozen(self, trainer: L.Trainer) -> bool:
        return trainer.current_epoch < self.epochs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        frozen = self._frozen(trainer)
        for parameter in self.parameters:
            parameter.requires_grad_(not frozen)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.lr is None or not self._frozen(trainer) or not trainer.optimizers:
            return
        groups = trainer.optimizers[0].param_groups
        self._scheduled = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = self.lr

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._scheduled is None:
            return
        for group, lr in zip(trainer.optimizers[0].param_groups, self._scheduled, strict=True):
            group["lr"] = lr
        self._scheduled = None
