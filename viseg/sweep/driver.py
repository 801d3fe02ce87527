"""The sweep driver: compose and validate every variant, prepare each distinct plan once, run Ray Tune.

Everything that can fail on user input (overrides, group options, the dataset) fails here, before Ray
starts. The experiment folder keeps `viseg_sweep.json` (the composed variants and settings) so that
`resume=` and `summary=` need nothing but the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from viseg.cli import to_typed, with_key_aliases
from viseg.config import BaseConfig, register_configs, reject_derived_overrides
from viseg.errors import ConfigError
from viseg.io.jsonio import read_json, write_json_atomic
from viseg.resources import conf_dir
from viseg.sweep.spec import SearchAxis, SweepConfig, SweepRequest, parse_folds, variant_name
from viseg.sweep.stages import CASCADE, previous_stage_overrides
from viseg.sweep.train_workers import trial_workers
from viseg.sweep.trial_setup import trial_config
from viseg.training.init_weights import source_checkpoint
from viseg.training.tracking import sweep_variant

log = logging.getLogger(__name__)
STATE_FILE = "viseg_sweep.json"


@dataclass
class SweepPlan:
    experiment: str
    storage_path: str
    variants: dict[str, str]  # name -> fully composed config (YAML)
    overrides: dict[str, list[str]]  # name -> the overrides that define it (for tables)
    folds: list[int]
    search: list[SearchAxis]
    settings: SweepConfig  # the sweep's own typed settings, saved and loaded through OmegaConf
    fixed: list[str] = field(default_factory=list)  # overrides every variant shares (best_config.yaml repeats them)
    # cascade variant -> the 3d_lowres variant whose runs (fold by fold) it trains on (sweep/stages.py)
    previous_stages: dict[str, str] = field(default_factory=dict)

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage_path) / self.experiment

    def trials(self) -> list[tuple[str, int]]:
        return [(v, f) for v in self.variants for f in self.folds]


def compose_variant(config_name: str, overrides: list[str]) -> BaseConfig:
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir())):
        try:
            composed = compose(config_name, overrides=with_key_aliases(overrides))
        except Exception as exc:  # Hydra's composition errors: unknown keys, options, types
            raise ConfigError(f"overrides {overrides} do not compose: {str(exc).splitlines()[0]}",
                              fix="check the key names and group options (python -m viseg.train --help)") from None
    cfg = to_typed(composed)
    reject_derived_overrides(cfg)
    return absolute_paths(cfg)


def absolute_paths(cfg: BaseConfig) -> BaseConfig:
    """Trials run in their own working folders (and on other nodes): every path they get must be absolute,
    or each trial would find its own cache and redo the preprocessing."""

    from viseg.preprocessing.prepare import dataset_root
    cfg.paths.cache = str(Path(cfg.paths.cache).expanduser().resolve())
    if cfg.init_from:  # checked here, before Ray starts; kept as named (a zip's unpacked copy is this node's own)
        source_checkpoint(cfg.init_from)
        cfg.init_from = str(Path(cfg.init_from).expanduser().resolve())
    if cfg.plan.from_model:
        cfg.plan.from_model = str(Path(cfg.plan.from_model).expanduser().resolve())
    cfg.dataset.basepath = str(dataset_root(cfg, progress=False).resolve())
    return cfg


def _experiment_name(request: SweepRequest, dataset: str, folds: list[int]) -> str:
    key = json.dumps([request.settings.config_name, request.fixed, [asdict(a) for a in request.axes],
                      [asdict(s) for s in request.search], folds], sort_keys=True)
    axes = "-".join(a.key.split(".")[-1] for a in request.axes) or "default"
    return f"{dataset}-{request.settings.config_name}-{axes}-{hashlib.sha256(key.encode()).hexdigest()[:6]}"


def plan_sweep(request: SweepRequest) -> SweepPlan:
    from omegaconf import OmegaConf

    from viseg.preprocessing.prepare import discover

    settings = request.settings
    variants, overrides = {}, {}
    for name, variant_overrides in request.variants().items():
        cfg = compose_variant(settings.config_name, [*request.fixed, *variant_overrides])
        variants[name] = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        overrides[name] = variant_overrides
    variants, overrides, previous_stages = _with_previous_stages(request, variants, overrides)
    _check_workers(request, variants)
    first = compose_variant(settings.config_name, request.fixed)
    folds = parse_folds(settings.search.folds if request.search else settings.folds, first.splits.n_folds)

    discovery = discover(first)
    dataset = discovery.info.name if discovery.info else "dataset"
    experiment = settings.experiment or _experiment_name(request, dataset, folds)
    # tracking=mlflow|wandb: one tracking experiment per sweep, one absolute store for every trial
    variants = {name: sweep_variant(text, experiment) for name, text in variants.items()}
    return SweepPlan(experiment=experiment,
                     storage_path=str(Path(settings.storage_path).expanduser().resolve()),  # URIs refused in spec
                     variants=variants, overrides=overrides, folds=folds, search=request.search,
                     settings=settings, fixed=list(request.fixed), previous_stages=previous_stages)


def _check_workers(request: SweepRequest, variants: dict[str, str]) -> None:
    """Multi-worker trials are grid trials: a search trial already runs its folds as Ray tasks of its own."""
    if request.search and any(trial_workers(t, request.settings.resources.workers) > 1 for t in variants.values()):
        raise ConfigError("a search trains each fold in one process; resources.workers (or devices=N) asks for "
                          "several Ray Train workers per trial, which only a grid sweep runs",
                          fix="drop resources.workers / devices= for the search, then cross_validate= the best "
                              "configuration with them")


def _free_name(name: str, taken: set[str]) -> str:
    return name if name not in taken else f"{name}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def _with_previous_stages(request: SweepRequest, variants: dict[str, str], overrides: dict[str, list[str]]
                          ) -> tuple[dict[str, str], dict[str, list[str]], dict[str, str]]:
    """Every cascade variant's 3d_lowres variant: an existing variant when one composes to exactly it, else a
    new one. Lowres variants come first, so that Tune starts their trials before the cascade's."""
    from omegaconf import OmegaConf

    cascades = [name for name, text in variants.items() if OmegaConf.create(text).get("configuration") == CASCADE]
    if not cascades:
        return variants, overrides, {}
    if request.search:
        raise ConfigError(f"configuration={CASCADE} in a search: each sampled configuration would need its own "
                          "3d_lowres runs first", fix="sweep the cascade as a grid (configuration=3d_fullres,"
                          f"{CASCADE} or fixed), then search the settings of one stage at a time")
    by_text = {text: name for name, text in variants.items()}
    stage_variants: dict[str, str] = {}
    stage_overrides: dict[str, list[str]] = {}
    previous: dict[str, str] = {}
    for name in cascades:
        lowres_overrides = previous_stage_overrides(overrides[name])
        cfg = compose_variant(request.settings.config_name, previous_stage_overrides([*request.fixed,
                                                                                      *overrides[name]]))
        text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        stage = by_text.get(text) or _free_name(variant_name(tuple(tuple(o.split("=", 1)) for o in lowres_overrides)),
                                                {*variants, *stage_variants})
        by_text.setdefault(text, stage)
        if stage not in variants:
            stage_variants[stage], stage_overrides[stage] = text, lowres_overrides
        previous[name] = stage
    lowres = [n for n in variants if n in previous.values()]
    order = [*lowres, *(n for n in variants if n not in lowres)]
    return ({**stage_variants, **{n: variants[n] for n in order}},
            {**stage_overrides, **{n: overrides[n] for n in order}}, previous)


def prepare_all(plan: SweepPlan) -> None:
    """Verify, fingerprint, plan and preprocess once per distinct plan, before any trial starts."""

    from viseg.preprocessing.prepare import prepare
    from viseg.preprocessing.preprocess import preprocess_dataset
    done: set[Path] = set()
    for name, variant_yaml in plan.variants.items():
        prepared = prepare(trial_config(variant_yaml, plan.folds[0], {}, name, "unused"))
        if prepared.plans_dir not in done:
            preprocess_dataset(prepared)
            done.add(prepared.plans_dir)
    log.info("%d distinct plan(s) prepared for %d variant(s)", len(done), len(plan.variants))


def save_state(plan: SweepPlan) -> None:
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(OmegaConf.structured(plan.settings))
    write_json_atomic(plan.experiment_dir / STATE_FILE, asdict(plan) | {
        "search": [asdict(s) for s in plan.search], "settings": settings})


def load_state(experiment_dir: Path) -> SweepPlan:
    path = Path(experiment_dir) / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"{experiment_dir} is not a viseg sweep experiment (no {STATE_FILE})",
                          fix="pass the experiment folder printed when the sweep started")
    data = read_json(path)
    data["search"] = [SearchAxis(**{**s, "choices": tuple(s["choices"])}) for s in data["search"]]
    data["settings"] = _typed_settings(data["settings"], path)
    # the folder given is the experiment, wherever it was first written: a moved or copied experiment
    # continues in place (as Ray's own restore does), never in the folder it was copied from
    folder = Path(experiment_dir).resolve()
    data["storage_path"], data["experiment"] = str(folder.parent), folder.name
    return SweepPlan(**data)


def _typed_settings(saved: dict[str, Any], path: Path) -> SweepConfig:
    """The saved settings through SweepConfig's schema: types checked, keys this viseg no longer knows named."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return to_typed(OmegaConf.merge(OmegaConf.structured(SweepConfig), saved))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"the sweep settings in {path} do not fit this viseg: "
                          f"{f'{key}: ' if key else ''}{str(exc).splitlines()[0]}",
                          fix="run the sweep again under a new experiment=, or with the viseg that started "
                              "it") from None


def max_epochs_by_variant(plan: SweepPlan) -> dict[str, int]:
    """Each variant's epoch budget, from its composed config: the console's `epoch / max` column."""
    from omegaconf import OmegaConf

    return {name: int(OmegaConf.create(text).trainer.max_epochs) for name, text in plan.variants.items()}


def render_trials(plan: SweepPlan) -> str:
    if plan.search:
        return _render_search(plan)
    lines = [f"experiment  {plan.experiment_dir}", f"trials      {len(plan.trials())} "
             f"({len(plan.variants)} variant(s) x folds {plan.folds})", ""]
    width = max(len(v) for v in plan.variants) + 2
    feeds = {stage: sorted(c for c, s in plan.previous_stages.items() if s == stage)
             for stage in plan.previous_stages.values()}
    lines += [f"  {v:{width}} fold {f}   {' '.join(plan.overrides[v]) or '(no overrides)'}"
              + (f"   (the previous stage of {', '.join(feeds[v])})" if v in feeds else "")
              for v, f in plan.trials()]
    return "\n".join(lines)


def _render_search(plan: SweepPlan) -> str:
    search = plan.settings.search
    lines = [f"experiment  {plan.experiment_dir}",
             f"search      {plan.settings.num_samples} configuration(s), each one trial training folds {plan.folds} "
             f"at once (scored by their mean), scheduler {search.scheduler or 'none'}", ""]
    for variant, overrides in plan.overrides.items():
        lines.append(f"  variant {variant}   {' '.join(overrides) or '(no overrides)'}")
    for axis in plan.search:
        bounds = f"[{axis.low}, {axis.high}]" if axis.kind != "choice" else str(list(axis.choices))
        lines.append(f"  searched: {axis.key} ~ {axis.kind} {bounds}")
    return "\n".join(lines)
