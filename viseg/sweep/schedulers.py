"""What a search samples, its algorithm and its trial scheduler, built from the typed `search.*` settings.
Epochs are every scheduler's budget (`epochs`, reported by each search trial), so grace periods and intervals
read as epochs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from viseg.errors import ConfigError
from viseg.noise import verbosity
from viseg.sweep.search_trial import EPOCHS
from viseg.sweep.spec import PBT_FIXED_PREFIXES, SearchAxis

if TYPE_CHECKING:
    from viseg.sweep.driver import SweepPlan


def _distribution(axis: SearchAxis) -> Any:
    from ray import tune

    if axis.kind == "loguniform":
        return tune.loguniform(axis.low, axis.high)
    if axis.kind == "uniform":
        return tune.uniform(axis.low, axis.high)
    return tune.choice(list(axis.choices))


def searched_space(plan: SweepPlan) -> dict[str, Any]:
    """What a search samples: the searched values, and the variant when there are several. Never the fold:
    every configuration trains all search folds, so no searcher can learn to prefer an easy fold."""
    from ray import tune

    names = list(plan.variants)
    return {"variant": tune.choice(names) if len(names) > 1 else names[0],
            "params": {axis.key: _distribution(axis) for axis in plan.search}}


def budget(plan: SweepPlan) -> int:
    """ASHA's and HyperBand's max_t: one past the longest epoch budget of any variant. They stop a trial that
    reaches max_t, and a configuration reports its full-resolution validation Dice after its last epoch, at the
    same budget: max_t at the last epoch would stop every configuration before its final score."""
    from omegaconf import OmegaConf

    return 1 + max(int(OmegaConf.create(yaml).trainer.max_epochs) for yaml in plan.variants.values())


def pbt_mutations(plan: SweepPlan) -> dict[str, Any]:
    """PBT explores the searched floats only, and only those a run can continue with from a checkpoint."""
    fixed = [axis.key for axis in plan.search if axis.key.startswith(PBT_FIXED_PREFIXES)]
    if fixed:
        raise ConfigError(f"search.scheduler=pbt cannot perturb {', '.join(fixed)}: PBT continues a trial from "
                          "another trial's checkpoint, whose LR schedule, epoch budget and sampling it keeps",
                          fix="search these with search.scheduler=asha (or none), or fix them for the PBT search; "
                              "PBT may perturb optimizer.lr, optimizer.weight_decay, optimizer.momentum, loss.* "
                              "and augmentation.* values")
    floats = {axis.key for axis in plan.search if axis.kind != "choice"}
    if not floats:
        raise ConfigError("search.scheduler=pbt needs at least one searched float to perturb",
                          fix="search e.g. optimizer.lr='tag(log, interval(1e-4, 1e-1))'")
    space = searched_space(plan)["params"]
    return {"params": {key: space[key] for key in sorted(floats)}}


def search_scheduler(plan: SweepPlan) -> Any:
    search = plan.settings.search
    if search.scheduler is None:
        return None
    from ray.tune import schedulers

    if search.scheduler == "asha":
        return schedulers.ASHAScheduler(time_attr=EPOCHS, max_t=budget(plan), grace_period=search.grace_period,
                                        reduction_factor=search.reduction_factor)
    if search.scheduler == "hyperband":
        return schedulers.HyperBandScheduler(time_attr=EPOCHS, max_t=budget(plan),
                                             reduction_factor=search.reduction_factor)
    if search.scheduler == "median":
        return schedulers.MedianStoppingRule(time_attr=EPOCHS, grace_period=search.grace_period,
                                             min_samples_required=2)
    return schedulers.PopulationBasedTraining(
        time_attr=EPOCHS, perturbation_interval=search.perturbation_interval,
        hyperparam_mutations=pbt_mutations(plan), quantile_fraction=search.quantile_fraction,
        resample_probability=search.resample_probability)


def search_algorithm(plan: SweepPlan) -> Any:
    """Optuna's TPE, except under PBT, whose population starts from random draws (Ray refuses a searcher
    beside PBT: exploit and explore choose the later values)."""
    search = plan.settings.search
    if search.scheduler == "pbt":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=search.seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if verbosity() < 2:  # Optuna sets its own logger to INFO when imported: its study banner is noise.py's kind
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    return OptunaSearch(seed=search.seed)
