"""Model selection's scoring and postprocessing choice on hand-made probabilities (no training needed)."""

from __future__ import annotations

import numpy as np

from viseg.sweep.best import Reference, choose_postprocessing, score


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
