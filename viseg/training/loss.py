"""nnU-Net's training loss: soft Dice (foreground classes) + cross-entropy, over deep-supervision outputs;
for region-based plans soft Dice + binary cross-entropy over sigmoid region outputs (`RegionDiceBCELoss`).

Deep supervision weights halve per resolution level and the coarsest output gets weight 0, exactly as
nnU-Net does (1e-6 under DDP, which refuses parameters without a gradient, as nnU-Net does too); targets for
the coarse outputs are downsampled with nearest neighbour so that they stay valid label maps. With an
`ignore_index` (dataset.json's ignore label, see viseg.data.labels) those voxels are left out of both terms,
as nnU-Net's DC_and_CE_loss does: cross-entropy skips them and Dice masks them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from viseg.training.distributed import gather_sum, is_distributed


def deep_supervision_scales(strides: Sequence[Sequence[int]]) -> list[list[float]]:
    """Relative size of each decoder output, highest resolution first (nnU-Net's definition)."""
    cumulative = np.cumprod(np.vstack(strides), axis=0)
    return [list(1 / c) for c in cumulative][:-1]


DDP_COARSEST_WEIGHT = 1e-6


def deep_supervision_weights(n_outputs: int, distributed: bool = False) -> list[float]:
    weights = np.array([1 / (2**i) for i in range(n_outputs)])
    if n_outputs > 1:
        weights[-1] = DDP_COARSEST_WEIGHT if distributed else 0
    return (weights / weights.sum()).tolist()


class SoftDiceLoss(nn.Module):
    """Soft Dice over foreground classes; `batch_dice` pools the batch into one volume (nnU-Net for 2d).
    `mask` (B, 1, ...) keeps the voxels that count (nnU-Net's loss_mask): the others add to no sum."""

    def __init__(self, batch_dice: bool, smooth: float = 1e-5):
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        probs = torch.softmax(logits.float(), dim=1)[:, 1:]
        onehot = F.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
        return -soft_dice(probs, onehot, self.batch_dice, self.smooth, mask)


def soft_dice(probs: Tensor, onehot: Tensor, batch_dice: bool, smooth: float = 1e-5,
              mask: Tensor | None = None) -> Tensor:
    """Mean soft Dice over the channels of (B, K, ...) probabilities and targets (nnU-Net's
    MemoryEfficientSoftDiceLoss, negated); `mask` (B, 1, ...) keeps the voxels that count. Batch Dice under DDP
    pools every rank's samples, as nnU-Net's all-gather does (summed per rank first, so ranks whose batches
    differ by one sample gather tensors of one shape)."""
    if mask is not None:
        probs, onehot = probs * mask, onehot * mask
    axes = tuple(range(2, probs.ndim))
    if batch_dice:
        axes = (0, *axes)
    intersection = (probs * onehot).sum(axes)
    denominator = probs.sum(axes) + onehot.sum(axes)
    if batch_dice:
        intersection, denominator = gather_sum(intersection), gather_sum(denominator)
    return ((2 * intersection + smooth) / (denominator + smooth).clamp_min(1e-8)).mean()


def region_targets(codes: Tensor, region_codes: Sequence[Sequence[int]]) -> Tensor:
    """(B, 1, ...) label codes -> (B, R, ...) float: 1 where the voxel's label is in region r."""
    return torch.cat([torch.isin(codes, torch.tensor(list(r), device=codes.device)) for r in region_codes],
                     dim=1).float()


class RegionDiceBCELoss(nn.Module):
    """nnU-Net's DC_and_BCE_loss for region-based training: one sigmoid output per region, soft Dice over
    every region (there is no background output) + binary cross-entropy.

    Targets arrive as label codes, like for label-based training, and become regions here: on the training
    device, after augmentation (which moves label maps, not regions), and per deep-supervision output from
    its downsampled label map, which equals downsampling the regions by nearest neighbour. With an ignore
    label both terms skip its voxels; the cross-entropy is then summed over regions and divided by the
    number of kept voxels, as nnU-Net does."""

    def __init__(self, batch_dice: bool, region_codes: Sequence[Sequence[int]], dice_weight: float = 1.0,
                 bce_weight: float = 1.0, ignore_index: int | None = None):
        super().__init__()
        self.batch_dice, self.region_codes = batch_dice, tuple(tuple(r) for r in region_codes)
        self.dice_weight, self.bce_weight, self.ignore_index = dice_weight, bce_weight, ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        target = target.long()
        logits = logits.float()
        regions = region_targets(target, self.region_codes)
        keep = None if self.ignore_index is None else target != self.ignore_index
        dice = -soft_dice(torch.sigmoid(logits), regions, self.batch_dice, mask=keep)
        if keep is None:
            bce = F.binary_cross_entropy_with_logits(logits, regions)
        else:
            per_voxel = F.binary_cross_entropy_with_logits(logits, regions, reduction="none")
            bce = (per_voxel * keep).sum() / keep.sum().clamp_min(1e-8)
        return self.dice_weight * dice + self.bce_weight * bce


class DiceCELoss(nn.Module):
    """Soft Dice + cross-entropy; voxels labelled `ignore_index` count in neither."""

    def __init__(self, batch_dice: bool, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 class_weights: Sequence[float] | None = None, ignore_index: int | None = None):
        super().__init__()
        self.dice = SoftDiceLoss(batch_dice)
        self.dice_weight, self.ce_weight = dice_weight, ce_weight
        self.ignore_index = ignore_index
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weight, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        target = target.long()
        if self.ignore_index is None:
            dice = self.dice(logits, target)
            ce = F.cross_entropy(logits.float(), target[:, 0], weight=self.class_weights)
            return self.dice_weight * dice + self.ce_weight * ce
        keep = target != self.ignore_index
        # ignored voxels take any valid class for the one-hot: the mask removes them from every Dice sum
        dice = self.dice(logits, torch.where(keep, target, 0), keep)
        if keep.any():
            ce = F.cross_entropy(logits.float(), target[:, 0], weight=self.class_weights,
                                 ignore_index=self.ignore_index)
        else:  # a patch without annotation: cross-entropy's mean over no voxel is NaN, nnU-Net's is 0
            ce = logits.float().sum() * 0.0
        return self.dice_weight * dice + self.ce_weight * ce


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a loss over the decoder outputs (a single tensor when deep supervision is off)."""

    def __init__(self, loss: nn.Module, n_outputs: int):
        super().__init__()
        self.loss = loss
        self.weights = deep_supervision_weights(n_outputs)
        self.ddp_weights = deep_supervision_weights(n_outputs, distributed=True)

    def forward(self, outputs: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            return self.loss(outputs, target)
        total = outputs[0].new_zeros(())
        for output, weight in zip(outputs, self.ddp_weights if is_distributed() else self.weights):
            if weight == 0:
                continue
            scaled = target
            if output.shape[2:] != target.shape[2:]:
                scaled = F.interpolate(target.float(), size=output.shape[2:], mode="nearest-exact").long()
            total = total + weight * self.loss(output, scaled)
        return total
