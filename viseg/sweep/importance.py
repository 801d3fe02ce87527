"""Which searched values mattered: Optuna's PED-ANOVA over a search's finished configurations.

Ray's OptunaSearch keeps its study inside pickled Ray state, which viseg never unpickles, so the study is
rebuilt in memory from the configurations' sampled values and final scores.

Why PED-ANOVA: it is the only evaluator in `optuna.importance` that runs without scikit-learn (fANOVA and
mean-decrease-impurity both fit sklearn's random forest and refuse to start without it), and it fits no model,
only one-dimensional Parzen estimators of where the better configurations sit against all of them. It is
deterministic, so it takes no seed and needs none.

How much to trust it, measured on synthetic searches (PED-ANOVA with the settings below): when the score
depends on a log-uniform learning rate alone, next to a uniform and a three-way choice that do not matter, the
learning rate ranked first in 55% of searches of 3 configurations (chance: 33%), 76% of 5, 93% of 8 and all of
16. A choice is harder to see beside a float that does not matter: a two-way choice that decides the score
ranked first in a third of 4-configuration searches (chance: a half), 65% of 8, 85% of 16 and 97% of 24.
A table from a handful of configurations describes that handful; it is no evidence for the next search.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

from viseg.io.atomic import write_atomically
from viseg.sweep.spec import SearchAxis

IMPORTANCE_EVALUATOR = "optuna PED-ANOVA"  # optuna.importance.PedAnovaImportanceEvaluator
# The fewest for which PED-ANOVA says anything. It compares the better configurations (the target group) with
# all of them, and the target group needs two: a single one gives a Parzen estimator without spread, and
# rankings from it were barely better than chance (measured as in the module's docstring: right in 53-62% of
# 3- to 10-configuration searches of two parameters, chance 50%). And one configuration at least must stay
# outside it: with two in all, the target group is everyone, and PED-ANOVA gives every parameter the same
# share. Three is that floor, not a promise of reliability (see the module's docstring).
IMPORTANCE_MIN_TRIALS = 3
VARIANT = "variant"
_TARGET_AT_LEAST = 2  # see IMPORTANCE_MIN_TRIALS
_BAR_WIDTH = 40  # characters of '#' for an importance of 1


def hyperparameter_importance(scores: list[tuple[dict[str, Any], float]], axes: list[SearchAxis], mode: str,
                              variants: list[str] | None = None) -> dict[str, float]:
    """{parameter: importance}, most important first (ties in the order of `axes`, the variant last), summing to 1.
    {} when there is too little to rank. A configuration whose score is not finite, or that lacks a value, or
    whose value lies outside its axis's choices, is left out rather than failing the whole report."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r}: use 'max' or 'min'")
    parameters = _parameters(axes, variants)
    rows = [row for params, value in scores if (row := _row(params, value, parameters)) is not None]
    if len(rows) < IMPORTANCE_MIN_TRIALS or not parameters:
        return {}
    raw = _evaluate(rows, parameters, mode)
    return {name: raw[name] for name in sorted(raw, key=lambda name: -raw[name])}  # stable: ties keep axes' order


def _parameters(axes: list[SearchAxis], variants: list[str] | None) -> list[SearchAxis]:
    """The searched axes, and the variant as one more choice when the searcher picks among several: a choice of
    configuration files is a hyperparameter like any other."""
    parameters = list(axes)
    if variants is not None and len(variants) > 1:
        parameters.append(SearchAxis(VARIANT, "choice", choices=tuple(variants)))
    return parameters


def _label(value: Any) -> str:
    """A choice as Optuna stores it: Optuna takes only None, bool, int, float and str as choices, and Hydra's
    choice() may hold lists; JSON also makes a tuple and the list it comes back as from Ray's state one label."""
    return json.dumps(value, sort_keys=True, default=str)


def _row(params: dict[str, Any], value: float, parameters: list[SearchAxis]) -> tuple[dict[str, Any], float] | None:
    """(the study's values, score) of one configuration, or None when it cannot enter the study."""
    if not _is_number(value) or not math.isfinite(value):
        return None
    row = {}
    for axis in parameters:
        if axis.key not in params:
            return None
        converted = _study_value(axis, params[axis.key])
        if converted is None:
            return None
        row[axis.key] = converted
    return row, float(value)


def _is_number(value: Any) -> bool:
    """numbers.Real: numpy's scalars count too (np.float32 is no float); a bool is no score."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _study_value(axis: SearchAxis, value: Any) -> Any:
    if axis.kind == "choice":
        label = _label(value)
        return label if label in {_label(choice) for choice in axis.choices} else None
    if not _is_number(value) or not math.isfinite(value) or (axis.kind == "loguniform" and value <= 0):
        return None
    return float(value)


def _distributions(rows: list[tuple[dict[str, Any], float]], parameters: list[SearchAxis]) -> dict[str, Any]:
    """Optuna's distributions of the axes. A float axis reaches out to the values trained: PBT's explore scales a
    value by 0.8 or 1.2 and may leave the searched range, and clipping would credit the score to a value no
    configuration trained with."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    distributions: dict[str, Any] = {}
    for axis in parameters:
        if axis.kind == "choice":
            distributions[axis.key] = CategoricalDistribution(list(dict.fromkeys(map(_label, axis.choices))))
        else:
            seen = [params[axis.key] for params, _ in rows]
            low, high = min(float(axis.low), *seen), max(float(axis.high), *seen)  # type: ignore[arg-type]
            distributions[axis.key] = FloatDistribution(low, high, log=axis.kind == "loguniform")
    return distributions


def _target_quantile(n: int) -> float:
    """The share of configurations PED-ANOVA treats as the better ones: the better half (two at least), so the
    table says which values set the better half of the search apart from the rest. Optuna's default, the top
    10%, is made for hundreds of trials: on a few dozen its target group holds a handful of configurations, whose
    Parzen estimator is so narrow that a float that does not matter looks important by chance. Measured (see the
    module's docstring), the better half ranked the value that decides the score first as often as the top
    quarter, the top third and Optuna's 10% raised to five configurations, or more often, in 22 of 24 cases (three
    kinds of search, 4 to 80 configurations); the top third did better in the other two. Its price: a value that
    matters only at the very top, say a narrow learning-rate optimum, ranks lower than with the top 10%.

    _QuantileFilter keeps ceil(quantile * n) configurations (and any tied with the last): k - 0.5 makes that
    exactly k without trusting the rounding of k / n * n."""
    k = max(_TARGET_AT_LEAST, n // 2)
    return (k - 0.5) / n


def _evaluate(rows: list[tuple[dict[str, Any], float]], parameters: list[SearchAxis], mode: str) -> dict[str, float]:
    """PED-ANOVA's normalised importances on a study rebuilt from `rows`. Optuna's notices are silenced for the
    call only: its INFO line for every study created, its ExperimentalWarning (PED-ANOVA was experimental in earlier
    Optuna versions) and its UserWarnings about small or tied studies, whose outcome (equal shares) the caller reads."""
    import warnings

    import optuna

    distributions = _distributions(rows, parameters)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
            for params, value in rows:
                study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
            evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=_target_quantile(len(rows)))
            raw = optuna.importance.get_param_importances(study, evaluator=evaluator, params=list(distributions),
                                                          normalize=True)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return {key: float(raw[key]) for key in distributions}


def render_importance(importance: dict[str, float], evaluator: str) -> str:
    """A table for the console and the log: numbers to read, bars to compare at a glance."""
    if not importance:
        return (f"hyperparameter importance: not computed, it needs at least {IMPORTANCE_MIN_TRIALS} finished "
                "configurations and one searched value")
    width = max(len("parameter"), *map(len, importance))
    lines = [f"hyperparameter importance, {evaluator} (the shares sum to 1):",
             f"  {'parameter':<{width}}  importance"]
    lines += [f"  {key:<{width}}  {value:10.3f}  {'#' * round(_BAR_WIDTH * value)}"
              for key, value in importance.items()]
    return "\n".join(lines)


def plot_importance(importance: dict[str, float], path: Path, title: str) -> None:
    """Horizontal bars, the most important on top. A bare Figure on the Agg canvas: pyplot's global figure list
    would keep every figure of a long-lived process (the sweep driver, a notebook kernel) alive."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(importance)[::-1]
    fig = Figure(figsize=(7, 1.4 + 0.45 * max(1, len(keys))), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.barh(keys, [importance[key] for key in keys], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", padding=3)
    if not keys:
        ax.text(0.5, 0.5, "nothing to rank", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel=f"importance, {IMPORTANCE_EVALUATOR} (the shares sum to 1)", xlim=(0, 1.12), title=title)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
    ax.grid(axis="x", alpha=0.3)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
