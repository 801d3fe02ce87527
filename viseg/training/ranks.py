"""Which process of a distributed run this is, without importing torch (the commands' --help stays light)."""

from __future__ import annotations

import os
import sys


def process_rank() -> int:
    """This process's global rank, also before the process group exists: Lightning's launcher starts ranks
    1.. with LOCAL_RANK (and NODE_RANK) set, Ray Train and torchrun set RANK; a single process is rank 0."""
    torch = sys.modules.get("torch")  # an initialised process group implies torch is loaded
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    for name in ("RANK", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0
