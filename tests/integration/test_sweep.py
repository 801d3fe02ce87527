"""The sweep layer on a real local Ray: a reduced version of the README's main command."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.sweep_runs import (
    TINY,
    epochs_in,
    kill_after_second_epoch,
    kill_session,
    run_folders,
    start_sweep,
    sweep,
    trial_results,
    wait_for,
)

pytestmark = pytest.mark.slow


def test_reduced_main_command_runs_every_trial_and_prepares_once(tmp_path: Path):
    args = ("folds=0-1", "lr_scheduler=step_lr,poly", "trainer.max_epochs=1", "trainer.iterations_per_epoch=2",
            "trainer.val_iterations=1", "splits.n_folds=3", "experiment=reduced")
    result = sweep(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = tmp_path / "results" / "sweeps" / "reduced"
    finished = sorted(str(p.parent.relative_to(experiment / "runs")).split("/", 2)[-1]
                      for p in (experiment / "runs").rglob("finished.json"))
    assert finished == ["lr_scheduler-poly/fold_0", "lr_scheduler-poly/fold_1",
                        "lr_scheduler-step_lr/fold_0", "lr_scheduler-step_lr/fold_1"]
    # every trial used the driver's one cache: one dataset folder, one preprocessed folder
    caches = list((tmp_path / ".viseg_cache").glob("VisegDemo-*"))
    assert len(caches) == 1 and len(list((caches[0] / "preprocessed").iterdir())) == 1
    summary = json.loads((experiment / "summary.json").read_text())
    assert sorted(v["variant"] for v in summary) == ["lr_scheduler-poly", "lr_scheduler-step_lr"]
    assert all(v["folds_finished"] == [0, 1] for v in summary)
    assert (experiment / "summary.png").is_file() and "lr_scheduler-poly" in result.stdout
    check_console(result.stdout, result.stderr, experiment)
    # the same command again continues the experiment instead of refusing it; nothing finished is retrained
    markers = {p: p.stat().st_mtime_ns for p in (experiment / "runs").rglob("finished.json")}
    again = sweep(*args, cwd=tmp_path)
    assert again.returncode == 0 and "continuing it" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (experiment / "runs").rglob("finished.json")} == markers
    check_best_then_predict(experiment, tmp_path)


NOISE = ("Tip:", "TPU available", "GPU available", "Checkpoint successfully created", "snapshotting",
         "Configuration for experiment", "Trial status:", "`Trainer.fit` stopped")


def check_console(stdout: str, stderr: str, experiment: Path) -> None:
    """Issue 16's console: none of Ray's or Lightning's per-trial lines, a short log of what happened, then
    the final table, the files it wrote and the next command."""
    lines = (stdout + stderr).splitlines()
    assert not [line for line in lines if any(noise in line for noise in NOISE)], stdout + stderr
    table = next(i for i, line in enumerate(stdout.splitlines()) if "folds ok/failed" in line)
    before_table = stdout.splitlines()[:table] + stderr.splitlines()
    assert len(before_table) <= 60, "\n".join(before_table)
    # off a terminal: one line per finished trial and a status line now and then, no progress bar's \r
    assert sum(line.startswith("finished ") for line in before_table) == 4 and "\r" not in stdout + stderr
    after = stdout.splitlines()[table:]
    assert f"json: {experiment / 'summary.json'}" in after and f"png:  {experiment / 'summary.png'}" in after
    assert any(line.startswith(f"next: python -m viseg.sweep best={experiment}") for line in after), after


def check_best_then_predict(experiment: Path, work: Path) -> None:
    """best= on the finished sweep: full-resolution CV Dice per variant and for their ensemble, then the
    printed predict command works as printed."""
    result = sweep(f"best={experiment}", "selection.mirror=false", cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((experiment / "selection" / "best.json").read_text())
    singles = [c["name"] for c in report["candidates"] if not c["name"].startswith("ensemble")]
    assert sorted(singles) == ["lr_scheduler-poly", "lr_scheduler-step_lr"]
    assert len(report["candidates"]) == 3  # the two variants, ranked, and the ensemble of the top two
    ranked = [c["mean_dice"] for c in report["candidates"]]
    assert ranked == sorted(ranked, reverse=True) and report["best"] == report["candidates"][0]
    # every validation case of both folds, scored at full resolution: 2 folds x (20 cases / 3 folds)
    assert all(c["n_cases"] == 14 for c in report["candidates"])

    # the ensemble's Dice, recomputed independently from the cached probabilities and the label files
    ensemble = next(c for c in report["candidates"] if c["name"].startswith("ensemble"))
    predictions = experiment / "selection" / "predictions"
    config = OmegaConf.load(next((experiment / "runs").rglob("fold_0/config.yaml")))
    labels_dir = Path(config.dataset.basepath) / "labelsTr"
    organ = []
    for npz in sorted((predictions / "lr_scheduler-poly").glob("*.npz")):
        mean = np.mean([np.load(predictions / v / npz.name)["probabilities"].astype(np.float32)
                        for v in ("lr_scheduler-poly", "lr_scheduler-step_lr")], axis=0)
        truth = np.asarray(nib.load(labels_dir / f"{npz.stem}.nii.gz").dataobj).transpose(2, 1, 0)
        predicted = mean.argmax(0) == 1
        organ.append(2 * (predicted & (truth == 1)).sum() / (predicted.sum() + (truth == 1).sum()))
    assert ensemble["dice_per_label"]["1"] == pytest.approx(float(np.mean(organ)), abs=1e-6)

    spec = json.loads((experiment / "selection" / "postprocessing.json").read_text())
    assert set(spec["largest_component_labels"]) <= {1, 2, 3}
    command = report["predict_command"]
    assert command in result.stdout
    images = work / "predict_in"
    images.mkdir()
    for case in ("demo_000", "demo_001"):
        (images / f"{case}_0000.nii.gz").symlink_to(Path(config.dataset.basepath) / "imagesTr" / f"{case}_0000.nii.gz")
    args = shlex.split(command)[3:]
    args = [f"input={images}" if a.startswith("input=") else f"output={work / 'pred'}" if a.startswith("output=")
            else a for a in args]
    predicted = subprocess.run([sys.executable, "-m", "viseg.predict", *args, "mirror=false"], cwd=work,
                               capture_output=True, text=True, timeout=600)
    assert predicted.returncode == 0, predicted.stdout[-3000:] + predicted.stderr[-3000:]
    assert sorted(p.name for p in (work / "pred").glob("*.nii.gz")) == ["demo_000.nii.gz", "demo_001.nii.gz"]
    assert "postprocessing" in predicted.stderr + predicted.stdout


def test_dry_run_prints_trials_and_starts_nothing(tmp_path: Path):
    result = sweep("folds=0,2", "lr_scheduler=step_lr,poly,cosine", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "6 (3 variant(s) x folds [0, 2])" in result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["lr_scheduler=nope,poly"], "lr_scheduler"),
    (["folds=0-9"], "out of range"),
    (["trainer.max_epochs=abc"], "max_epochs"),
    (["patch_size=interval(8, 64)"], "cannot be searched"),
    (["model.model_args.n_stages=3"], "derived"),
    (["sweep=nope"], "does not exist"),
])
def test_invalid_overrides_fail_fast_with_a_readable_message(tmp_path: Path, args: list[str], message: str):
    result = sweep(*args, "dry_run=true", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_help_explains_the_grammar(tmp_path: Path):
    result = sweep("--help", cwd=tmp_path, timeout=60)
    assert result.returncode == 0 and "resume=<experiment path>" in result.stdout and "interval" in result.stdout


def test_killed_driver_resumes_unfinished_trials_and_keeps_finished_ones(tmp_path: Path):
    experiment = tmp_path / "results" / "sweeps" / "killed"
    process = start_sweep("folds=0", "lr_scheduler=step_lr,poly", "trainer.max_epochs=3",
                          "trainer.iterations_per_epoch=3", *TINY, "experiment=killed", cwd=tmp_path)

    def one_finished_one_started() -> bool:
        runs = run_folders(experiment)
        done = [r for r in runs.values() if (r / "finished.json").is_file()]
        started = [r for r in runs.values() if (r / "checkpoints" / "last.ckpt").is_file() and r not in done]
        return len(done) == 1 and len(started) == 1

    try:
        wait_for(one_finished_one_started, process, what="one finished trial and one checkpointed trial")
    finally:
        kill_session(process)
    finished = next(r for r in run_folders(experiment).values() if (r / "finished.json").is_file())
    finished_state = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()}

    result = sweep(f"resume={experiment}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = run_folders(experiment)
    assert sorted(runs) == ["lr_scheduler-poly/fold_0", "lr_scheduler-step_lr/fold_0"]
    for run in runs.values():
        assert json.loads((run / "finished.json").read_text())["epochs"] == 3
        assert epochs_in(run) == [0, 1, 2]  # the interrupted trial continued: no epoch trained twice
    # the trial that had finished before the kill was not touched
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()} == finished_state
    assert all(v["folds_finished"] == [0] for v in json.loads((experiment / "summary.json").read_text()))


def test_killed_trial_worker_is_retried_from_its_checkpoint(tmp_path: Path):
    experiment = tmp_path / "results" / "sweeps" / "worker"
    process = start_sweep("folds=0", "trainer.max_epochs=4", "trainer.iterations_per_epoch=3", *TINY,
                          "max_failures=2", "experiment=worker", cwd=tmp_path)
    output = kill_after_second_epoch(process, experiment, "pid")
    assert process.returncode == 0, output[-4000:]
    run = run_folders(experiment)["default/fold_0"]
    assert json.loads((run / "finished.json").read_text())["epochs"] == 4
    reported = [r["epoch"] for r in trial_results(experiment) if "epoch" in r]
    # a retry from scratch would report epoch 0 again; from the checkpoint it goes on where it stopped
    assert reported.count(0) == 1 and sorted(set(reported)) == [0, 1, 2, 3], reported
    assert len({r["pid"] for r in trial_results(experiment)}) == 2  # a second worker process did the rest
    assert epochs_in(run) == [0, 1, 2, 3]


def test_a_diverging_trial_fails_alone_and_the_summary_marks_it(tmp_path: Path):
    result = sweep("folds=0", "optimizer.lr=0.01,1e30", "trainer.max_epochs=1", "trainer.iterations_per_epoch=3",
                   *TINY, "max_failures=0", "experiment=diverged", cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    experiment = tmp_path / "results" / "sweeps" / "diverged"
    errors = json.loads((experiment / "errors.json").read_text())
    assert [(e["variant"], e["fold"]) for e in errors] == [("lr-1e_30", 0)]
    assert errors[0]["error"].startswith("TrainingError: the training loss is nan") and "fix:" in errors[0]["error"]
    summary = {s["variant"]: s for s in json.loads((experiment / "summary.json").read_text())}
    assert summary["lr-0.01"]["folds_finished"] == [0] and summary["lr-0.01"]["best"]
    assert summary["lr-1e_30"]["folds_failed"] == [0] and "diverged" in summary["lr-1e_30"]["errors"]["0"]
    assert f"resume={experiment}" in result.stdout
