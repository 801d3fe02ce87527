"""The Tune callback that seals Ray's experiment state as the driver writes it (see `state_seal`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.tune import Callback

from viseg.sweep.ray_state import is_state_file
from viseg.sweep.state_seal import StateSealer

log = logging.getLogger(__name__)


class SealStateCallback(Callback):
    """Ray saves its state into the driver's staging folder inside a controller step, before `on_step_end`,
    and uploads it to the experiment folder afterwards; the digests are taken from the staged copy.

    Ray pickles its callbacks into `tuner.pkl`, so this one holds nothing worth keeping there: the key is
    loaded from the user's config folder when needed, and the paths come from the trials' storage."""

    def __init__(self) -> None:
        self._sealer: StateSealer | None = None
        self._staging: Path | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def _seal(self, trials: list[Any]) -> None:
        if self._sealer is None:
            if not trials:
                return
            storage = trials[0].storage
            self._sealer = StateSealer(Path(storage.experiment_fs_path))
            self._staging = Path(storage.experiment_driver_staging_path)
        assert self._staging is not None
        try:
            self._sealer.seal_changed(self._staging, is_state_file)
        except OSError as exc:  # a full disk: the sweep goes on; state left unsealed is not loaded on resume
            log.warning("could not seal Ray's experiment state in %s (%s): a resume will not load the state "
                        "written since (a grid then continues from its run folders)", self._sealer.experiment, exc)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._seal(trials)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        """After Ray's last save, which it forces and waits for when the run ends (or is stopped by a signal)."""
        self._seal(trials)
