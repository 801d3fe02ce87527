"""Model selection's scoring, postprocessing choice and ensemble pairs on hand-made probabilities and candidates
(no training needed)."""

from __future__ import annotations

import shlex
from dataclasses import asdict
from pathlib import Path

import numpy as np

from viseg.data.labels import LabelEncoding
from viseg.sweep.best import (
    Candidate,
    Reference,
    _ensemble,
    choose_postprocessing,
    ensemble_pairs,
    predict_command,
    render,
    score,
)


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.stack([(labels == k).astype(np.float32) for k in range(n_classes)])


def test_largest_component_is_kept_only_for_labels_where_it_raises_dice():
    truth = np.zeros((1, 20, 20), dtype=np.int16)
    truth[0, 2:8, 2:8] = 1  # label 1: one blob
    truth[0, 12:16, 2:6] = 2  # label 2: two blobs, both real
    truth[0, 12:16, 12:16] = 2
    predicted = truth.copy()
    predicted[0, 16:18, 16:18] = 1  # a spurious label-1 speck: removing it helps
    load = {"case": one_hot(predicted, 3)}.__getitem__
    reference = Reference({"case": truth}, (0, 1, 2))
    baseline = score(load, reference)
    assert baseline["dice_per_label"]["2"] == 1.0 and baseline["dice_per_label"]["1"] < 1.0
    chosen = choose_postprocessing(load, reference, baseline)
    # label 2's second blob would be deleted by keeping one component: not chosen
    assert chosen["largest_component_labels"] == [1]
    assert chosen["dice_per_label_after"] == {"1": 1.0, "2": 1.0} and chosen["mean_dice_after"] == 1.0


def test_score_leaves_out_cases_where_a_label_is_absent_from_both():
    truth_a = np.zeros((1, 8, 8), dtype=np.int16)
    truth_a[0, 1:4, 1:4] = 1
    truth_b = np.zeros((1, 8, 8), dtype=np.int16)  # no label 1 anywhere: not a zero, not counted
    load = {"a": one_hot(truth_a, 2), "b": one_hot(truth_b, 2)}.__getitem__
    result = score(load, Reference({"a": truth_a, "b": truth_b}, (0, 1)))
    assert result == {"dice_per_label": {"1": 1.0}, "mean_dice": 1.0}


def candidate(name: str, configuration: str, mean_dice: float, folds: int = 2) -> Candidate:
    return Candidate(name, [name], {"1": mean_dice}, mean_dice, 4,
                     [f"/exp/runs/d/p/{name}/fold_{k}" for k in range(folds)], configuration)


def names(pairs: list[tuple[Candidate, Candidate]]) -> list[tuple[str, str]]:
    return [(a.name, b.name) for a, b in pairs]


def test_pairs_are_the_top_two_and_every_two_of_each_configurations_best_variant():
    ranked = [candidate("a", "2d", 0.9), candidate("b", "2d", 0.8), candidate("c", "3d_fullres", 0.7),
              candidate("d", "3d_lowres", 0.6), candidate("e", "3d_fullres", 0.5)]
    assert names(ensemble_pairs(ranked)) == [("a", "b"), ("a", "c"), ("a", "d"), ("c", "d")]


def test_a_pair_named_twice_is_tried_once_and_one_configuration_pairs_its_top_two():
    cross_top = [candidate("a", "2d", 0.9), candidate("c", "3d_fullres", 0.8), candidate("b", "2d", 0.7)]
    assert names(ensemble_pairs(cross_top)) == [("a", "c")]
    one_configuration = [candidate(n, "3d_fullres", 1 - i / 10) for i, n in enumerate("abc")]
    assert names(ensemble_pairs(one_configuration)) == [("a", "b")]
    assert ensemble_pairs(one_configuration[:1]) == []


def test_variants_predicting_other_labels_are_not_ensembled(tmp_path: Path):
    """The rule best= keeps across configurations: the same labels for the same cases, or no ensemble."""
    truth = np.zeros((1, 6, 6), dtype=np.int16)
    truth[0, 1:3, 1:3] = 1
    folders = {v: tmp_path / v for v in ("a", "b", "c")}
    for folder in folders.values():
        folder.mkdir()
        np.savez(folder / "case.npz", probabilities=one_hot(truth, 2))
    labels = {"case": truth}
    same, other = LabelEncoding((1,)), LabelEncoding((1, 2))
    a, b, c = candidate("a", "2d", 0.9), candidate("b", "3d_fullres", 0.8), candidate("c", "3d_fullres", 0.7)
    values = {"a": same, "b": same, "c": other}
    ensemble = _ensemble((a, b), folders, labels, values)
    assert ensemble is not None and ensemble.members == ["a", "b"] and ensemble.configuration == "2d+3d_fullres"
    assert ensemble.mean_dice == 1.0 and ensemble.run_dirs == [*a.run_dirs, *b.run_dirs]
    assert _ensemble((a, c), folders, labels, values) is None


def test_an_ensembles_command_lists_every_fold_of_both_members_and_the_table_shows_configurations(tmp_path: Path):
    a, b = candidate("a", "2d", 0.9, folds=3), candidate("b", "3d_fullres", 0.8, folds=2)
    both = Candidate("ensemble(a+b)", ["a", "b"], {"1": 0.95}, 0.95, 4, [*a.run_dirs, *b.run_dirs], "2d+3d_fullres")
    command = shlex.split(predict_command(Path("/exp"), both, tmp_path / "post.json", "best"))
    assert f"model={','.join(a.run_dirs + b.run_dirs)}" in command and len(a.run_dirs + b.run_dirs) == 5
    assert "checkpoint=best" in command and f"postprocessing={tmp_path / 'post.json'}" in command
    post = {"largest_component_labels": [], "mean_dice_before": 0.95, "mean_dice_after": 0.95}
    report = {"experiment": "/exp", "checkpoint": "best", "candidates": [asdict(c) for c in (both, a, b)],
              "best": asdict(both), "postprocessing": post, "predict_command": shlex.join(command)}
    table = render(report).splitlines()
    assert "configuration" in table[0]
    assert table[2].split()[:3] == ["*", "ensemble(a+b)", "2d+3d_fullres"] and table[4].split()[1] == "3d_fullres"
    assert any(line.startswith("* best: ensemble(a+b) (2d+3d_fullres; 4 cross-validation cases") for line in table)
    old = {**report, "candidates": [{k: v for k, v in asdict(a).items() if k != "configuration"}]}
    assert render(old).splitlines()[2].split()[:2] == ["a", "-"]  # a best.json written before configurations
