"""nnU-Net's cascade in a sweep: each 3d_cascade_fullres variant trains on a 3d_lowres variant, fold by fold.

The driver derives, for every cascade variant, its lowres variant (the same overrides with
configuration=3d_lowres; an existing variant when one is exactly that) and lists it first, so Tune creates and
starts every lowres trial before the cascade trials. A cascade trial of fold k then waits for the lowres trial
of fold k through a Ray actor (`StageBoard`): a Ray call that returns when that trial reports its run folder,
not a poll of the disk. A lowres run finished before a driver restart is found on disk and needs no wait.

No deadlock: a waiting cascade trial holds a slot, but the trial it waits for was started before it (Tune
starts trials in the order it created them) and waits for nothing itself.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from viseg.errors import ConfigError
from viseg.io.layout import FINISHED_MARKER
from viseg.planning.plans import CASCADE_CONFIGURATION, LOWRES_CONFIGURATION

CASCADE = CASCADE_CONFIGURATION
LOWRES = LOWRES_CONFIGURATION


def stage_key(variant: str, fold: int) -> str:
    return f"{variant}/fold_{fold}"


def board_name(runs_dir: str | Path) -> str:
    """One board per experiment (named after its folder), so two sweeps on one cluster never share one."""
    return f"viseg-stages-{hashlib.sha256(str(Path(runs_dir).resolve()).encode()).hexdigest()[:12]}"


class StageBoard:
    """Which lowres trials (variant/fold) have finished, and their run folders; `wait` returns once one has."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[str, str]] = {}  # key -> (running | finished | failed, run folder | error)
        self.changed: dict[str, asyncio.Event] = {}

    def _event(self, key: str) -> asyncio.Event:
        return self.changed.setdefault(key, asyncio.Event())

    async def started(self, key: str) -> None:
        self.states[key] = ("running", "")

    async def finished(self, key: str, run_dir: str) -> None:
        self.states[key] = ("finished", run_dir)
        self._event(key).set()

    async def failed(self, key: str, message: str) -> None:
        self.states[key] = ("failed", message)
        self._event(key).set()

    async def wait(self, key: str) -> tuple[str, str]:
        """(finished, run folder) or (failed, error): the first that the lowres trial reports. A failure
        Tune retries is replaced by the retry's outcome (`started` clears it)."""
        while self.states.get(key, ("pending", ""))[0] not in ("finished", "failed"):
            event = self._event(key)
            event.clear()
            await event.wait()
        return self.states[key]


def start_board(runs_dir: str | Path) -> Any:
    """The experiment's board, created by the driver before the trials: the driver keeps the handle for as long
    as the sweep runs (a named actor lives while a handle to it does)."""
    import ray

    actor = ray.remote(num_cpus=0)(StageBoard)
    return actor.options(name=board_name(runs_dir), get_if_exists=True, max_concurrency=1000).remote()


def stop_board(handle: Any | None) -> None:
    if handle is not None:
        import ray

        ray.kill(handle)


def board(runs_dir: str | Path) -> Any:
    import ray

    return ray.get_actor(board_name(runs_dir))


def wait_for_previous_stage(runs_dir: str, variant: str, fold: int, run_dir: Path) -> Path:
    """The lowres run folder of (variant, fold), once its trial has finished it."""
    import ray

    if (run_dir / FINISHED_MARKER).is_file():
        return run_dir
    status, detail = ray.get(board(runs_dir).wait.remote(stage_key(variant, fold)))
    if status != "finished":
        raise ConfigError(f"the cascade's previous stage, {variant} fold {fold}, failed: {detail}",
                          fix=f"fix it, then resume the sweep (python -m viseg.sweep resume={Path(runs_dir).parent}): "
                              "the lowres trial runs again and the cascade after it")
    return Path(detail)


def previous_stage_overrides(overrides: list[str]) -> list[str]:
    """A cascade variant's overrides with its configuration replaced by 3d_lowres."""
    return [*(o for o in overrides if not o.lstrip("+~").startswith("configuration=")), f"configuration={LOWRES}"]
