"""Make nnU-Net v2 plan references for datasets large enough to need (or almost need) a 3d_lowres stage.

nnU-Net plans from the dataset fingerprint alone, so no images are needed: this script writes a synthetic,
deterministic `dataset_fingerprint.json` and `dataset.json` per dataset, runs nnU-Net's own
`nnUNetv2_plan_experiment` on them in temporary nnUNet_raw / nnUNet_preprocessed folders, and copies the
resulting `nnUNetPlans.json` next to them under tests/data/nnunet_lowres/<name>/.

The planner still lists imagesTr and reads its first image to choose a reader (the plans' image_reader_writer),
so one 2x2x2 NIfTI stands in for the cases; numTraining in dataset.json, not the files, sets the dataset size.

Run it with nnU-Net's venv (it needs numpy and nibabel; nnU-Net itself runs in a subprocess):

    bench/.venv-nnunet/bin/python bench/make_lowres_plan_references.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data" / "nnunet_lowres"

CT_INTENSITIES = {"max": 3071.0, "mean": 95.3, "median": 62.0, "min": -1024.0, "percentile_00_5": -958.0,
                  "percentile_99_5": 1187.0, "std": 163.8}
MR_INTENSITIES = {"max": 2841.0, "mean": 412.6, "median": 398.0, "min": 0.0, "percentile_00_5": 31.0,
                  "percentile_99_5": 1405.0, "std": 211.4}


@dataclass(frozen=True)
class Variant:
    """One synthetic dataset: per-case spacing and shape drawn around a median (axis order as nnU-Net reads
    NIfTI with SimpleITK, i.e. z, y, x)."""

    name: str
    dataset_id: int
    description: str
    channel: str
    num_cases: int
    spacing: tuple[float, float, float]
    spacing_jitter: tuple[float, float, float]  # relative, uniform +-
    shape: tuple[int, int, int]
    shape_jitter: tuple[float, float, float]  # relative, uniform +-
    relative_size_after_cropping: float


VARIANTS = [
    # Whole-body-CT-like, ~400^3 voxels at ~1 mm: the 3d_fullres patch covers ~3 % of the median image, so
    # nnU-Net finds a 3d_lowres stage (and batch_dice of 3d_fullres becomes True).
    Variant("ct_large", 951, "isotropic CT, median ~400^3 at 1 mm: 3d_lowres exists", "CT", 20,
            (1.0, 0.9, 0.9), (0.2, 0.1, 0.1), (400, 440, 440), (0.15, 0.1, 0.1), 1.0),
    # Abdominal-MR-like, thick slices: the spacing search first coarsens only the fine in-plane axes
    # (nnU-Net's "anisotropic axes first" branch) before coarsening all of them; 3d_lowres exists.
    Variant("mr_aniso_large", 952, "anisotropic MR, 3 mm slices, 512^2 in-plane: 3d_lowres exists", "T2", 16,
            (3.0, 0.7, 0.7), (0.2, 0.05, 0.05), (120, 512, 512), (0.2, 0.05, 0.05), 0.85),
    # Just too small: the fullres patch covers less than 25 % of the median image, so nnU-Net searches a
    # 3d_lowres spacing, but the one it finds shrinks the image by less than 2x and the stage is dropped.
    Variant("ct_drop", 953, "isotropic CT, median ~210^3 at 1 mm: 3d_lowres searched, then dropped", "CT", 12,
            (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (210, 212, 208), (0.06, 0.06, 0.06), 1.0),
]


def _cases(v: Variant, seed: int) -> tuple[list[list[float]], list[list[int]]]:
    rng = np.random.default_rng(seed)
    spacings, shapes = [], []
    for _ in range(v.num_cases):
        s = [round(m * (1 + rng.uniform(-j, j)), 4) for m, j in zip(v.spacing, v.spacing_jitter)]
        n = [int(round(m * (1 + rng.uniform(-j, j)))) for m, j in zip(v.shape, v.shape_jitter)]
        spacings.append(s)
        shapes.append(n)
    return spacings, shapes


def fingerprint(v: Variant, seed: int) -> dict[str, Any]:
    """A dataset_fingerprint.json as nnUNetv2_extract_fingerprint writes it (same keys)."""
    spacings, shapes = _cases(v, seed)
    return {
        "foreground_intensity_properties_per_channel": {
            "0": CT_INTENSITIES if v.channel == "CT" else MR_INTENSITIES},
        "median_relative_size_after_cropping": v.relative_size_after_cropping,
        "shapes_after_crop": shapes,
        "spacings": spacings,
    }


def dataset_json(v: Variant, seed: int) -> dict[str, Any]:
    return {
        "channel_names": {"0": v.channel},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": v.num_cases,
        "file_ending": ".nii.gz",
        "name": v.name,
        "description": f"synthetic fingerprint, {v.description}, seed={seed}",
    }


def plan_with_nnunet(v: Variant, fp: dict[str, Any], ds: dict[str, Any],
                     nnunet_bin: Path) -> tuple[dict[str, Any], str]:
    """nnU-Net's plans for the fingerprint, and a one-line account of its 3d_lowres search."""
    import nibabel as nib

    with tempfile.TemporaryDirectory() as tmp:
        folder = f"Dataset{v.dataset_id:03d}_{v.name}"
        raw, pre = Path(tmp, "raw", folder), Path(tmp, "preprocessed", folder)
        (raw / "imagesTr").mkdir(parents=True)
        pre.mkdir(parents=True)
        (raw / "dataset.json").write_text(json.dumps(ds, indent=2))
        (pre / "dataset_fingerprint.json").write_text(json.dumps(fp, indent=2))
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)),
                 str(raw / "imagesTr" / "case_000_0000.nii.gz"))
        env = os.environ | {"nnUNet_raw": str(raw.parent), "nnUNet_preprocessed": str(pre.parent),
                            "nnUNet_results": str(Path(tmp, "results"))}
        log = subprocess.run([str(nnunet_bin / "nnUNetv2_plan_experiment"), "-d", str(v.dataset_id)],
                             env=env, check=True, capture_output=True, text=True).stdout
        plans = json.loads((pre / "nnUNetPlans.json").read_text())
        # which branch of the lowres rule the planner took, from its own messages
        steps = log.count("Attempting to find 3d_lowres config")
        dropped = "Dropping 3d_lowres config" in log
        return plans, f"{steps} lowres search steps, {'dropped' if dropped else 'kept' if steps else 'none'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="variant names (default: all)")
    parser.add_argument("--nnunet-bin", type=Path, default=Path(sys.executable).parent,
                        help="folder holding nnUNetv2_plan_experiment (default: this Python's bin)")
    args = parser.parse_args()
    for v in VARIANTS:
        if args.only and v.name not in args.only:
            continue
        out = OUT / v.name
        out.mkdir(parents=True, exist_ok=True)
        fp, ds = fingerprint(v, args.seed), dataset_json(v, args.seed)
        plans, search = plan_with_nnunet(v, fp, ds, args.nnunet_bin)
        for name, data in (("dataset_fingerprint.json", fp), ("dataset.json", ds), ("nnUNetPlans.json", plans)):
            (out / name).write_text(json.dumps(data, indent=4) + "\n")
        lowres = plans["configurations"].get("3d_lowres")
        print(f"{v.name}: configurations {list(plans['configurations'])}, 3d_fullres batch_dice "
              f"{plans['configurations']['3d_fullres']['batch_dice']}, 3d_fullres patch "
              f"{plans['configurations']['3d_fullres']['patch_size']}, 3d_lowres patch "
              f"{lowres['patch_size'] if lowres else None}; {search}")
    shutil.rmtree(OUT / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
