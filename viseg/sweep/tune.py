"""The Ray Tune adapter: param space, Tuner, restore. The only sweep module that configures Ray."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from viseg.errors import ConfigError
from viseg.io.jsonio import write_json_atomic
from viseg.io.layout import EXPERIMENT_RUNS
from viseg.noise import quiet_tune_driver, verbosity
from viseg.sweep.code_pin import pin_code
from viseg.sweep.console import error_message, make_console
from viseg.sweep.driver import SweepPlan, max_epochs_by_variant
from viseg.sweep.ray_state import ASIDE, UNTRUSTED, SweepTrials, set_aside_damaged_state, set_aside_untrusted_state
from viseg.sweep.schedulers import search_algorithm, search_scheduler, searched_space
from viseg.sweep.search_trial import SCORE, run_search_trial
from viseg.sweep.state_seal import StateSealer, key_path
from viseg.sweep.train_workers import HEAD_CPU, trial_workers
from viseg.sweep.trial import run_trial

log = logging.getLogger(__name__)


def param_space(plan: SweepPlan) -> dict[str, Any]:
    """Grid sweeps: variants x folds as grid axes, one trial each. Searches: one trial per configuration."""
    from ray import tune

    if not plan.search:
        return {"variant": tune.grid_search(list(plan.variants)), "fold": tune.grid_search(plan.folds)}
    return searched_space(plan)


def is_pbt(plan: SweepPlan) -> bool:
    return bool(plan.search) and plan.settings.search.scheduler == "pbt"


def fold_resources(plan: SweepPlan) -> dict[str, float]:
    resources = plan.settings.resources
    return {"CPU": float(resources.cpu), "GPU": float(resources.gpu)}


def grid_trial_resources(plan: SweepPlan, config: dict[str, Any]) -> Any:
    """resources.cpu/gpu for a one-process trial. A trial on several Ray Train workers takes a sliver of a CPU
    for itself: Ray Train places its workers (resources.* each), on any nodes."""
    from ray import tune

    resources = plan.settings.resources
    text = plan.variants.get(config.get("variant"), "")
    if text and trial_workers(text, resources.workers) > 1:
        return tune.PlacementGroupFactory([{"CPU": HEAD_CPU}])
    return tune.PlacementGroupFactory([{"CPU": float(resources.cpu),
                                        **({"GPU": float(resources.gpu)} if resources.gpu else {})}])


def trainable(plan: SweepPlan) -> Any:
    """A grid trial trains one fold in the trial's own worker. A search trial reserves one bundle per search
    fold (resources.* each) behind an empty head bundle: its own process only waits and reports, while each
    fold trains in its bundle, so resources.gpu=1 with two folds reserves two GPUs for the configuration."""
    from ray import tune

    runs_dir = str(plan.experiment_dir / EXPERIMENT_RUNS)
    if not plan.search:
        resources = plan.settings.resources
        workers = {"workers": resources.workers, "cpu": resources.cpu, "gpu": resources.gpu,
                   "max_failures": plan.settings.max_failures}
        with_data = tune.with_parameters(run_trial, variants=plan.variants, runs_dir=runs_dir,
                                         previous_stages=plan.previous_stages, workers=workers)
        return tune.with_resources(with_data, lambda config: grid_trial_resources(plan, config))
    search = plan.settings.search
    with_data = tune.with_parameters(run_search_trial, variants=plan.variants, runs_dir=runs_dir,
                                     folds=list(plan.folds), metric=search.metric, mode=search.mode,
                                     fold_retries=plan.settings.max_failures, fold_resources=fold_resources(plan),
                                     checkpoint_every=search.perturbation_interval if is_pbt(plan) else 1)
    bundles = [{}, *([fold_resources(plan)] * len(plan.folds))]
    return tune.with_resources(with_data, tune.PlacementGroupFactory(bundles, strategy="PACK"))


def trial_name(trial: Any) -> str:
    """`<variant>_fold<k>_<trial id>` (grid) or `<variant>_<trial id>` (search: one trial covers its folds):
    readable in Tune's table and folder listing, unique by the id."""
    fold = trial.config.get("fold")
    return f"{trial.config.get('variant')}{'' if fold is None else f'_fold{fold}'}_{trial.trial_id}"


def _tune_config(plan: SweepPlan) -> Any:
    from ray import tune

    settings = plan.settings
    # reuse_actors: a grid trial's worker keeps torch and Lightning imported for the next trial (seconds each).
    # A search trial's folds train in tasks of their own, and a stopped or exploited trial must take them down
    # with its process, so search trials never reuse one.
    common = {"max_concurrent_trials": settings.max_concurrent_trials, "reuse_actors": not plan.search,
              "trial_name_creator": trial_name, "trial_dirname_creator": trial_name}
    if not plan.search:
        return tune.TuneConfig(**common)
    return tune.TuneConfig(metric=SCORE, mode=settings.search.mode, num_samples=settings.num_samples,
                           search_alg=search_algorithm(plan), scheduler=search_scheduler(plan),
                           time_budget_s=settings.search.time_budget_s, **common)


def build_tuner(plan: SweepPlan) -> Any:
    from ray import tune

    from viseg.sweep.seal_callback import SealStateCallback

    level = verbosity()
    quiet_tune_driver(level)
    callbacks = [SealStateCallback()]
    if level >= 1:
        callbacks.append(make_console(max_epochs=max_epochs_by_variant(plan), folds=list(plan.folds),
                                      search=bool(plan.search), every_s=plan.settings.status_every_s))
    run_config = tune.RunConfig(
        name=plan.experiment, storage_path=plan.storage_path,
        failure_config=tune.FailureConfig(max_failures=plan.settings.max_failures),
        # PBT may hand any trial's checkpoint of a perturbation point to another trial later (also after a
        # driver restart): Ray would delete it if it kept only the last few, so under PBT it keeps them all
        # (one per perturbation interval, see trainable)
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=None if is_pbt(plan) else plan.settings.checkpoints_to_keep),
        # Tune's own tables only at verbose=2: viseg's console (sweep/console.py) shows the trials
        verbose=2 if level >= 2 else 0, callbacks=callbacks)
    tuner = tune.Tuner(trainable(plan), param_space=param_space(plan), tune_config=_tune_config(plan),
                       run_config=run_config)
    _seal_tuner_file(plan)
    return tuner


def _seal_tuner_file(plan: SweepPlan) -> None:
    """The Tuner writes tuner.pkl as it is built (a restored one may rewrite it): seal it at once."""

    StateSealer(plan.experiment_dir).seal_files([plan.experiment_dir / "tuner.pkl"])


def restore_tuner(plan: SweepPlan) -> Any:
    """Errored and unfinished trials continue from their last checkpoint; finished ones are kept.

    Ray restores only what its own state files hold, and when one of them does not load it silently restarts
    the experiment from a param space it never saved, with trials that have no config. So viseg's own sweep
    state decides: a grid's param space is rebuilt from the saved plan and handed to Ray (a restart then
    reruns the same grid), and state Ray cannot read is set aside first. A grid needs no Ray state to go on:
    its trials find their run folders by variant and fold, finished ones return at once and the others
    continue from their own checkpoints, so it then starts a fresh Tuner. A search cannot: its trials are
    named after Ray's ids and Optuna's history lives in that state, so it stops and says what to do.

    Ray's state files are pickles (its JSON too carries pickled values), so none is read, not even to check
    it, unless this user's viseg sealed it (`state_seal`): a grid sets unsealed files aside and goes on from
    its run folders, a search stops."""
    from ray import tune

    experiment = plan.experiment_dir
    untrusted = set_aside_untrusted_state(experiment, move=not plan.search)
    if untrusted and plan.search:
        raise ConfigError(f"Ray's search state in {experiment} does not carry your viseg's seal "
                          f"({', '.join(untrusted)}): it was written by someone else, changed or cut (a full disk) "
                          "since, or sealed with another key, and viseg never unpickles such state (loading it "
                          "could run any code it holds)",
                          fix=f"if you ran this search, resume it with the key it was sealed with ({key_path()} "
                              "on the machine that ran it, or VISEG_STATE_KEY=<key file>); otherwise "
                              f"cross-validate what it found (cross_validate={experiment}) or start it again "
                              "under a new experiment=...")
    if untrusted:
        log.warning("Ray's experiment state in %s does not carry your viseg's seal (%s), so it is not loaded (set "
                    "aside in %s/); the trials continue from their run folders (finished ones are kept, the "
                    "others resume from their last checkpoint)", experiment, ", ".join(untrusted), UNTRUSTED)
        return build_tuner(plan)
    trials = SweepTrials(variants=list(plan.variants), folds=list(plan.folds), search=bool(plan.search),
                         random_search=is_pbt(plan))
    damaged = set_aside_damaged_state(experiment, trials)
    if damaged is None:
        # a search passes none: were Ray to restart it anyway, its trials get no config and fail with a clear
        # error (sweep/trial.py) instead of silently starting a second search in the same experiment
        space = None if plan.search else param_space(plan)
        tuner = tune.Tuner.restore(str(experiment), trainable(plan), param_space=space, resume_unfinished=True,
                                   resume_errored=True)
        _seal_tuner_file(plan)
        return tuner
    if plan.search:
        raise ConfigError(f"Ray's search state in {experiment} is damaged ({damaged}; set aside in {ASIDE}/), "
                          "so the search cannot continue where it stopped",
                          fix=f"cross-validate what it found (cross_validate={experiment}) or start the search "
                              "again under a new experiment=...; its finished trials stay in runs/")
    log.warning("Ray's experiment state in %s is damaged (%s); the trials continue from their run folders "
                "(finished ones are kept, the others resume from their last checkpoint)", experiment, damaged)
    return build_tuner(plan)


def record_errors(plan: SweepPlan, results: Any) -> list[dict[str, Any]]:
    """Failed trials, kept beside the summary so it can mark them."""
    errors = []
    for result in results:
        if result.error is None:
            continue
        config, message = result.config or {}, error_message(result.error)
        if not plan.search:
            errors.append({"variant": config.get("variant"), "fold": config.get("fold"), "error": message})
            continue
        # a search trial is one configuration over all search folds, its runs named <variant>-<trial id>
        trial_id = Path(str(result.path)).name.rsplit("_", 1)[-1]
        errors += [{"variant": f"{config.get('variant')}-{trial_id}", "fold": fold, "error": message}
                   for fold in plan.folds]
    write_json_atomic(Path(plan.experiment_dir) / "errors.json", errors)
    return errors


def init_ray(experiment_dir: Path) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), else start a local Ray; either way the trials run
    the code as it is now, snapshot into the experiment (sweep/code_pin.py), not whatever is checked out when
    each of them starts."""
    import ray

    if ray.is_initialized():  # only in-process callers: the runtime_env is fixed when Ray starts
        log.warning("Ray was started before the sweep: its trials import viseg as that Ray finds it, not pinned")
        return
    ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False,
             runtime_env=pin_code(experiment_dir).runtime_env)
