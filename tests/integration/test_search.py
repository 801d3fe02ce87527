"""Searches on a real local Ray: one trial per configuration over its folds, the schedulers, what a search
leaves behind (search.json, best_config.yaml, importance) and its resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.sweep_runs import TINY, kill_session, run_folders, start_sweep, sweep, wait_for

pytestmark = pytest.mark.slow
LR = "optimizer.lr=tag(log, interval(1e-3, 1e-1))"


def reports_by_trial(experiment: Path) -> dict[str, list[dict]]:
    """Each search trial's reports (its result.json), oldest first."""
    trials = {}
    for path in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            trials[rows[-1]["trial_id"]] = rows
    return trials


def epochs_of(run: Path) -> list[int]:
    with open(run / "metrics.csv") as handle:
        return [int(float(row["epoch"])) for row in csv.DictReader(handle)]


def test_optuna_search_trains_every_fold_per_configuration_and_its_winner_is_reusable(tmp_path: Path):
    result = sweep(LR, "num_samples=4", "search.folds=[0,1]", "trainer.max_epochs=2",
                   "trainer.iterations_per_epoch=2", *TINY, "experiment=search", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    search = tmp_path / "results" / "sweeps" / "search"
    trials = reports_by_trial(search)
    assert len(trials) == 4
    runs = run_folders(search)
    for trial_id, rows in trials.items():
        config = rows[-1]["config"]
        assert set(config) == {"variant", "params"}  # a configuration: no fold among its values
        name = f"{config['variant']}-{trial_id}"
        # both folds trained, each in a run folder of its own, for every epoch
        assert all((runs[f"{name}/fold_{k}"] / "finished.json").is_file() for k in (0, 1))
        assert all(epochs_of(runs[f"{name}/fold_{k}"]) == [0, 1] for k in (0, 1))
        epochs = [r for r in rows if "epoch" in r and "final/mean_dice" not in r]
        assert [r["epochs"] for r in epochs] == [1, 2]
        for report in epochs:  # the reported metric is the fold mean, each fold's value beside it
            folds = [report[f"fold_{k}/val/ema_pseudo_dice"] for k in (0, 1)]
            assert report["val/ema_pseudo_dice"] == pytest.approx(sum(folds) / 2)
            assert report["score"] == report["val/ema_pseudo_dice"]
        final = rows[-1]
        dice = [json.loads((runs[f"{name}/fold_{k}"] / "validation" / "summary.json").read_text())["mean_dice"]
                for k in (0, 1)]
        assert final["final/mean_dice"] == pytest.approx(sum(dice) / 2) == pytest.approx(final["score"])

    # Optuna itself never saw a fold: its study holds the configuration's values only
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch()
    searcher.restore_from_dir(str(search))
    study_params = [set(t.params) for t in searcher._ot_study.trials]
    assert study_params and all(params == {"params/optimizer.lr"} for params in study_params), study_params

    report = json.loads((search / "search.json").read_text())
    configurations = report["configurations"]
    assert [c["status"] for c in configurations] == ["finished"] * 4
    means = [c["mean"] for c in configurations]
    assert means == sorted(means, reverse=True)
    assert "fold 0" in result.stdout and "fold 1" in result.stdout and "mean ± std" in result.stdout
    assert report["importance"]["values"] and (search / "importance.png").read_bytes()[:4] == b"\x89PNG"
    winner = configurations[0]
    assert f"sweep={search / 'best_config.yaml'}" in result.stdout

    # the winner, cross-validated from best_config.yaml, trains with exactly its values
    result = sweep(f"sweep={search / 'best_config.yaml'}", "folds=0-1", "experiment=winner", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cv = run_folders(tmp_path / "results" / "sweeps" / "winner")
    assert sorted(cv) == ["default/fold_0", "default/fold_1"]
    for run in cv.values():
        saved = OmegaConf.load(run / "config.yaml")
        assert saved.optimizer.lr == winner["params"]["optimizer.lr"]
        assert saved.trainer.max_epochs == 2 and (run / "finished.json").is_file()


def test_asha_stops_a_hopeless_learning_rate_before_its_last_epoch(tmp_path: Path):
    # the demo's small network learns the organ within an epoch at 3e-3; at 1e-7 it cannot
    result = sweep("optimizer.lr=tag(search, choice(0.003, 1e-7))", "num_samples=4", "search.folds=[0]",
                   "search.scheduler=asha", "search.grace_period=1", "search.reduction_factor=2",
                   "trainer.max_epochs=4", "trainer.iterations_per_epoch=6", *TINY, "experiment=asha", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = tmp_path / "results" / "sweeps" / "asha"
    configurations = json.loads((experiment / "search.json").read_text())["configurations"]
    hopeless = [c for c in configurations if c["params"]["optimizer.lr"] == 1e-7]
    stopped = [c for c in hopeless if c["status"] == "stopped early"]
    assert stopped and all(c["epochs"] < 4 for c in stopped), configurations
    assert configurations[0]["status"] == "finished" and configurations[0]["params"]["optimizer.lr"] == 0.003
    assert "stopped early" in result.stdout


def test_pbt_exploits_a_better_trial_keeps_every_epoch_and_resumes_after_a_driver_kill(tmp_path: Path):
    args = (LR, "num_samples=2", "search.folds=[0]", "search.scheduler=pbt", "search.perturbation_interval=1",
            "search.quantile_fraction=0.5", "search.resample_probability=0", "trainer.max_epochs=6",
            "trainer.iterations_per_epoch=3", "splits.n_folds=3", "trainer.val_iterations=1", "experiment=pbt")
    experiment = tmp_path / "results" / "sweeps" / "pbt"
    process = start_sweep(*args, cwd=tmp_path)
    try:
        wait_for(lambda: sum(len(rows) for rows in reports_by_trial(experiment).values()) >= 4, process,
                 what="four epoch reports")
    finally:
        kill_session(process)  # the driver and its local Ray, mid-search
    result = sweep(f"resume={experiment}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    trials = reports_by_trial(experiment)
    assert len(trials) == 2
    exploits = [(trial_id, row) for trial_id, rows in trials.items() for row in rows if row.get("exploited_from")]
    assert exploits, "no trial continued from the other's checkpoint"
    trial_id, row = exploits[0]
    donor_lrs = {r["config"]["params"]["optimizer.lr"] for r in trials[row["exploited_from"]]}
    assert row["config"]["params"]["optimizer.lr"] not in donor_lrs  # explored: perturbed by 0.8 or 1.2
    runs = run_folders(experiment)
    for tid, rows in trials.items():
        run = runs[f"default-{tid}/fold_0"]
        assert (run / "finished.json").is_file() and rows[-1]["epochs"] == 6
        assert epochs_of(run) == list(range(6))  # no epoch lost: neither to the exploit nor to the kill
    log = (runs[f"default-{trial_id}/fold_0"] / "training_log.txt").read_text()
    assert "changed from the checkpoint: optimizer.lr" in log


def test_a_lost_fold_task_is_restarted_from_its_checkpoint_while_the_other_fold_goes_on(tmp_path: Path):
    import os
    import signal

    experiment = tmp_path / "results" / "sweeps" / "lost-fold"
    process = start_sweep(LR, "num_samples=1", "search.folds=[0,1]", "trainer.max_epochs=8",
                          "trainer.iterations_per_epoch=3", *TINY, "max_failures=2", "experiment=lost-fold",
                          cwd=tmp_path)

    def epoch_reports() -> list[dict]:
        return [r for rows in reports_by_trial(experiment).values() for r in rows if "folds_reported" in r]

    # 8 epochs: the folds start apart, so the faster one may be epochs ahead of the reports when it is killed,
    # and it must still have epochs left to train in its new worker
    try:
        wait_for(lambda: any(r["epochs"] >= 2 for r in epoch_reports()), process, what="two epochs of both folds")
        lost, kept = epoch_reports()[-1]["fold_0/pid"], epoch_reports()[-1]["fold_1/pid"]
        os.kill(lost, signal.SIGKILL)
        output, _ = process.communicate(timeout=600)
    finally:
        kill_session(process)
    assert process.returncode == 0, output[-4000:]
    reports = epoch_reports()
    assert [r["epochs"] for r in reports] == list(range(1, 9))  # every epoch reported once, none lost
    # an epoch fold 0 had trained before the kill but the trial had not reported yet comes back from the
    # checkpoint's history, trained by no live process: its report names no fold_0 pid
    fold_0_pids = [r.get("fold_0/pid") for r in reports]
    assert len(set(fold_0_pids) - {None}) == 2  # fold 0 went on in a new worker
    assert {r["fold_1/pid"] for r in reports} == {kept}  # fold 1 never stopped
    assert fold_0_pids[-1] not in (lost, None)
    runs = run_folders(experiment)
    for fold in (0, 1):
        run = next(path for name, path in runs.items() if name.endswith(f"/fold_{fold}"))
        assert epochs_of(run) == list(range(8)) and (run / "finished.json").is_file()
    assert "was lost" in output and "starting it again from its last checkpoint" in output
