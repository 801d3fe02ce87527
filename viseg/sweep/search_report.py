"""What a search found, from its files alone (trial reports as JSON, errors.json, no Ray): every configuration
with its sampled values, its per-fold and mean full-resolution Dice and its status; the winner as a reusable
sweep spec (`best_config.yaml`); and which searched values mattered (`importance.png`).

    <experiment>/search.json        every configuration, best first, and the importance table
    <experiment>/best_config.yaml   python -m viseg.sweep sweep=<it> folds=all  trains the winner on every fold
    <experiment>/importance.png     (once enough configurations have finished)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from viseg.io.atomic import write_text_atomically
from viseg.io.jsonio import write_json_atomic
from viseg.sweep.driver import SweepPlan
from viseg.sweep.importance import (
    IMPORTANCE_EVALUATOR,
    hyperparameter_importance,
    plot_importance,
    render_importance,
)
from viseg.sweep.search_trial import FINAL_METRIC, SCORE
from viseg.sweep.summary import read_errors
from viseg.sweep.trial_results import read_trials

BEST_CONFIG = "best_config.yaml"
SEARCH_REPORT = "search.json"
IMPORTANCE_PLOT = "importance.png"
STATUSES = ("finished", "stopped early", "running", "failed")


@dataclass
class Configuration:
    trial_id: str
    variant: str
    params: dict[str, Any]
    status: str  # one of STATUSES
    epochs: int
    fold_dice: dict[int, float | None] = field(default_factory=dict)  # final full-resolution Dice per fold
    mean: float | None = None  # over the folds: the configuration's final score
    std: float | None = None
    score: float | None = None  # the last score the searcher saw (a stopped trial's intermediate one)
    error: str | None = None

    @property
    def name(self) -> str:
        """The run name of its folds (runs/.../<variant>-<trial id>/fold_<k>)."""
        return f"{self.variant}-{self.trial_id}"


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    return float(value) if ok else None


def read_configurations(experiment: Path, plan: SweepPlan, ended: bool) -> list[Configuration]:
    """Every configuration the search tried, best first: finished ones by their final mean Dice, then the
    ones a scheduler stopped (by the last score they reached), then failed ones. `ended`: the search is over,
    so a configuration neither finished nor failed was stopped early (by the scheduler or the time budget)."""
    errors = {variant: message for variant, _, message in read_errors(experiment)}
    configurations = []
    for trial in read_trials(experiment):
        config, last = trial.config, trial.last
        if "variant" not in config:
            continue
        configuration = Configuration(trial_id=trial.trial_id, variant=str(config["variant"]),
                                      params=dict(config.get("params") or {}), status="running",
                                      epochs=int(last.get("epochs") or 0), score=_number(last.get(SCORE)))
        if FINAL_METRIC in last:
            configuration.status = "finished"
            configuration.fold_dice = {fold: _number(last.get(f"final/fold_{fold}/mean_dice"))
                                       for fold in plan.folds}
            configuration.mean, configuration.std = _number(last[FINAL_METRIC]), _number(last.get("final/std_dice"))
        elif configuration.name in errors:
            configuration.status, configuration.error = "failed", errors[configuration.name]
        elif ended:
            configuration.status = "stopped early"
        configurations.append(configuration)
    sign = -1.0 if plan.settings.search.mode == "max" else 1.0

    def rank(c: Configuration) -> tuple[Any, ...]:
        value = c.mean if c.status == "finished" else c.score
        return (STATUSES.index(c.status), value is None, sign * (value or 0.0), c.trial_id)

    return sorted(configurations, key=rank)


def best_config_yaml(plan: SweepPlan, best: Configuration) -> str:
    """A sweep spec of the winner: the search's shared overrides, its variant's and its searched values."""
    from omegaconf import OmegaConf

    overrides = [*plan.fixed, *plan.overrides.get(best.variant, []),
                 *(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
                   for key, value in sorted(best.params.items()))]
    spec = {"config_name": plan.settings.config_name, "folds": "all", "overrides": overrides,
            "resources": asdict(plan.settings.resources), "max_failures": plan.settings.max_failures,
            "checkpoints_to_keep": plan.settings.checkpoints_to_keep}
    dice = "-" if best.mean is None else f"{best.mean:.4f} ± {best.std or 0.0:.4f}"
    header = (f"# The best configuration of the search {plan.experiment_dir}\n"
              f"# trial {best.trial_id} ({best.variant}), mean Dice {dice} over folds {plan.folds}.\n"
              f"# Train it on every fold: python -m viseg.sweep sweep={plan.experiment_dir / BEST_CONFIG}\n")
    return header + OmegaConf.to_yaml(OmegaConf.create(spec))


def importance_of(configurations: list[Configuration], plan: SweepPlan) -> dict[str, float]:
    finished = [(dict(c.params, **({"variant": c.variant} if len(plan.variants) > 1 else {})), c.mean)
                for c in configurations if c.status == "finished" and c.mean is not None]
    return hyperparameter_importance(finished, list(plan.search), plan.settings.search.mode,  # type: ignore[arg-type]
                                     variants=list(plan.variants))


def render_configurations(configurations: list[Configuration], plan: SweepPlan) -> str:
    if not configurations:
        return "no configuration has reported yet"
    keys = sorted({key for c in configurations for key in c.params})
    header = ["  trial", *keys, *[f"fold {f}" for f in plan.folds], "mean ± std", "epochs", "status"]

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    rows = []
    for i, c in enumerate(configurations):
        mark = "*" if i == 0 and c.status == "finished" else " "
        dice = "-" if c.mean is None else f"{c.mean:.4f} ± {c.std or 0.0:.4f}"
        rows.append([f"{mark} {c.name}", *[cell(c.params.get(k)) for k in keys],
                     *[cell(c.fold_dice.get(f)) for f in plan.folds], dice, str(c.epochs), c.status])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("* best configuration: full-resolution validation Dice of each search fold, mean ± std "
                 "(ddof=0) over them")
    return "\n".join(lines)


def write_search_report(experiment: Path, plan: SweepPlan, ended: bool) -> tuple[str, dict[str, Path]]:
    """The table (and importance) as text for the console, and the files written."""
    configurations = read_configurations(experiment, plan, ended)
    importance = importance_of(configurations, plan)
    paths = {"search": experiment / SEARCH_REPORT}
    write_json_atomic(paths["search"], {
        "metric": plan.settings.search.metric, "mode": plan.settings.search.mode, "folds": plan.folds,
        "configurations": [asdict(c) | {"name": c.name, "fold_dice": {str(k): v for k, v in c.fold_dice.items()}}
                           for c in configurations],
        "importance": {"evaluator": IMPORTANCE_EVALUATOR, "values": importance}})
    text = [render_configurations(configurations, plan)]
    best = next((c for c in configurations if c.status == "finished"), None)
    if best is not None:
        paths["best_config"] = experiment / BEST_CONFIG
        write_text_atomically(paths["best_config"], best_config_yaml(plan, best))
    if importance:
        paths["importance"] = experiment / IMPORTANCE_PLOT
        plot_importance(importance, paths["importance"], f"{experiment.name}: hyperparameter importance")
    text += ["", render_importance(importance, IMPORTANCE_EVALUATOR)]
    return "\n".join(text), paths


def next_command(paths: dict[str, Path]) -> str | None:
    if "best_config" not in paths:
        return None
    return f"python -m viseg.sweep sweep={paths['best_config']}   (the winner on every fold)"
