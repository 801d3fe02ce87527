"""Batched nnU-Net augmentation: shapes, exact crops, label integrity, data/label alignment, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from viseg.config import AugmentationConfig
from viseg.data.labels import LabelEncoding
from viseg.training.augment import (
    BatchAugmenter,
    affine_matrices,
    apply_along_axes,
    augmentation_input_size,
    centre_crop,
    gaussian_matrices,
    is_anisotropic,
    low_resolution_matrices,
    resample,
)

PROBABILITIES = ("p_rotation", "p_scaling", "p_gaussian_noise", "p_gaussian_blur", "p_brightness", "p_contrast",
                 "p_low_resolution", "p_gamma", "p_gamma_inverted", "p_mirror")
INTENSITY = ("p_gaussian_noise", "p_gaussian_blur", "p_brightness", "p_contrast", "p_low_resolution", "p_gamma",
             "p_gamma_inverted")


def only(*names: str, **values: float) -> AugmentationConfig:
    """A config with every probability 0 except `names` (1) and explicit `values`."""
    probabilities = {name: 1.0 if name in names else 0.0 for name in PROBABILITIES}
    return AugmentationConfig(**{**probabilities, **values})


def batch(shape: tuple[int, ...], channels: int = 2, size: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive random images and labels 0..2 of spatial `shape`."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.rand(size, channels, *shape, generator=generator) + 0.1
    seg = torch.randint(0, 3, (size, 1, *shape), generator=generator)
    return data, seg


def ellipsoid(shape: tuple[int, ...], size: int = 2) -> torch.Tensor:
    """Off-centre ellipsoids (one per sample) whose edges rise within a tenth of a voxel: images of objects, with
    seg = data > 0.5 the same objects. Linear interpolation of the image and of the one-hot labels then put
    the border at the same place, so any geometric mismatch between the two paths shows as disagreement."""
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    images = []
    for b in range(size):
        radii = [(0.22 + 0.03 * ((k + b) % 3)) * n for k, n in enumerate(shape)]
        distance = sum(((x - (0.4 + 0.02 * b) * n) / r) ** 2 for x, n, r in zip(axes, shape, radii)).sqrt()
        images.append(torch.sigmoid(50 * min(radii) * (1 - distance)))
    return torch.stack(images)[:, None]


def analytic(coords: torch.Tensor) -> torch.Tensor:
    """A smooth asymmetric function of voxel coordinates (..., dim), to check resampling geometry exactly."""
    return sum(torch.sin(2 * math.pi * coords[..., k] / (25 + 8 * k) + k) for k in range(coords.shape[-1]))


def augment(patch: tuple[int, ...], cfg: AugmentationConfig, data: torch.Tensor, seg: torch.Tensor, seed: int = 0,
            anisotropic: bool = False, num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return BatchAugmenter(patch, cfg, anisotropic, LabelEncoding.for_classes(num_classes))(data, seg, generator)


@pytest.mark.parametrize("patch", [(24, 20), (8, 16, 16), (4, 20, 24)])
def test_output_shapes_and_dtypes(patch):
    cfg = only(*PROBABILITIES)
    anisotropic = is_anisotropic(patch, [1.0] * len(patch))
    data, seg = batch(augmentation_input_size(patch, cfg, anisotropic), channels=2, size=3)
    out_data, out_seg = augment(patch, cfg, data, seg, anisotropic=anisotropic)
    assert out_data.shape == (3, 2, *patch) and out_data.dtype == torch.float32
    assert out_seg.shape == (3, 1, *patch) and out_seg.dtype == torch.int64
    assert torch.isfinite(out_data).all()


@pytest.mark.parametrize("cfg", [AugmentationConfig(enabled=False), only()])
@pytest.mark.parametrize(("patch", "shape"), [((8, 10, 12), (11, 15, 12)), ((10, 12), (13, 16))])
def test_without_augmentation_the_output_is_the_centre_crop(cfg, patch, shape):
    data, seg = batch(shape)
    out_data, out_seg = augment(patch, cfg, data, seg)
    index = (slice(None), slice(None), *[slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(shape, patch)])
    assert torch.equal(out_data, data[index]) and torch.equal(out_seg, seg[index])
    out_data += 1  # a copy: the caller's batch is never modified
    assert not torch.equal(out_data, data[index])


@pytest.mark.parametrize(("patch", "shape"), [((8, 10, 12), (11, 15, 12)), ((10, 12), (13, 16))])
def test_an_identity_affine_resamples_exactly_the_centre_crop(patch, shape):
    """The resampling path and the cheap crop path agree, also for odd (input - patch) differences."""
    data, seg = batch(shape)
    identity = torch.eye(len(shape), dtype=torch.float64).repeat(2, 1, 1)
    out_data, out_seg = resample(data, seg, identity, patch, LabelEncoding.for_classes(3))
    assert torch.allclose(out_data, centre_crop(data, patch), atol=1e-5)
    assert torch.equal(out_seg, centre_crop(seg, patch))


@pytest.mark.parametrize("patch", [(20, 20), (8, 16, 16), (4, 20, 24)])
def test_labels_only_take_values_of_the_input(patch):
    cfg = only(*PROBABILITIES)
    anisotropic = is_anisotropic(patch, [1.0] * len(patch))
    data, _ = batch(augmentation_input_size(patch, cfg, anisotropic), size=4)
    seg = torch.tensor([0, 2, 5])[torch.randint(0, 3, (4, 1, *data.shape[2:]), generator=torch.Generator())]
    for seed in range(3):
        _, out_seg = augment(patch, cfg, data, seg, seed=seed, anisotropic=anisotropic, num_classes=6)
        assert set(out_seg.unique().tolist()) <= {0, 2, 5}


def test_a_90_degree_rotation_is_rot90_of_the_centre_crop():
    data, seg = batch((6, 20, 20))
    patch = (4, 12, 12)
    quarter = torch.full((2, 1), math.pi / 2, dtype=torch.float64)
    affine = affine_matrices(quarter, torch.ones(2, 3, dtype=torch.float64), planes=((1, 2),))
    out_data, out_seg = resample(data, seg, affine, patch, LabelEncoding.for_classes(3))
    assert torch.allclose(out_data, torch.rot90(centre_crop(data, patch), -1, dims=(3, 4)), atol=1e-4)
    assert torch.equal(out_seg, torch.rot90(centre_crop(seg, patch), -1, dims=(3, 4)))


@pytest.mark.parametrize(("patch", "planes"), [((12, 16, 14), ((1, 2), (2, 0), (0, 1))), ((14, 18), ((0, 1),))])
def test_resampling_follows_the_affine(patch, planes):
    """Output voxel p (from the patch centre) shows the input at affine @ p + the crop's centre."""
    shape = tuple(n + 16 for n in patch)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
    data = analytic(grid)[None, None].float()
    angles = torch.tensor([[0.4, -0.3, 0.2][: len(planes)]], dtype=torch.float64)
    affine = affine_matrices(angles, torch.full((1, len(patch)), 1.15, dtype=torch.float64), planes)
    out_data, _ = resample(data, torch.zeros_like(data, dtype=torch.int64), affine, patch, LabelEncoding.for_classes(2))
    offsets = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in patch], indexing="ij")
    centre = torch.tensor([(s - p) // 2 + (p - 1) / 2 for s, p in zip(shape, patch)], dtype=torch.float64)
    source = torch.stack(offsets, -1) @ affine[0].T + centre
    assert ((source >= 0) & (source <= torch.tensor(shape) - 1)).all()
    assert torch.allclose(out_data[0, 0].double(), analytic(source), atol=0.04)


@pytest.mark.parametrize(("patch", "anisotropic"), [((16, 20, 20), False), ((4, 24, 20), True), ((24, 28), False)])
def test_spatial_transforms_keep_data_and_labels_aligned(patch, anisotropic):
    cfg = only("p_rotation", "p_scaling", "p_mirror", p_mirror=0.5)
    data = ellipsoid(augmentation_input_size(patch, cfg, anisotropic), size=6)
    seg = (data > 0.5).long()
    for seed in range(2):
        out_data, out_seg = augment(patch, cfg, data, seg, seed=seed, anisotropic=anisotropic, num_classes=2)
        agreement = (out_seg == (out_data > 0.5)).float().mean().item()
        assert agreement >= 0.99
        assert not torch.allclose(out_data, centre_crop(data, patch))


def test_mirroring_flips_data_and_labels_together():
    patch = (6, 8, 10)
    data, _ = batch((8, 10, 12), size=8)
    seg = (data[:, :1] > 0.6).long()
    out_data, out_seg = augment(patch, only("p_mirror"), data, seg)
    crop_data, crop_seg = centre_crop(data, patch), centre_crop(seg, patch)
    assert torch.equal(out_data, crop_data.flip(2, 3, 4)) and torch.equal(out_seg, crop_seg.flip(2, 3, 4))
    out_data, out_seg = augment(patch, only("p_mirror", p_mirror=0.5), data, seg)
    assert torch.equal(out_seg, (out_data[:, :1] > 0.6).long())
    assert not torch.equal(out_data, crop_data) and not torch.equal(out_data, crop_data.flip(2, 3, 4))


def test_only_the_configured_mirror_axes_flip():
    data, seg = batch((6, 8, 10))
    out_data, _ = augment((6, 8, 10), only("p_mirror", mirror_axes=[1]), data, seg)
    assert torch.equal(out_data, data.flip(3))


@pytest.mark.parametrize("name", INTENSITY)
def test_intensity_transforms_change_images_but_not_labels(name):
    patch = (6, 12, 12)
    data, seg = batch((8, 14, 16), channels=2, size=4)
    out_data, out_seg = augment(patch, only(name), data, seg)
    crop = centre_crop(data, patch)
    assert torch.equal(out_seg, centre_crop(seg, patch))
    assert out_data.shape == crop.shape and not torch.allclose(out_data, crop)


def test_contrast_stays_within_the_original_range():
    data, seg = batch((6, 12, 12), size=4)
    out_data, _ = augment((6, 12, 12), only("p_contrast", contrast_range=[2.0, 3.0]), data, seg)
    flat, out = data.flatten(2), out_data.flatten(2)
    assert (out >= flat.amin(2, keepdim=True) - 1e-6).all() and (out <= flat.amax(2, keepdim=True) + 1e-6).all()
    assert (out.std(2) > flat.std(2)).all()


@pytest.mark.parametrize("name", ["p_gamma", "p_gamma_inverted"])
def test_gamma_retains_mean_and_std(name):
    data, seg = batch((6, 12, 12), size=4)
    out_data, _ = augment((6, 12, 12), only(name), data, seg)
    flat, out = data.flatten(2), out_data.flatten(2)
    assert torch.allclose(out.mean(2), flat.mean(2), atol=1e-4) and torch.allclose(out.std(2), flat.std(2), atol=1e-4)
    assert not torch.allclose(out, flat)


def test_the_same_seed_gives_the_same_batch():
    patch = (8, 16, 16)
    cfg = only(*PROBABILITIES, p_mirror=0.5, p_low_resolution=0.5, p_gaussian_noise=0.5)
    data, seg = batch(augmentation_input_size(patch, cfg, False), size=4)
    first, again, other = (augment(patch, cfg, data, seg, seed=s) for s in (7, 7, 8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.allclose(first[0], other[0])


def test_anisotropic_augmentation_never_mixes_the_first_axis():
    """Slice d holds value d + 1 and label d + 1; after in-plane rotation, scaling and low resolution, output
    slice k holds only its own value (or zero padding at the rim) and only its own label (or background)."""
    patch = (5, 20, 24)
    cfg = only("p_rotation", "p_scaling", "p_low_resolution")
    shape = augmentation_input_size(patch, cfg, anisotropic=True)
    assert shape[0] == patch[0]
    level = torch.arange(1, shape[0] + 1, dtype=torch.float32).view(1, 1, -1, 1, 1).expand(4, 1, *shape)
    for seed in range(3):
        out_data, out_seg = augment(patch, cfg, level.clone(), level.long(), seed=seed, anisotropic=True,
                                    num_classes=shape[0] + 1)
        for k in range(patch[0]):
            labels = set(out_seg[:, :, k].unique().tolist())
            assert labels <= {0, k + 1} and k + 1 in labels
            assert out_data[:, :, k].min() >= -1e-4 and out_data[:, :, k].max() <= k + 1 + 1e-4
            assert torch.isclose(out_data[:, :, k].amax((1, 2, 3)), torch.tensor(k + 1.0), atol=1e-4).all()


def test_low_resolution_matrices_match_nearest_then_linear_interpolation():
    image = torch.rand(1, 1, 9, 14, 11, generator=torch.Generator().manual_seed(1))
    zoom = 0.6
    low = [round(n * zoom) for n in image.shape[2:]]
    expected = F.interpolate(F.interpolate(image, low, mode="nearest-exact"), image.shape[2:], mode="trilinear")
    matrices = [low_resolution_matrices(n, torch.tensor([zoom])) for n in image.shape[2:]]
    assert torch.allclose(apply_along_axes(image[0], matrices), expected[0], atol=1e-5)


def test_gaussian_matrices_are_a_reflect_padded_convolution():
    image = torch.rand(1, 7, 12, 10, generator=torch.Generator().manual_seed(2))
    sigma, radius = 0.8, 3
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    taps = taps / taps.sum()
    rows = image[0].permute(0, 2, 1).reshape(-1, 1, 12)  # axis 1 last
    expected = F.conv1d(F.pad(rows, (radius, radius), mode="reflect"), taps.view(1, 1, -1))
    expected = expected.reshape(7, 10, 12).permute(0, 2, 1)
    blurred = apply_along_axes(image, [None, gaussian_matrices(12, torch.tensor([sigma]), radius), None])
    assert torch.allclose(blurred[0], expected, atol=1e-5)


@pytest.mark.parametrize(("patch", "anisotropic", "expected"), [
    ((20, 56, 64), True, (20, 75, 75)),  # nnU-Net's get_patch_size values for these patches
    ((56, 112, 112), False, (122, 179, 147)),
    ((512, 256), False, (659, 301)),
    ((320, 256), False, (376, 376)),
])
def test_input_size_matches_nnunet(patch, anisotropic, expected):
    size = augmentation_input_size(patch, AugmentationConfig(), anisotropic)
    assert size == expected and all(s >= p for s, p in zip(size, patch))
    assert augmentation_input_size(patch, AugmentationConfig(enabled=False), anisotropic) == patch


def test_anisotropy_follows_nnunets_dummy_2d_rule():
    assert is_anisotropic((20, 56, 64), (3.0, 0.8, 0.8))
    assert not is_anisotropic((56, 112, 112), (1.0, 1.0, 1.0))
    assert not is_anisotropic((20, 512), (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        is_anisotropic((20, 56, 64), (1.0, 1.0))


def test_a_too_small_input_is_rejected():
    data, seg = batch((6, 12, 12))
    with pytest.raises(ValueError, match="smaller than patch"):
        augment((8, 12, 12), AugmentationConfig(), data, seg)


# --- the label encoding: ignore and outside-the-mask -------------------------------------------------------


def test_the_ignore_label_moves_with_the_image():
    """The ignore code is resampled as a label of its own: its voxels follow rotation, scaling and mirroring
    exactly as a class would, instead of turning into background."""
    patch = (16, 20, 20)
    cfg = only("p_rotation", "p_scaling", "p_mirror", p_mirror=0.5)
    labels = LabelEncoding.for_classes(2, ignore=True)
    data = ellipsoid(augmentation_input_size(patch, cfg, False), size=6)
    seg = torch.where(data > 0.5, labels.ignore_index, 0)
    for seed in range(2):
        generator = torch.Generator().manual_seed(seed)
        out_data, out_seg = BatchAugmenter(patch, cfg, False, labels)(data, seg, generator)
        assert set(out_seg.unique().tolist()) == {0, labels.ignore_index}
        assert (out_seg == labels.ignore_index).eq(out_data > 0.5).float().mean().item() >= 0.99


def test_masked_channels_are_zero_outside_the_mask_after_augmentation():
    """nnU-Net's MaskImageTransform after mirroring: where the (augmented) seg says OUTSIDE, a channel
    normalised within the mask is exactly 0 again, as inference sees it, and the seg is background; the
    unmasked channel and every voxel inside the mask are exactly what augmentation made of them."""
    patch = (8, 16, 16)
    cfg = only(*PROBABILITIES, p_mirror=0.5)
    shape = augmentation_input_size(patch, cfg, False)
    data, _ = batch(shape, channels=2, size=4)
    seg = torch.full((4, 1, *shape), LabelEncoding.OUTSIDE)
    seg[:, :, 3:-3, 5:-5, 4:-6] = 1  # the nonzero mask holds class 1 only, so background marks outside
    labels = LabelEncoding.for_classes(2)
    masked, plain = (BatchAugmenter(patch, cfg, False, labels, flags)(data, seg, torch.Generator().manual_seed(3))
                     for flags in ((True, False), ()))
    (out_data, out_seg), (free_data, free_seg) = masked, plain
    assert torch.equal(out_seg, free_seg) and set(out_seg.unique().tolist()) == {0, 1}
    outside = (out_seg == 0).expand(-1, 2, *patch).clone()
    outside[:, 1] = False
    assert outside.any() and (~outside[:, 0]).any()
    assert (out_data[outside] == 0).all()
    assert (free_data[outside] != 0).any()  # noise and intensity transforms did reach those voxels
    assert torch.equal(out_data[~outside], free_data[~outside])


def test_validation_crops_and_relabels_outside_without_masking():
    """nnU-Net's validation transforms only turn -1 into background: the data is already 0 there."""
    data, seg = batch((10, 12, 12))
    seg[:, :, :3] = LabelEncoding.OUTSIDE
    out_data, out_seg = BatchAugmenter((8, 10, 10), AugmentationConfig(enabled=False), False,
                                       LabelEncoding.for_classes(3), (True, True))(data, seg)
    crop = centre_crop(seg, (8, 10, 10))
    assert torch.equal(out_data, centre_crop(data, (8, 10, 10)))
    assert torch.equal(out_seg, crop.clamp(min=0)) and (crop == LabelEncoding.OUTSIDE).any()
