"""`python -m viseg.sweep`: folds x config variants as Ray Tune trials over the shared core."""

from __future__ import annotations

import sys

from viseg.cli import configure_logging, exit_status, quote_values, with_key_aliases
from viseg.resources import sweeps_dir
from viseg.sweep.commands import run

HELP = """\
python -m viseg.sweep [--config-name=anatomy_config|lesion_config] [sweep=<spec>] [key=value ...]

Runs cross-validation folds x config variants as Ray Tune trials. Every trial is one call of the
shared core's train() (the same code as python -m viseg.train), on a local Ray or on the cluster a job
was submitted to. Overrides use Hydra's grammar:

  key=a,b  key=choice(a,b)  key=range(1,4)     grid axes: the cartesian product gives the variants
  key=interval(lo,hi)  key='tag(log, interval(lo,hi))'  key='tag(search, choice(a,b))'
                                               searched ranges (Optuna, num_samples trials)
  key=value                                    applied to every trial (any training config key)

Sweep settings (a sweep spec in sweeps/<name>.yaml may set them; the command line wins):
  folds=0-4 | 0,2,4 | all        folds to run (default 0-4)
  sweep=<name>|<file.yaml>       load sweeps/<name>.yaml or a spec file (variants, folds, search
                                 space, resources, ...), e.g. a search's best_config.yaml
  resources.cpu=1 resources.gpu=0.5   per trial, per fold in a search (fractional GPUs share a device)
  resources.workers=2            a grid trial on 2 Ray Train workers (DDP, any nodes; cpu/gpu above per
                                 worker); a variant's devices=N does the same for that variant alone
  max_concurrent_trials=N  max_failures=2  checkpoints_to_keep=2  num_samples=8
  storage_path=results/sweeps    a folder; on a cluster one mounted at the same path on every node
                                 (NFS, EFS, Lustre, ...); URIs such as s3:// are refused
  experiment=<name>              default: derived from dataset, config and axes (deterministic)
  dry_run=true                   print the trial table and exit
  verbose=1                      the console: 0 errors, warnings and the final table only; 1 also the
                                 trial table (redrawn on a terminal); 2 also Ray's and Lightning's own
                                 output (VISEG_VERBOSE=2 in the environment does the same)
  status_every_s=30              off a terminal (ray job logs, SLURM files): a status line this often
  resume=<experiment path>       continue a stopped sweep: unfinished and errored trials resume from
                                 their last checkpoint, finished trials are kept
  summary=<experiment path>      print and write the cross-validation summary (also while running)
  cross_validate=<search path> top_k=1   run the best searched configuration(s) over all folds
  best=<experiment path>         choose what to deploy: cross-validation Dice of every variant predicted at
                                 full resolution, pairs ensembled (the top two, and every pair of each
                                 configuration's best), largest-component postprocessing
                                 per label where it helps; writes selection/best.json, prints the predict
                                 command (selection.ensembles=true selection.mirror=true selection.checkpoint=final)

Searches (any searched range above): one trial per sampled configuration, which trains all of
search.folds at once (one Ray task per fold, each with resources.* of its own) and is scored by
their mean; the searcher never sees the fold.
  search.folds=[0,1,2]           the default: 3x the cost of [0], but no choice is fitted to one
                                 fold's few validation cases; [0] for a quick look
  search.scheduler=asha|hyperband|median|pbt   stop weak configurations early (epochs as budget);
                                 pbt copies better trials' checkpoints and perturbs searched floats
  search.grace_period=1 search.reduction_factor=3          asha, hyperband, median
  search.perturbation_interval=2 search.quantile_fraction=0.25 search.resample_probability=0.25  pbt
  search.time_budget_s=3600      end the search on time
  search.metric=val/ema_pseudo_dice search.mode=max        per-epoch score (fold mean); a finished
                                 configuration's score is its folds' full-resolution validation Dice
  At the end: search.json (every configuration, per-fold and mean Dice, status), importance.png,
  and best_config.yaml: python -m viseg.sweep sweep=<experiment>/best_config.yaml trains the winner
  on every fold.

Without dataset.basepath (and without sweep=), the demo spec runs on the built-in demo dataset with a
small budget, so `python -m viseg.sweep folds=0-4 lr_scheduler=step_lr,poly` finishes on a laptop CPU.
Results: <storage_path>/<experiment>/ holds Tune's trial folders (TensorBoard logs, checkpoints),
runs/.../<variant>/fold_<k>/ run folders (same layout as python -m viseg.train; predict needs nothing
else), summary.json/.csv/.png and errors.json.
"""


# Settings whose values are paths: quoted before Hydra's override grammar reads them (see quote_values).
PATH_SETTINGS = ("resume", "summary", "cross_validate", "best", "storage_path", "sweep")


def _normalise_args(args: list[str]) -> list[str]:
    """`--config-name X` / `--config-name=X` become the sweep setting config_name=X."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config-name", "-cn") and i + 1 < len(args):
            out.append(f"config_name={args[i + 1]}")
            i += 2
            continue
        out.append(f"config_name={arg.split('=', 1)[1]}" if arg.startswith("--config-name=") else arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(HELP)
        return 0

    configure_logging()
    arguments = quote_values(with_key_aliases(_normalise_args(args)), PATH_SETTINGS)
    return exit_status("sweep", lambda: run(arguments, sweeps_dir()))


if __name__ == "__main__":
    raise SystemExit(main())
