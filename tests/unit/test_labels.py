"""dataset.json's ignore label (nnU-Net's sparse annotation): never a class, never predicted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.parity import fingerprint_from_reference
from viseg.data.labels import LabelEncoding, choose_foreground_labels, class_labels, ignore_label_problem
from viseg.errors import ConfigError
from viseg.planning.network import build_model
from viseg.planning.planner import PlannerSettings, make_plans

LABELS = {"background": 0, "organ": 1, "vessel": 2, "ignore": 3}


def test_every_label_but_ignore_is_a_class():
    assert class_labels(LABELS) == (1, 2)
    assert choose_foreground_labels(LABELS, None, "demo") == (1, 2)
    assert choose_foreground_labels(LABELS, [2], "demo") == (2,)


def test_listing_the_ignore_label_as_foreground_is_refused():
    with pytest.raises(ConfigError, match=r"foreground_labels=\[1, 3\] lists 3, the 'ignore' label") as info:
        choose_foreground_labels(LABELS, [1, 3], "demo")
    assert "remove 3 from foreground_labels" in str(info.value)


def test_ignore_must_be_the_highest_label_value():
    assert ignore_label_problem(LABELS) is None
    assert ignore_label_problem({"background": 0, "organ": 1}) is None
    problem = ignore_label_problem({"background": 0, "ignore": 1, "organ": 2})
    assert problem is not None and "highest label value" in problem


def test_the_encoding_puts_ignore_after_the_classes():
    labels = LabelEncoding((2, 1), ignore_label=3)
    assert labels.num_classes == 3 and labels.ignore_index == 3 and labels.label_codes == (1, 2, 3)
    assert LabelEncoding((1,)).ignore_index is None
    with pytest.raises(ConfigError):
        LabelEncoding((1, 3), ignore_label=3)


def test_the_plan_and_network_have_no_output_for_the_ignore_label(shared: Path):
    fingerprint = fingerprint_from_reference(shared, "acdc")
    fingerprint = dataclasses.replace(fingerprint, labels={**fingerprint.labels, "ignore": 4})
    plans = make_plans(fingerprint, PlannerSettings())
    assert plans.foreground_labels == (1, 2, 3) and plans.num_classes == 4 and plans.ignore_label == 4
    network = build_model(plans, "2d", deep_supervision=False)
    with torch.no_grad():
        output = network(torch.zeros(1, plans.num_channels, *plans.configuration("2d").patch_size))
    assert output.shape[1] == 4  # background and the three classes: no head for the ignore label
    with pytest.raises(ConfigError, match="'ignore' label"):
        make_plans(fingerprint, PlannerSettings(foreground_labels=(1, 4)))
