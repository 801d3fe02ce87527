"""`best=<experiment>`: pick what to deploy from a finished sweep, as nnU-Net's find_best_configuration does.

Pseudo-Dice and the preprocessed-grid validation of training are good enough to watch a run, not to choose
between runs: this step predicts every fold's validation cases again, at the images' full resolution and in
their own geometry (the same `predict_case` as `python -m viseg.predict`), and scores them against the
original label files. Every case is scored by the fold that did not train on it, so each variant's number
is a true cross-validation Dice.

Then, as nnU-Net, pairs of variants are also ensembled (their probabilities averaged per case): nnU-Net pairs
every two of its configurations; a sweep has many variants per configuration, so the pairs are every two of
the best variant of each configuration (2d + 3d_fullres, ...), and the two best variants overall. The best
candidate wins, and for each of its labels keeping only the largest connected component is adopted when it
raises that label's mean Dice. Everything lands in `<experiment>/selection/`:

    predictions/<variant>/<case>.npz   cross-validation probabilities (float16) and what produced them;
                                       reused by a second call only when that is unchanged
    best.json                          every candidate's Dice per label, the winner, postprocessing, command
    postprocessing.json                read by `python -m viseg.predict` (also put in the winning variant's
                                       folder, where `model=<experiment> variant=<v>` finds it by itself)
"""

from __future__ import annotations

import json
import logging
import shlex
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from viseg.cli import to_typed
from viseg.config import BaseConfig
from viseg.data.labels import LabelEncoding, Region
from viseg.errors import ConfigError
from viseg.inference.ensemble import checkpoint_path, experiment_variants, load_ensemble
from viseg.inference.predict import InferenceOptions, predict_case
from viseg.io.atomic import write_atomically
from viseg.io.jsonio import read_json, write_json_atomic
from viseg.io.layout import FINISHED_MARKER, describe_weights
from viseg.progress import track

log = logging.getLogger(__name__)
SELECTION_DIR = "selection"
LoadProbabilities = Callable[[str], np.ndarray]


@dataclass
class Candidate:
    name: str
    members: list[str]  # variants whose probabilities are averaged (one for a single variant)
    dice_per_label: dict[str, float | None]
    mean_dice: float | None  # mean over labels of the per-label mean over cases
    n_cases: int
    run_dirs: list[str] = field(default_factory=list)
    # the members' configurations (2d, 3d_fullres, ...), '+'-joined for an ensemble: pairs are chosen by it
    configuration: str = ""


@dataclass
class Reference:
    """The original label map of a validation case, and which label values the models predict."""

    labels: dict[str, np.ndarray]  # case id -> label map (original geometry)
    label_values: tuple[int, ...]  # index k -> label value; 0 is background
    # a region plan: each output's label values and the label value it writes back (see viseg.data.labels)
    regions: tuple[tuple[int, ...], ...] = ()
    regions_class_order: tuple[int, ...] = ()

    @property
    def scored(self) -> tuple[Region, ...]:
        """What is scored and postprocessed: each label value, or each region."""
        return LabelEncoding(self.label_values[1:], None, self.regions, self.regions_class_order).scored

    @classmethod
    def of(cls, labels: dict[str, np.ndarray], encoding: LabelEncoding) -> Reference:
        return cls(labels, (0, *encoding.foreground_labels), encoding.regions, encoding.regions_class_order)


def finished_variants(experiment: Path) -> dict[str, dict[int, Path]]:

    variants = {}
    for name, folds in experiment_variants(experiment).items():
        done = {k: d for k, d in folds.items() if (d / FINISHED_MARKER).is_file()}
        if done:
            variants[name] = done
    if not variants:
        raise ConfigError(f"{experiment} has no finished run folder under runs/",
                          fix="let the sweep finish (resume= it) before choosing the best configuration")
    return variants


def _validation_cases(run_dir: Path, fold: int) -> tuple[list[Any], Any]:
    """The fold's validation cases (with their files) as the run's dataset config discovers them."""
    from omegaconf import OmegaConf

    from viseg.preprocessing.prepare import discover

    cfg = to_typed(OmegaConf.merge(OmegaConf.structured(BaseConfig), OmegaConf.load(run_dir / "config.yaml")))
    val_ids = set(read_json(run_dir / "splits.json")[fold]["val"])
    cases = [c for c in discover(cfg, progress=False).cases if c.case_id in val_ids]
    if len(cases) != len(val_ids):
        missing = sorted(val_ids - {c.case_id for c in cases})
        raise ConfigError(f"{run_dir}: validation cases {missing[:5]} are no longer in {cfg.dataset.basepath}",
                          fix="point dataset.basepath of the runs at the dataset they were trained on")
    return cases, cfg


def prediction_key(checkpoint_file: Path, checkpoint: str, mirror_axes: tuple[int, ...] | None,
                   step: float) -> dict[str, Any]:
    """What a cached prediction depends on besides the case: the weights file as it is now (path, size and
    mtime change when training continues or the file is replaced), the weights choice, the axes mirrored
    (none without mirroring) and the sliding-window step. Identity rather than a hash of the file: hashing
    every fold's checkpoint on each call would cost more than a small sweep's predictions."""
    stat = checkpoint_file.stat()
    return {"checkpoint_file": str(checkpoint_file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "weights": checkpoint, "mirror_axes": None if mirror_axes is None else list(mirror_axes),
            "step": float(step)}


def cached_key(path: Path) -> dict[str, Any] | None:
    """The key stored inside a cached .npz (None for a missing, unreadable or key-less file: predict again).
    Inside the archive, not beside it, so that predictions and key are replaced together by one rename."""
    try:
        with np.load(path) as archive:
            return json.loads(str(archive["key"])) if "key" in archive.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def predict_validation(variant: str, folds: dict[int, Path], out_dir: Path, checkpoint: str, mirror: bool,
                       references: dict[str, np.ndarray], progress: bool) -> tuple[LabelEncoding, str]:
    """Full-resolution probabilities of every validation case of every fold, cached as .npz per case; a
    cached case is reused only when its key (prediction_key) matches the one this call would use. Returns
    what the variant predicts and its configuration (as its runs were trained), which choose the pairs that
    are ensembled."""
    from viseg.data.nifti import read_case
    out_dir.mkdir(parents=True, exist_ok=True)
    options = InferenceOptions(mirror=mirror)
    encoding, configuration = LabelEncoding(()), ""
    for fold, run_dir in sorted(folds.items()):
        cases, _ = _validation_cases(run_dir, fold)
        ensemble = load_ensemble([run_dir], checkpoint)
        encoding, configuration = ensemble.plans.label_encoding(), ensemble.configuration
        key = prediction_key(checkpoint_path(run_dir, checkpoint), checkpoint,
                             tuple(ensemble.mirror_axes) if mirror else None, options.step)
        stored = json.dumps(key, sort_keys=True)
        for case in track(cases, f"{variant} fold {fold}", enabled=progress):
            target = out_dir / f"{case.case_id}.npz"
            if case.case_id not in references:
                references[case.case_id] = read_case(case).label
            if cached_key(target) == key:
                continue
            arrays = read_case(case, with_label=False)
            probabilities = predict_case(ensemble, arrays.image, arrays.spacing, options)
            write_atomically(target, lambda tmp, p=probabilities, k=stored: np.savez_compressed(
                tmp, probabilities=p.astype(np.float16), key=np.array(k)), keep_ending=True)
    return encoding, configuration


def score(load: LoadProbabilities, reference: Reference, largest_component: Iterable[Region] = ()
          ) -> dict[str, Any]:
    """Mean Dice per label (or region) over the cases (cases where one is absent from both are left out)."""

    from viseg.evaluation.metrics import dice_per_label, mean_ignoring_none, mean_over_cases, region_key
    from viseg.inference.export import keep_largest_component, probabilities_to_labels

    keep, values = list(largest_component), reference.scored
    per_case = []
    for case_id, truth in reference.labels.items():
        prediction = probabilities_to_labels(load(case_id), reference.label_values, reference.regions_class_order)
        if keep:
            prediction = keep_largest_component(prediction, keep)
        per_case.append(dice_per_label(prediction, truth, values))
    means = mean_over_cases(per_case, map(region_key, values))
    return {"dice_per_label": means, "mean_dice": mean_ignoring_none(means.values())}


def _loader(folders: list[Path]) -> LoadProbabilities:
    """Probabilities of a case, averaged over the folders' members (one folder: that variant alone)."""
    def load(case_id: str) -> np.ndarray:
        arrays = [np.load(folder / f"{case_id}.npz")["probabilities"].astype(np.float32) for folder in folders]
        return np.mean(arrays, axis=0) if len(arrays) > 1 else arrays[0]

    return load


def _rank(candidates: list[Candidate]) -> list[Candidate]:
    return sorted(candidates, key=lambda c: -1.0 if c.mean_dice is None else c.mean_dice, reverse=True)


def choose_postprocessing(load: LoadProbabilities, reference: Reference, baseline: dict[str, Any]) -> dict[str, Any]:
    """Per label (or region): keep the largest component only if that raises its mean Dice (nnU-Net's test)."""
    from viseg.evaluation.metrics import region_key

    chosen: list[Region] = []
    for value in reference.scored:
        trial = score(load, reference, [value])["dice_per_label"][region_key(value)]
        before = baseline["dice_per_label"][region_key(value)]
        if trial is not None and before is not None and trial > before:
            chosen.append(value)
    after = score(load, reference, chosen) if chosen else baseline
    return {"largest_component_labels": chosen, "dice_per_label_before": baseline["dice_per_label"],
            "dice_per_label_after": after["dice_per_label"], "mean_dice_before": baseline["mean_dice"],
            "mean_dice_after": after["mean_dice"]}


def predict_command(experiment: Path, best: Candidate, postprocessing_file: Path, checkpoint: str) -> str:
    """The command that deploys the winner with the weights it was scored with (final is predict's default).
    An ensemble lists every finished fold of its members; `load_ensemble` groups them by configuration and
    plan and weighs each group alike, as the members were weighed here."""
    weights = [] if checkpoint == "final" else [f"checkpoint={checkpoint}"]
    if len(best.members) == 1:
        return shlex.join(["python", "-m", "viseg.predict", f"model={experiment}", f"variant={best.members[0]}",
                           *weights, "input=<images folder>", "output=<output folder>"])
    return shlex.join(["python", "-m", "viseg.predict", f"model={','.join(best.run_dirs)}", *weights,
                       f"postprocessing={postprocessing_file}", "input=<images folder>", "output=<output folder>"])


def select_best(experiment: Path, ensembles: bool = True, checkpoint: str = "final", mirror: bool = True,
                progress: bool = True) -> dict[str, Any]:
    experiment = Path(experiment).expanduser().resolve()
    variants = finished_variants(experiment)
    log.info("scoring %d variant(s) of %s with %s", len(variants), experiment, describe_weights(checkpoint))
    selection = experiment / SELECTION_DIR
    folders = {v: selection / "predictions" / v.replace("/", "_") for v in variants}
    labels: dict[str, np.ndarray] = {}
    predicted = {v: predict_validation(v, folds, folders[v], checkpoint, mirror, labels, progress)
                 for v, folds in variants.items()}
    values = {v: encoding for v, (encoding, _) in predicted.items()}
    candidates = []
    for variant, folds in variants.items():
        reference = _reference_for(labels, folders[variant], values[variant])
        result = score(_loader([folders[variant]]), reference)
        candidates.append(Candidate(variant, [variant], result["dice_per_label"], result["mean_dice"],
                                    len(reference.labels), [str(d) for _, d in sorted(folds.items())],
                                    predicted[variant][1]))
    candidates = _rank(candidates)
    if ensembles and len(candidates) >= 2:
        pairs = [_ensemble(pair, folders, labels, values) for pair in ensemble_pairs(candidates)]
        candidates = _rank([*candidates, *(c for c in pairs if c is not None)])
    best = candidates[0]
    member_folders = [folders[m] for m in best.members]
    reference = _reference_for(labels, member_folders[0], values[best.members[0]])
    postprocessing = choose_postprocessing(_loader(member_folders), reference, asdict(best))
    postprocessing_file = selection / "postprocessing.json"
    spec = {"largest_component_labels": [v if isinstance(v, int) else list(v)
                                         for v in postprocessing["largest_component_labels"]]}
    write_json_atomic(postprocessing_file, spec)
    if len(best.members) == 1:
        write_json_atomic(Path(best.run_dirs[0]).parent / "postprocessing.json", spec)
    report = {"experiment": str(experiment), "checkpoint": checkpoint, "mirror": mirror,
              "metric": "mean over labels of the mean Dice over full-resolution cross-validation cases",
              "candidates": [asdict(c) for c in candidates], "best": asdict(best), "postprocessing": postprocessing,
              "postprocessing_file": str(postprocessing_file),
              "predict_command": predict_command(experiment, best, postprocessing_file, checkpoint)}
    write_json_atomic(selection / "best.json", report)
    return report


def _reference_for(labels: dict[str, np.ndarray], folder: Path, encoding: LabelEncoding) -> Reference:
    """The cases this variant predicted (its folds' validation cases)."""
    return Reference.of({c: labels[c] for c in sorted(labels) if (folder / f"{c}.npz").is_file()}, encoding)


def ensemble_pairs(ranked: list[Candidate]) -> list[tuple[Candidate, Candidate]]:
    """The pairs of single variants to ensemble, each pair better-ranked first: the two best variants (which
    may share a configuration), then every two of the best variant of each configuration, nnU-Net's
    find_best_configuration pairing of configurations; a pair named twice is tried once. `ranked`: single
    variants, best first."""
    best_of: dict[str, Candidate] = {}
    for candidate in ranked:
        best_of.setdefault(candidate.configuration, candidate)
    pairs = [(ranked[0], ranked[1])] if len(ranked) >= 2 else []
    pairs += list(combinations(best_of.values(), 2))  # best_of keeps rank order: better member first
    seen: set[frozenset[str]] = set()
    unique = []
    for a, b in pairs:
        if (key := frozenset((a.name, b.name))) not in seen:
            seen.add(key)
            unique.append((a, b))
    return unique


def _ensemble(pair: tuple[Candidate, Candidate], folders: dict[str, Path], labels: dict[str, np.ndarray],
              values: dict[str, LabelEncoding]) -> Candidate | None:
    """Two variants averaged, when they predict the same labels for the same cases (else None: their
    probabilities could not be averaged class by class, or scored on one set of cases)."""
    first, second = pair
    a, b = first.members[0], second.members[0]
    ref_a, ref_b = (_reference_for(labels, folders[v], values[v]) for v in (a, b))
    if values[a] != values[b] or set(ref_a.labels) != set(ref_b.labels):
        log.warning("not ensembling %s and %s: they predict different labels or cases", a, b)
        return None
    result = score(_loader([folders[a], folders[b]]), ref_a)
    return Candidate(f"ensemble({a}+{b})", [a, b], result["dice_per_label"], result["mean_dice"],
                     len(ref_a.labels), [*first.run_dirs, *second.run_dirs],
                     f"{first.configuration}+{second.configuration}")


def render(report: dict[str, Any]) -> str:
    """best.json as a table: each candidate, its configuration(s), Dice per label and mean; then the winner,
    its postprocessing and the command that deploys it."""
    candidates = report["candidates"]
    labels = list(candidates[0]["dice_per_label"])
    width = max(len(c["name"]) for c in candidates) + 2
    # reports written before candidates had a configuration show none
    config_width = max(len("configuration"), *(len(c.get("configuration", "")) for c in candidates)) + 2
    head = (f"  {'candidate':{width}}{'configuration':{config_width}}"
            + "".join(f"{'dice ' + label:>12}" for label in labels) + f"{'mean':>10}")
    lines = [head, "-" * len(head)]
    for c in candidates:
        mark = "*" if c["name"] == report["best"]["name"] else " "
        cells = "".join(f"{_fmt(c['dice_per_label'][label]):>12}" for label in labels)
        lines.append(f"{mark} {c['name']:{width}}{c.get('configuration', '') or '-':{config_width}}{cells}"
                     f"{_fmt(c['mean_dice']):>10}")
    post = report["postprocessing"]
    kept = post["largest_component_labels"]
    configuration = report["best"].get("configuration")
    lines += ["", f"* best: {report['best']['name']} ({f'{configuration}; ' if configuration else ''}"
                  f"{report['best']['n_cases']} cross-validation cases at full "
                  f"resolution, {describe_weights(report['checkpoint'])})",
              f"postprocessing: largest component of labels {kept} (mean Dice {_fmt(post['mean_dice_before'])} -> "
              f"{_fmt(post['mean_dice_after'])})" if kept else "postprocessing: none improves Dice",
              f"written: {Path(report['experiment']) / SELECTION_DIR / 'best.json'}",
              f"predict with:\n  {report['predict_command']}"]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
