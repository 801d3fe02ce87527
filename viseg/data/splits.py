"""Deterministic cross-validation splits.

`kfold_splits` reproduces nnU-Net's splits_final.json for the same case ids (sklearn's shuffled KFold with
seed 12345, re-implemented with numpy's RandomState so sklearn is not a dependency). `grouped_splits`
keeps all cases of one patient in one fold (ACDC has two frames per patient, which nnU-Net's default
split separates).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from viseg.errors import ConfigError, DatasetError
from viseg.io.jsonio import read_json, write_json_atomic

Split = dict[str, list[str]]


def _kfold_indices(n_items: int, n_folds: int, seed: int) -> list[np.ndarray]:
    """Validation indices per fold, as sklearn.model_selection.KFold(shuffle=True, random_state=seed)."""
    indices = np.arange(n_items)
    np.random.RandomState(seed).shuffle(indices)
    sizes = np.full(n_folds, n_items // n_folds, dtype=int)
    sizes[: n_items % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(indices[bounds[i]: bounds[i + 1]]) for i in range(n_folds)]


def kfold_splits(case_ids: list[str], n_folds: int = 5, seed: int = 12345) -> list[Split]:
    ids = sorted(case_ids)
    if len(ids) < n_folds:
        raise ConfigError(f"{len(ids)} cases cannot be split into {n_folds} folds",
                          fix=f"set splits.n_folds to at most {len(ids)} or add cases")
    splits = []
    for val_idx in _kfold_indices(len(ids), n_folds, seed):
        val = set(val_idx.tolist())
        splits.append({"train": [c for i, c in enumerate(ids) if i not in val],
                       "val": [c for i, c in enumerate(ids) if i in val]})
    return splits


def group_of(case_id: str, pattern: re.Pattern[str]) -> str:
    match = pattern.search(case_id)
    if match is None:
        raise ConfigError(f"splits.group_pattern {pattern.pattern!r} does not match case id {case_id!r}",
                          fix="use a regex whose first group names the patient, e.g. '(patient\\d+)'")
    return match.group(1) if match.groups() else match.group(0)


def grouped_splits(case_ids: list[str], group_pattern: str, n_folds: int = 5, seed: int = 12345) -> list[Split]:
    """k-fold over patients instead of cases: a patient's cases are all in one fold."""
    pattern = re.compile(group_pattern)
    members: dict[str, list[str]] = defaultdict(list)
    for case_id in sorted(case_ids):
        members[group_of(case_id, pattern)].append(case_id)
    group_folds = kfold_splits(list(members), n_folds, seed)
    return [{key: sorted(c for g in fold[key] for c in members[g]) for key in ("train", "val")}
            for fold in group_folds]


def make_splits(case_ids: list[str], n_folds: int = 5, seed: int = 12345,
                group_pattern: str | None = None) -> list[Split]:
    if group_pattern:
        return grouped_splits(case_ids, group_pattern, n_folds, seed)
    return kfold_splits(case_ids, n_folds, seed)


def load_user_splits(path: Path, case_ids: list[str]) -> list[Split]:
    """A splits_final.json shipped with the dataset (nnU-Net's convention) wins over generated splits;
    it must name only existing cases."""
    splits = read_json(path)
    known = set(case_ids)
    if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
        raise DatasetError(f"{path} must be a list of {{'train': [...], 'val': [...]}}",
                           fix="fix the file or delete it to let viseg generate splits")
    unknown = sorted({c for s in splits for c in s["train"] + s["val"]} - known)
    if unknown:
        raise DatasetError(f"{path} names cases that do not exist: {unknown[:5]}",
                           fix="remove them from the splits file or add the cases")
    return [{"train": list(s["train"]), "val": list(s["val"])} for s in splits]


def save_splits(path: Path, splits: list[Split]) -> None:
    write_json_atomic(path, splits)
