"""Loss, deep supervision, sliding-window inference and pseudo-Dice counting on small real tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from viseg.data.labels import LabelEncoding
from viseg.evaluation.metrics import dice_per_label
from viseg.inference.sliding_window import gaussian_importance, predict_volume, sliding_window_logits, window_starts
from viseg.training.loss import DeepSupervisionLoss, DiceCELoss, deep_supervision_scales, deep_supervision_weights
from viseg.training.module import confusion_counts


def test_deep_supervision_weights_match_nnunet():
    weights = deep_supervision_weights(4)
    expected = np.array([1, 0.5, 0.25, 0])
    assert np.allclose(weights, expected / expected.sum())
    assert deep_supervision_weights(1) == [1.0]


def test_deep_supervision_scales_follow_strides():
    scales = deep_supervision_scales([[1, 1, 1], [1, 2, 2], [2, 2, 2]])
    assert np.allclose(scales, [[1, 1, 1], [1, 0.5, 0.5]])


def _onehot_logits(target: torch.Tensor, num_classes: int, scale: float = 10.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(target[:, 0], num_classes).movedim(-1, 1).float() * scale


def test_dice_ce_prefers_the_right_answer():
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    loss = DiceCELoss(batch_dice=False)
    right = loss(_onehot_logits(target, 3), target)
    wrong = loss(_onehot_logits((target + 1) % 3, 3), target)
    assert right < -0.9 < wrong


def test_class_weights_change_cross_entropy():
    target = torch.randint(0, 2, (2, 1, 6, 6))
    logits = torch.randn(2, 2, 6, 6)
    plain = DiceCELoss(False, dice_weight=0.0)(logits, target)
    weighted = DiceCELoss(False, dice_weight=0.0, class_weights=[1.0, 5.0])(logits, target)
    assert not torch.isclose(plain, weighted)


def test_deep_supervision_loss_downsamples_targets():
    coarse = torch.randint(0, 2, (1, 1, 4, 4))
    target = coarse.repeat_interleave(2, -1).repeat_interleave(2, -2)  # 2x2 blocks: any nearest sampling agrees
    outputs = [_onehot_logits(target, 2), _onehot_logits(coarse, 2), torch.zeros(1, 2, 2, 2)]
    loss = DeepSupervisionLoss(DiceCELoss(False), n_outputs=3)(outputs, target)
    assert loss < -0.9  # the zero-weight coarsest output does not count


def test_window_starts_cover_the_image_with_half_overlap():
    starts = window_starts([100, 40], [32, 64])
    assert starts[1] == [0]
    assert starts[0][0] == 0 and starts[0][-1] == 100 - 32
    assert max(np.diff(starts[0])) <= 16


def test_gaussian_importance_is_positive_and_peaks_in_the_centre():
    weight = gaussian_importance([9, 9])
    assert weight.min() > 0 and weight[4, 4] == weight.max() == 1


class PointwiseNet(nn.Module):
    """A 1x1 convolution: its output cannot depend on the window, so blending must reproduce it."""

    def __init__(self, channels: int, classes: int, dim: int):
        super().__init__()
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        self.conv = conv(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.conv(x)]


@pytest.mark.parametrize("shape", [(2, 11, 37, 29), (2, 5, 8, 8)])
def test_sliding_window_equals_whole_image_for_a_pointwise_network(shape):
    torch.manual_seed(0)
    net = PointwiseNet(2, 3, 3).eval()
    data = torch.randn(*shape)
    logits = sliding_window_logits(net, data, (8, 16, 16), 3, mirror_axes=(0, 1, 2))
    assert logits.shape == (3, *shape[1:])
    assert torch.allclose(logits, net(data[None])[0][0], atol=1e-5)


def test_2d_network_predicts_a_volume_slice_by_slice():
    net = PointwiseNet(1, 2, 2).eval()
    data = np.random.default_rng(0).normal(size=(1, 4, 20, 20)).astype(np.float32)
    probs = predict_volume(net, data, (16, 16), 2, torch.device("cpu"))
    expected = torch.softmax(net(torch.from_numpy(data).permute(1, 0, 2, 3))[0], 1).permute(1, 0, 2, 3)
    assert probs.shape == (2, 4, 20, 20) and torch.allclose(probs, expected, atol=1e-5)


def test_confusion_counts_and_dice():
    prediction = torch.tensor([[0, 1, 1, 2]])
    target = torch.tensor([[0, 1, 2, 2]])
    counts = confusion_counts(prediction, target, 3)
    assert counts.tolist() == [[1, 1], [1, 0], [0, 1]]
    assert dice_per_label(prediction.numpy(), target.numpy(), (1, 2)) == {"1": 2 / 3, "2": 2 / 3}
    assert dice_per_label(np.zeros(4), np.zeros(4), (1,)) == {"1": None}


def test_the_encoding_keeps_only_foreground_labels():
    seg = np.array([-1, 0, 1, 2, 3])
    assert LabelEncoding((3, 1)).encode(seg, keep_outside=False).tolist() == [0, 0, 2, 0, 1]
    assert LabelEncoding((3, 1)).encode(seg).tolist() == [LabelEncoding.OUTSIDE, 0, 2, 0, 1]
    assert LabelEncoding((1,), ignore_label=3).encode(seg, keep_outside=False).tolist() == [0, 0, 1, 0, 2]


# --- the ignore label ---------------------------------------------------------------------------------------

IGNORE = 3  # LabelEncoding.for_classes(3, ignore=True).ignore_index: one past the classes 0..2


def _ignore_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, (2, 1, 6, 8, 8), generator=generator)
    target[:, :, :2] = IGNORE
    target[1, :, 4:, :4] = IGNORE
    return torch.randn(2, 3, 6, 8, 8, generator=generator, requires_grad=True), target


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("class_weights", [None, [1.0, 2.0, 3.0]])
def test_ignored_voxels_do_not_change_the_loss(batch_dice, class_weights):
    """Whatever the network outputs at ignored voxels, the loss and its gradient elsewhere are the same, and
    no gradient reaches the ignored voxels (nnU-Net's DC_and_CE_loss with ignore_label)."""
    logits, target = _ignore_batch()
    loss_fn = DiceCELoss(batch_dice, class_weights=class_weights, ignore_index=IGNORE)
    loss = loss_fn(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    ignored = (target == IGNORE).expand_as(logits)
    other = logits.detach().clone()
    other[ignored] = 100 * torch.randn(int(ignored.sum()), generator=torch.Generator().manual_seed(1))
    other.requires_grad_(True)
    again = loss_fn(other, target)
    (grad_again,) = torch.autograd.grad(again, other)
    assert torch.isfinite(loss) and torch.isclose(loss, again, atol=1e-6)
    assert (grad[ignored] == 0).all() and torch.allclose(grad, grad_again, atol=1e-7)
    # the same loss as if the ignored voxels were not there: case 0 ignores its first two slices
    plain = DiceCELoss(batch_dice, class_weights=class_weights)
    assert torch.isclose(loss_fn(logits[:1], target[:1]), plain(logits[:1, :, 2:], target[:1, :, 2:]), atol=1e-6)


def test_a_patch_without_annotation_has_a_finite_loss_with_a_gradient():
    logits, target = _ignore_batch()
    loss = DiceCELoss(False, ignore_index=IGNORE)(logits, torch.full_like(target, IGNORE))
    assert torch.isfinite(loss)
    loss.backward()  # nnU-Net counts cross-entropy as 0 there; the graph must still be there for the step


def test_pseudo_dice_and_validation_dice_skip_ignored_voxels():
    prediction = torch.tensor([[0, 1, 1, 2, 1, 2]])
    target = torch.tensor([[0, 1, 2, 2, IGNORE, IGNORE]])
    # predictions on the two ignored voxels are neither false positives nor anything else
    counts = confusion_counts(prediction, target, 3, ignore_index=IGNORE)
    assert counts.tolist() == [[1, 1], [1, 0], [0, 1]]
    assert confusion_counts(prediction, target, 3).tolist() != counts.tolist()
    assert dice_per_label(prediction.numpy(), target.numpy(), (1, 2), ignore_label=IGNORE) == {"1": 2 / 3, "2": 2 / 3}
