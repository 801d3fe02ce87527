"""A search's scheduler and space from the typed settings: what each scheduler gets, what PBT refuses, and
that a search never samples the fold."""

from __future__ import annotations

from pathlib import Path

import pytest

from viseg.errors import ConfigError
from viseg.sweep.driver import SweepPlan
from viseg.sweep.parse import parse_request
from viseg.sweep.schedulers import budget, search_algorithm, search_scheduler
from viseg.sweep.spec import SearchAxis
from viseg.sweep.tune import param_space, trainable

NO_SPECS = Path("/nonexistent-sweeps")
LR = SearchAxis("optimizer.lr", "loguniform", 1e-4, 1e-2)


def plan(*args: str, search: list[SearchAxis] | None = None) -> SweepPlan:
    settings = parse_request(list(args), sweeps_dir=NO_SPECS).settings
    return SweepPlan(experiment="exp", storage_path="/tmp", variants={"a": "trainer:\n  max_epochs: 7\n",
                                                                       "b": "trainer:\n  max_epochs: 9\n"},
                     overrides={"a": [], "b": []}, folds=[0, 1, 2], search=search or [LR], settings=settings)


def test_the_search_samples_the_configuration_never_the_fold():
    space = param_space(plan())
    assert set(space) == {"variant", "params"} and set(space["params"]) == {"optimizer.lr"}
    # one bundle per search fold behind an empty head bundle: resources.* per fold
    resources = trainable(plan("resources.cpu=2", "resources.gpu=1")).__dict__.get("_resources")
    assert resources is not None and resources.bundles == [{"CPU": 2.0, "GPU": 1.0}] * 3
    assert resources.head_bundle_is_empty


def test_search_folds_default_to_three():
    assert parse_request([], sweeps_dir=NO_SPECS).settings.search.folds == [0, 1, 2]


@pytest.mark.parametrize(("scheduler", "kind"), [
    ("asha", "AsyncHyperBandScheduler"), ("hyperband", "HyperBandScheduler"), ("median", "MedianStoppingRule"),
    ("pbt", "PopulationBasedTraining")])
def test_each_scheduler_reads_its_typed_settings_in_epochs(scheduler: str, kind: str):
    built = search_scheduler(plan(f"search.scheduler={scheduler}", "search.grace_period=2",
                                  "search.reduction_factor=4", "search.perturbation_interval=5"))
    assert type(built).__name__ == kind and built._time_attr == "epochs"
    if scheduler == "asha":  # max_t one past the longest variant's 9 epochs; the first rung at grace_period
        assert built._max_t == budget(plan()) == 10 and built._reduction_factor == 4
        assert built._brackets[0]._rungs[-1][0] == 2
    if scheduler == "hyperband":
        assert built._max_t_attr == 10 and built._eta == 4
    if scheduler == "pbt":
        assert built._perturbation_interval == 5
        assert set(built._hyperparam_mutations["params"]) == {"optimizer.lr"}
        assert type(search_algorithm(plan("search.scheduler=pbt"))).__name__ == "BasicVariantGenerator"
    else:
        assert type(search_algorithm(plan(f"search.scheduler={scheduler}"))).__name__ == "OptunaSearch"


def test_pbt_refuses_what_a_checkpoint_cannot_continue_with_and_needs_a_float():
    schedule = SearchAxis("lr_scheduler.kwargs.gamma", "uniform", 0.1, 0.9)
    with pytest.raises(ConfigError, match=r"cannot perturb lr_scheduler\.kwargs\.gamma") as error:
        search_scheduler(plan("search.scheduler=pbt", search=[LR, schedule]))
    assert "optimizer.lr" in str(error.value)  # the fix says what PBT may perturb
    with pytest.raises(ConfigError, match="at least one searched float"):
        search_scheduler(plan("search.scheduler=pbt", search=[SearchAxis("loss.ce_weight", "choice",
                                                                         choices=(0.5, 1.0))]))


@pytest.mark.parametrize(("override", "message"), [
    ("search.grace_period=0", "at least 1 epoch"), ("search.reduction_factor=1", "must be above 1"),
    ("search.quantile_fraction=0.7", r"\(0, 0.5\]"), ("search.time_budget_s=-5", "must be positive")])
def test_scheduler_settings_are_checked(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        parse_request([override], sweeps_dir=NO_SPECS)
