"""Network construction: each architecture starts from nnU-Net's own initialisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.parity import fingerprint_from_reference
from viseg.planning.network import build_model
from viseg.planning.planner import PlannerSettings, make_plans


def _network(shared: Path, architecture: str) -> torch.nn.Module:
    plans = make_plans(fingerprint_from_reference(shared, "synth_iso"), PlannerSettings(architecture=architecture))
    return build_model(plans, "3d_fullres")


def test_residual_encoder_blocks_start_as_identity(shared: Path):
    """nnU-Net's ResidualEncoderUNet.initialize zeroes the last norm of every residual block (the one
    before the add), so each block's residual branch outputs 0 and the block is the identity."""
    from dynamic_network_architectures.building_blocks.residual import BasicBlockD

    blocks = [m for m in _network(shared, "ResidualEncoderUNet").modules() if isinstance(m, BasicBlockD)]
    assert blocks
    for block in blocks:
        assert torch.count_nonzero(block.conv2.norm.weight) == 0
        assert torch.count_nonzero(block.conv2.norm.bias) == 0
        x = torch.randn(1, block.conv1.conv.in_channels, 8, 8, 8)
        skip = x if block.skip is None else block.skip(x)
        with torch.no_grad():
            residual = block.conv2(block.conv1(x))
        assert torch.equal(residual, torch.zeros_like(residual))
        assert skip.shape == residual.shape


@pytest.mark.parametrize("architecture", ["PlainConvUNet", "ResidualEncoderUNet"])
def test_convolutions_are_he_initialised(shared: Path, architecture: str):
    """He init with LeakyReLU's slope 1e-2: every conv bias 0; the norms of plain convs keep weight 1."""
    network = _network(shared, architecture)
    convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs if c.bias is not None)
    first = convs[0]
    fan_in = first.weight[0].numel()
    expected_std = (2 / (1 + 1e-4) / fan_in) ** 0.5
    assert abs(float(first.weight.std()) - expected_std) < 0.25 * expected_std
