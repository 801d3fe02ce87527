"""nnU-Net v2's default augmentation, batched in torch on the training device.

The loader crops each sample LARGER than the patch (`augmentation_input_size`), so rotations and scalings
sample image rather than padding; `BatchAugmenter` turns that batch into the training patch with the recipe
of nnUNetTrainer.get_training_transforms: same order, same distributions, same per-channel choices. Every
random parameter is drawn as one tensor for the whole batch and per-sample choices become masks, index
subsets or per-sample operators, so there is no Python loop over samples or voxels.

Labels travel as `viseg.data.labels.LabelEncoding` codes: every class, the ignore label and OUTSIDE (outside the
nonzero mask) are resampled as labels of their own, so their masks move with the image. After mirroring,
channels normalised within the nonzero mask are set back to 0 wherever the label says OUTSIDE, and OUTSIDE
then becomes background (nnU-Net's MaskImageTransform and RemoveLabelTransform(-1, 0), in that order):
noise and intensity changes outside the mask would otherwise reach training but never inference, where
those voxels are always 0.

Separable linear filters (Gaussian blur, the low-resolution simulation) are applied as one (N, N) matrix per
sample and axis with `einsum`. A banded matrix is a separable convolution whose taps may differ per sample,
which one grouped conv expresses only with a loop over kernel sizes; on CPU it measured 3x faster than
grouped conv3d at (2, 56, 112, 112), and on the GPU it is a batched GEMM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from viseg.config import AugmentationConfig
from viseg.data.labels import LabelEncoding
from viseg.planning.geometry import ANISOTROPY_THRESHOLD

IN_PLANE_ROTATION_DEGREES = 180.0  # nnU-Net: dummy-2D and near-square 2D patches rotate freely in-plane
ELONGATED_2D_ROTATION_DEGREES = 15.0  # nnU-Net: 2D patches with max/min side > 1.5 rotate little
ELONGATED_2D_RATIO = 1.5
# nnU-Net sizes the loader's crop with these scaling bounds, not the training ones (its own todo admits it);
# kept so our crops, and the padding a strong zoom-out pulls in, match nnU-Net's.
INPUT_SIZE_MIN_SCALE = 0.85
BLUR_TRUNCATE = 6.0  # kernel width in sigmas (batchgeneratorsv2 blur_dimension)
P_BLUR_PER_CHANNEL = 0.5  # nnU-Net blurs / degrades half the channels of a chosen sample
P_LOW_RESOLUTION_PER_CHANNEL = 0.5
GAMMA_EPS = 1e-7
ROTATION_PLANES_3D = ((1, 2), (2, 0), (0, 1))  # nnU-Net's Rx, Ry, Rz; composed as Rz @ Ry @ Rx @ S


def is_anisotropic(patch_size: Sequence[int], spacing: Sequence[float]) -> bool:
    """nnU-Net's do_dummy_2D_data_aug: a 3D patch much shorter along axis 0 gets in-plane spatial augmentation
    only, because rotating thick slices out of plane would smear them. Like nnU-Net the rule reads the patch:
    the planner derived it from the spacing (low-resolution axis first), so the patch already encodes it."""
    if len(spacing) != len(patch_size):
        raise ValueError(f"spacing {list(spacing)} and patch_size {list(patch_size)} differ in length")
    return len(patch_size) == 3 and max(patch_size) / patch_size[0] > ANISOTROPY_THRESHOLD


def rotation_degrees(patch_size: Sequence[int], cfg: AugmentationConfig, anisotropic: bool) -> float:
    """Largest |angle|: cfg.rotation_degrees around every axis of a 3D patch; in-plane rotations use nnU-Net's
    fixed ranges (configure_rotation_dummyDA_mirroring_and_inital_patch_size), which the config does not hold."""
    if len(patch_size) == 3 and not anisotropic:
        return cfg.rotation_degrees
    if len(patch_size) == 2 and max(patch_size) / min(patch_size) > ELONGATED_2D_RATIO:
        return ELONGATED_2D_ROTATION_DEGREES
    return IN_PLANE_ROTATION_DEGREES


def augmentation_input_size(patch_size: tuple[int, ...], cfg: AugmentationConfig, anisotropic: bool) -> tuple[int, ...]:
    """The crop the loader must deliver: nnU-Net's get_patch_size. It rotates the patch's extent vector by the
    largest angle (capped at 90 degrees) in each plane, keeps the largest extent per axis and divides by the
    smallest scale; with dummy-2D the first axis is never resampled and stays as is."""
    if not cfg.enabled:
        return tuple(patch_size)
    angle = math.radians(min(rotation_degrees(patch_size, cfg, anisotropic), 90.0))
    c, s = math.cos(angle), math.sin(angle)
    extent = [float(v) for v in patch_size]
    for i, j in ROTATION_PLANES_3D if len(patch_size) == 3 else ((0, 1),):
        rotated = list(patch_size)
        rotated[i], rotated[j] = c * patch_size[i] + s * patch_size[j], c * patch_size[j] - s * patch_size[i]
        extent = [max(e, abs(r)) for e, r in zip(extent, rotated)]
    size = [int(e / INPUT_SIZE_MIN_SCALE) for e in extent]
    if anisotropic and len(patch_size) == 3:
        size[0] = patch_size[0]
    return tuple(size)


@dataclass(frozen=True)
class _Random:
    """Draws every parameter from one generator, on the generator's device, so one seed fixes the batch.
    Pass a generator on the training device: a CPU generator with GPU data copies noise fields across."""

    generator: torch.Generator | None
    device: torch.device  # where the data lives

    def rand(self, *shape: int) -> Tensor:
        source = self.device if self.generator is None else self.generator.device
        return torch.rand(shape, generator=self.generator, device=source).to(self.device)

    def randn(self, *shape: int) -> Tensor:
        source = self.device if self.generator is None else self.generator.device
        return torch.randn(shape, generator=self.generator, device=source).to(self.device)

    def coin(self, p: float, *shape: int) -> Tensor:
        return self.rand(*shape) < p

    def uniform(self, low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * self.rand(*shape)

    def bg_contrast(self, low: float, high: float, *shape: int) -> Tensor:
        """batchgeneratorsv2's BGContrast: half the draws below 1, half above, so a range like [0.75, 1.25]
        darkens and brightens equally often whatever its asymmetry."""
        below = self.coin(0.5, *shape) & (low < 1)
        lo = torch.where(below, low, max(low, 1.0))
        hi = torch.where(below, 1.0, high)
        return lo + (hi - lo) * self.rand(*shape)


def centre_crop(x: Tensor, patch_size: Sequence[int]) -> Tensor:
    """A copy of the central patch, offset (S - P) // 2 on every axis; never a view of the caller's batch."""
    spatial = x.shape[2:]
    index = [slice(None), slice(None)] + [slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(spatial, patch_size)]
    return x[tuple(index)].clone(memory_format=torch.contiguous_format)


def _plane_rotation(angle: Tensor, dim: int, i: int, j: int) -> Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    m = torch.eye(dim, dtype=angle.dtype, device=angle.device).repeat(len(angle), 1, 1)
    m[:, i, i], m[:, j, j], m[:, i, j], m[:, j, i] = c, c, -s, s
    return m


def affine_matrices(angles: Tensor, scales: Tensor, planes: Sequence[tuple[int, int]]) -> Tensor:
    """(B, dim, dim) maps from output to input voxel offsets, nnU-Net's R @ S: a scale above 1 samples a larger
    region (smaller objects). angles (B, len(planes)) in radians rotate in `planes`; scales is (B, dim)."""
    m = torch.diag_embed(scales)
    for k, (i, j) in enumerate(planes):
        m = _plane_rotation(angles[:, k], scales.shape[1], i, j) @ m
    return m


def _affine_theta(affine: Tensor, in_size: Sequence[int], patch_size: Sequence[int]) -> Tensor:
    """grid_sample's normalised form (x = last axis) of `affine` about the centre crop's centre, so an identity
    affine samples exactly the voxels `centre_crop` takes, also when S - P is odd."""
    s = torch.tensor(in_size, dtype=affine.dtype, device=affine.device)
    p = torch.tensor(patch_size, dtype=affine.dtype, device=affine.device)
    linear = affine * p[None, None, :] / s[None, :, None]
    shift = torch.tensor([-((a - b) % 2) / a for a, b in zip(in_size, patch_size)], dtype=affine.dtype)
    shift = shift.to(affine.device).flip(0).expand(len(affine), -1)
    return torch.cat([linear.flip(-2, -1), shift[..., None]], dim=-1)


def _resample_labels(seg: Tensor, grid: Tensor, labels: LabelEncoding) -> Tensor:
    """One-hot + bilinear + argmax, as nnU-Net does: nearest neighbour would be cheaper but jags rotated
    boundaries and shifts them by up to half a voxel. OUTSIDE, the classes and the ignore label each have an
    indicator; background scores 1 - their sum. Outside the input is OUTSIDE (nnU-Net pads the seg with -1),
    so its indicator is resampled as (indicator - 1) with zero padding, plus 1. Exact ties go to the lower code
    (OUTSIDE, background, 1..K, ignore)."""
    codes = (labels.OUTSIDE, *labels.label_codes)
    indicators = (seg == torch.tensor(codes, device=seg.device).view(1, -1, *[1] * (seg.dim() - 2))).float()
    indicators[:, 0] -= 1
    scores = F.grid_sample(indicators, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    scores[:, 0] += 1
    background = 1 - scores.sum(1)
    # a running maximum over codes: argmax across the strided class axis was 16x slower on CPU
    best = scores[:, 0]
    label = torch.full(best.shape, labels.OUTSIDE, dtype=torch.int64, device=seg.device)
    label.masked_fill_(background > best, 0)
    best = torch.maximum(best, background)
    for k in range(1, len(codes)):
        score = scores[:, k]
        label.masked_fill_(score > best, codes[k])
        best = torch.maximum(best, score)
    return label[:, None]


def resample(data: Tensor, seg: Tensor, affine: Tensor, patch_size: Sequence[int], labels: LabelEncoding,
             ) -> tuple[Tensor, Tensor]:
    """Samples the centred output patch through per-sample `affine` (see affine_matrices); zero padding for
    the data, OUTSIDE for the labels."""
    theta = _affine_theta(affine, data.shape[2:], patch_size).float()
    grid = F.affine_grid(theta, [len(data), 1, *patch_size], align_corners=False)
    out = F.grid_sample(data, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # a cascade's seg has a second channel, the previous stage's labels: resampled alike, on the same grid
    return out, torch.cat([_resample_labels(seg[:, c:c + 1], grid, labels) for c in range(seg.shape[1])], 1)


def apply_along_axes(x: Tensor, matrices: Sequence[Tensor | None]) -> Tensor:
    """x (n, *spatial); matrices[a] (n, N_a, N_a) or None: out[.., k, ..] = sum_j m[k, j] x[.., j, ..] on axis a."""
    src = "n" + "xyz"[: x.dim() - 1]
    for axis, m in enumerate(matrices):
        if m is not None:
            letter = src[axis + 1]
            x = torch.einsum(f"nk{letter},{src}->{src.replace(letter, 'k')}", m, x)
    return x


def gaussian_matrices(size: int, sigma: Tensor, radius: int) -> Tensor:
    """(n, size, size) Gaussian blur along one axis with reflect borders (batchgeneratorsv2 pads 'reflect').
    One radius for the batch, from the largest sigma: smaller sigmas' extra taps are ~0 (exp(-18) at 0.5)."""
    offsets = torch.arange(-radius, radius + 1, device=sigma.device)
    taps = torch.exp(-0.5 * (offsets / sigma.clamp(min=1e-6)[:, None]) ** 2)
    taps = taps / taps.sum(1, keepdim=True)
    source = (torch.arange(size, device=sigma.device)[:, None] + offsets).abs()
    source = torch.where(source > size - 1, 2 * (size - 1) - source, source).clamp(0, size - 1)
    m = torch.zeros(len(sigma), size, size, device=sigma.device, dtype=sigma.dtype)
    shape = (len(sigma), size, len(offsets))
    return m.scatter_add_(2, source.expand(shape), taps[:, None, :].expand(shape))


def low_resolution_matrices(size: int, zoom: Tensor) -> Tensor:
    """(n, size, size): F.interpolate 'nearest-exact' down to round(size * zoom), then linear back up
    (align_corners=False), as nnU-Net's SimulateLowResolutionTransform; both are separable, hence exact."""
    low = torch.round(size * zoom).clamp(min=1)[:, None]
    out = torch.arange(size, device=zoom.device, dtype=zoom.dtype)
    source = ((out + 0.5) * (low / size) - 0.5).clamp(min=0)
    j0 = source.floor()
    w1 = source - j0
    j1 = torch.minimum(j0 + 1, low - 1)

    def original(j: Tensor) -> Tensor:  # the voxel nearest-exact picked for low-resolution voxel j
        return ((j + 0.5) * (size / low)).floor().clamp(max=size - 1).long()[..., None]

    m = torch.zeros(len(zoom), size, size, device=zoom.device, dtype=zoom.dtype)
    m.scatter_add_(2, original(j0), (1 - w1)[..., None])
    return m.scatter_add_(2, original(j1), w1[..., None])


def _apply_selected(x: Tensor, mask: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Replaces the (sample, channel) images of x (B, C, *spatial) where mask (B, C) holds with
    fn(images, flat_indices), in place: only chosen images cost compute."""
    flat = x.view(-1, *x.shape[2:])
    index = mask.reshape(-1).nonzero().flatten()
    if index.numel():
        flat.index_copy_(0, index, fn(flat[index], index))
    return x


def _per_image(values: Tensor, index: Tensor, dim: int) -> Tensor:
    """values (B, C) -> the chosen images' values, broadcastable over `dim` spatial axes."""
    return values.reshape(-1)[index].view(-1, *[1] * dim)


def _spatial_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    flat = x.flatten(1)
    lo, hi = torch.aminmax(flat, dim=1)
    std, mean = torch.std_mean(flat, dim=1)  # unbiased, like nnU-Net's x.std()
    view = (-1, *[1] * (x.dim() - 1))
    return mean.view(view), std.view(view), lo.view(view), hi.view(view)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Scale around the mean, clipped to the original range (nnU-Net's preserve_range=True)."""
    mean, _, lo, hi = _spatial_stats(x)
    return torch.minimum(torch.maximum((x - mean) * factor + mean, lo), hi)


def gamma(x: Tensor, exponent: Tensor, invert: bool) -> Tensor:
    """nnU-Net's GammaTransform with retain_stats: gamma on the min-max normalised image, then the original
    mean and std restored, so only the shape of the histogram changes. `invert` bends the other tail."""
    x = -x if invert else x
    mean, std, lo, hi = _spatial_stats(x)
    span = hi - lo
    x = ((x - lo) / span.clamp(min=GAMMA_EPS)) ** exponent * span + lo
    new_mean, new_std, _, _ = _spatial_stats(x)
    x = (x - new_mean) * (std / new_std.clamp(min=GAMMA_EPS)) + mean
    return -x if invert else x


class BatchAugmenter:
    """Turns the loader's (B, C, *input_size) / (B, 1, *input_size) batch into the training patch on its device.

    The seg holds `labels` codes, OUTSIDE included; `use_mask_for_norm` is the plan's flag per channel (empty:
    no channel). Returns float32 data and int64 labels in which OUTSIDE has become background. With `cfg`
    disabled (validation) it only crops and relabels OUTSIDE, as nnU-Net's validation transforms do: the
    masked channels are already 0 there.

    A cascade (`previous_stage=True`) gets a (B, 2, ...) seg whose second channel holds the previous stage's
    labels (the same codes). They move with the image and labels, and leave as one more data channel per
    foreground label, after every intensity change (nnU-Net's MoveSegAsOneHotToDataTransform), then, in
    training, are perturbed as nnU-Net perturbs them (`viseg.training.cascade_augment`).
    """

    def __init__(self, patch_size: Sequence[int], cfg: AugmentationConfig, anisotropic: bool,
                 labels: LabelEncoding, use_mask_for_norm: Sequence[bool] = (), previous_stage: bool = False):
        self.patch_size = tuple(int(v) for v in patch_size)
        self.dim = len(self.patch_size)
        if self.dim not in (2, 3):
            raise ValueError(f"patch_size {list(patch_size)} must be 2D or 3D")
        self.cfg = cfg
        self.anisotropic = anisotropic and self.dim == 3
        self.labels = labels
        self.previous_stage = previous_stage
        self.use_mask_for_norm = tuple(bool(m) for m in use_mask_for_norm)
        self.masked_channels = [c for c, masked in enumerate(self.use_mask_for_norm) if masked]
        self.max_angle = math.radians(rotation_degrees(self.patch_size, cfg, self.anisotropic))
        self.mirror_axes = tuple(range(self.dim)) if cfg.mirror_axes is None else tuple(cfg.mirror_axes)
        if any(not 0 <= a < self.dim for a in self.mirror_axes):
            raise ValueError(f"augmentation.mirror_axes={list(self.mirror_axes)} must be spatial axes < {self.dim}")

    @torch.no_grad()
    def __call__(self, data: Tensor, seg: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        self._check(data, seg)
        data, seg = data.float(), seg.long()
        if not self.cfg.enabled:
            cropped = _outside_to_background(centre_crop(seg, self.patch_size))
            return self._with_previous(centre_crop(data, self.patch_size), cropped, None)
        rng = _Random(generator, data.device)
        data, seg = self._spatial(data, seg, rng)
        data = self._noise_and_blur(data, rng)
        data = self._intensity(data, rng)
        data, seg = self._mirror(data, seg, rng)
        return self._with_previous(self._mask(data, seg), _outside_to_background(seg), rng)

    def _with_previous(self, data: Tensor, seg: Tensor, rng: _Random | None) -> tuple[Tensor, Tensor]:
        """A cascade's previous-stage labels, one-hot, appended to the data (perturbed when augmenting)."""
        if not self.previous_stage:
            return data, seg
        from viseg.training.cascade_augment import perturb_previous_stage

        codes = torch.arange(1, self.labels.num_classes, device=seg.device).view(1, -1, *[1] * self.dim)
        one_hot = (seg[:, 1:2] == codes).to(data.dtype)
        if rng is not None:
            one_hot = perturb_previous_stage(one_hot, int(rng.rand(1).mul(2**31).item()))
        return torch.cat([data, one_hot], 1), seg[:, :1]

    def _check(self, data: Tensor, seg: Tensor) -> None:
        seg_channels = 2 if self.previous_stage else 1
        if data.dim() != self.dim + 2 or seg.shape != (data.shape[0], seg_channels, *data.shape[2:]):
            raise ValueError(f"expected data (B, C, *S) and seg (B, {seg_channels}, *S) with {self.dim} spatial "
                             f"axes, got {tuple(data.shape)} and {tuple(seg.shape)}")
        if self.use_mask_for_norm and len(self.use_mask_for_norm) != data.shape[1]:
            raise ValueError(f"use_mask_for_norm has {len(self.use_mask_for_norm)} flags for {data.shape[1]} "
                             "channels")
        if any(s < p for s, p in zip(data.shape[2:], self.patch_size)):
            raise ValueError(f"input {tuple(data.shape[2:])} is smaller than patch {self.patch_size}; "
                             "crop it with augmentation_input_size")

    def _draw_affine(self, rng: _Random, batch: int) -> tuple[Tensor, Tensor]:
        """Per-sample affines (B, dim, dim) and which samples have one (rotation or scaling drawn)."""
        planes = ROTATION_PLANES_3D if self.dim == 3 and not self.anisotropic else ((self.dim - 2, self.dim - 1),)
        rotate, scale = rng.coin(self.cfg.p_rotation, batch), rng.coin(self.cfg.p_scaling, batch)
        angles = rng.uniform(-self.max_angle, self.max_angle, batch, len(planes)).double() * rotate[:, None]
        # one factor for all axes (nnU-Net's p_synchronize_scaling_across_axes=1); dummy-2D leaves axis 0 alone
        factor = torch.where(scale, rng.uniform(*self.cfg.scaling_range, batch), 1.0).double()
        scales = factor[:, None].repeat(1, self.dim)
        if self.anisotropic:
            scales[:, 0] = 1.0
        return affine_matrices(angles, scales, planes), rotate | scale

    def _spatial(self, data: Tensor, seg: Tensor, rng: _Random) -> tuple[Tensor, Tensor]:
        """Rotation and scaling in one resampling; untouched samples are just centre-cropped."""
        affine, moved = self._draw_affine(rng, len(data))
        index = moved.nonzero().flatten()
        if index.numel() == len(data):  # every sample moves: resample without copying the input
            return resample(data, seg, affine, self.patch_size, self.labels)
        out_data, out_seg = centre_crop(data, self.patch_size), centre_crop(seg, self.patch_size)
        if index.numel():
            resampled, labels = resample(data[index], seg[index], affine[index], self.patch_size, self.labels)
            out_data[index], out_seg[index] = resampled, labels
        return out_data, out_seg

    def _noise_and_blur(self, x: Tensor, rng: _Random) -> Tensor:
        cfg, (batch, channels), dim = self.cfg, x.shape[:2], self.dim
        # the noise level is shared by a sample's channels and used as a std, as nnU-Net does despite its name
        noisy = rng.coin(cfg.p_gaussian_noise, batch, 1).expand(batch, channels)
        std = rng.uniform(*cfg.noise_variance, batch, 1).expand(batch, channels)
        _apply_selected(x, noisy, lambda img, i: img + rng.randn(*img.shape) * _per_image(std, i, dim))
        blurred = rng.coin(cfg.p_gaussian_blur, batch, 1) & rng.coin(P_BLUR_PER_CHANNEL, batch, channels)
        sigma = rng.uniform(*cfg.blur_sigma, batch * channels, dim)  # per channel and axis, as nnU-Net
        radius = int(cfg.blur_sigma[1] * BLUR_TRUNCATE + 0.5) // 2  # nnU-Net's odd kernel size for that sigma

        def blur(img: Tensor, i: Tensor) -> Tensor:
            return apply_along_axes(img, [gaussian_matrices(n, sigma[i, a], radius) for a, n in
                                           enumerate(img.shape[1:])])

        return _apply_selected(x, blurred, blur)

    def _intensity(self, x: Tensor, rng: _Random) -> Tensor:
        """Brightness, contrast, low resolution, inverted gamma, gamma: nnU-Net's order and per-channel draws."""
        cfg, (batch, channels), dim = self.cfg, x.shape[:2], self.dim
        brighten = rng.coin(cfg.p_brightness, batch, 1).expand(batch, channels)
        multiplier = rng.bg_contrast(*cfg.brightness_range, batch, channels)
        x = x * torch.where(brighten, multiplier, 1.0).view(batch, channels, *[1] * dim)
        contrasted = rng.coin(cfg.p_contrast, batch, 1).expand(batch, channels)
        factor = rng.bg_contrast(*cfg.contrast_range, batch, channels)
        _apply_selected(x, contrasted, lambda img, i: contrast(img, _per_image(factor, i, dim)))
        degraded = rng.coin(cfg.p_low_resolution, batch, 1) & rng.coin(P_LOW_RESOLUTION_PER_CHANNEL, batch, channels)
        zoom = rng.uniform(*cfg.low_resolution_zoom, batch * channels)  # same zoom on every axis, as nnU-Net

        def low_resolution(img: Tensor, i: Tensor) -> Tensor:
            skip = 1 if self.anisotropic else 0  # dummy-2D: the thick-slice axis is already low resolution
            return apply_along_axes(img, [None if a < skip else low_resolution_matrices(n, zoom[i])
                                           for a, n in enumerate(img.shape[1:])])

        _apply_selected(x, degraded, low_resolution)
        for p, invert in ((cfg.p_gamma_inverted, True), (cfg.p_gamma, False)):
            chosen = rng.coin(p, batch, 1).expand(batch, channels)
            exponent = rng.bg_contrast(*cfg.gamma_range, batch, channels)
            _apply_selected(x, chosen, lambda img, i, e=exponent, inv=invert: gamma(img, _per_image(e, i, dim), inv))
        return x

    def _mirror(self, data: Tensor, seg: Tensor, rng: _Random) -> tuple[Tensor, Tensor]:
        flips = rng.coin(self.cfg.p_mirror, len(data), len(self.mirror_axes))
        for k, axis in enumerate(self.mirror_axes):
            flip = flips[:, k].view(-1, *[1] * (self.dim + 1))
            data = torch.where(flip, data.flip(axis + 2), data)
            seg = torch.where(flip, seg.flip(axis + 2), seg)
        return data, seg

    def _mask(self, data: Tensor, seg: Tensor) -> Tensor:
        """nnU-Net's MaskImageTransform: masked channels back to exactly 0 outside the mask, as inference sees them."""
        if self.masked_channels:
            outside = seg[:, :1] == LabelEncoding.OUTSIDE  # (B, 1, *patch): broadcasts over the chosen channels
            channels = data[:, self.masked_channels]
            data[:, self.masked_channels] = channels.masked_fill(outside, 0.0)
        return data


def _outside_to_background(seg: Tensor) -> Tensor:
    """nnU-Net's RemoveLabelTransform(-1, 0): once the mask has been applied, outside is background."""
    return seg.masked_fill_(seg == LabelEncoding.OUTSIDE, 0)


def _benchmark(patch_size: tuple[int, ...], cfg: AugmentationConfig, seconds: float = 3.0) -> float:
    """Batches per second for B=2, C=1 on CPU."""
    import time

    aniso = is_anisotropic(patch_size, [1.0] * len(patch_size))
    size = augmentation_input_size(patch_size, cfg, aniso)
    augment = BatchAugmenter(patch_size, cfg, aniso, LabelEncoding.for_classes(3))
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(2, 1, *size, generator=generator)
    seg = torch.randint(0, 3, (2, 1, *size), generator=generator)
    augment(data, seg, generator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        augment(data, seg, generator)
        count += 1
    return count / (time.perf_counter() - start)


if __name__ == "__main__":
    every = {name: 1.0 for name in ("p_rotation", "p_scaling", "p_gaussian_noise", "p_gaussian_blur", "p_brightness",
                                    "p_contrast", "p_low_resolution", "p_gamma", "p_gamma_inverted")}
    for label, config in (("nnU-Net defaults", AugmentationConfig()), ("every p = 1", AugmentationConfig(**every)),
                          ("disabled", AugmentationConfig(enabled=False))):
        for patch in ((20, 56, 64), (56, 112, 112)):
            aniso = is_anisotropic(patch, [1.0] * 3)
            print(f"{label:17s} patch {patch} input {augmentation_input_size(patch, config, aniso)}: "
                  f"{_benchmark(patch, config):6.1f} batches/s ({torch.get_num_threads()} threads)")
