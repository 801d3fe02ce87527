"""Preprocessing, nnU-Net v2 vs viseg: wall-clock time on the same cores, and whether the arrays agree.

Measured: the wall-clock time of preprocessing every case of a raw nnU-Net-layout dataset for 3d_fullres
(transpose, crop, normalize, resample, foreground locations, write), interpreter start-up and imports
included. Both tools run as fresh subprocesses with the same number of worker processes, after each has
fingerprinted and planned the same cases (untimed):

* nnU-Net: ``nnUNetv2_preprocess -d ID -c 3d_fullres -np N --no_pbar`` from ``bench/.venv-nnunet`` after
  ``nnUNetv2_plan_and_preprocess --no_pp``; its output folder is removed before each round;
* viseg: ``python -c`` calling ``viseg.preprocessing.prepare.prepare`` (verification, fingerprint and plan come
  from its cache) and ``viseg.preprocessing.preprocess.preprocess_dataset``, with the preprocessed folder removed
  before each round.

The first ``--cases`` cases (sorted) are linked into a temporary dataset. The tools alternate (nnU-Net,
viseg, ...) so that background load drifting over time hits both alike, and the medians are compared.

Reading the ratio: ``median(viseg) / median(nnU-Net)``; below 1 viseg is faster.

Agreement (after the last round, untimed, read by nnU-Net's venv): per case the data's max absolute
difference, seg equality, class locations (nnU-Net's class_locations vs viseg's _fg.npz) and crop bbox;
plus the plan values preprocessing depends on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers live beside this script
from fingerprint_vs_nnunet import (
    NNUNET_VENV,
    REPO,
    Check,
    _load,
    agreement_table,
    machine_info,
    make_nnunet_raw,
    timed,
    timing_table,
    warm_page_cache,
    write_results,
)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DATASET = Path("/work/shared/data/acdc")
DEFAULT_OUT = BENCH_DIR / "results" / "preprocess_acdc.json"
CONFIGURATION = "3d_fullres"

# The viseg side: `python -c VISEG_SNIPPET root cache num_processes preprocess(0|1)`; prints the folders.
VISEG_SNIPPET = """
import json, sys
from omegaconf import OmegaConf
from viseg.config import BaseConfig, PlainConvUnet3DConfig
from viseg.preprocessing.prepare import prepare
from viseg.preprocessing.preprocess import preprocess_dataset, preprocessed_dir

root, cache, num_processes, run = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BaseConfig), {
    "model": OmegaConf.structured(PlainConvUnet3DConfig), "lr_scheduler": {"type": "PolyLR"},
    "dataset": {"basepath": root}, "paths": {"cache": cache}, "splits": {"n_folds": 2},
    "num_processes": num_processes}))
prepared = prepare(cfg, progress=False)
if run:
    preprocess_dataset(prepared, num_processes=num_processes, progress=False)
print(json.dumps({"folder": str(preprocessed_dir(prepared)), "plans": str(prepared.plans_path)}))
"""

# Runs in nnU-Net's venv (it reads nnU-Net's blosc2 files): `python -c COMPARE nnunet_dir viseg_dir`.
COMPARE_SNIPPET = """
import json, sys
from pathlib import Path
import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

ref_dir, our_dir = Path(sys.argv[1]), Path(sys.argv[2])
forward = json.loads((our_dir / "manifest.json").read_text())["transpose_forward"]
ids = sorted(nnUNetDatasetBlosc2.get_identifiers(str(ref_dir)))
ref = nnUNetDatasetBlosc2(str(ref_dir), ids)
rows = []
for case in ids:
    data, seg, _, props = ref.load_case(case)
    data, seg = np.asarray(data[:]), np.asarray(seg[:])
    ours = np.load(our_dir / f"{case}_data.npy"), np.load(our_dir / f"{case}_seg.npy")
    meta = json.loads((our_dir / f"{case}.json").read_text())["properties"]
    same_shape = data.shape == ours[0].shape and seg.shape == ours[1].shape
    with np.load(our_dir / f"{case}_fg.npz") as fg:
        locs = {int(k[6:]): fg[k] for k in fg.files}
    ref_locs = {int(k): np.asarray(v).reshape(-1, 4) for k, v in props["class_locations"].items()}
    rows.append({
        "case": case, "same_shape": same_shape,
        "max_abs_diff": float(np.abs(data - ours[0]).max()) if same_shape else None,
        "seg_equal": bool(same_shape and np.array_equal(seg, ours[1])),
        "locations_equal": set(locs) == set(ref_locs) and all(np.array_equal(locs[k], ref_locs[k]) for k in locs),
        "bbox_equal": [meta["bbox"][i] for i in forward]
                      == [list(map(int, b)) for b in props["bbox_used_for_cropping"]],
    })
print(json.dumps(rows))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Needs bench/.venv-nnunet: run `bash bench/setup_nnunet_env.sh` first.")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET,
                        help="raw dataset in nnU-Net v2 layout; default: %(default)s")
    parser.add_argument("--cases", type=int, default=None, help="first N cases (sorted); default: all")
    parser.add_argument("--np", type=int, default=2, dest="num_processes",
                        help="worker processes for both tools (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="results JSON; the .md summary goes beside it, logs to raw/ (default: %(default)s)")
    parser.add_argument("--nnunet-id", type=int, default=27, help="dataset ID given to nnU-Net (default: 27)")
    parser.add_argument("--viseg-python", type=Path, default=REPO / ".venv" / "bin" / "python",
                        help="python of viseg's venv (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.num_processes < 1 or (args.cases is not None and args.cases < 1):
        parser.error("--repeats, --np and --cases must be at least 1")
    return args


# -- setup (untimed) ------------------------------------------------------------------------------------


def subset_dataset(source: Path, dest: Path, n_cases: int | None) -> int:
    """Links the first `n_cases` cases (all channels and the label) into `dest`, a dataset both tools read."""
    dataset_json = json.loads((source / "dataset.json").read_text())
    ending = dataset_json.get("file_ending", ".nii.gz")
    labels = sorted((source / "labelsTr").glob(f"*{ending}"))[:n_cases]
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    for label in labels:
        case = label.name[: -len(ending)]
        (dest / "labelsTr" / label.name).symlink_to(label.resolve())
        for image in sorted((source / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}")):
            (dest / "imagesTr" / image.name).symlink_to(image.resolve())
    dataset_json["numTraining"] = len(labels)
    (dest / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    return len(labels)


def nnunet_env(raw: Path, work: Path) -> dict[str, str]:
    return dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(work / "preprocessed"),
                nnUNet_results=str(work / "results"))


def plan_nnunet(args: argparse.Namespace, env: dict[str, str], logs: Path) -> None:
    cmd = [str(NNUNET_VENV / "bin" / "nnUNetv2_plan_and_preprocess"), "-d", str(args.nnunet_id), "--no_pp",
           "-npfp", str(args.num_processes), "--no_pbar"]
    seconds = timed(cmd, env, logs / "nnunet_plan.log")
    print(f"nnU-Net fingerprint + plan (untimed): {seconds:.1f} s", flush=True)


def run_viseg_snippet(args: argparse.Namespace, dataset: Path, cache: Path, run: bool, log: Path
                      ) -> tuple[float, dict[str, str]]:
    out = log.with_suffix(".json")
    cmd = [str(args.viseg_python), "-c", VISEG_SNIPPET, str(dataset), str(cache), str(args.num_processes),
           "1" if run else "0"]
    with out.open("w") as handle:
        seconds = timed_to(cmd, handle, log)
    return seconds, json.loads(out.read_text().strip().splitlines()[-1])


def timed_to(cmd: list[str], stdout: Any, log: Path) -> float:
    """`timed`, with stdout kept apart from the log (the viseg snippet prints its folders there)."""
    with log.open("w") as err:
        start = time.perf_counter()
        rc = subprocess.run(cmd, stdout=stdout, stderr=err).returncode
        seconds = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"{cmd[0]} exited with {rc}; see {log}:\n{log.read_text(errors='replace')[-3000:]}")
    return seconds


# -- the timed rounds -----------------------------------------------------------------------------------


def run_rounds(args: argparse.Namespace, dataset: Path, env: dict[str, str], nnunet_out: Path, cache: Path,
               viseg_out: Path, logs: Path) -> list[dict[str, float]]:
    """Alternate nnU-Net and viseg; each starts from an empty output folder (removed untimed)."""
    nnunet_cmd = [str(NNUNET_VENV / "bin" / "nnUNetv2_preprocess"), "-d", str(args.nnunet_id), "-c",
                  CONFIGURATION, "-np", str(args.num_processes), "--no_pbar"]
    rounds = []
    for i in range(1, args.repeats + 1):
        shutil.rmtree(nnunet_out, ignore_errors=True)
        t_nnunet = timed(nnunet_cmd, env, logs / f"preprocess_nnunet_round{i}.log")
        shutil.rmtree(viseg_out, ignore_errors=True)
        t_viseg, _ = run_viseg_snippet(args, dataset, cache, True, logs / f"preprocess_viseg_round{i}.log")
        print(f"round {i}/{args.repeats}: nnU-Net {t_nnunet:.2f} s, viseg {t_viseg:.2f} s", flush=True)
        rounds.append({"round": i, "nnunet_s": round(t_nnunet, 3), "viseg_s": round(t_viseg, 3)})
    return rounds


# -- agreement ------------------------------------------------------------------------------------------


def compare_outputs(nnunet_out: Path, viseg_out: Path) -> list[dict[str, Any]]:
    cmd = [str(NNUNET_VENV / "bin" / "python"), "-c", COMPARE_SNIPPET, str(nnunet_out), str(viseg_out)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def plan_checks(nnunet_plans: dict[str, Any], viseg_manifest: dict[str, Any]) -> list[Check]:
    conf = nnunet_plans["configurations"][CONFIGURATION]
    pairs = {
        "plan.transpose_forward": (nnunet_plans["transpose_forward"], viseg_manifest["transpose_forward"]),
        "plan.spacing": (conf["spacing"], viseg_manifest["spacing"]),
        "plan.normalization_schemes": (conf["normalization_schemes"], viseg_manifest["normalization_schemes"]),
        "plan.use_mask_for_norm": (conf["use_mask_for_norm"], viseg_manifest["use_mask_for_norm"]),
    }
    return [Check(k, list(a) == list(b), f"nnU-Net {a}, viseg {b}") for k, (a, b) in pairs.items()]


def array_checks(rows: list[dict[str, Any]], n_cases: int) -> list[Check]:
    n = len(rows)
    diffs = [r["max_abs_diff"] for r in rows if r["max_abs_diff"] is not None]
    worst = max(diffs, default=float("nan"))

    def count(key: str) -> Check:
        bad = [r["case"] for r in rows if not r[key]]
        return Check(key, n == n_cases and not bad, f"{n - len(bad)}/{n} cases" + (f", e.g. {bad[:3]}" if bad else ""))

    return [Check("cases", n == n_cases, f"nnU-Net wrote {n}, expected {n_cases}"), count("same_shape"),
            Check("data max abs diff", bool(diffs) and worst == 0.0, f"{worst:.3g} over {len(diffs)} cases"),
            count("seg_equal"), count("locations_equal"), count("bbox_equal")]


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


# -- reporting ------------------------------------------------------------------------------------------


def markdown(result: dict[str, Any], checks: list[Check]) -> str:
    m, s, d = result["machine"], result["settings"], result["dataset"]
    nn, vi = m["nnunet_env"], m["viseg_env"]
    return "\n".join([
        f"# Preprocessing ({CONFIGURATION}): nnU-Net v2 vs viseg ({d['name']})",
        "",
        f"{result['timestamp']}; {d['num_cases']} cases from `{d['path']}`; `-np {s['num_processes']}` for both, "
        f"{s['repeats']} alternating rounds, wall clock incl. process start.",
        f"Machine: {m['cpu_count']} CPUs, Python {m['python']}; nnunetv2 {nn['nnunetv2']} (torch {nn['torch']}), "
        f"viseg {vi['viseg']} (torch {vi['torch']}). Load average (1/5/15 min) before "
        f"{_load(result['load_before'])}, after {_load(result['load_after'])}.",
        "",
        "| round | nnU-Net [s] | viseg [s] |",
        "| ---: | ---: | ---: |",
        *(f"| {r['round']} | {r['nnunet_s']:.2f} | {r['viseg_s']:.2f} |" for r in result["rounds"]),
        f"| **median** | **{result['median_s']['nnunet']:.2f}** | **{result['median_s']['viseg']:.2f}** |",
        "",
        f"**ratio median(viseg) / median(nnU-Net) = {result['ratio_viseg_over_nnunet']:.3f}** (< 1: viseg faster).",
        "",
        f"On disk: nnU-Net {result['output_mib']['nnunet']:.0f} MiB (blosc2-compressed), viseg "
        f"{result['output_mib']['viseg']:.0f} MiB (raw .npy, memory-mapped by the loader).",
        "",
        f"Outputs agree: **{'yes' if result['agreement']['all_agree'] else 'NO'}**.",
        "",
        "| check | ok | detail |",
        "| --- | --- | --- |",
        *(f"| {c.field} | {'yes' if c.ok else '**NO**'} | {c.detail} |" for c in checks),
        "",
    ])



def build_result(args: argparse.Namespace, machine: dict[str, Any], n_cases: int, folder: str,
                 rounds: list[dict[str, float]], loads: list[list[float]], sizes: dict[str, float],
                 checks: list[Check]) -> dict[str, Any]:
    """Everything the JSON records: settings, machine, load, per-round times, medians, ratio, agreement."""
    medians = {k: statistics.median(r[f"{k}_s"] for r in rounds) for k in ("nnunet", "viseg")}
    ratio = medians["viseg"] / medians["nnunet"]
    return {
        "benchmark": f"{CONFIGURATION} preprocessing: nnUNetv2_preprocess vs viseg preprocess_dataset",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"path": str(args.dataset), "name": json.loads((args.dataset / "dataset.json").read_text())
                    .get("name", args.dataset.name), "num_cases": n_cases, "nnunet_folder": folder},
        "machine": machine,
        "settings": {"num_processes": args.num_processes, "repeats": args.repeats,
                     "order": "per round: nnU-Net then viseg", "timing": "wall clock of a fresh subprocess",
                     "untimed": "fingerprint + plan of both tools, removing the previous round's output"},
        "load_before": [round(v, 2) for v in loads[0]],
        "load_after": [round(v, 2) for v in loads[1]],
        "rounds": rounds,
        "median_s": {k: round(v, 3) for k, v in medians.items()},
        "ratio_viseg_over_nnunet": round(ratio, 4),
        "output_mib": {k: round(v, 1) for k, v in sizes.items()},
        "agreement": {"all_agree": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]},
    }


# -- main -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dataset = args.dataset.resolve()
    if not (NNUNET_VENV / "bin" / "nnUNetv2_preprocess").exists():
        sys.exit("bench/.venv-nnunet is missing: run `bash bench/setup_nnunet_env.sh` first")
    logs = args.out.parent / "raw"
    logs.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.viseg_python)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp_name:
        tmp = Path(tmp_name)
        dataset = tmp / "data" / args.dataset.name
        n_cases = subset_dataset(args.dataset, dataset, args.cases)
        print(f"{n_cases} cases; warming the page cache: {warm_page_cache(args.dataset) / 2**20:.0f} MiB read")
        raw, folder = make_nnunet_raw(tmp, dataset, args.nnunet_id)
        env = nnunet_env(raw, tmp / "nnunet")
        plan_nnunet(args, env, logs)
        seconds, paths = run_viseg_snippet(args, dataset, tmp / "viseg_cache", False, logs / "viseg_plan.log")
        print(f"viseg verify + fingerprint + plan (untimed): {seconds:.1f} s", flush=True)
        nnunet_out = tmp / "nnunet" / "preprocessed" / folder / f"nnUNetPlans_{CONFIGURATION}"
        viseg_out = Path(paths["folder"])
        load_before = list(os.getloadavg())
        rounds = run_rounds(args, dataset, env, nnunet_out, tmp / "viseg_cache", viseg_out, logs)
        load_after = list(os.getloadavg())
        nnunet_plans = json.loads((nnunet_out.parent / "nnUNetPlans.json").read_text())
        manifest = json.loads((viseg_out / "manifest.json").read_text())
        checks = plan_checks(nnunet_plans, manifest) + array_checks(compare_outputs(nnunet_out, viseg_out), n_cases)
        sizes = {"nnunet": folder_mib(nnunet_out), "viseg": folder_mib(viseg_out)}
    result = build_result(args, machine, n_cases, folder, rounds, [load_before, load_after], sizes, checks)
    write_results(args.out, result, checks, markdown)
    print()
    print(timing_table(rounds, result["median_s"], result["ratio_viseg_over_nnunet"]))
    print()
    print(agreement_table(checks))
    print(f"\noutputs agree: {'yes' if result['agreement']['all_agree'] else 'NO'}")
    print(f"results: {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
