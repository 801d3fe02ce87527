"""Hyperparameter importance of a finished search, with Optuna's PED-ANOVA on a rebuilt study."""

from __future__ import annotations

import math
import random
from pathlib import Path

from viseg.sweep.importance import (
    IMPORTANCE_MIN_TRIALS,
    hyperparameter_importance,
    plot_importance,
    render_importance,
)
from viseg.sweep.spec import SearchAxis

AXES = [SearchAxis("optimizer.lr", "loguniform", 1e-4, 1e-1), SearchAxis("loss.dice_weight", "uniform", 0.0, 1.0)]


def search(n: int, sign: float = 1.0, seed: int = 0) -> list[tuple[dict, float]]:
    """The score peaks at lr = 1e-2 and does not depend on the loss weight at all."""
    rng = random.Random(seed)
    scores = []
    for _ in range(n):
        params = {"optimizer.lr": 10 ** rng.uniform(-4, -1), "loss.dice_weight": rng.uniform(0, 1)}
        value = -(math.log10(params["optimizer.lr"]) + 2) ** 2 + rng.gauss(0, 0.01)
        scores.append((params, sign * value))
    return scores


def test_the_value_that_drives_the_score_ranks_first_whichever_the_direction():
    for mode, sign in (("max", 1.0), ("min", -1.0)):
        importance = hyperparameter_importance(search(16, sign), AXES, mode)
        assert next(iter(importance)) == "optimizer.lr", importance
        assert importance["optimizer.lr"] > 2 * importance["loss.dice_weight"]
        assert math.isclose(sum(importance.values()), 1.0, rel_tol=1e-6)


def test_choices_and_variants_take_part():
    rng = random.Random(2)
    axes = [SearchAxis("lr_scheduler.type", "choice", choices=("PolyLR", "StepLR")), AXES[1]]
    scores = []
    for _ in range(30):
        params = {"lr_scheduler.type": rng.choice(["PolyLR", "StepLR"]), "loss.dice_weight": rng.uniform(0, 1),
                  "variant": rng.choice(["a", "b"])}
        scores.append((params, (1.0 if params["lr_scheduler.type"] == "PolyLR" else 0.0) + rng.gauss(0, 0.01)))
    importance = hyperparameter_importance(scores, axes, "max", variants=["a", "b"])
    assert set(importance) == {"lr_scheduler.type", "loss.dice_weight", "variant"}
    assert next(iter(importance)) == "lr_scheduler.type"


def test_too_few_configurations_give_no_table_and_say_so():
    assert hyperparameter_importance(search(IMPORTANCE_MIN_TRIALS - 1), AXES, "max") == {}
    assert f"at least {IMPORTANCE_MIN_TRIALS}" in render_importance({}, "PED-ANOVA")
    assert hyperparameter_importance(search(IMPORTANCE_MIN_TRIALS), AXES, "max")


def test_table_and_plot(tmp_path: Path):
    importance = hyperparameter_importance(search(16), AXES, "max")
    text = render_importance(importance, "PED-ANOVA")
    assert "optimizer.lr" in text.splitlines()[1] and "#" in text
    plot_importance(importance, tmp_path / "importance.png", "search")
    assert (tmp_path / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
