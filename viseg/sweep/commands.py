"""The sweep command's modes: a new sweep, dry run, resume and summary."""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

from viseg.errors import ConfigError, VisegError, free_space_then, is_storage_full, storage_full
from viseg.io.layout import EXPERIMENT_RUNS
from viseg.noise import VERBOSE_ENV, quiet_libraries
from viseg.sweep.best import render, select_best
from viseg.sweep.cross_validate import plan_cross_validation
from viseg.sweep.driver import STATE_FILE, SweepPlan, load_state, plan_sweep, prepare_all, render_trials, save_state
from viseg.sweep.parse import parse_request
from viseg.sweep.search_report import next_command, write_search_report
from viseg.sweep.stages import start_board, stop_board
from viseg.sweep.summary import render_table, summarize, write_summary
from viseg.sweep.train_workers import check_capacity
from viseg.sweep.tune import build_tuner, init_ray, record_errors, restore_tuner

log = logging.getLogger(__name__)


def print_summary(experiment_dir: Path, ended: bool = False) -> int:
    """The cross-validation table; for a search also every configuration, the importance of the searched
    values and best_config.yaml. `ended`: the sweep has just finished (unfinished search trials were stopped).
    Below the table: where it was written and the command to run next."""
    if not (experiment_dir / STATE_FILE).is_file() and not (experiment_dir / EXPERIMENT_RUNS).is_dir():
        raise ConfigError(f"{experiment_dir} is not a sweep experiment (no {STATE_FILE}, no runs/)",
                          fix="pass the experiment folder printed when the sweep started")
    summaries = summarize(experiment_dir)
    written = write_summary(experiment_dir, summaries)
    plan = load_state(experiment_dir) if (experiment_dir / STATE_FILE).is_file() else None
    if plan is not None and plan.search:
        text, paths = write_search_report(experiment_dir, plan, ended)
        print(f"\n{text}")
        print(_written(written | paths, next_command(paths)))
        return 0
    print(f"\n{render_table(summaries)}")
    finished = any(s.folds_finished for s in summaries)
    command = (f"python -m viseg.sweep best={experiment_dir}   (full-resolution cross-validation Dice, "
               "ensembles, postprocessing; prints the predict command)") if finished else None
    print(_written(written, command))
    return 0


def _written(paths: dict[str, Path], command: str | None) -> str:
    """The files the summary wrote, one per line, and what to run next: easy to find below a long table."""
    width = max(len(kind) for kind in paths) + 1
    lines = ["", *(f"{kind + ':':<{width}} {path}" for kind, path in paths.items())]
    if command:
        lines.append(f"{'next:':<{width}} {command}")
    return "\n".join(lines)


def _finish(plan: SweepPlan, results) -> int:

    errors = record_errors(plan, results)
    code = print_summary(plan.experiment_dir, ended=True)
    if any(e["error"].startswith("StorageFullError") for e in errors):
        raise storage_full("the sweep's results", plan.experiment_dir,
                           fix=free_space_then(f"python -m viseg.sweep resume={plan.experiment_dir}"))
    if errors:
        print(f"\n{len(errors)} trial(s) failed; see {plan.experiment_dir / 'errors.json'}. "
              f"Continue with: python -m viseg.sweep resume={plan.experiment_dir}")
    return code if not errors else 1


def _check_capacity(plan: SweepPlan) -> None:
    import os

    if os.environ.get("RAY_ADDRESS"):  # a cluster may autoscale to fit
        return
    resources = plan.settings.resources
    check_capacity(plan.variants, resources.workers, resources.cpu, resources.gpu)


def _fit(plan: SweepPlan, tuner) -> int:
    """Run the trials. A full disk under storage_path can break Tune's own bookkeeping (a truncated error
    file makes its result grid raise): that becomes one error saying what is kept and how to go on."""
    # a cascade's trials wait on this actor for their lowres trials; it lives while this handle does
    board = start_board(plan.experiment_dir / EXPERIMENT_RUNS) if plan.previous_stages else None
    try:
        return _finish(plan, tuner.fit())
    except VisegError:
        raise
    except Exception as exc:
        if is_storage_full(exc) or _a_trial_ran_out_of_space(plan.experiment_dir) or _ray_read_back_truncated(exc):
            raise storage_full("the sweep's results", plan.experiment_dir,
                               fix=free_space_then(f"python -m viseg.sweep resume={plan.experiment_dir}")) from exc
        raise
    finally:
        stop_board(board)


def _a_trial_ran_out_of_space(experiment_dir: Path) -> bool:
    return any("no space left on device" in path.read_text(errors="replace").lower()
               for path in experiment_dir.glob("*/error.txt"))


def _ray_read_back_truncated(exc: BaseException) -> bool:
    """Tune failing to read back a file it wrote itself (an empty error.pkl, a cut JSON state): its writes
    to storage_path are not atomic, and a full volume is what cuts them (the error files too, so the
    trials' own errors may not be readable either)."""
    names = {"EOFError", "UnpicklingError", "JSONDecodeError"}
    frames = traceback.extract_tb(exc.__traceback__)
    return type(exc).__name__ in names and any("/ray/" in frame.filename for frame in frames)


def new_sweep(args: list[str], sweeps_dir: Path) -> int:
    has_dataset = any(a.startswith("dataset.basepath=") for a in args)
    has_spec = any(a.startswith("sweep=") for a in args)
    request = parse_request(args, sweeps_dir, default_spec=None if has_dataset or has_spec else "demo")
    return _start(plan_sweep(request))


def cross_validate(args: list[str], sweeps_dir: Path) -> int:
    """The best searched configuration(s) of a finished search, over every fold, as a new grid sweep."""

    request = parse_request(args, sweeps_dir)
    cli_keys = {a.split("=", 1)[0].split(".")[0].lstrip("+~") for a in args}
    return _start(plan_cross_validation(request, cli_keys))


def _start(plan: SweepPlan) -> int:

    print(render_trials(plan))
    if plan.settings.dry_run:
        return 0
    if (plan.experiment_dir / STATE_FILE).is_file():
        saved = load_state(plan.experiment_dir)
        if (saved.variants, saved.folds, saved.search) != (plan.variants, plan.folds, plan.search):
            raise ConfigError(f"experiment {plan.experiment_dir} exists already with other trials",
                              fix=f"continue it with resume={plan.experiment_dir}, or name a new one with "
                                  "experiment=...")
        # the same command again (e.g. a second `make demo`): continue it; finished trials are kept as they are
        print(f"\nexperiment {plan.experiment_dir} exists with these trials: continuing it")
        return resume(str(plan.experiment_dir))
    prepare_all(plan)
    save_state(plan)
    init_ray(plan.experiment_dir)
    _check_capacity(plan)
    return _fit(plan, build_tuner(plan))


def choose_best(args: list[str], sweeps_dir: Path) -> int:
    """Cross-validation Dice at full resolution per variant (and pairs ensembled), postprocessing."""

    settings = parse_request(args, sweeps_dir).settings
    experiment = Path(settings.best or "")
    if not (experiment / EXPERIMENT_RUNS).is_dir():
        raise ConfigError(f"{experiment} is not a sweep experiment folder (no runs/)",
                          fix="pass the experiment folder printed when the sweep started")
    choice = settings.selection
    print(render(select_best(experiment, choice.ensembles, choice.checkpoint, choice.mirror)))
    return 0


def resume(experiment: str) -> int:

    plan = load_state(Path(experiment))
    print(render_trials(plan))
    init_ray(plan.experiment_dir)
    _check_capacity(plan)
    return _fit(plan, restore_tuner(plan))


MODES = ("summary", "resume", "cross_validate", "best")  # settings of SweepConfig that each pick a mode


def run(args: list[str], sweeps_dir: Path) -> int:
    """The mode the typed settings ask for (summary=, resume=, cross_validate=, best=), else a new sweep."""
    settings = parse_request(args, sweeps_dir).settings
    if settings.verbose is not None:  # this process and, on a local Ray, the trials it starts (noise.py)
        os.environ[VERBOSE_ENV] = str(settings.verbose)
    quiet_libraries()
    given = [mode for mode in MODES if getattr(settings, mode) is not None]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(f'{m}=' for m in given)} are different modes of the sweep command",
                          fix="give one of them per command")
    if settings.summary is not None:
        return print_summary(Path(settings.summary))
    if settings.resume is not None:
        return resume(settings.resume)
    if settings.cross_validate is not None:
        return cross_validate(args, sweeps_dir)
    if settings.best is not None:
        return choose_best(args, sweeps_dir)
    return new_sweep(args, sweeps_dir)
