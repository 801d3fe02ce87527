"""Sweep overhead: wall time of an N-trial `python -m viseg.sweep` against the sum of its trials' own training
time (train()'s seconds, written by every trial into its run folder's finished.json), on the same machine.

Trials run one at a time (max_concurrent_trials=1), so the difference is exactly what the sweep layer
adds: interpreter and Ray start-up, composing and checking the variants, placing trials, per-epoch
checkpoint reports to Tune, experiment-state snapshots and the summary. A warm-up sweep first fills the
demo dataset and preprocessing cache, which both paths would share.

    .venv/bin/python bench/sweep_overhead.py                        # 3 trials of ~4 min each on a 2-core CPU (~14 min)
    .venv/bin/python bench/sweep_overhead.py --folds 0-1 --epochs 3 --iterations 10   # a quick look

`--search` measures a search instead: each configuration is one trial that trains its search folds at once
as parallel Ray tasks (one CPU each), so a trial's own cost is its slowest fold's training time, and its
overhead is the trial's wall time (Tune's time_total_s) beyond that: starting the fold tasks and their
workers, streaming every epoch back, the per-epoch fold-mean reports and checkpoints, and the final report.

    .venv/bin/python bench/sweep_overhead.py --search --folds 0-1 --samples 2 \
        --out bench/results/sweep_overhead_search.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_sweep(work: Path, experiment: str, args: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "viseg.sweep", *args, f"experiment={experiment}",
                             "max_concurrent_trials=1"], cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"sweep failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return wall


def trial_seconds(experiment_dir: Path) -> list[float]:
    return [json.loads(p.read_text())["seconds"] for p in sorted((experiment_dir / "runs").rglob("finished.json"))]


def search_trials(experiment_dir: Path) -> list[dict[str, float]]:
    """Per search trial: Tune's wall time of the trial and its folds' own train() seconds."""
    trials = []
    for result_file in sorted(experiment_dir.glob("*/result.json")):
        reports = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        final = reports[-1]
        runs = json.loads(final["run_dirs"])
        folds = [json.loads((Path(run) / "finished.json").read_text())["seconds"] for run in runs.values()]
        trials.append({"trial_seconds": final["time_total_s"], "fold_train_seconds": folds})
    return trials


def search_result(work: Path, options: argparse.Namespace, budget: list[str]) -> dict[str, object]:
    from viseg.sweep.spec import parse_folds

    folds = str(parse_folds(options.folds, 5)).replace(" ", "")
    wall = run_sweep(work, "measured", ["optimizer.lr=tag(log, interval(1e-3, 1e-2))",
                                        f"num_samples={options.samples}", f"search.folds={folds}",
                                        "resources.cpu=1", *budget])
    trials = search_trials(work / "results" / "sweeps" / "measured")
    own = [max(t["fold_train_seconds"]) for t in trials]
    spent = [t["trial_seconds"] for t in trials]
    return {
        "mode": "search (one trial per configuration, its folds as parallel Ray tasks)",
        "configurations": len(trials), "search_folds": folds, "epochs": options.epochs,
        "iterations_per_epoch": options.iterations,
        "trials": [{"trial_seconds": round(t["trial_seconds"], 2),
                    "fold_train_seconds": [round(s, 2) for s in t["fold_train_seconds"]]} for t in trials],
        "sum_slowest_fold_seconds": round(sum(own), 2), "sum_trial_seconds": round(sum(spent), 2),
        "trial_overhead_fraction": round((sum(spent) - sum(own)) / sum(own), 4),
        "sweep_wall_seconds": round(wall, 2),
        "sweep_overhead_fraction": round((wall - sum(own)) / sum(own), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", default="0-2", help="folds of the demo dataset, one trial each (default 0-2)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=30, help="iterations per epoch")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sweep_overhead.json")
    parser.add_argument("--search", action="store_true", help="measure a search: one trial per configuration, "
                        "its folds (--folds) trained at once")
    parser.add_argument("--samples", type=int, default=2, help="configurations of the --search")
    options = parser.parse_args()

    budget = [f"trainer.max_epochs={options.epochs}", f"trainer.iterations_per_epoch={options.iterations}",
              "trainer.val_iterations=2", "splits.n_folds=5"]
    with tempfile.TemporaryDirectory(prefix="viseg-bench-sweep-") as tmp:
        work = Path(tmp)
        run_sweep(work, "warmup", ["folds=0", "trainer.max_epochs=1", "trainer.iterations_per_epoch=1",
                                   "trainer.val_iterations=1", "splits.n_folds=5"])
        if options.search:
            result = search_result(work, options, budget)
        else:
            wall = run_sweep(work, "measured", [f"folds={options.folds}", *budget])
            seconds = trial_seconds(work / "results" / "sweeps" / "measured")
    if options.search:
        result["machine"] = f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}"
        result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"\nfold-parallel trial overhead: {100 * result['trial_overhead_fraction']:.1f} % of its slowest "
              "fold's own training time")
        return
    total = sum(seconds)
    result = {
        "trials": len(seconds), "epochs": options.epochs, "iterations_per_epoch": options.iterations,
        "trial_train_seconds": [round(s, 2) for s in seconds], "sum_trial_seconds": round(total, 2),
        "sweep_wall_seconds": round(wall, 2), "overhead_seconds": round(wall - total, 2),
        "overhead_per_trial_seconds": round((wall - total) / len(seconds), 2),
        "overhead_fraction": round((wall - total) / total, 4),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\nsweep overhead: {100 * result['overhead_fraction']:.1f} % of the trials' own training time "
          f"({result['overhead_per_trial_seconds']} s per trial)")


if __name__ == "__main__":
    main()
