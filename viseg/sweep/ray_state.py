"""Whether Ray can restore a sweep from its experiment folder, checked before Ray tries.

Ray's own answer comes too late and is silent: when any of its state files fails to load, Tune logs "Failed to
restore the run state" and *restarts* the experiment from the Tuner's param space, which `Tuner.restore` does
not keep (tuner.pkl holds only its keys). The restarted trials then have no config at all. Ray writes these
files in place and uploads them without a rename, so a full disk can cut any of them (the search state
`basic-variant-state-*.json` is a pickle despite its name, so "parses as JSON" is no test). So every state
file is read here the way Ray will read it, and each trial entry must be one of this sweep's trials.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from viseg.sweep.state_seal import untrusted_state_files

# Ray 2.x state files in the experiment folder -> how Ray reads them back
STATE_FILES = {
    "experiment_state-*.json": "json",  # the trials, with their configs
    "basic-variant-state-*.json": "pickle",  # a grid's generator (which trials are still to come)
    "search_gen_state-*.json": "pickle",  # a search's generator and its wrappers
    "searcher-state-*.pkl": "pickle",  # the searcher itself (Optuna's history)
    "callback-states-*.pkl": "pickle",
    "tuner.pkl": "pickle",
}
ASIDE = "damaged_tune_state"
UNTRUSTED = "untrusted_tune_state"


def is_state_file(name: str) -> bool:
    return any(fnmatch(name, pattern) for pattern in STATE_FILES)


def state_files(experiment: Path) -> list[Path]:
    return sorted(path for pattern in STATE_FILES for path in experiment.glob(pattern))


@dataclass
class SweepTrials:
    """What this sweep's trials may be: a restored trial outside it means Ray's state is not this sweep's."""

    variants: list[str]
    folds: list[int]
    search: bool
    random_search: bool = False  # a search without a searcher (PBT's population): Ray's basic generator


def _load(path: Path, kind: str) -> Any:
    data = path.read_bytes()
    if kind == "json":
        return json.loads(data)
    import ray.cloudpickle as cloudpickle  # what Ray unpickles its own state with

    return cloudpickle.loads(data)


def _trial_problem(entry: Any, trials: SweepTrials) -> str | None:
    try:
        state = json.loads(entry[0])
    except (TypeError, IndexError, KeyError, ValueError):
        return "a trial entry that does not load"
    config = state.get("config") if isinstance(state, dict) else None
    if trials.search:  # a search trial is a configuration: a variant, its folds are the search's
        if not isinstance(config, dict) or config.get("variant") not in trials.variants:
            return f"a trial entry without this search's variants (config {config!r})"
        return None
    if not isinstance(config, dict) or config.get("variant") not in trials.variants \
            or config.get("fold") not in trials.folds:
        return f"a trial entry without this sweep's variant and fold (config {config!r})"
    return None


def _experiment_state_problem(state: Any, trials: SweepTrials) -> str | None:
    """What Ray's resume would trip over: it reads runner_data and needs at least one trial (it takes the
    first trial's timestamp), and a trial without variant and fold cannot run."""
    if not isinstance(state, dict) or not isinstance(state.get("runner_data"), dict):
        return "no runner_data"
    entries = state.get("trial_data")
    if not isinstance(entries, list) or not entries:
        return "no trial entries"
    return next((p for p in (_trial_problem(e, trials) for e in entries) if p), None)


def file_problem(path: Path, kind: str, trials: SweepTrials) -> str | None:
    """None when Ray can read the file back; else why not."""
    try:
        loaded = _load(path, kind)
    except Exception as exc:  # truncated pickle, cut JSON, an unreadable file: all stop Ray's restore
        return f"unreadable ({type(exc).__name__})"
    if path.name.startswith("experiment_state-"):
        return _experiment_state_problem(loaded, trials)
    return None


def set_aside_damaged_state(experiment: Path, trials: SweepTrials) -> str | None:
    """None when Ray can restore from the folder; else why not, after moving the damaged files into
    `damaged_tune_state/` (kept for inspection, out of Ray's way: an older, complete state may remain)."""
    damaged: list[str] = []
    for pattern, kind in STATE_FILES.items():
        for path in sorted(experiment.glob(pattern)):
            problem = file_problem(path, kind, trials)
            if problem is not None:
                damaged.append(f"{path.name}: {problem}")
                aside = experiment / ASIDE
                aside.mkdir(exist_ok=True)
                path.replace(aside / path.name)
    missing = [p for p in _required(trials) if not any(experiment.glob(p))]
    if not missing:
        return None
    return "; ".join([*(f"no readable {p}" for p in missing), *damaged])


def _required(trials: SweepTrials) -> list[str]:
    """Without its generator's state Ray would not know which trials are still to come (a grid's later
    trials, a search's sampler), so a restore without it would silently drop them."""
    searched = trials.search and not trials.random_search
    generator = "search_gen_state-*.json" if searched else "basic-variant-state-*.json"
    return ["tuner.pkl", "experiment_state-*.json", generator]



def set_aside_untrusted_state(experiment: Path, move: bool) -> list[str]:
    """The state files this user's viseg did not seal (read as bytes, never loaded); with `move`, they go
    into `untrusted_tune_state/`, where Ray will not look for them."""

    untrusted = untrusted_state_files(experiment, state_files(experiment))
    if move:
        for name in untrusted:
            aside = experiment / UNTRUSTED
            aside.mkdir(exist_ok=True)
            (experiment / name).replace(aside / name)
    return untrusted
