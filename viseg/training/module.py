"""The LightningModule: loss, steps, pseudo-Dice, optimizer and scheduler. No paths, no I/O, no splitting.

Augmentation runs in `on_after_batch_transfer`, i.e. batched on the training device (the GPU when there is
one) instead of in CPU loader workers. Validation uses nnU-Net's pseudo-Dice: true/false positives and
false negatives summed over the epoch's validation patches, smoothed across epochs with an exponential
moving average (0.9) that selects the best checkpoint. Voxels of the ignore label (`ignore_index`) count
in no class, as in nnU-Net's validation_step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from viseg.config import LRSchedulerConfig, OptimizerConfig
from viseg.errors import TrainingError
from viseg.schedulers import build_scheduler
from viseg.training.distributed import all_reduce_sum

Batch = tuple[Tensor, Tensor]
EMA_DECAY = 0.9


class SegmentationModule(L.LightningModule):
    def __init__(self, network: nn.Module, loss: nn.Module, num_classes: int, optimizer: OptimizerConfig,
                 lr_scheduler: LRSchedulerConfig, max_epochs: int,
                 train_transform: Callable[[Tensor, Tensor], Batch] | None = None,
                 val_transform: Callable[[Tensor, Tensor], Batch] | None = None,
                 ignore_index: int | None = None, region_codes: tuple[tuple[int, ...], ...] = ()):
        """`num_classes`: the network's outputs (one per region for a region plan, whose `region_codes`
        are then the label codes of each region)."""
        super().__init__()
        self.network = network
        self.loss = loss
        self.num_classes, self.ignore_index, self.region_codes = num_classes, ignore_index, region_codes
        self.optimizer_cfg, self.scheduler_cfg, self.max_epochs = optimizer, lr_scheduler, max_epochs
        self.train_transform, self.val_transform = train_transform, val_transform
        self.ema_pseudo_dice: float | None = None
        scored = len(region_codes) if region_codes else num_classes - 1
        self._counts = torch.zeros(3, scored, dtype=torch.float64)  # tp, fp, fn per foreground class or region

    def forward(self, x: Tensor) -> Any:
        return self.network(x)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        data, seg = batch
        transform = self.train_transform if self.trainer.training else self.val_transform
        return transform(data, seg) if transform is not None else (data, seg)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        data, seg = batch
        loss = self.loss(self.network(data), seg)
        if not torch.isfinite(loss):
            # stop before the optimizer step: the weights and the last checkpoint stay finite
            raise TrainingError(f"the training loss is {float(loss)} at epoch {self.current_epoch}, step "
                                f"{batch_idx}: training diverged",
                                fix="lower optimizer.lr, or clip gradients with trainer.gradient_clip_val")
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=data.shape[0],
                 sync_dist=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=False, on_epoch=True,
                 batch_size=data.shape[0], sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._counts.zero_()

    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor:
        data, seg = batch
        output = self.network(data)
        loss = self.loss(output, seg)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=data.shape[0],
                 sync_dist=True)
        logits = output[0] if isinstance(output, list | tuple) else output
        if self.region_codes:  # nnU-Net: sigmoid > 0.5 per region, i.e. a positive logit
            counts = region_confusion_counts(logits > 0, seg, self.region_codes, self.ignore_index)
        else:
            counts = confusion_counts(logits.argmax(1), seg[:, 0], self.num_classes, self.ignore_index)
        self._counts += counts.cpu()
        return loss

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        tp, fp, fn = all_reduce_sum(self._counts.to(self.device)).cpu()  # every rank's validation patches
        denominator = 2 * tp + fp + fn
        dice = torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), torch.nan)
        mean = float(torch.nanmean(dice)) if not torch.isnan(dice).all() else 0.0
        self.ema_pseudo_dice = mean if self.ema_pseudo_dice is None else (
            EMA_DECAY * self.ema_pseudo_dice + (1 - EMA_DECAY) * mean)
        for k, value in enumerate(dice.tolist(), start=1):
            self.log(f"val/pseudo_dice_{k}", 0.0 if value != value else value, sync_dist=True)
        self.log("val/mean_pseudo_dice", mean, prog_bar=True, sync_dist=True)
        self.log("val/ema_pseudo_dice", self.ema_pseudo_dice, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optimizer_cfg
        if cfg.type == "SGD":
            optimizer = torch.optim.SGD(self.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = build_scheduler(self.scheduler_cfg.type, optimizer, self.scheduler_cfg.kwargs, self.max_epochs)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if self.scheduler_cfg.monitor:
            config["monitor"] = self.scheduler_cfg.monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ema_pseudo_dice"] = self.ema_pseudo_dice

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.ema_pseudo_dice = checkpoint.get("ema_pseudo_dice")


def confusion_counts(prediction: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None
                     ) -> Tensor:
    """(3, K-1): true positives, false positives, false negatives per foreground class, over the voxels whose
    target is not `ignore_index` (a prediction there is neither right nor wrong)."""
    counted = None if ignore_index is None else target != ignore_index
    counts = []
    for k in range(1, num_classes):
        pred, true = prediction == k, target == k
        if counted is not None:
            pred &= counted
        counts.append(torch.stack([(pred & true).sum(), (pred & ~true).sum(), (~pred & true).sum()]))
    return torch.stack(counts, dim=1).double()


def region_confusion_counts(inside: Tensor, seg: Tensor, region_codes: tuple[tuple[int, ...], ...],
                            ignore_index: int | None = None) -> Tensor:
    """(3, R): true positives, false positives, false negatives per region, from (B, R, ...) predicted
    membership and (B, 1, ...) label codes, over the voxels whose label is not `ignore_index`."""
    from viseg.training.loss import region_targets

    true = region_targets(seg.long(), region_codes).bool()
    pred = inside if ignore_index is None else inside & (seg != ignore_index)
    axes = (0, *range(2, pred.ndim))
    return torch.stack([(pred & true).sum(axes), (pred & ~true).sum(axes), (~pred & true).sum(axes)]).double()
