"""Hyperparameter importance of a finished search: Optuna's PED-ANOVA on a study rebuilt from the scores."""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path
from typing import Any

import pytest

from viseg.sweep.importance import (
    IMPORTANCE_EVALUATOR,
    IMPORTANCE_MIN_TRIALS,
    hyperparameter_importance,
    plot_importance,
    render_importance,
)
from viseg.sweep.spec import SearchAxis

LR = SearchAxis("optimizer.lr", "loguniform", 1e-4, 1e-1)
DICE_WEIGHT = SearchAxis("loss.dice_weight", "uniform", 0.0, 1.0)
SCHEDULER = SearchAxis("lr_scheduler.type", "choice", choices=("PolyLR", "StepLR", "CosineLR"))
AXES = [LR, DICE_WEIGHT]
Scores = list[tuple[dict[str, Any], float]]


def search(n: int, sign: float = 1.0, seed: int = 0) -> Scores:
    """The score peaks at lr = 1e-2 and does not depend on the loss weight at all."""
    rng = random.Random(seed)
    scores = []
    for _ in range(n):
        params = {LR.key: 10 ** rng.uniform(-4, -1), DICE_WEIGHT.key: rng.uniform(0, 1)}
        value = -(math.log10(params[LR.key]) + 2) ** 2 + rng.gauss(0, 0.01)
        scores.append((params, sign * value))
    return scores


def test_the_value_that_drives_the_score_ranks_first_with_most_of_the_importance():
    """Over several searches, not one: on 16 configurations a single search may still hand the loss weight a
    third (seed 0 does), which is what PED-ANOVA makes of that search, not a fault."""
    results = [hyperparameter_importance(search(16, seed=seed), AXES, "max") for seed in range(8)]
    for importance in results:
        assert list(importance) == [LR.key, DICE_WEIGHT.key], importance
        assert math.isclose(sum(importance.values()), 1.0, rel_tol=1e-9)
        assert all(value >= 0 for value in importance.values())
    assert sum(importance[LR.key] for importance in results) / len(results) > 0.8, results


def test_minimising_the_negated_score_gives_the_same_importance():
    maximised = hyperparameter_importance(search(16), AXES, "max")
    minimised = hyperparameter_importance(search(16, sign=-1.0), AXES, "min")
    assert list(minimised) == list(maximised) == [LR.key, DICE_WEIGHT.key]
    assert minimised == pytest.approx(maximised)


def test_the_direction_matters():
    """Minimising a score that should be maximised picks the worst configurations as the better ones: the lr of
    those is spread over both ends of the range instead of gathered at 1e-2, so the ranking changes."""
    assert hyperparameter_importance(search(16), AXES, "max") != pytest.approx(
        hyperparameter_importance(search(16), AXES, "min"))


def choice_search(n: int, seed: int, key: str = SCHEDULER.key, choices: tuple = SCHEDULER.choices) -> Scores:
    """The score is 1 for the first choice and 0 for the others; the loss weight does not matter."""
    rng = random.Random(seed)
    scores = []
    for _ in range(n):
        params = {key: rng.choice(choices), DICE_WEIGHT.key: rng.uniform(0, 1), LR.key: 10 ** rng.uniform(-4, -1)}
        scores.append((params, float(params[key] == choices[0]) + rng.gauss(0, 0.01)))
    return scores


def test_a_choice_that_drives_the_score_ranks_first():
    """24 configurations: beside a float that does not matter, PED-ANOVA needs more of them to see a choice
    (see the module's docstring)."""
    results = [hyperparameter_importance(choice_search(24, seed), [SCHEDULER, DICE_WEIGHT], "max")
               for seed in range(8)]
    assert sum(next(iter(importance)) == SCHEDULER.key for importance in results) >= 7, results
    assert sum(importance[SCHEDULER.key] for importance in results) / len(results) > 0.7, results


def test_the_variant_is_a_parameter_when_the_search_picks_among_several():
    variants = ["3d_fullres", "2d"]
    scores = choice_search(24, seed=0, key="variant", choices=tuple(variants))
    importance = hyperparameter_importance(scores, AXES, "max", variants=variants)
    assert set(importance) == {LR.key, DICE_WEIGHT.key, "variant"}
    assert next(iter(importance)) == "variant", importance
    # one variant: nothing chosen, nothing to rank, even should its name be in the params
    assert set(hyperparameter_importance(scores, AXES, "max", variants=variants[:1])) == {LR.key, DICE_WEIGHT.key}
    assert set(hyperparameter_importance(scores, AXES, "max")) == {LR.key, DICE_WEIGHT.key}


def test_too_few_configurations_give_no_table_and_say_so():
    assert IMPORTANCE_MIN_TRIALS >= 3  # two: the better group would be both, and every share equal
    assert hyperparameter_importance(search(IMPORTANCE_MIN_TRIALS - 1), AXES, "max") == {}
    assert set(hyperparameter_importance(search(IMPORTANCE_MIN_TRIALS), AXES, "max")) == {LR.key, DICE_WEIGHT.key}
    message = render_importance({}, IMPORTANCE_EVALUATOR)
    assert f"at least {IMPORTANCE_MIN_TRIALS}" in message and "\n" not in message


def test_nothing_searched_gives_nothing():
    scores = [({}, float(i)) for i in range(10)]
    assert hyperparameter_importance(scores, [], "max") == {}
    assert hyperparameter_importance(scores, [], "max", variants=["only"]) == {}
    assert hyperparameter_importance([({"variant": v}, float(i)) for i, v in enumerate("abab")], [], "max",
                                     variants=["a", "b"])


def test_configurations_that_cannot_enter_the_study_are_left_out_not_fatal():
    good = search(IMPORTANCE_MIN_TRIALS)
    bad: Scores = [({LR.key: 1e-3}, 0.5),  # a value missing
                   ({LR.key: 1e-3, DICE_WEIGHT.key: 0.5}, math.nan),
                   ({LR.key: 1e-3, DICE_WEIGHT.key: 0.5}, math.inf),
                   ({LR.key: -1.0, DICE_WEIGHT.key: 0.5}, 0.5),  # not on a log scale
                   ({LR.key: "1e-3", DICE_WEIGHT.key: 0.5}, 0.5)]
    assert hyperparameter_importance(bad + good[:-1], AXES, "max") == {}
    assert hyperparameter_importance(bad + good, AXES, "max") == hyperparameter_importance(good, AXES, "max")
    off_choice = [({SCHEDULER.key: "ExponentialLR"}, 1.0)] * 5
    assert hyperparameter_importance(off_choice, [SCHEDULER], "max") == {}


def test_a_value_perturbed_past_the_searched_range_still_counts():
    scores = search(8)
    scores[0][0][LR.key] = 0.3  # PBT's explore: 1.2 x a value near the upper end, and beyond
    importance = hyperparameter_importance(scores, AXES, "max")
    assert set(importance) == {LR.key, DICE_WEIGHT.key}


def test_choices_that_optuna_would_not_take_as_they_are():
    """Optuna takes only None, bool, int, float and str as choices; Hydra's choice() may hold lists, and Ray's
    state gives tuples back as lists."""
    scale = SearchAxis("augmentation.scale", "choice", choices=((0.9, 1.1), (0.7, 1.4), None))
    scores = choice_search(24, 0, scale.key, scale.choices)
    for params, _ in scores:
        params[scale.key] = params[scale.key] and list(params[scale.key])
    importance = hyperparameter_importance(scores, [scale, DICE_WEIGHT], "max")
    assert next(iter(importance)) == scale.key, importance


def test_equal_scores_share_equally_in_the_axes_order_every_time():
    tied = [(params, 1.0) for params, _ in search(6)]
    importance = hyperparameter_importance(tied, AXES, "max")
    assert list(importance) == [LR.key, DICE_WEIGHT.key]
    assert importance == pytest.approx({LR.key: 0.5, DICE_WEIGHT.key: 0.5})
    reversed_axes = hyperparameter_importance(tied, AXES[::-1], "max")
    assert list(reversed_axes) == [DICE_WEIGHT.key, LR.key]


def test_optunas_notices_are_silenced_for_the_call_only(recwarn: pytest.WarningsRecorder,
                                                        capfd: pytest.CaptureFixture[str]):
    import optuna

    before_verbosity, before_filters = optuna.logging.get_verbosity(), list(warnings.filters)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        hyperparameter_importance([(params, 1.0) for params, _ in search(4)], AXES, "max")  # tied: optuna warns
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(before_verbosity)
    assert warnings.filters == before_filters
    assert not [str(w.message) for w in recwarn], [str(w.message) for w in recwarn]
    assert "study created" not in capfd.readouterr().err


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        hyperparameter_importance(search(8), AXES, "maximize")


def test_the_table_names_the_evaluator_and_draws_proportional_bars():
    importance = hyperparameter_importance(search(16), AXES, "max")
    lines = render_importance(importance, IMPORTANCE_EVALUATOR).splitlines()
    assert IMPORTANCE_EVALUATOR in lines[0]
    rows = lines[2:]
    assert [row.split()[0] for row in rows] == [LR.key, DICE_WEIGHT.key]
    assert [float(row.split()[1]) for row in rows] == pytest.approx(list(importance.values()), abs=5e-4)
    assert rows[0].count("#") > rows[1].count("#") and rows[0].count("#") == round(40 * importance[LR.key])
    # fixed width: the numbers line up under their heading
    column = lines[1].index("importance") + len("importance")
    assert {row.index(".", len(row.split()[0]) + 2) + 4 for row in rows} == {column}


def test_the_plot_is_a_png_written_atomically(tmp_path: Path):
    importance = hyperparameter_importance(search(16), AXES, "max")
    target = tmp_path / "importance.png"
    plot_importance(importance, target, "search: hyperparameter importance")
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["importance.png"]  # no temporary file left behind
