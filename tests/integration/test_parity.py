"""End-to-end parity with nnU-Net v2 on real files: read, verify, fingerprint, plan and split exactly as
`python -m viseg.plan` does, then compare with nnU-Net's own outputs in ../shared/reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parity import configuration_differences, fingerprint_differences, load_json
from viseg.data.pathfinders import get_pathfinder
from viseg.data.splits import kfold_splits
from viseg.planning.fingerprint import extract_fingerprint
from viseg.planning.planner import PlannerSettings, make_plans

pytestmark = pytest.mark.slow


def _fingerprint(root: Path):
    discovery = get_pathfinder("nnunet", root).discover()
    assert discovery.problems == []
    return extract_fingerprint(discovery.info, discovery.cases, num_processes=2, progress=False)


@pytest.mark.parametrize(("variant", "reference"), [("aniso", "synth_aniso"), ("iso", "synth_iso")])
def test_synthetic_dataset_fingerprint_and_plans_match_nnunet(synthetic_reference_dataset, shared: Path,
                                                              variant: str, reference: str):
    root = synthetic_reference_dataset(variant)
    # the generated data are byte-for-byte the data nnU-Net planned (checksums from the reference)
    generated = {c["case"]: c["sha256_arrays"] for c in load_json(root / "cases.json")}
    expected = {c["case"]: c["sha256_arrays"] for c in load_json(shared / "reference" / reference / "raw_cases.json")}
    assert generated == expected

    fingerprint = _fingerprint(root)
    ref_dir = shared / "reference" / reference
    assert fingerprint_differences(fingerprint, load_json(ref_dir / "dataset_fingerprint.json")) == {}
    plans = make_plans(fingerprint, PlannerSettings())
    ref_plans = load_json(ref_dir / "nnUNetPlans.json")
    assert list(plans.transpose_forward) == ref_plans["transpose_forward"]
    for configuration in ("3d_fullres", "2d"):
        assert configuration_differences(plans.configuration(configuration),
                                         ref_plans["configurations"][configuration]) == {}


def test_acdc_fingerprint_plans_and_splits_match_nnunet(shared: Path):
    ref_dir = shared / "reference" / "acdc"
    fingerprint = _fingerprint(shared / "data" / "acdc")
    assert fingerprint_differences(fingerprint, load_json(ref_dir / "dataset_fingerprint.json")) == {}
    plans = make_plans(fingerprint, PlannerSettings())
    ref_plans = load_json(ref_dir / "nnUNetPlans.json")
    for configuration in ("3d_fullres", "2d"):
        assert configuration_differences(plans.configuration(configuration),
                                         ref_plans["configurations"][configuration]) == {}
    assert kfold_splits(fingerprint.case_ids) == load_json(ref_dir / "splits_final.json")
