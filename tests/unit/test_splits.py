"""Cross-validation splits: nnU-Net's for the same ids, and grouped splits that keep patients together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from viseg.data.splits import grouped_splits, kfold_splits, load_user_splits, make_splits
from viseg.errors import ConfigError, DatasetError


@pytest.fixture(scope="module")
def acdc_reference(shared: Path) -> list[dict]:
    return json.loads((shared / "reference" / "acdc" / "splits_final.json").read_text())


def _ids(splits: list[dict]) -> list[str]:
    return sorted(set(splits[0]["train"]) | set(splits[0]["val"]))


def test_kfold_matches_nnunet_splits_final(acdc_reference):
    assert kfold_splits(_ids(acdc_reference)) == acdc_reference


def test_kfold_ignores_input_order(acdc_reference):
    assert kfold_splits(list(reversed(_ids(acdc_reference)))) == acdc_reference


def test_every_case_is_validated_exactly_once():
    ids = [f"case_{i:02d}" for i in range(23)]
    splits = kfold_splits(ids, n_folds=5)
    assert sorted(c for s in splits for c in s["val"]) == ids
    assert [len(s["val"]) for s in splits] == [5, 5, 5, 4, 4]
    assert all(not set(s["train"]) & set(s["val"]) for s in splits)


def test_grouped_splits_keep_patients_together(acdc_reference):
    ids = _ids(acdc_reference)
    splits = grouped_splits(ids, r"(patient\d+)")
    assert sorted(c for s in splits for c in s["val"]) == ids
    for split in splits:
        val_patients = {c.split("_")[0] for c in split["val"]}
        assert not val_patients & {c.split("_")[0] for c in split["train"]}
    # nnU-Net's default split does separate the two frames of some patients
    def patients(cases: list[str]) -> set[str]:
        return {c.split("_")[0] for c in cases}

    assert any(patients(s["val"]) & patients(s["train"]) for s in acdc_reference)


def test_group_pattern_that_does_not_match_names_the_case():
    with pytest.raises(ConfigError, match="case_1"):
        make_splits(["case_1", "patient002_a"], n_folds=2, group_pattern=r"(patient\d+)")


def test_too_few_cases_for_folds():
    with pytest.raises(ConfigError, match="3 cases"):
        kfold_splits(["a", "b", "c"], n_folds=5)


def test_shipped_splits_are_validated(tmp_path: Path):
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps([{"train": ["a"], "val": ["ghost"]}]))
    with pytest.raises(DatasetError, match="ghost"):
        load_user_splits(path, ["a", "b"])
    path.write_text(json.dumps([{"train": ["a"], "val": ["b"]}]))
    assert load_user_splits(path, ["a", "b"]) == [{"train": ["a"], "val": ["b"]}]
