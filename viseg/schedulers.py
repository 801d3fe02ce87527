"""The fixed registry of learning-rate schedulers a config may name.

Configs name a scheduler by a short registry key, never by an import path: a config or a checkpoint can
therefore never make viseg import arbitrary code. Factories import torch lazily so that config validation
(and `--help`) stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SchedulerFactory = Callable[[Any, dict[str, Any], int], Any]


def _step_lr(optimizer: Any, kwargs: dict[str, Any], max_epochs: int) -> Any:
    from torch.optim.lr_scheduler import StepLR

    return StepLR(optimizer, **kwargs)


def _poly(optimizer: Any, kwargs: dict[str, Any], max_epochs: int) -> Any:
    # nnU-Net's PolyLRScheduler: lr = lr0 * (1 - epoch / max_epochs) ** exponent. The horizon is fixed when
    # the scheduler is built, which is why continuing with more epochs cannot revive the learning rate.
    from torch.optim.lr_scheduler import PolynomialLR

    args = {"power": 0.9, **kwargs}
    return PolynomialLR(optimizer, total_iters=args.pop("total_iters", max_epochs), **args)


def _cosine(optimizer: Any, kwargs: dict[str, Any], max_epochs: int) -> Any:
    from torch.optim.lr_scheduler import CosineAnnealingLR

    args = dict(kwargs)
    return CosineAnnealingLR(optimizer, T_max=args.pop("T_max", max_epochs), **args)


def _plateau(optimizer: Any, kwargs: dict[str, Any], max_epochs: int) -> Any:
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    return ReduceLROnPlateau(optimizer, **kwargs)


SCHEDULERS: dict[str, SchedulerFactory] = {
    "StepLR": _step_lr,
    "PolyLR": _poly,
    "CosineAnnealingLR": _cosine,
    "ReduceLROnPlateau": _plateau,
}

# Schedulers whose decay is tied to the total number of epochs fixed at construction time.
HORIZON_SCHEDULERS = frozenset({"PolyLR", "CosineAnnealingLR"})
# Schedulers that step on a monitored metric and therefore need `monitor`.
METRIC_SCHEDULERS = frozenset({"ReduceLROnPlateau"})


def build_scheduler(name: str, optimizer: Any, kwargs: dict[str, Any], max_epochs: int) -> Any:
    """Build a registered scheduler; unknown names fail with the list of valid ones."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler.type {name!r}; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](optimizer, dict(kwargs), max_epochs)
