"""`cross_validate=<search experiment>`: take the best searched configuration(s) to every fold.

A search trains every configuration on `search.folds` only. This step reads the finished search's trial
reports (JSON files only, no running Ray needed), ranks its configurations as the search summary does (final
fold-mean Dice, then the ones a scheduler stopped early), and plans a new grid sweep: one variant per chosen
configuration (the searched values become fixed overrides), times every fold.
The search experiment itself is never modified.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from viseg.errors import ConfigError
from viseg.sweep.driver import SweepPlan, load_state
from viseg.sweep.search_report import read_configurations
from viseg.sweep.spec import SweepConfig, SweepRequest, parse_folds
from viseg.sweep.trial_setup import with_params

log = logging.getLogger(__name__)


def _with_params(variant_yaml: str, params: dict[str, Any]) -> str:
    """The variant's composed config with the searched values fixed (validated like any config)."""
    from omegaconf import OmegaConf


    return OmegaConf.to_yaml(OmegaConf.structured(with_params(variant_yaml, params)))


def plan_cross_validation(request: SweepRequest, cli_keys: set[str]) -> SweepPlan:
    """The new sweep: settings from the search, except those given on this command line."""
    if request.fixed or request.axes or request.search:
        given = request.fixed + [a.key for a in request.axes] + [s.key for s in request.search]
        raise ConfigError(f"cross_validate= takes sweep settings only, not training overrides ({given})",
                          fix="the configurations come from the search; run a new sweep to change them")
    search_dir = Path(request.settings.cross_validate or "").expanduser().resolve()
    search = load_state(search_dir)
    if not search.search:
        raise ConfigError(f"{search_dir} is a grid sweep, not a search: it has every fold already",
                          fix="read its cross-validation table with summary=" + str(search_dir))
    # the search's own settings (metric, mode) stay: they describe how the candidates were ranked
    settable = {f.name for f in fields(SweepConfig)} - {"search", "dry_run", "cross_validate", "resume", "summary"}
    given = {key: getattr(request.settings, key) for key in cli_keys & settable}
    settings = replace(search.settings, **given, dry_run=request.settings.dry_run, cross_validate=str(search_dir),
                       resume=None, summary=None)
    top_k = settings.top_k
    if top_k < 1:
        raise ConfigError(f"top_k={top_k} must be at least 1", fix="use top_k=1 for the single best configuration")
    ranked = [c for c in read_configurations(search_dir, search, ended=True) if c.status != "failed"
              and (c.mean if c.status == "finished" else c.score) is not None]
    if not ranked:
        raise ConfigError(f"no configuration of {search_dir} has a score yet",
                          fix=f"let the search finish (resume={search_dir}) before cross-validating it")
    chosen = ranked[:top_k]
    for rank, candidate in enumerate(chosen, start=1):
        score = candidate.mean if candidate.status == "finished" else candidate.score
        log.info("rank %d: %s %s (score %.4f, %s)", rank, candidate.variant, candidate.params, score,
                 candidate.status)
    variants = {c.name: _with_params(search.variants[c.variant], c.params) for c in chosen}
    overrides = {c.name: [*search.overrides[c.variant], *(f"{k}={v}" for k, v in sorted(c.params.items()))]
                 for c in chosen}
    n_folds = _n_folds(next(iter(variants.values())))
    folds = parse_folds(settings.folds, n_folds)
    experiment = given.get("experiment") or f"{search.experiment}-cv-top{top_k}"
    storage = _absolute(given["storage_path"]) if "storage_path" in given else search.storage_path
    return replace(search, experiment=experiment, storage_path=storage, variants=variants,
                   overrides=overrides, folds=folds, search=[], settings=settings)


def _n_folds(variant_yaml: str) -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.create(variant_yaml).splits.n_folds)


def _absolute(storage_path: str) -> str:
    return str(Path(storage_path).expanduser().resolve())  # URIs never get here: spec refuses them
