"""DDP's rules (training/distributed.py): nnU-Net's share of the batch per rank, and a loss over two real gloo
processes that equals the single-process loss on the same global batch, gradients included."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from viseg.errors import ConfigError
from viseg.training.distributed import rank_batch
from viseg.training.loss import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights


@pytest.mark.parametrize(("batch", "world", "oversample", "expected"), [
    (4, 2, 0.33, [(2, 0.0), (2, 0.5)]),   # forced from round(4 * 0.67) = 3 on: the last sample, rank 1's
    (5, 2, 0.33, [(3, 0.0), (2, 1.0)]),   # 3 + 2; forced from 3 on: both of rank 1's
    (2, 2, 0.33, [(1, 0.0), (1, 1.0)]),   # forced from round(1.34) = 1 on
    (7, 3, 0.5, [(3, 0.0), (2, 0.5), (2, 1.0)]),  # forced from round(3.5) = 4 on: one of rank 1's, rank 2's
    (2, 1, 0.33, [(2, 0.33)]),            # one process keeps the plan's values
])
def test_each_rank_takes_nnunets_share_and_the_batch_forces_what_one_process_would(batch, world, oversample,
                                                                                    expected):
    shares = [rank_batch(batch, oversample, rank, world) for rank in range(world)]
    assert [(b, round(p, 2)) for b, p in shares] == expected
    assert sum(b for b, _ in shares) == batch
    # each rank's loader forces from round(b * (1 - p)) on: together the same number as the whole batch
    forced = sum(b - round(b * (1 - p)) for b, p in shares)
    assert forced == batch - round(batch * (1 - oversample))


def test_a_batch_smaller_than_the_ranks_is_refused():
    with pytest.raises(ConfigError, match="batch_size 1 cannot be shared by 2 processes"):
        rank_batch(1, 0.33, 0, 2)


def test_the_coarsest_output_keeps_a_tiny_weight_under_ddp():
    plain, ddp = deep_supervision_weights(4), deep_supervision_weights(4, distributed=True)
    assert plain[-1] == 0 and 0 < ddp[-1] < 1e-5 and sum(ddp) == pytest.approx(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs() -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(4, 3, 8, 8, 8, generator=generator), torch.randn(4, 3, 4, 4, 4, generator=generator)]
    target = torch.randint(0, 3, (4, 1, 8, 8, 8), generator=generator)
    return logits, target


def _loss() -> DeepSupervisionLoss:
    return DeepSupervisionLoss(DiceCELoss(batch_dice=True), n_outputs=2)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        logits, target = _inputs()
        share = slice(rank * 2, rank * 2 + 2)
        mine = [x[share].clone().requires_grad_(True) for x in logits]
        loss = _loss()(mine, target[share])
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": [x.grad for x in mine]}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_compute_the_single_process_loss_and_its_gradient(tmp_path: Path):
    """Batch Dice pools both ranks' halves, cross-entropy is each half's mean: the mean of the ranks' losses is
    the one-process loss (the coarsest output's 1e-6 aside), and each rank's gradient is world_size times the
    one-process gradient of its samples, which DDP's averaging of parameter gradients turns back into it."""
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    logits, target = _inputs()
    full = [x.clone().requires_grad_(True) for x in logits]
    loss = DeepSupervisionLoss(DiceCELoss(batch_dice=True), n_outputs=2)(full, target)
    loss.backward()
    # the single process gives the coarse output weight 0, DDP 1e-6: the losses differ by about that much
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), loss.detach(), atol=1e-5)
    for rank, result in enumerate(ranks):
        share = slice(rank * 2, rank * 2 + 2)
        assert torch.allclose(result["grads"][0], 2 * full[0].grad[share], atol=1e-6)
