"""Shape and spacing rules that planning, resampling and augmentation must agree on, defined once."""

from __future__ import annotations

from collections.abc import Sequence

# nnU-Net's ANISO_THRESHOLD. The planner takes the 10th-percentile spacing for an axis this much coarser than
# the others; resampling then handles that axis separately; augmentation then rotates and scales in-plane.
ANISOTROPY_THRESHOLD = 3.0


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """The shape covering the same physical extent at `new_spacing` (nnU-Net's rounding). The planner's
    median shapes and the preprocessed arrays both come from here, so plans.json and the cache agree."""
    if not len(shape) == len(spacing) == len(new_spacing):
        raise ValueError(f"shape {tuple(shape)}, spacing {tuple(spacing)} and new spacing {tuple(new_spacing)} "
                         "must have the same number of axes")
    return tuple(int(round(s / n * d)) for s, n, d in zip(spacing, new_spacing, shape))
