"""The sweep summary reads only files: real experiment folders written in tmp_path, known numbers out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from viseg.sweep.summary import Stat, render_table, summarize, write_summary

DATASET, PLAN = "Dataset001_Toy", "nnUNetPlans_3d_fullres"
# variant -> fold -> mean_dice_per_class; std is numpy's ddof=0, so the expectations use the same formula
KNOWN = {
    "lr_scheduler-poly": {0: {"1": 0.8, "2": 0.6}, 1: {"1": 0.9, "2": None}, 2: {"1": 0.7, "2": 0.4}},
    "default": {0: {"1": 0.5, "2": 0.5}, 1: {"1": 0.6, "2": 0.5}, 2: {"1": 0.7, "2": 0.5}},
}


def write_fold(experiment: Path, variant: str, fold: int, per_class: dict[str, float | None],
               finished: bool = True, plan: str = PLAN) -> Path:
    """One run folder as viseg.train leaves it: validation/summary.json, then finished.json."""
    run_dir = experiment / "runs" / DATASET / plan / variant / f"fold_{fold}"
    (run_dir / "validation").mkdir(parents=True)
    defined = [v for v in per_class.values() if v is not None]
    mean_dice = float(np.mean(defined)) if defined else None
    summary = {"fold": fold, "cases": {"case_000": dict(per_class)}, "mean_dice_per_class": per_class,
               "mean_dice": mean_dice}
    (run_dir / "validation" / "summary.json").write_text(json.dumps(summary))
    if finished:
        (run_dir / "finished.json").write_text(json.dumps({"epochs": 1, "ema_pseudo_dice": 0.5,
                                                           "mean_dice": mean_dice}))
    return run_dir


def write_known(experiment: Path) -> None:
    for variant, folds in KNOWN.items():
        for fold, per_class in folds.items():
            write_fold(experiment, variant, fold, per_class)


def expected(values: list[float]) -> tuple[float, float, int]:
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5, len(values)


def by_name(summaries):
    return {s.variant: s for s in summaries}


def test_two_variants_three_folds_exact_means_stds_and_best(tmp_path):
    write_known(tmp_path)
    summaries = summarize(tmp_path)
    assert [s.variant for s in summaries] == ["lr_scheduler-poly", "default"]  # best first
    poly, default = summaries
    assert poly.best and not default.best
    assert poly.folds_finished == [0, 1, 2] and poly.folds_failed == [] and poly.folds_unfinished == []
    assert poly.dice_per_class["1"] == pytest.approx(expected([0.8, 0.9, 0.7]))
    assert poly.dice_per_class["2"] == pytest.approx(expected([0.6, 0.4]))  # fold 1's None skipped
    assert poly.dice_per_class["2"].n == 2
    assert poly.overall == pytest.approx(expected([0.7, 0.9, 0.55]))
    assert default.dice_per_class["2"] == pytest.approx((0.5, 0.0, 3))
    assert default.overall == pytest.approx(expected([0.5, 0.55, 0.6]))
    assert poly.fold_dice == pytest.approx({0: 0.7, 1: 0.9, 2: 0.55})


def test_std_is_ddof_0_and_single_fold_gives_zero(tmp_path):
    write_fold(tmp_path, "one", 0, {"1": 0.8})
    write_fold(tmp_path, "two", 0, {"1": 0.6})
    write_fold(tmp_path, "two", 1, {"1": 0.8})
    summaries = by_name(summarize(tmp_path))
    assert summaries["one"].overall == pytest.approx((0.8, 0.0, 1))
    assert summaries["two"].overall == pytest.approx((0.7, 0.1, 2))  # ddof=1 would give 0.1414


def test_unfinished_fold_is_listed_but_not_counted(tmp_path):
    write_known(tmp_path)
    write_fold(tmp_path, "default", 3, {"1": 1.0, "2": 1.0}, finished=False)  # running: summary but no marker
    (tmp_path / "runs" / DATASET / PLAN / "default" / "fold_4").mkdir()  # just started
    default = by_name(summarize(tmp_path))["default"]
    assert default.folds_finished == [0, 1, 2]
    assert default.folds_unfinished == [3, 4]
    assert default.overall == pytest.approx(expected([0.5, 0.55, 0.6]))
    assert "2 fold(s) still unfinished" in render_table(summarize(tmp_path))


def test_errors_json_marks_failed_folds(tmp_path):
    write_known(tmp_path)
    write_fold(tmp_path, "default", 3, {"1": 0.1}, finished=False)
    errors = [{"variant": "default", "fold": 3, "error": "CUDA out of memory"},
              {"variant": "lr_scheduler-poly", "fold": 0, "error": "retried and finished later"},
              {"variant": "batch_size-8", "fold": 0, "error": "failed before its run folder existed"},
              {"variant": "broken-entry"}]  # no fold: skipped with a warning
    (tmp_path / "errors.json").write_text(json.dumps(errors))
    summaries = by_name(summarize(tmp_path))
    assert summaries["default"].folds_failed == [3] and summaries["default"].folds_unfinished == []
    assert summaries["default"].errors == {3: "CUDA out of memory"}
    assert summaries["lr_scheduler-poly"].folds_failed == []  # finished wins over an older error
    crashed = summaries["batch_size-8"]
    assert crashed.folds_finished == [] and crashed.folds_failed == [0] and crashed.overall == (None, None, 0)
    assert "broken-entry" not in summaries


def test_label_with_only_none_values_has_n_zero(tmp_path):
    write_fold(tmp_path, "v", 0, {"1": 0.9, "2": None})
    write_fold(tmp_path, "v", 1, {"1": 0.7, "2": None})
    (summary,) = summarize(tmp_path)
    assert summary.dice_per_class["2"] == Stat(None, None, 0)
    assert summary.overall == pytest.approx((0.8, 0.1, 2))
    assert "-" in render_table([summary]).splitlines()[2]


def test_ties_prefer_fewer_failures_then_name(tmp_path):
    for variant in ("b", "a", "c"):
        write_fold(tmp_path, variant, 0, {"1": 0.5})
    (tmp_path / "errors.json").write_text(json.dumps([{"variant": "a", "fold": 1, "error": "x"}]))
    summaries = summarize(tmp_path)
    assert [s.variant for s in summaries] == ["b", "c", "a"]
    assert [s.best for s in summaries] == [True, False, False]


def test_same_variant_name_in_two_plans_is_kept_apart(tmp_path):
    write_fold(tmp_path, "default", 0, {"1": 0.9}, plan="nnUNetPlans_3d_fullres")
    write_fold(tmp_path, "default", 0, {"1": 0.3}, plan="nnUNetPlans_2d")
    write_fold(tmp_path, "other", 0, {"1": 0.5})
    summaries = by_name(summarize(tmp_path))
    assert set(summaries) == {"nnUNetPlans_3d_fullres/default", "nnUNetPlans_2d/default", "other"}
    assert summaries["nnUNetPlans_3d_fullres/default"].best


def test_render_table_shows_numbers_and_best_marker(tmp_path):
    write_known(tmp_path)
    table = render_table(summarize(tmp_path))
    lines = table.splitlines()
    assert "dice 1" in lines[0] and "dice 2" in lines[0] and "overall" in lines[0]
    best_row = next(line for line in lines if "lr_scheduler-poly" in line)
    assert best_row.startswith("* ")
    assert "0.8000 ± 0.0816" in best_row and "0.5000 ± 0.1000" in best_row and "0.7167 ± 0.1434" in best_row
    assert "3/0" in best_row
    default_row = next(line for line in lines if line.lstrip().startswith("default"))
    assert not default_row.startswith("*") and "0.5500 ± 0.0408" in default_row


def test_render_table_variant_without_finished_fold(tmp_path):
    write_fold(tmp_path, "ok", 0, {"1": 0.5})
    (tmp_path / "errors.json").write_text(json.dumps([{"variant": "bad", "fold": 0, "error": "boom"}]))
    row = next(line for line in render_table(summarize(tmp_path)).splitlines() if "bad" in line)
    assert "0/1" in row and row.split()[-1] == "-"


def test_write_summary_writes_valid_json_csv_png(tmp_path):
    write_known(tmp_path)
    summaries = summarize(tmp_path)
    paths = write_summary(tmp_path, summaries)
    assert paths == {kind: tmp_path / f"summary.{kind}" for kind in ("json", "csv", "png")}
    data = json.loads(paths["json"].read_text())
    assert data == json.loads(json.dumps([s.to_dict() for s in summaries]))
    assert data[0]["variant"] == "lr_scheduler-poly" and data[0]["best"] is True
    assert data[0]["dice_per_class"]["1"]["mean"] == pytest.approx(0.8)
    rows = list(csv.DictReader(paths["csv"].open(newline="")))
    assert [r["variant"] for r in rows] == ["lr_scheduler-poly", "default"]
    assert float(rows[0]["overall_mean"]) == pytest.approx(expected([0.7, 0.9, 0.55])[0])
    assert float(rows[1]["dice_2_std"]) == pytest.approx(0.0)
    assert rows[0]["folds_finished"] == "3" and rows[0]["best"] == "1"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".summary.*"))  # no temporary files left behind


def test_empty_experiment(tmp_path):
    assert summarize(tmp_path) == []
    assert "no finished trials" in render_table([])
    paths = write_summary(tmp_path, [])
    assert json.loads(paths["json"].read_text()) == []
    assert next(csv.reader(paths["csv"].open(newline="")))[0] == "variant"
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_the_variant_name_summary_prints_is_the_one_predict_and_best_take(tmp_path: Path):
    """Two plans holding a variant of the same name: every command must call each one the same."""
    from viseg.inference.ensemble import experiment_variants
    from viseg.sweep.summary import summarize

    experiment = tmp_path / "sweep"
    for plan in ("PlainConvUNet-3d_fullres-aaaa", "PlainConvUNet-2d-bbbb"):
        fold = experiment / "runs" / "Dataset-1234" / plan / "default" / "fold_0"
        fold.mkdir(parents=True)
        (fold / "config.yaml").write_text("fold: 0\n")
    printed = {s.variant for s in summarize(experiment)}
    assert printed == {"PlainConvUNet-3d_fullres-aaaa/default", "PlainConvUNet-2d-bbbb/default"}
    assert set(experiment_variants(experiment)) == printed
