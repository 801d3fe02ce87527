"""Where networks run and in which precision: one rule for training, its validation and prediction."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from viseg.errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; an explicit CUDA device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but no CUDA GPU is available", fix="use device=auto or device=cpu")
    return torch.device(device)


def forward_autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast for network forwards on a GPU (as training's bf16-mixed precision); fp32 on the CPU,
    where bf16 convolutions are slower, not faster."""
    return torch.autocast(device.type, enabled=device.type == "cuda", dtype=torch.bfloat16)
