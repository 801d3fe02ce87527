"""nnU-Net's perturbations of a cascade's previous-stage input, so that the cascade learns to correct it.

Training inputs are the lowres model's predictions of cases it mostly trained on, better than those it will
make at test time; nnU-Net therefore degrades them per sample (nnUNetTrainer.get_training_transforms, from
batchgeneratorsv2), and so does this module, with the same probabilities:

- with p 0.4, each label's channel (in random order) with p 0.5: a random binary dilation, erosion, opening
  or closing by a ball of radius uniform in [1, 8] voxels; voxels a channel gains leave the other channels;
- with p 0.2, each label's channel with p 0.5: one random connected component smaller than 15 % of the patch
  removed (nnU-Net's fill_with_other_class_p=0: it becomes background).

A Python loop over samples and channels: the operators are chosen per sample, and connected components are
labelled on the CPU (scipy), as nnU-Net labels them in its loader workers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

P_BINARY_OPERATOR = 0.4
P_BINARY_OPERATOR_PER_LABEL = 0.5
BALL_RADIUS_RANGE = (1.0, 8.0)
P_REMOVE_COMPONENT = 0.2
P_REMOVE_COMPONENT_PER_LABEL = 0.5
MAX_REMOVED_COMPONENT_FRACTION = 0.15
OPERATORS = ("dilation", "erosion", "closing", "opening")


def ball(radius: float, dim: int, device: torch.device) -> Tensor:
    """Voxels within `radius` of the centre on the integer grid: skimage's ball (disk in 2D)."""
    half = int(np.floor(radius))
    axes = torch.arange(-half, half + 1, device=device, dtype=torch.float32)
    grids = torch.meshgrid(*[axes] * dim, indexing="ij")
    return (sum(g**2 for g in grids) <= radius**2).float()


def dilate(mask: Tensor, strel: Tensor) -> Tensor:
    """Binary dilation of a (*S) bool mask by a symmetric structuring element (zero padding: none outside)."""
    conv = F.conv3d if mask.dim() == 3 else F.conv2d
    out = conv(mask[None, None].float(), strel[None, None], padding=strel.shape[0] // 2)
    return out[0, 0] > 0.5


def erode(mask: Tensor, strel: Tensor) -> Tensor:
    return ~dilate(~mask, strel)


def binary_operator(mask: Tensor, operator: str, strel: Tensor) -> Tensor:
    if operator == "dilation":
        return dilate(mask, strel)
    if operator == "erosion":
        return erode(mask, strel)
    if operator == "closing":
        return erode(dilate(mask, strel), strel)
    if operator == "opening":
        return dilate(erode(mask, strel), strel)
    raise ValueError(f"unknown binary operator {operator!r}; use one of {OPERATORS}")


def _random_binary_operators(sample: Tensor, rng: np.random.Generator) -> None:
    """In place on (K, *S): nnU-Net's ApplyRandomBinaryOperatorTransform."""
    channels = list(rng.permutation(sample.shape[0]))
    for channel in [c for c in channels if rng.random() < P_BINARY_OPERATOR_PER_LABEL]:
        before = sample[channel] > 0.5
        strel = ball(float(rng.uniform(*BALL_RADIUS_RANGE)), before.dim(), sample.device)
        after = binary_operator(before, OPERATORS[rng.integers(len(OPERATORS))], strel)
        added = after & ~before
        for other in channels:
            if other != channel:
                sample[other][added] = 0
        sample[channel] = after.to(sample.dtype)


def _remove_random_component(sample: Tensor, rng: np.random.Generator) -> None:
    """In place on (K, *S): nnU-Net's RemoveRandomConnectedComponentFromOneHotEncodingTransform."""
    from scipy import ndimage

    for channel in [int(c) for c in rng.permutation(sample.shape[0]) if rng.random() < P_REMOVE_COMPONENT_PER_LABEL]:
        mask = (sample[channel] > 0.5).cpu().numpy()
        if not mask.any():
            continue
        components, _ = ndimage.label(mask)
        sizes = np.bincount(components.ravel())[1:]
        small = np.flatnonzero(sizes < mask.size * MAX_REMOVED_COMPONENT_FRACTION) + 1
        if small.size:
            chosen = torch.from_numpy(components == rng.choice(small)).to(sample.device)
            sample[channel][chosen] = 0


def perturb_previous_stage(one_hot: Tensor, seed: int) -> Tensor:
    """(B, K, *S) one-hot previous-stage labels -> the same, each sample perturbed as nnU-Net does."""
    rng = np.random.default_rng(seed)
    out = one_hot.clone()
    for sample in out:
        if rng.random() < P_BINARY_OPERATOR:
            _random_binary_operators(sample, rng)
        if rng.random() < P_REMOVE_COMPONENT:
            _remove_random_component(sample, rng)
    return out
