"""What changes when one run trains on several processes (Lightning DDP, on GPUs with NCCL or on CPU with gloo).

nnU-Net's DDP rules (nnUNetTrainer and its MemoryEfficientSoftDiceLoss), each needed for the run to mean the
same as on one process:
- the planned batch is the global batch: each rank takes its share (`rank_batch`), with the oversampling
  adjusted so that the whole batch oversamples the same samples as one process would;
- batch Dice sums its statistics over every rank's samples (`gather_sum`, differentiable);
- the coarsest deep-supervision output keeps a 1e-6 weight instead of 0 (training/loss.py): DDP refuses
  parameters that get no gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from viseg.errors import ConfigError


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def rank_batch(global_batch: int, oversample: float, rank: int, world_size: int) -> tuple[int, float]:
    """(this rank's batch size, its oversample_foreground_percent): nnU-Net's _set_batch_size_and_oversample.

    The first ranks take one more sample when the batch does not divide evenly. The global batch's forced
    samples are its last ones (the loader's rule: from round(batch * (1 - oversample)) on); each rank's
    percentage is chosen so that its own loader forces exactly its share of them."""
    if world_size == 1:  # nnU-Net leaves one process's batch and oversampling as planned
        return global_batch, oversample
    if global_batch < world_size:
        raise ConfigError(f"batch_size {global_batch} cannot be shared by {world_size} processes",
                          fix=f"use devices={global_batch} or fewer, or batch_size={world_size} or more")
    sizes = [global_batch // world_size + (1 if (global_batch // world_size) * world_size + i < global_batch else 0)
             for i in range(world_size)]
    low, high = sum(sizes[:rank]), sum(sizes[:rank + 1])
    forced = [i >= round(global_batch * (1 - oversample)) for i in range(global_batch)]
    if high / global_batch < 1 - oversample:
        share = 0.0
    elif low / global_batch > 1 - oversample:
        share = 1.0
    else:
        share = sum(forced[low:high]) / sizes[rank]
    return sizes[rank], share


class _AllGatherGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice (Lightning's, which
    nnU-Net uses for batch Dice)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        gathered = [torch.zeros_like(tensor) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, tensor.contiguous())
        return torch.stack(gathered)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
        return grad[torch.distributed.get_rank()]


def gather_sum(tensor: Tensor) -> Tensor:
    """The sum of `tensor` over every rank (itself on one process), differentiable."""
    if not is_distributed():
        return tensor
    return _AllGatherGrad.apply(tensor).sum(0)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """In place and without gradient: counts (the pseudo-Dice's tp/fp/fn) summed over every rank."""
    if is_distributed():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor
