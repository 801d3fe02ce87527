"""Which searched values mattered: Optuna's PED-ANOVA over a search's finished configurations.

Ray's OptunaSearch keeps its study inside pickled Ray state, which viseg never unpickles, so the study is
rebuilt in memory from the configurations' sampled values and final scores. PED-ANOVA needs no model fit
(fANOVA would bring scikit-learn) and compares where the top configurations sit against all of them, which
still reads sensibly for the handful of configurations a CPU or a small GPU budget affords.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from viseg.io.atomic import write_atomically
from viseg.sweep.spec import SearchAxis

IMPORTANCE_EVALUATOR = "PED-ANOVA (optuna.importance)"
# PED-ANOVA compares the top configurations (at least two of them) with all: with fewer than three there is
# no "rest" to compare the top with
IMPORTANCE_MIN_TRIALS = 3


def _distributions(axes: list[SearchAxis], variants: list[str] | None) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    distributions: dict[str, Any] = {}
    for axis in axes:
        if axis.kind == "choice":
            distributions[axis.key] = CategoricalDistribution(list(axis.choices))
        else:
            distributions[axis.key] = FloatDistribution(float(axis.low), float(axis.high),  # type: ignore[arg-type]
                                                        log=axis.kind == "loguniform")
    if variants and len(variants) > 1:
        distributions["variant"] = CategoricalDistribution(list(variants))
    return distributions


def hyperparameter_importance(scores: list[tuple[dict[str, Any], float]], axes: list[SearchAxis], mode: str,
                              variants: list[str] | None = None) -> dict[str, float]:
    """{parameter: importance}, most important first, summing to 1; {} when there is too little to rank."""
    import warnings

    import optuna

    distributions = _distributions(axes, variants)
    usable = [(params, value) for params, value in scores
              if math.isfinite(value) and all(key in params for key in distributions)]
    if len(usable) < IMPORTANCE_MIN_TRIALS or not distributions:
        return {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PED-ANOVA is marked experimental; the warning says nothing here
            study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
            for params, value in usable:
                # PBT's explore may step a value past the searched bounds: clip into the distribution
                values = {key: _inside(params[key], distributions[key]) for key in distributions}
                study.add_trial(optuna.trial.create_trial(params=values, distributions=distributions, value=value))
            # the top "target" group must hold at least two configurations
            quantile = min(0.5, max(0.25, 2 / len(usable)))
            evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)
            raw = optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=True)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return {key: float(value) for key, value in sorted(raw.items(), key=lambda kv: -kv[1])}


def _inside(value: Any, distribution: Any) -> Any:
    low, high = getattr(distribution, "low", None), getattr(distribution, "high", None)
    if low is None or not isinstance(value, int | float):
        return value
    return min(max(float(value), low), high)


def render_importance(importance: dict[str, float], evaluator: str) -> str:
    if not importance:
        return (f"hyperparameter importance: needs at least {IMPORTANCE_MIN_TRIALS} finished configurations "
                "and one searched value")
    width = max(len(key) for key in importance)
    lines = [f"hyperparameter importance ({evaluator}, of the final fold-mean Dice):"]
    lines += [f"  {key:{width}}  {value:5.3f}  {'#' * round(40 * value)}" for key, value in importance.items()]
    return "\n".join(lines)


def plot_importance(importance: dict[str, float], path: Path, title: str) -> None:
    """Horizontal bars, most important on top. A bare Figure on the Agg canvas: no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(importance)[::-1]
    fig = Figure(figsize=(7, 1.2 + 0.45 * len(keys)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(keys, [importance[k] for k in keys], color="tab:blue")
    ax.set(xlabel="importance (PED-ANOVA, normalised)", xlim=(0, 1), title=title)
    ax.grid(axis="x", alpha=0.3)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
