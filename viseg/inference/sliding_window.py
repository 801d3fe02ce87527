"""Sliding-window inference over whole preprocessed volumes (nnU-Net's scheme).

Windows overlap by half a patch and are blended with a Gaussian importance map, so predictions near a
window's border (where the network sees little context) count less. Used for the full-case validation at
the end of training and by `python -m viseg.predict`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from viseg.inference.device import forward_autocast


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> Tensor:
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in patch_size], indexing="ij")
    weight = torch.ones(tuple(patch_size))
    for grid, size in zip(grids, patch_size):
        center, sigma = (size - 1) / 2, size * sigma_scale
        weight = weight * torch.exp(-((grid - center) ** 2) / (2 * sigma**2))
    weight = weight / weight.max()
    # no zeros: every voxel must receive some weight (nnU-Net clamps to the smallest nonzero value)
    return weight.clamp_min(weight[weight > 0].min())


def window_starts(image_size: Sequence[int], patch_size: Sequence[int], step: float = 0.5) -> list[list[int]]:
    """nnU-Net's compute_steps_for_sliding_window: evenly spread starts, overlap of at least 1 - step."""
    starts = []
    for size, patch in zip(image_size, patch_size):
        if size <= patch:
            starts.append([0])
            continue
        n = int(np.ceil((size - patch) / (patch * step))) + 1
        stride = (size - patch) / (n - 1)
        starts.append([int(np.round(stride * i)) for i in range(n)])
    return starts


def _pad_to(data: Tensor, patch_size: Sequence[int]) -> tuple[Tensor, list[slice]]:
    """Pad spatial dims up to the patch size (centred); return the slices that undo it."""
    pads, crop = [], []
    for size, patch in zip(data.shape[1:], patch_size):
        total = max(0, patch - size)
        before = total // 2
        pads.append((before, total - before))
        crop.append(slice(before, before + size))
    flat = [p for pair in reversed(pads) for p in pair]
    return torch.nn.functional.pad(data, flat), crop


@torch.no_grad()
def sliding_window_logits(network: nn.Module, data: Tensor, patch_size: Sequence[int], num_classes: int,
                          step: float = 0.5, batch_size: int = 2, mirror_axes: Sequence[int] = ()) -> Tensor:
    """Blended logits (K, *spatial) for one volume (C, *spatial) whose dimensionality matches the patch."""
    device = data.device
    padded, crop = _pad_to(data, patch_size)
    spatial = padded.shape[1:]
    weight = gaussian_importance(patch_size).to(device)
    logits = torch.zeros((num_classes, *spatial), device=device)
    counts = torch.zeros(spatial, device=device)
    slices = [tuple(slice(s, s + p) for s, p in zip(start, patch_size))
              for start in itertools.product(*window_starts(spatial, patch_size, step))]
    for i in range(0, len(slices), batch_size):
        chunk = slices[i:i + batch_size]
        batch = torch.stack([padded[(slice(None), *s)] for s in chunk])
        prediction = _predict(network, batch, mirror_axes)
        for s, pred in zip(chunk, prediction):
            logits[(slice(None), *s)] += pred * weight
            counts[s] += weight
    return (logits / counts)[(slice(None), *crop)]


def _predict(network: nn.Module, batch: Tensor, mirror_axes: Sequence[int]) -> Tensor:
    """Network output at full resolution, averaged over the mirrored inputs (test-time augmentation)."""
    def forward(x: Tensor) -> Tensor:
        with forward_autocast(x.device):
            out = network(x)
        return (out[0] if isinstance(out, list | tuple) else out).float()

    prediction = forward(batch)
    axes = [a + 2 for a in mirror_axes]
    combos = [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]
    for combo in combos:
        prediction += torch.flip(forward(torch.flip(batch, combo)), combo)
    return prediction / (len(combos) + 1)


@torch.no_grad()
def predict_volume(network: nn.Module, data: np.ndarray, patch_size: Sequence[int], num_classes: int,
                   device: torch.device, mirror_axes: Sequence[int] = (), batch_size: int = 2,
                   step: float = 0.5, regions: bool = False) -> Tensor:
    """Probabilities (K, Z, Y, X) for a preprocessed volume: softmax over classes, or with `regions` a
    sigmoid per region output (nnU-Net's inference_nonlin); a 2D network runs slice by slice."""
    volume = torch.from_numpy(np.array(data, dtype=np.float32)).to(device)  # a copy: memmaps are read-only
    if len(patch_size) == volume.ndim - 1:
        logits = sliding_window_logits(network, volume, patch_size, num_classes, step=step, batch_size=batch_size,
                                       mirror_axes=mirror_axes)
    else:
        logits = torch.stack([sliding_window_logits(network, volume[:, z], patch_size, num_classes, step=step,
                                                    batch_size=batch_size, mirror_axes=mirror_axes)
                              for z in range(volume.shape[1])], dim=1)
    return torch.sigmoid(logits) if regions else torch.softmax(logits, 0)
