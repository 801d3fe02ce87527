"""What a sweep is: the sweep's own settings, and the command line split into them, fixed training
overrides, grid axes and searched axes (parsed with Hydra's own override grammar).

A sweep spec in `sweeps/<name>.yaml` holds the same settings as data; command-line overrides win over it.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from viseg.config import check_folder_name
from viseg.errors import ConfigError
from viseg.io.layout import WEIGHTS, WEIGHTS_HELP

SWEEP_KEYS = ("folds", "sweep", "dry_run", "resume", "summary", "cross_validate", "top_k", "experiment",
              "storage_path", "num_samples", "max_concurrent_trials", "max_failures", "checkpoints_to_keep",
              "resources", "search", "config_name", "best", "selection", "verbose", "status_every_s")
# Values that change the plan or the data cannot be searched: every trial of a search shares one plan.
UNSEARCHABLE_PREFIXES = ("patch_size", "spacing", "batch_size", "transpose_", "foreground_labels", "model",
                         "plan.", "dataset.", "splits.", "num_channels", "num_classes", "fold", "paths.",
                         "configuration")


# What a searched axis draws from. The schemas below are OmegaConf structured configs, which refuse Literal
# annotations (omegaconf 2.3: "Unexpected type annotation"), so they check their allowed values in __post_init__.
SearchKind = Literal["loguniform", "uniform", "choice"]
SEARCH_SCHEDULERS = ("asha", "hyperband", "median", "pbt")
SEARCH_MODES = ("max", "min")
# What PBT may perturb: values a run continues with from its checkpoint (the optimizer's are adopted on resume,
# the loss and the augmentation are rebuilt from the config). Never the LR schedule, whose state the checkpoint
# carries, the epoch budget, nor anything that changes the plan or the network (refused for every search).
PBT_FIXED_PREFIXES = ("lr_scheduler.", "optimizer.type", "trainer.max_epochs", "trainer.iterations_per_epoch",
                      "seed", "sampling.", "loader.")


@dataclass
class ResourcesConfig:
    cpu: float = 1.0
    gpu: float = 0.0  # fractional values share a GPU between trials
    # Ray Train workers per grid trial (DDP across them, on any nodes), cpu/gpu above then per worker; a variant
    # with devices=N (an int above 1) trains on N workers whatever this says, so a sweep can mix both
    workers: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"resources.workers={self.workers} must be at least 1",
                              fix="use resources.workers=1 (one process per trial) or more")


@dataclass
class SearchConfig:
    """A search: every trial is one sampled configuration trained on all of `folds` at once (one Ray task per
    fold inside the trial's resources), scored by the mean over those folds. The searcher never sees a fold."""

    folds: Any = field(default_factory=lambda: [0, 1, 2])  # [0] is 3x cheaper, but fits every choice to one fold
    scheduler: str | None = None  # one of SEARCH_SCHEDULERS; None trains every configuration to the end
    metric: str = "val/ema_pseudo_dice"  # the fold mean of this per-epoch metric drives schedulers
    mode: str = "max"  # one of SEARCH_MODES
    seed: int = 0
    time_budget_s: float | None = None  # end the search after this many seconds (running trials keep their state)
    # the schedulers' own settings, in epochs
    grace_period: int = 1  # asha, hyperband, median: epochs every configuration trains before it can be stopped
    reduction_factor: float = 3.0  # asha, hyperband: keep 1/reduction_factor of the configurations at each rung
    perturbation_interval: int = 2  # pbt: epochs between exploit (copy a better trial) and explore (perturb)
    quantile_fraction: float = 0.25  # pbt: the bottom fraction copies the top fraction
    resample_probability: float = 0.25  # pbt: explore draws a fresh value instead of scaling by 0.8 or 1.2

    def __post_init__(self) -> None:
        if self.scheduler is not None and self.scheduler not in SEARCH_SCHEDULERS:
            raise ConfigError(f"search.scheduler={self.scheduler!r} is not a search scheduler",
                              fix=f"use one of {list(SEARCH_SCHEDULERS)}, or leave it out to run every trial")
        for key in ("grace_period", "perturbation_interval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"search.{key}={getattr(self, key)} must be at least 1 epoch")
        if not self.reduction_factor > 1:
            raise ConfigError(f"search.reduction_factor={self.reduction_factor} must be above 1",
                              fix="search.reduction_factor=3 keeps a third of the configurations at each rung")
        if not 0 < self.quantile_fraction <= 0.5:
            raise ConfigError(f"search.quantile_fraction={self.quantile_fraction} must be in (0, 0.5]")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(f"search.time_budget_s={self.time_budget_s} must be positive (seconds)")
        if self.mode not in SEARCH_MODES:
            raise ConfigError(f"search.mode={self.mode!r} must be max or min",
                              fix="search.mode=max for a Dice, search.mode=min for a loss")


@dataclass
class SelectionConfig:
    """How best= scores the variants (nnU-Net's find_best_configuration validates with mirroring on)."""

    ensembles: bool = True  # also score pairs averaged: the top two, and the best of each configuration
    checkpoint: str = "final"  # final, best or last (WEIGHTS), as python -m viseg.predict
    mirror: bool = True

    def __post_init__(self) -> None:
        if self.checkpoint not in WEIGHTS:
            raise ConfigError(f"selection.checkpoint={self.checkpoint!r} is not a checkpoint name",
                              fix=f"use selection.checkpoint={WEIGHTS_HELP}")


@dataclass
class SweepConfig:
    config_name: str = "anatomy_config"
    folds: Any = "0-4"
    experiment: str | None = None  # experiment name; default derived from dataset, config and axes
    storage_path: str = "results/sweeps"  # a path every node mounts (NFS, EFS, Lustre, ...), never a URI
    num_samples: int = 8  # trials drawn by the search (only with searched axes)
    max_concurrent_trials: int | None = None
    max_failures: int = 2  # retries of a trial from its last checkpoint (worker death, node loss)
    checkpoints_to_keep: int = 2
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    dry_run: bool = False
    resume: str | None = None
    summary: str | None = None
    cross_validate: str | None = None
    top_k: int = 1
    best: str | None = None  # an experiment to choose the configuration to deploy from
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    sweep: str | None = None
    overrides: list[str] = field(default_factory=list)  # fixed training overrides from a spec file
    # console: 0 results, errors and warnings only; 1 also the live trial table (or, off a terminal, a status
    # line every status_every_s seconds); 2 also Ray's own tables and Lightning's banners (viseg/noise.py).
    # None: VISEG_VERBOSE, else 1. Applies to the command that gives it (a resume can be louder than its sweep).
    verbose: int | None = None
    status_every_s: float = 30.0

    def __post_init__(self) -> None:
        self.storage_path = storage_path_on_disk(self.storage_path)
        if self.verbose is not None and self.verbose not in (0, 1, 2):
            raise ConfigError(f"verbose={self.verbose} is not a console level", fix="use verbose=0, 1 or 2")
        if not self.status_every_s > 0:
            raise ConfigError(f"status_every_s={self.status_every_s} must be positive", fix="e.g. status_every_s=30")
        if self.experiment is not None:
            check_folder_name("experiment", self.experiment)


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[str, ...]  # override-string values, as Hydra would substitute them


@dataclass(frozen=True)
class SearchAxis:
    key: str
    kind: SearchKind
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()


@dataclass
class SweepRequest:
    settings: SweepConfig
    fixed: list[str]  # training overrides applied to every trial
    axes: list[Axis]  # grid: the cartesian product gives the variants
    search: list[SearchAxis]

    def variants(self) -> dict[str, list[str]]:
        """Deterministic variant names -> their overrides (the cartesian product of the grid axes)."""
        if not self.axes:
            return {"default": []}
        result: dict[str, list[str]] = {}
        for combo in itertools.product(*[[(a.key, v) for v in a.values] for a in self.axes]):
            name = variant_name(combo)
            if name in result:  # values that differ only in characters a folder name cannot hold
                name = f"{name}-{hashlib.sha256(repr(combo).encode()).hexdigest()[:6]}"
            result[name] = [f"{k}={v}" for k, v in combo]
        return result


def storage_path_on_disk(value: str) -> str:
    """`storage_path` as a folder path; `file://` URIs become their path, any other URI is refused. Tune
    could write its own files to s3://, but every trial writes its run folder (checkpoints, metrics,
    predictions) with plain file I/O under the experiment folder, so on a URI those would land on each
    node's local disk and be lost with the node."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", value)
    if scheme is None:
        return value
    if scheme.group(1).lower() == "file":
        from urllib.parse import unquote, urlparse

        parsed = urlparse(value)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"storage_path={value!r}: a file:// URI names a host ({parsed.netloc!r})",
                              fix="use file:///<absolute path> or the plain path of the shared folder")
        return unquote(parsed.path)
    raise ConfigError(f"storage_path={value!r} is a URI ({scheme.group(1)}://): viseg writes run folders, "
                      "checkpoints and summaries with plain file I/O, so storage_path must be a shared "
                      "filesystem path mounted at the same place on every node (NFS, EFS, Lustre, ...)",
                      fix="mount the storage on every node (e.g. s3 through a FUSE mount or EFS) and pass "
                          "storage_path=/mnt/shared/sweeps")


def variant_name(assignments: tuple[tuple[str, str], ...]) -> str:
    parts = [f"{key.split('.')[-1]}-{value}" for key, value in assignments]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(parts))


def _fold(value: Any) -> int:
    """One fold number: an int or its digits, never a bool, float or list (those are typos, not folds)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ConfigError(f"folds: {value!r} is not a fold number", fix="use e.g. folds=0-4, folds=0,2,4 or all")


def parse_folds(value: Any, n_folds: int) -> list[int]:
    """`0-4`, `0,2,4`, `[0,2]`, a single int, or `all`."""
    if value == "all":
        folds = list(range(n_folds))
    elif isinstance(value, int) and not isinstance(value, bool):
        folds = [value]
    elif isinstance(value, list | tuple):
        folds = [_fold(v) for v in value]
    elif isinstance(value, str) and re.fullmatch(r"\d+-\d+", value):
        start, stop = map(int, value.split("-"))
        folds = list(range(start, stop + 1))
    elif isinstance(value, str) and re.fullmatch(r"\d+(,\d+)*", value):
        folds = [int(v) for v in value.split(",")]
    else:
        raise ConfigError(f"folds={value!r} is not a fold selection", fix="use e.g. folds=0-4, folds=0,2,4 or all")
    bad = [f for f in folds if not 0 <= f < n_folds]
    if bad or not folds:
        raise ConfigError(f"folds {bad or folds} are out of range for splits.n_folds={n_folds}",
                          fix=f"choose folds in 0..{n_folds - 1}")
    return sorted(set(folds))


def load_spec(name: str, sweeps_dir: Path) -> dict[str, Any]:
    """`sweep=<name>` (sweeps/<name>.yaml) or `sweep=<path to a .yaml file>`, e.g. a search's best_config.yaml."""
    from omegaconf import OmegaConf

    path = Path(name).expanduser() if str(name).endswith((".yaml", ".yml")) else sweeps_dir / f"{name}.yaml"
    if not path.is_file() and path.parent != sweeps_dir:
        raise ConfigError(f"sweep spec {path} does not exist", fix="pass the path of a sweep spec .yaml file")
    if not path.is_file():
        known = sorted(p.stem for p in sweeps_dir.glob("*.yaml"))
        raise ConfigError(f"sweep spec {path} does not exist", fix=f"use one of {known}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]
