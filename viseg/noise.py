"""Other libraries' console output that a viseg user cannot act on, off unless asked for.

Lightning prints a device banner, a cloud-logging advertisement and a "fit stopped" line once per run, Ray
a line per checkpoint and a warning about snapshot frequency; in a sweep that is several lines per trial,
which bury the table and the errors that matter. viseg prints the device in its own start line
(training_log.txt) and tracks checkpoints itself. `VISEG_VERBOSE=2` (or the sweep's `verbose=2`) brings all
of it back. Warnings and errors are never hidden, except the few below, which name a deliberate design choice
of viseg's or a library's internal deprecation.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "VISEG_VERBOSE"
DEFAULT_VERBOSITY = 1

# loggers whose INFO lines repeat once per run or per checkpoint
CHATTY_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",  # "GPU available", "TPU available", "💡 Tip", "`Trainer.fit` stopped"
    "lightning.fabric.utilities.rank_zero",
    "ray.train._internal.storage",  # "Checkpoint successfully created at: ..." per report
    "ray.train.v2._internal.execution.storage",
)
# warnings about choices viseg made on purpose, or raised inside a library about its own code
KNOWN_WARNINGS = (
    # viseg's loader is an IterableDataset with a length; each worker gets its own seed and share of batches
    r".*Your `IterableDataset` has `__len__` defined.*",
    # the module moves batches to the device and augments them there (training/module.py), by design
    r".*You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataM.*",
    # Lightning's own use of a torch API deprecated in torch 2.13
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


def verbosity() -> int:
    """0: errors, warnings and results only; 1: viseg's own progress (default); 2: every library's output too."""
    try:
        return int(os.environ.get(VERBOSE_ENV, DEFAULT_VERBOSITY))
    except ValueError:
        return DEFAULT_VERBOSITY


def quiet_libraries(level: int | None = None) -> None:
    """Silence the chatty loggers and known warnings in this process (a trial's worker, or a single run)."""
    if (verbosity() if level is None else level) >= 2:
        return
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def quiet_tune_driver(level: int | None = None) -> None:
    """The sweep driver's side, read by Tune when the Tuner starts (so before `tuner.fit()`):
    - its warning that snapshots are frequent: viseg checkpoints every epoch on purpose (a killed trial loses at
      most one), and the advice (keep more checkpoints) costs disk for nothing;
    - its console: Tune's newer output prints an experiment box and a TensorBoard hint even when silent, its
      older one (RAY_AIR_NEW_OUTPUT=0) prints nothing at verbose=0, and viseg's console takes its place."""
    if (verbosity() if level is None else level) >= 2:
        return
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
