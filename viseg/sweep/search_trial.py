"""One search trial = one sampled configuration trained on every search fold at once.

The searcher and the schedulers see a configuration, never a fold: the trial starts one Ray task per fold
(`fold_task.train_fold`) in its own placement-group bundle, waits for every fold's epoch, and reports their
mean (with each fold's value beside it). `score` is what the searcher and schedulers rank: the fold mean of
`search.metric` every epoch, and once every fold has finished, the fold mean of the full-resolution
validation Dice (the number `best=` uses) when the metric is maximised.

Each report carries a checkpoint with every fold's last.ckpt of that epoch (`fold_<k>/`), so Ray can restore
the trial, and Population Based Training can hand it to another trial: a trial that finds a checkpoint written
by another trial (`TRIAL_STATE` names the writer) continues from those weights in its own run folders, with its
own (perturbed) values. A fold task lost to a dead worker or node is started again from its own last.ckpt
while the other folds go on; an error in the training itself (a diverged loss) fails the trial.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from viseg.errors import ConfigError
from viseg.io.jsonio import read_json
from viseg.noise import quiet_libraries
from viseg.sweep.fold_task import REPORTED_DIR, FoldJob, train_fold
from viseg.sweep.trial_setup import link_files

log = logging.getLogger(__name__)
TRIAL_STATE = "search_trial.json"  # in every trial checkpoint: {"trial_id": writer, "epochs": reported}
SCORE = "score"  # what the searcher and the schedulers rank
EPOCHS = "epochs"  # epochs trained: the schedulers' budget (time_attr)
FINAL_METRIC = "final/mean_dice"


@dataclass
class Start:
    """Where a trial (re)starts: how many epochs it reported, and what each fold resumes from."""

    epochs: int = 0
    resume: dict[int, str | None] = field(default_factory=dict)
    exploited: str | None = None  # the trial whose checkpoint this one continues (PBT)
    metrics: dict[str, Any] = field(default_factory=dict)  # what the checkpoint's writer reported with it
    folder: Path | None = None  # the checkpoint Ray restored


def search_variant(config: dict[str, Any], variants: dict[str, str], experiment: Path) -> str:
    variant = config.get("variant")
    if variant not in variants:
        raise ConfigError(f"Ray started a trial with config {config!r}, which is none of this search's "
                          "configurations: its experiment state was lost or damaged",
                          fix=f"a search cannot continue without it: cross_validate={experiment} what it found, "
                              "or start it again under a new experiment=...")
    return str(variant)


def _start(trial_id: str, folds: list[int]) -> Start:
    """From the checkpoint Ray restored into this trial: its own (a resume: each fold goes on from its run
    folder, newer than or equal to the checkpoint, except right after an exploit) or another trial's (an
    exploit: every fold starts from it)."""
    import ray.tune

    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        return Start(resume={fold: None for fold in folds})
    folder = Path(checkpoint.path)  # storage_path is a filesystem path every node mounts (spec refuses URIs)
    state = read_json(folder / TRIAL_STATE)
    epochs = int(state["epochs"])
    if state.get("trial_id") == trial_id and not state.get("adopted"):
        return Start(epochs=epochs, resume={fold: None for fold in folds})
    if state.get("trial_id") == trial_id:  # stopped right after adopting a donor's: its folds may not have it yet
        return Start(epochs=epochs, resume={fold: str(folder / f"fold_{fold}") for fold in folds})
    missing = [fold for fold in folds if not (folder / f"fold_{fold}" / "last.ckpt").is_file()]
    if missing:
        raise ConfigError(f"the checkpoint {folder} handed to trial {trial_id} lacks folds {missing}",
                          fix="every trial of a search trains the same folds; start the search again")
    return Start(epochs=epochs, resume={fold: str(folder / f"fold_{fold}") for fold in folds},
                 exploited=str(state.get("trial_id")), metrics=dict(state.get("metrics") or {}), folder=folder)


EXPLOITS_DIR = "pbt_exploits"  # <experiment>/pbt_exploits/<trial>_epoch<e>/: a donor's checkpoint, held for the folds


def _adopt(start: Start, trial_id: str, folds: list[int], experiment: Path) -> tuple[Start, Path]:
    """After PBT's exploit, make the donor's checkpoint this trial's own at once: were this trial stopped
    before its next report, its restore would otherwise depend on a checkpoint the donor owns (and that Ray
    deletes with the donor's old checkpoints when checkpoints_to_keep applies). So the donor's files are linked
    into a folder of the experiment that the folds resume from, and reported straight away as this trial's own
    checkpoint, with the metrics the donor reached there (the exploit shows as one report at the donor's epoch)."""
    import ray.tune

    assert start.folder is not None
    stage = experiment / EXPLOITS_DIR / f"{trial_id}_epoch{start.epochs}"
    shutil.rmtree(stage, ignore_errors=True)
    folder = _checkpoint_folder(trial_id, start.epochs, {f: str(start.folder / f"fold_{f}") for f in folds},
                                start.metrics, stage=stage, adopted=True)
    metrics = {**start.metrics, "exploited_from": start.exploited, EPOCHS: start.epochs}
    ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))
    return replace(start, resume={f: str(stage / f"fold_{f}") for f in folds}), stage


def _checkpoint_folder(trial_id: str, epochs: int, staged: dict[int, str], metrics: dict[str, Any],
                       stage: Path | None = None, adopted: bool = False) -> str:
    """One folder for Ray to persist: TRIAL_STATE (the writer, its epochs and the metrics it reported with it)
    and fold_<k>/ with that fold's staged files (hard links)."""
    stage = stage or Path(tempfile.mkdtemp(prefix="viseg-search-ckpt-"))
    stage.mkdir(parents=True, exist_ok=True)
    state = {"trial_id": trial_id, "epochs": epochs, "metrics": metrics, "adopted": adopted}
    (stage / TRIAL_STATE).write_text(json.dumps(state))
    for fold, source in staged.items():
        link_files(sorted(Path(source).iterdir()), stage / f"fold_{fold}")
    return str(stage)


def fold_mean(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The mean of every numeric metric all folds reported (NaN-free values only)."""
    keys = set.intersection(*(set(row) for row in rows)) if rows else set()
    means = {}
    for key in sorted(keys):
        values = [row[key] for row in rows]
        if all(isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v) for v in values):
            means[key] = float(sum(values) / len(values))
    return means


class FoldStreams:
    """The trial's fold tasks: start, read the next item, start again after a lost worker, cancel."""

    def __init__(self, jobs: dict[int, FoldJob], retries: int, resources: dict[str, float]):
        self.jobs, self.retries, self.resources = jobs, retries, resources
        self.attempts = dict.fromkeys(jobs, 0)
        self.streams: dict[int, Any] = {}

    def start(self, fold: int, job: FoldJob) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = ray.util.get_current_placement_group()
        # bundle k (after the trial's empty head bundle, which Ray drops) is the k-th search fold's share
        index = sorted(self.jobs).index(fold)
        strategy = (PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
                    if group is not None else "DEFAULT")
        task = ray.remote(train_fold).options(
            num_returns="streaming", num_cpus=self.resources.get("CPU", 0), num_gpus=self.resources.get("GPU", 0),
            max_retries=0, scheduling_strategy=strategy, name=f"{job.name}/fold_{fold}")
        self.jobs[fold] = job
        self.streams[fold] = task.remote(job)

    def next(self, fold: int, report_from: int) -> dict[str, Any]:
        """The fold's next item; a fold whose worker or node was lost starts again from its own last.ckpt."""
        import ray
        from ray.exceptions import RayTaskError

        while True:
            try:
                return ray.get(next(self.streams[fold]))
            except RayTaskError as exc:  # the training itself failed: the trial fails with its own error
                raise exc.as_instanceof_cause() from None
            except ray.exceptions.RayError as exc:
                self.attempts[fold] += 1
                if self.attempts[fold] > self.retries:
                    raise
                log.warning("fold %d of %s was lost (%s); starting it again from its last checkpoint (attempt "
                            "%d of %d)", fold, self.jobs[fold].name, type(exc).__name__, self.attempts[fold],
                            self.retries)
                self.start(fold, replace(self.jobs[fold], report_from=report_from, resume=None))

    def cancel(self) -> None:
        import ray

        for stream in self.streams.values():
            try:
                ray.cancel(stream, force=True)
            except Exception as exc:  # already finished or gone: nothing left to stop
                log.debug("cancelling a fold task: %s", exc)


def run_search_trial(config: dict[str, Any], variants: dict[str, str], runs_dir: str, folds: list[int],
                     metric: str, mode: str, fold_retries: int, fold_resources: dict[str, float],
                     checkpoint_every: int = 1) -> None:
    """The Tune trainable of a search (see the module docstring). `checkpoint_every`: epochs between the
    checkpoints reported to Ray (PBT's perturbation interval: it only ever exploits at those)."""
    import ray.tune

    quiet_libraries()  # this process reports the checkpoints; its folds train (and quiet themselves) elsewhere
    experiment = Path(runs_dir).parent
    variant = search_variant(config, variants, experiment)
    params = dict(config.get("params") or {})
    trial_id = ray.tune.get_context().get_trial_id()
    name = f"{variant}-{trial_id}"
    start, held = _start(trial_id, folds), None
    if start.exploited:
        log.info("trial %s continues from trial %s's checkpoint at epoch %d with %s", trial_id, start.exploited,
                 start.epochs, params)
        start, held = _adopt(start, trial_id, folds, experiment)
    jobs = {fold: FoldJob(variant_yaml=variants[variant], params=params, fold=fold, name=name, runs_dir=runs_dir,
                          report_from=start.epochs, resume=start.resume[fold]) for fold in folds}
    streams = FoldStreams(dict(jobs), fold_retries, fold_resources)
    try:
        for fold, job in jobs.items():
            streams.start(fold, job)
        _follow(streams, folds, start, trial_id, metric, mode, held, checkpoint_every)
    finally:
        streams.cancel()


def _follow(streams: FoldStreams, folds: list[int], start: Start, trial_id: str, metric: str, mode: str,
            held: Path | None, checkpoint_every: int) -> None:
    """Report every epoch once all folds have it, then the final scores once all folds have finished. `held`:
    an exploited checkpoint the folds started from, removed once each of them has reported an epoch."""

    pending: dict[int, dict[int, dict[str, Any]]] = {fold: {} for fold in folds}
    finals: dict[int, dict[str, Any]] = {}
    epoch, last_score = start.epochs, None
    while True:
        for fold in folds:
            while fold not in finals and epoch not in pending[fold]:
                item = streams.next(fold, epoch)
                if "final" in item:
                    finals[fold] = item["final"]
                elif item["epoch"] >= epoch:  # an earlier epoch comes again only after a fallback: seen already
                    pending[fold][item["epoch"]] = item
        ready = [pending[fold].pop(epoch) for fold in folds if epoch in pending[fold]]
        if not ready:
            break  # every fold has finished: no epoch is left to report
        last_score = _report_epoch(ready, epoch, trial_id, metric, with_checkpoint=(epoch + 1) % checkpoint_every == 0)
        if held is not None and len(ready) == len(folds):
            shutil.rmtree(held, ignore_errors=True)
            held = None
        epoch += 1
    _report_final(finals, folds, epoch, mode, last_score)


def _report_epoch(items: list[dict[str, Any]], epoch: int, trial_id: str, metric: str,
                  with_checkpoint: bool) -> float | None:
    import ray.tune

    rows = [item["metrics"] for item in items]
    metrics: dict[str, Any] = fold_mean(rows)
    metrics |= {f"fold_{item['fold']}/{metric}": item["metrics"].get(metric) for item in items}
    # which process trained each fold's epoch: a fold restarted after a lost worker shows a new one
    metrics |= {f"fold_{item['fold']}/pid": item["pid"] for item in items if item.get("pid")}
    metrics |= {"epoch": epoch, EPOCHS: epoch + 1, "folds_reported": len(items), SCORE: metrics.get(metric)}
    staged = {item["fold"]: item["checkpoint"] for item in items}
    checkpoint = None
    if with_checkpoint and all(staged.values()):
        folder = _checkpoint_folder(trial_id, epoch + 1, staged, metrics)  # type: ignore[arg-type]
        checkpoint = ray.tune.Checkpoint.from_directory(folder)
    try:
        ray.tune.report(metrics, checkpoint=checkpoint)
    finally:
        if checkpoint is not None:
            shutil.rmtree(checkpoint.path, ignore_errors=True)
        for path in staged.values():
            if path:
                shutil.rmtree(path, ignore_errors=True)
                parent = Path(path).parent
                if parent.name == REPORTED_DIR and not any(parent.iterdir()):
                    parent.rmdir()
    return metrics[SCORE]


def _report_final(finals: dict[int, dict[str, Any]], folds: list[int], epochs: int, mode: str,
                  last_score: float | None) -> None:
    """Every fold's full-resolution validation Dice and their mean: the configuration's final score."""
    import ray.tune

    dice = {fold: finals[fold].get("mean_dice") for fold in folds}
    values = [float(v) for v in dice.values() if v is not None]
    mean = sum(values) / len(values) if values else 0.0
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else 0.0
    per_class: dict[str, list[float]] = {}
    for final in finals.values():
        for label, value in (final.get("mean_dice_per_class") or {}).items():
            if value is not None:
                per_class.setdefault(label, []).append(float(value))
    report: dict[str, Any] = {FINAL_METRIC: mean, "final/std_dice": spread, EPOCHS: epochs,
                              "run_dirs": json.dumps({str(f): finals[f]["run_dir"] for f in folds}),
                              "node_id": ",".join(sorted({str(finals[f].get("node_id")) for f in folds}))}
    report |= {f"final/fold_{fold}/mean_dice": value for fold, value in dice.items()}
    report |= {f"final/dice_{label}": sum(v) / len(v) for label, v in per_class.items()}
    # a Dice is maximised: the final score is the full-resolution one; a minimised metric (a loss) stays as is
    report[SCORE] = mean if mode == "max" else last_score
    ray.tune.report(report)
