"""A really trained nnU-Net v2 model folder, predicted by viseg and by nnU-Net itself: do the labels agree?

viseg's ``python -m viseg.predict`` accepts a trained nnU-Net v2 model folder
(``nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>``) as its ``model=``. This bench trains such
a folder with nnU-Net itself, briefly, on the CPU, then predicts the same cases with both predictors and
compares the label maps voxel by voxel. Unlike ``predict_vs_nnunet.py`` (seeded untrained weights written
into a hand-made model folder), the folder here is exactly what nnU-Net's training writes, and the weights
have learned something, so the logit margins are those of a real model.

1. Training (nnU-Net's venv, ``bench/.venv-nnunet``; skipped when the model folder already has
   ``fold_<k>/checkpoint_final.pth``, unless ``--retrain``): the first ``--cases`` ACDC cases (sorted; default
   40) are linked into a raw dataset under ``--work-dir`` (dataset.json's numTraining adjusted), then
   ``nnUNetv2_plan_and_preprocess -c 2d``. A copy of nnU-Net's plans under ``--plans-name`` gets a reduced 2d
   patch ``--patch`` and batch ``--batch`` (default 128x128 and 12, so that a CPU finishes) and the topology
   nnU-Net's own planner derives for that patch (``get_pool_and_conv_props`` with the ExperimentPlanner's
   settings; the patch is snapped by it); all else is nnU-Net's plan, the preprocessed data is shared. The
   fold split is nnU-Net's ``generate_crossval_split`` (seed 12345, 5 folds) over patients
   (``--group-pattern``: ACDC's two frames of a patient stay in one fold), written as ``splits_final.json``.
   Trainer ``--trainer`` (default ``nnUNetTrainer_1epoch``: nnU-Net's variant with 1 epoch of 250 training
   and 50 validation iterations) through ``nnunetv2.run.run_training.get_trainer_from_args`` +
   ``run_training()``, i.e. ``nnUNetv2_train DATASET 2d FOLD -tr TRAINER -p PLANS`` without its end-of-training
   ``perform_actual_validation`` (the bench predicts the validation cases itself) and at ``--threads`` torch
   threads (``nnUNetv2_train -device cpu`` would take every core), ``nnUNet_n_proc_DA=0``. The result is
   nnU-Net's normal model folder: plans.json, dataset.json, fold_<k>/checkpoint_final.pth (its checkpoint's
   trainer_name is the trainer's class name).
2. nnU-Net predicts fold ``--fold``'s validation cases (the first ``--predict-cases``), their images linked
   into a folder in imagesTs naming: ``nnUNetPredictor(tile_step_size=0.5, use_gaussian=True,
   use_mirroring=--mirror, perform_everything_on_device=False, device=cpu)``,
   ``initialize_from_trained_model_folder(use_folds=(fold,), checkpoint_name="checkpoint_final.pth")``,
   ``predict_from_files_sequential`` (what ``nnUNetv2_predict -f FOLD -chk checkpoint_final.pth`` does,
   in-process and at ``--threads`` threads).
3. viseg predicts the same folder, in viseg's venv, straight from the nnU-Net model folder:
   ``python -m viseg.predict model=<model folder> folds=<fold> input=<folder> output=<folder> mirror=true|false
   step=0.5 device=cpu`` (OMP/MKL/OpenBLAS threads = ``--threads``). viseg is run from the working tree as it
   is; the JSON records its commit and a hash of its uncommitted changes.
4. Compare, per case: the fraction of voxels on which the two label maps agree (target >= 0.99 for every
   case), the same over the voxels that either tool labels foreground (a harder number: background dominates
   a cardiac MRI), the label voxel counts, and shape and affine of both outputs (and of the input image).
   Both predictions are scored against the original labels with ``python -m viseg.evaluate`` (Dice per class
   and mean), to show that the model learned something (an untrained network scores near 0) and that viseg's
   prediction scores as nnU-Net's does.

Reading the result: agreement 1.0 = identical label maps. They are not bit-identical by construction:
nnU-Net accumulates the sliding-window logits in float16 on the CPU and resamples logits, viseg accumulates
in float32 and resamples probabilities (ACDC's cases are at the plan's spacing, so nothing is resampled);
voxels whose top two logits lie within float16 rounding may flip. A trained model has larger margins than
untrained weights, so the agreement should be close to 1; a systematic error (wrong normalization, mirror
axes, transpose, crop, window placement, channel order, weights) shows as a low agreement and a Dice gap.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
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
    write_results,
)
from preprocess_vs_nnunet import nnunet_env, subset_dataset
from quality_vs_nnunet import (
    NNUNET_PREDICT,
    NNUNET_TRAIN,
    git,
    link_inputs,
    plan_summary,
    size_arg,
    thread_env,
)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DATASET = Path("/work/shared/data/acdc")
DEFAULT_OUT = BENCH_DIR / "results" / "nnunet_import_vs_nnunet.json"
DEFAULT_WORK = Path("/work/bench_import")
CONFIGURATION = "2d"
TARGET_AGREEMENT = 0.99
# "learned something": nnU-Net's mean Dice at least this many times chance, the Dice a labelling with the same
# class frequencies as its prediction but placed at random would get (per class 2pq/(p+q), p and q the
# reference's and the prediction's fractions of the voxels): for ACDC's small structures, chance is near 0.02
LEARNED_FACTOR = 10
NAMES = {"nnunet": "nnU-Net", "viseg": "viseg"}

# Prepended to the nnU-Net snippets that look a trainer up by name (training, nnUNetPredictor). bench/.venv-nnunet
# cannot import torchvision (CPU torch, CUDA-only torchvision on PyPI: see setup_nnunet_env.sh), and nnU-Net's
# lookup (find_class_by_name) imports every module under nnunetv2/training/nnUNetTrainer until one has the class:
# the timm-based primus trainers come before variants/ (where nnUNetTrainer_1epoch lives) and fail on torchvision.
# Only modules that fail because of torchvision are skipped; any other import error is raised as before.
NNUNET_TORCHVISION_GUARD = """
import importlib as _importlib, sys as _sys, traceback as _traceback, types as _types
import nnunetv2.utilities.find_class_by_name as _finder

def _import_module(name, package=None):
    try:
        return _importlib.import_module(name, package)
    except Exception as error:
        if "torchvision" not in "".join(_traceback.format_exception(error)):
            raise
        print(f"bench: nnU-Net's class search skips {name} (needs torchvision: {error!r})", file=_sys.stderr)
        return _types.ModuleType(name)

_finder.importlib = _types.SimpleNamespace(import_module=_import_module)
"""

# nnU-Net's venv, untimed: `python -c NNUNET_PLANS settings.json out.json`. The bench plans: nnU-Net's own 2d
# plan with the requested patch and batch and the topology nnU-Net's planner derives for that patch; and a
# patient-grouped fold split as splits_final.json.
NNUNET_PLANS = """
import json, re, sys
from pathlib import Path
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.utilities.crossval_split import generate_crossval_split
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

s = json.loads(open(sys.argv[1]).read())
pre = Path(s["preprocessed"])
own = json.loads((pre / "nnUNetPlans.json").read_text())
plans = json.loads(json.dumps(own))
plans["plans_name"] = s["plans_name"]
conf = plans["configurations"][s["configuration"]]
planner = ExperimentPlanner(s["dataset_id"])  # only for its U-Net settings
_, strides, kernels, patch, _ = get_pool_and_conv_props(conf["spacing"], s["patch"],
                                                        planner.UNet_featuremap_min_edge_length, 999999)
n = len(strides)
max_features = planner.UNet_max_features_2d if len(patch) == 2 else planner.UNet_max_features_3d
conf["patch_size"] = [int(v) for v in patch]
conf["batch_size"] = int(s["batch"])
arch = conf["architecture"]["arch_kwargs"]
arch.update(n_stages=n, kernel_sizes=[[int(v) for v in k] for k in kernels],
            strides=[[int(v) for v in k] for k in strides],
            features_per_stage=[min(max_features, planner.UNet_base_num_features * 2 ** i) for i in range(n)],
            n_conv_per_stage=list(planner.UNet_blocks_per_stage_encoder[:n]),
            n_conv_per_stage_decoder=list(planner.UNet_blocks_per_stage_decoder[:n - 1]))
(pre / (s["plans_name"] + ".json")).write_text(json.dumps(plans, indent=1))
cases = sorted(get_filenames_of_train_images_and_targets(s["raw_folder"]).keys())
if s["group_pattern"]:
    group_of = {c: re.search(s["group_pattern"], c).group(1) for c in cases}
    folds = generate_crossval_split(sorted(set(group_of.values())), seed=12345, n_splits=5)
    splits = [{k: sorted(c for c in cases if group_of[c] in set(f[k])) for k in ("train", "val")} for f in folds]
else:
    splits = generate_crossval_split(cases, seed=12345, n_splits=5)
(pre / "splits_final.json").write_text(json.dumps(splits, indent=1))
open(sys.argv[2], "w").write(json.dumps({"cases": cases, "splits": splits}))
"""

# nnU-Net's venv, untimed: `python -c NNUNET_CHECKPOINT checkpoint`; what the trained checkpoint says.
NNUNET_CHECKPOINT = """
import json, sys, torch
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
init = ck.get("init_args", {})
unique = {}  # PlainConvUNet's state dict holds the encoder again under decoder.encoder.*: count storages once
for v in ck["network_weights"].values():
    unique.setdefault(v.untyped_storage().data_ptr(), v.numel())
print(json.dumps({"keys": sorted(ck), "trainer_name": ck.get("trainer_name"), "current_epoch": ck.get("current_epoch"),
                  "inference_allowed_mirroring_axes": list(ck.get("inference_allowed_mirroring_axes") or []),
                  "plans_name": init.get("plans", {}).get("plans_name"), "configuration": init.get("configuration"),
                  "fold": init.get("fold"), "state_dict_tensors": len(ck["network_weights"]),
                  "state_dict_values": sum(v.numel() for v in ck["network_weights"].values()),
                  "parameters": sum(unique.values())}))
"""


# -- command line ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Needs bench/.venv-nnunet: run `bash bench/setup_nnunet_env.sh` first. The first run trains (32 min "
        "on 2 shared cores); later runs reuse the model folder in --work-dir and only predict and compare (about "
        "4 min; add --reuse-nnunet-predictions to predict with viseg only). Smoke test (~2 min): --cases 10 "
        "--batch 2 --patch 64x64 --predict-cases 1 --mirror off --work-dir /tmp/import_smoke --out "
        "/tmp/import_smoke/r.json")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET,
                        help="raw dataset in nnU-Net v2 layout; default: %(default)s")
    parser.add_argument("--cases", type=int, default=40,
                        help="train on the first N cases (sorted; keep it even for ACDC's frame pairs; 0: all); "
                        "default: %(default)s")
    parser.add_argument("--trainer", default="nnUNetTrainer_1epoch",
                        help="nnU-Net trainer class (default: %(default)s, 250 training iterations)")
    parser.add_argument("--patch", type=size_arg, default=[128, 128], metavar="YxX",
                        help="2d patch of the bench plans, snapped by nnU-Net's planner (default: 128x128)")
    parser.add_argument("--batch", type=int, default=12, help="batch size of the bench plans (default: %(default)s)")
    parser.add_argument("--fold", type=int, default=0,
                        help="fold trained and whose validation cases are predicted (default: %(default)s)")
    parser.add_argument("--predict-cases", type=int, default=8,
                        help="predict the first N validation cases of --fold (sorted; default: %(default)s, all of "
                        "them with 40 cases)")
    parser.add_argument("--mirror", choices=("on", "off"), default="on",
                        help="test-time mirroring for both predictors (default: on, both tools' default)")
    parser.add_argument("--group-pattern", default=r"(patient\d+)",
                        help="regex whose group 1 names a case's patient: the fold split keeps a patient's cases "
                        "in one fold ('': nnU-Net's own split of cases; default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch/OMP/MKL/OpenBLAS threads of training and both predictors (default: %(default)s)")
    parser.add_argument("--np", type=int, default=2, dest="num_processes",
                        help="processes for nnU-Net's planning/preprocessing and the evaluation (default: "
                        "%(default)s)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK,
                        help="dataset subset, nnU-Net's raw/preprocessed/results folders, predictions and logs; "
                        "kept, so that a later run reuses the trained model folder (default: %(default)s)")
    parser.add_argument("--retrain", action="store_true",
                        help="train again even when the model folder has a checkpoint_final.pth")
    parser.add_argument("--reuse-nnunet-predictions", action="store_true",
                        help="keep nnU-Net's predictions of an earlier run when they were made with the same "
                        "checkpoint, cases and mirroring")
    parser.add_argument("--nnunet-only", action="store_true",
                        help="steps 1-2 only (train, nnU-Net prediction and its Dice); writes no results file")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="results JSON; the .md summary goes beside it (default: %(default)s)")
    parser.add_argument("--nnunet-id", type=int, default=27, help="dataset ID given to nnU-Net (default: 27)")
    parser.add_argument("--plans-name", default="nnUNetPlans_import_bench",
                        help="plans identifier of the bench plans copy (default: %(default)s)")
    parser.add_argument("--viseg-python", type=Path, default=REPO / ".venv" / "bin" / "python",
                        help="python of viseg's venv (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.batch, args.threads, args.num_processes, args.predict_cases) < 1 or args.fold < 0:
        parser.error("--batch, --threads, --np and --predict-cases must be at least 1, --fold at least 0")
    if args.cases and args.cases < 10:
        parser.error("--cases must be at least 10 (5 folds) or 0 (all)")
    return args


# -- step 1: the nnU-Net model folder -------------------------------------------------------------------


def trainer_epochs(trainer: str) -> int:
    """The epochs of nnU-Net's training-length variants (nnUNetTrainer_1epoch, _5epochs, ...); else 1000."""
    match = re.fullmatch(r"nnUNetTrainer_(\d+)epochs?", trainer)
    return int(match.group(1)) if match else 1000


def setup_dataset(args: argparse.Namespace, work: Path) -> tuple[Path, Path, str]:
    """The (subset) raw dataset and nnU-Net's nnUNet_raw/DatasetXXX_Name link to it."""
    dataset = args.dataset
    if args.cases:
        dataset = work / "data" / args.dataset.name
        if not dataset.exists():
            subset_dataset(args.dataset, dataset, args.cases)
    if not (work / "nnUNet_raw").exists():
        make_nnunet_raw(work, dataset, args.nnunet_id)
    raw = work / "nnUNet_raw"
    return dataset, raw, next(raw.iterdir()).name


def plan_nnunet(args: argparse.Namespace, env: dict[str, str], raw: Path, folder: str, logs: Path
                ) -> dict[str, Any]:
    """nnU-Net's own plan and 2d preprocessing, then the bench plans copy and the split."""
    preprocessed = Path(env["nnUNet_preprocessed"]) / folder
    if not (preprocessed / "nnUNetPlans.json").is_file() or not (preprocessed / "nnUNetPlans_2d").is_dir():
        cmd = [str(NNUNET_VENV / "bin" / "nnUNetv2_plan_and_preprocess"), "-d", str(args.nnunet_id), "-c",
               CONFIGURATION, "-np", str(args.num_processes), "-npfp", str(args.num_processes), "--no_pbar"]
        seconds = timed(cmd, env, logs / "nnunet_plan_and_preprocess.log")
        print(f"nnU-Net fingerprint + plan + preprocess 2d: {seconds:.1f} s", flush=True)
    settings, out = logs.parent / "nnunet_plans_settings.json", logs.parent / "nnunet_plans_out.json"
    settings.write_text(json.dumps({"preprocessed": str(preprocessed), "plans_name": args.plans_name,
                                    "configuration": CONFIGURATION, "dataset_id": str(args.nnunet_id),
                                    "patch": args.patch, "batch": args.batch, "raw_folder": str(raw / folder),
                                    "group_pattern": args.group_pattern}))
    timed([str(NNUNET_VENV / "bin" / "python"), "-c", NNUNET_PLANS, str(settings), str(out)], env,
          logs / "nnunet_bench_plans.log")
    return json.loads(out.read_text())


def train_nnunet(args: argparse.Namespace, env: dict[str, str], work: Path, logs: Path) -> dict[str, Any]:
    settings, out = work / "nnunet_train.json", work / "nnunet_train_out.json"
    settings.write_text(json.dumps({
        "dataset_id": args.nnunet_id, "configuration": CONFIGURATION, "fold": args.fold, "plans": args.plans_name,
        "trainer": args.trainer, "epochs": trainer_epochs(args.trainer), "iterations": 250, "val_iterations": 50,
        "threads": args.threads}))
    cmd = [str(NNUNET_VENV / "bin" / "python"), "-c", NNUNET_TORCHVISION_GUARD + NNUNET_TRAIN, str(settings), str(out)]
    print(f"training {args.trainer} fold {args.fold} ({trainer_epochs(args.trainer)} x 250 iterations, "
          f"{args.threads} threads); log: {logs / 'nnunet_train.log'}", flush=True)
    seconds = timed(cmd, env, logs / "nnunet_train.log")
    result = json.loads(out.read_text())
    log = result.pop("log")
    epochs = list(zip(log.get("epoch_start_timestamps", []), log.get("epoch_end_timestamps", [])))
    return {**result, "wall_s": round(seconds, 1), "loop_s": round(sum(b - a for a, b in epochs), 1),
            "epochs_logged": len(epochs),
            "final": {k: (log.get(k) or [None])[-1] for k in ("train_losses", "val_losses", "mean_fg_dice",
                                                               "ema_fg_dice")},
            "command": shlex.join([*cmd[:-4], "-c", "NNUNET_TRAIN", *cmd[-2:]])}


def checkpoint_info(checkpoint: Path, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([str(NNUNET_VENV / "bin" / "python"), "-c", NNUNET_CHECKPOINT, str(checkpoint)], env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- steps 2 and 3: the two predictors ------------------------------------------------------------------


def predict_nnunet(args: argparse.Namespace, env: dict[str, str], ctx: dict[str, Any], logs: Path
                   ) -> dict[str, Any]:
    work, output = ctx["work"], ctx["work"] / f"pred_nnunet_mirror_{args.mirror}"
    settings = {"model": str(ctx["model"]), "fold": args.fold, "input": str(ctx["images"]), "output": str(output),
                "mirror": args.mirror == "on", "threads": args.threads}
    stamp = {**settings, "cases": ctx["cases"], "checkpoint_mtime": ctx["checkpoint"].stat().st_mtime}
    previous = work / f"nnunet_predict_mirror_{args.mirror}.json"
    if args.reuse_nnunet_predictions and previous.is_file():
        old = json.loads(previous.read_text())
        complete = all((output / f"{c}{ctx['ending']}").is_file() for c in ctx["cases"])
        if old["stamp"] == stamp and "load_at_start" in old and complete:
            print(f"nnU-Net predictions reused from {output}", flush=True)
            return {**old, "reused": True}
    if output.exists():
        shutil.rmtree(output)
    path, out = work / "nnunet_predict_settings.json", work / "nnunet_predict_out.json"
    path.write_text(json.dumps(settings))
    print(f"nnU-Net predicting {len(ctx['cases'])} cases (mirroring {args.mirror}) ...", flush=True)
    load_at_start = [round(v, 2) for v in os.getloadavg()]
    cmd = [str(NNUNET_VENV / "bin" / "python"), "-c", NNUNET_TORCHVISION_GUARD + NNUNET_PREDICT, str(path), str(out)]
    seconds = timed(cmd, env, logs / f"nnunet_predict_mirror_{args.mirror}.log")
    result = {"stamp": stamp, "output": str(output), "wall_s": round(seconds, 1), "load_at_start": load_at_start,
              "load_at_end": [round(v, 2) for v in os.getloadavg()], **json.loads(out.read_text()),
              "command": "nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring="
              f"{args.mirror == 'on'}, perform_everything_on_device=False, device=cpu)"
              f".initialize_from_trained_model_folder({ctx['model']}, use_folds=({args.fold},), "
              "checkpoint_name='checkpoint_final.pth').predict_from_files_sequential(input, output)"}
    previous.write_text(json.dumps(result, indent=1))
    return {**result, "reused": False}


def viseg_command(args: argparse.Namespace, ctx: dict[str, Any], output: Path) -> list[str]:
    return [str(args.viseg_python), "-m", "viseg.predict", f"model={ctx['model']}", f"folds={args.fold}",
            f"input={ctx['images']}", f"output={output}", f"mirror={'true' if args.mirror == 'on' else 'false'}",
            "step=0.5", "device=cpu"]


def predict_viseg(args: argparse.Namespace, ctx: dict[str, Any], logs: Path) -> dict[str, Any]:
    output = ctx["work"] / f"pred_viseg_mirror_{args.mirror}"
    if output.exists():
        shutil.rmtree(output)
    cmd = viseg_command(args, ctx, output)
    log = logs / f"viseg_predict_mirror_{args.mirror}.log"
    print(f"viseg predicting {len(ctx['cases'])} cases from the nnU-Net model folder ...\n$ {shlex.join(cmd)}",
          flush=True)
    env = dict(os.environ, **thread_env(args.threads))
    load_at_start = [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    with log.open("w") as handle:
        rc = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    return {"output": str(output), "wall_s": round(seconds, 1), "returncode": rc, "log": str(log),
            "load_at_start": load_at_start, "load_at_end": [round(v, 2) for v in os.getloadavg()],
            "command": shlex.join(cmd)}


def viseg_source() -> dict[str, Any]:
    """The viseg code that ran: the working tree (commit + a hash of its uncommitted viseg/ and conf/)."""
    changed = git(["status", "--porcelain", "--", "viseg", "conf"]).splitlines()
    digest = hashlib.sha256(git(["diff", "HEAD", "--", "viseg", "conf"]).encode())
    for line in sorted(changed):
        if line.startswith("??"):  # untracked: a file, or a folder git lists as one entry
            top = REPO / line[3:]
            for path in sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]:
                digest.update(path.read_bytes())
    return {"ref": "worktree", "commit": git(["rev-parse", "HEAD"]), "uncommitted": changed,
            "uncommitted_sha256": digest.hexdigest()[:16] if changed else None}


# -- step 4: comparison and scores ----------------------------------------------------------------------


def evaluate(args: argparse.Namespace, pred: Path, labels: Path, label_names: dict[str, str], tool: str,
             logs: Path) -> dict[str, Any]:
    """Dice per class and mean of one prediction folder: python -m viseg.evaluate against the original labels."""
    summary = pred.parent / f"summary_{tool}_{pred.name}.json"
    cmd = [str(args.viseg_python), "-m", "viseg.evaluate", f"pred={pred}", f"ref={labels}",
           f"labels=[{','.join(label_names)}]", f"output={summary}", f"num_processes={args.num_processes}"]
    timed(cmd, dict(os.environ), logs / f"{tool}_evaluate.log")
    data = json.loads(summary.read_text())
    return {"mean_dice": data["foreground_mean"]["Dice"],
            "dice": {name: data["mean"][k]["Dice"] for k, name in label_names.items()},
            "per_case": {c["case"]: {name: c["metrics"][k]["Dice"] for k, name in label_names.items()}
                         for c in data["metric_per_case"]},
            "summary": str(summary)}


def chance_dice(reference: Any, prediction: Any, classes: list[int]) -> float | None:
    """Mean over `classes` of the expected Dice of a random labelling with `prediction`'s class frequencies."""
    values = []
    for c in classes:
        p, q = float((reference == c).mean()), float((prediction == c).mean())
        if p + q > 0:
            values.append(2 * p * q / (p + q))
    return statistics.fmean(values) if values else None


def compare(cases: list[str], images: Path, labels: Path, outputs: dict[str, Path], ending: str,
            classes: list[int]) -> list[dict[str, Any]]:
    import nibabel as nib
    import numpy as np

    rows = []
    for case in cases:
        image = nib.load(images / f"{case}_0000{ending}")
        maps = {t: nib.load(outputs[t] / f"{case}{ending}") for t in ("nnunet", "viseg")}
        a, b = (np.asarray(maps[t].dataobj) for t in ("nnunet", "viseg"))
        reference = np.asarray(nib.load(labels / f"{case}{ending}").dataobj)
        same = a.shape == b.shape
        foreground = (a > 0) | (b > 0) if same else None
        values = sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()))
        rows.append({
            "case": case, "shape": {"image": list(image.shape), "nnunet": list(a.shape), "viseg": list(b.shape)},
            "affine_max_abs_diff": float(np.abs(maps["nnunet"].affine - maps["viseg"].affine).max()),
            "affine_vs_image_max_abs_diff": max(float(np.abs(m.affine - image.affine).max()) for m in maps.values()),
            "dtype": {t: str(maps[t].get_data_dtype()) for t in maps},
            "voxels": int(a.size),
            "agreement": float((a == b).mean()) if same else None,
            "differing_voxels": int((a != b).sum()) if same else None,
            "foreground_agreement": float((a == b)[foreground].mean()) if same and foreground.any() else None,
            "label_voxels": {str(v): {"nnunet": int((a == v).sum()), "viseg": int((b == v).sum())} for v in values},
            "chance_dice_nnunet": chance_dice(reference, a, classes) if reference.shape == a.shape else None,
        })
    return rows


def checks_for(args: argparse.Namespace, ctx: dict[str, Any], train: dict[str, Any], ck: dict[str, Any],
               nn_pred: dict[str, Any], vi_pred: dict[str, Any], rows: list[dict[str, Any]],
               scores: dict[str, Any]) -> list[Check]:
    model, plans, bench = ctx["model"], ctx["plans"], ctx["bench_plans"]
    files = [p for p in ("plans.json", "dataset.json", f"fold_{args.fold}/checkpoint_final.pth")
             if (model / p).is_file()]
    epochs = trainer_epochs(args.trainer)
    agreements = [r["agreement"] for r in rows]
    geometry = all(r["shape"]["nnunet"] == r["shape"]["viseg"] == r["shape"]["image"]
                   and r["affine_max_abs_diff"] < 1e-4 and r["affine_vs_image_max_abs_diff"] < 1e-4 for r in rows)
    nn, vi = scores["nnunet"]["mean_dice"], scores["viseg"]["mean_dice"]
    chance = summary_chance(rows)
    return [
        Check("model folder", len(files) == 3, f"{model}: {', '.join(files)}"),
        Check("checkpoint trainer_name", ck["trainer_name"] == args.trainer,
              f"{ck['trainer_name']} (plans {ck['plans_name']}, configuration {ck['configuration']}, fold {ck['fold']}"
              f", {ck['parameters']:,} parameters)"),
        Check("trained epochs", ck["current_epoch"] == epochs and train.get("epochs_logged", epochs) == epochs,
              f"checkpoint current_epoch {ck['current_epoch']}, log {train.get('epochs_logged', '?')} epochs, "
              f"{args.trainer}: {epochs} x 250 iterations"),
        Check("bench plan", plans == bench and plans["batch_size"] == args.batch,
              f"model folder's plans.json {'=' if plans == bench else '!='} {args.plans_name}.json: patch "
              f"{plans['patch_size']} (requested {args.patch}), batch {plans['batch_size']}, "
              f"{plans['network']['n_stages']} stages, strides {plans['network']['strides']}"),
        Check("cases predicted", len(rows) == len(ctx["cases"]) and vi_pred["returncode"] == 0,
              f"{len(rows)} of {len(ctx['cases'])} by both; viseg exit status {vi_pred['returncode']}"),
        Check("output geometry", geometry, "shape and affine of both outputs equal each other and the input image"
              if geometry else "; ".join(f"{r['case']}: {r['shape']}, affine diff {r['affine_max_abs_diff']:.2g}"
                                         for r in rows)),
        Check(f"label agreement >= {TARGET_AGREEMENT} per case", None not in agreements
              and min(agreements) >= TARGET_AGREEMENT,
              f"min {min(agreements):.5f}, mean {statistics.fmean(agreements):.5f}" if None not in agreements
              else "shapes differ"),
        Check(f"model learned (nnU-Net mean Dice >= {LEARNED_FACTOR} x chance)", chance is not None
              and nn >= LEARNED_FACTOR * chance, f"mean Dice {nn:.4f}, chance {fmt(chance, 4)} (a random labelling "
              "with the prediction's class frequencies)"),
        Check("Dice viseg vs nnU-Net within 0.01", abs(vi - nn) <= 0.01, f"viseg - nnU-Net {vi - nn:+.4f}"),
        Check("mirror axes", args.mirror == "off" or nn_pred["mirror_axes"] == ck["inference_allowed_mirroring_axes"],
              f"checkpoint {ck['inference_allowed_mirroring_axes']}, nnU-Net predictor used {nn_pred['mirror_axes']}"),
    ]


# -- reporting ------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 5) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any], checks: list[Check]) -> str:
    m, s, d, sm = result["machine"], result["settings"], result["dataset"], result["summary"]
    nn, vi = m["nnunet_env"], m["viseg_env"]
    sc, plan, tr, pr = result["scores"], result["plan"]["bench"], result["training"], result["prediction"]
    names = list(sc["nnunet"]["dice"])
    rows = [f"| {r['case']} | {fmt(r['agreement'])} | {fmt(r['foreground_agreement'])} | "
            f"{r['differing_voxels']} / {r['voxels']} | {sc['nnunet']['per_case'][r['case']].get('mean', 0):.4f} | "
            f"{sc['viseg']['per_case'][r['case']].get('mean', 0):.4f} |" for r in result["cases"]]
    dice_rows = [f"| {NAMES[t]} | " + " | ".join(f"{sc[t]['dice'][n]:.4f}" for n in names)
                 + f" | **{sc[t]['mean_dice']:.4f}** |" for t in ("nnunet", "viseg")]
    train_line = (f"trained in {tr['wall_s']:.0f} s ({tr['torch_threads']} torch threads; final train loss "
                  f"{fmt(tr['final']['train_losses'], 3)}, pseudo-Dice {fmt(tr['final']['mean_fg_dice'], 3)})"
                  if tr.get("wall_s") is not None else "trained by an earlier run (no training record)")
    return "\n".join([
        f"# nnU-Net v2 model folder predicted by viseg vs nnU-Net's own predictor ({CONFIGURATION}, CPU, "
        f"{d['name']})",
        "",
        f"{result['timestamp']}; model trained by nnU-Net on the first {d['num_cases']} cases of `{d['path']}`: "
        f"trainer `{s['trainer']}` ({s['epochs']} x 250 iterations), plans `{s['plans_name']}` (nnU-Net's 2d plan "
        f"with patch {plan['patch_size']}, batch {plan['batch_size']}, PlainConvUNet with "
        f"{plan['network']['n_stages']} stages; nnU-Net's own: patch {result['plan']['nnunet_own']['patch_size']}, "
        f"batch {result['plan']['nnunet_own']['batch_size']}), fold {s['fold']}, {train_line}. "
        f"Model folder `{s['model_folder']}`.",
        f"Predicted: {len(result['cases'])} of fold {s['fold']}'s validation cases, tile step 0.5, Gaussian, "
        f"mirroring {s['mirror']}, `checkpoint_final.pth`, CPU, {s['threads']} threads: nnU-Net "
        f"`nnUNetPredictor` ({sm['predict_wall_s']['nnunet']:.0f} s"
        f"{', predicted by an earlier run' if s['nnunet_predictions_reused'] else ''}), viseg "
        f"`{s['viseg_command_short']}` "
        f"({sm['predict_wall_s']['viseg']:.0f} s).",
        f"Machine: {m['cpu_count']} CPUs, no GPU, Python {m['python']}; nnunetv2 {nn['nnunetv2']} (torch "
        f"{nn['torch']}), viseg {vi['viseg']} (torch {vi['torch']}), working tree at "
        f"{result['viseg_source']['commit'][:12]}"
        + (f" + uncommitted changes ({result['viseg_source']['uncommitted_sha256']})"
           if result["viseg_source"]["uncommitted"] else "")
        + f". Load average (1/5/15 min) at the start and end of nnU-Net's prediction "
        f"{_load(pr['nnunet']['load_at_start'])}, {_load(pr['nnunet']['load_at_end'])}, of viseg's "
        f"{_load(pr['viseg']['load_at_start'])}, {_load(pr['viseg']['load_at_end'])}: the machine is shared, "
        "so the wall times are indicative only (this bench measures agreement, `predict_vs_nnunet.py` speed).",
        "",
        "| case | label agreement | foreground agreement | differing voxels | Dice nnU-Net | Dice viseg |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        f"| **min / mean** | **{fmt(sm['min_agreement'])}** / {fmt(sm['mean_agreement'])} | "
        f"{fmt(sm['min_foreground_agreement'])} / {fmt(sm['mean_foreground_agreement'])} | "
        f"{sm['differing_voxels']} / {sm['voxels']} | {sc['nnunet']['mean_dice']:.4f} | "
        f"{sc['viseg']['mean_dice']:.4f} |",
        "",
        "Label agreement: fraction of all voxels with the same label; foreground agreement: the same over the "
        "voxels either tool labels foreground. Dice: `python -m viseg.evaluate` against the original labels "
        f"(case rows: mean over the classes); chance level {fmt(sm['chance_dice'], 4)} (a random labelling with "
        "the class frequencies of nnU-Net's prediction).",
        "",
        f"| tool | {' | '.join(f'Dice {n}' for n in names)} | mean Dice |",
        f"| --- | {' | '.join('---:' for _ in names)} | ---: |",
        *dice_rows,
        "",
        f"Target: label agreement >= {TARGET_AGREEMENT} for every case: "
        f"**{'yes' if sm['target_met'] else 'NO'}** (min {fmt(sm['min_agreement'])}).",
        "",
        "| check | ok | detail |",
        "| --- | --- | --- |",
        *(f"| {c.field} | {'yes' if c.ok else '**NO**'} | {c.detail.replace('|', chr(92) + '|')} |" for c in checks),
        "",
    ])


def summary_chance(rows: list[dict[str, Any]]) -> float | None:
    values = [r["chance_dice_nnunet"] for r in rows if r["chance_dice_nnunet"] is not None]
    return statistics.fmean(values) if values else None


def summarize(rows: list[dict[str, Any]], nn_pred: dict[str, Any], vi_pred: dict[str, Any]) -> dict[str, Any]:
    agreements = [r["agreement"] for r in rows]
    fg = [r["foreground_agreement"] for r in rows if r["foreground_agreement"] is not None]
    ok = None not in agreements
    return {"min_agreement": min(agreements) if ok else None,
            "mean_agreement": statistics.fmean(agreements) if ok else None,
            "min_foreground_agreement": min(fg, default=None),
            "mean_foreground_agreement": statistics.fmean(fg) if fg else None,
            "differing_voxels": sum(r["differing_voxels"] or 0 for r in rows), "voxels": sum(r["voxels"] for r in rows),
            "chance_dice": summary_chance(rows), "learned_factor": LEARNED_FACTOR,
            "target_agreement": TARGET_AGREEMENT, "target_met": ok and min(agreements) >= TARGET_AGREEMENT,
            "predict_wall_s": {"nnunet": nn_pred["wall_s"], "viseg": vi_pred["wall_s"]}}


def add_case_means(score: dict[str, Any]) -> dict[str, Any]:
    for dice in score["per_case"].values():
        values = [v for v in dice.values() if v is not None]
        dice["mean"] = statistics.fmean(values) if values else None
    return score


# -- main -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dataset, args.out, args.viseg_python = args.dataset.resolve(), args.out.resolve(), args.viseg_python.absolute()
    if not (NNUNET_VENV / "bin" / "nnUNetv2_plan_and_preprocess").exists():
        sys.exit("bench/.venv-nnunet is missing: run `bash bench/setup_nnunet_env.sh` first")
    work = args.work_dir.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.viseg_python)
    dataset, raw, folder = setup_dataset(args, work)
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    ending = dataset_json.get("file_ending", ".nii.gz")
    label_names = {str(v): k for k, v in dataset_json["labels"].items() if k not in ("background", "ignore")}
    threads = thread_env(args.threads)
    env = dict(nnunet_env(raw, work / "nnunet"), nnUNet_n_proc_DA="0", nnUNet_compile="f",
               nnUNet_def_n_proc=str(args.threads), **threads)
    model = Path(env["nnUNet_results"]) / folder / f"{args.trainer}__{args.plans_name}__{CONFIGURATION}"
    checkpoint = model / f"fold_{args.fold}" / "checkpoint_final.pth"
    record = work / f"train_result_fold{args.fold}.json"

    # step 1: train, or reuse the model folder
    trained_now = not checkpoint.is_file() or args.retrain
    if not trained_now:
        print(f"reusing the trained model folder {model}", flush=True)
        train = json.loads(record.read_text()) if record.is_file() else {"reused": True}
        split = json.loads((Path(env["nnUNet_preprocessed"]) / folder / "splits_final.json").read_text())
    else:
        if (model / f"fold_{args.fold}").exists():
            shutil.rmtree(model / f"fold_{args.fold}")
        # planning without nnUNet_n_proc_DA=0: its VRAM estimate calls torch.set_num_threads(nnUNet_n_proc_DA)
        planned = plan_nnunet(args, {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}, raw, folder, logs)
        split = planned["splits"]
        train = train_nnunet(args, env, work, logs)
        record.write_text(json.dumps(train, indent=1))
        print(f"training: {train['wall_s']:.0f} s wall, loop {train['loop_s']:.0f} s; final pseudo-Dice "
              f"{train['final']['mean_fg_dice']}", flush=True)
    if not checkpoint.is_file():
        sys.exit(f"no {checkpoint} after training: see {logs / 'nnunet_train.log'}")
    ck = checkpoint_info(checkpoint, env)
    plans_json = json.loads((model / "plans.json").read_text())
    own_plans = json.loads((Path(env["nnUNet_preprocessed"]) / folder / "nnUNetPlans.json").read_text())

    cases = sorted(split[args.fold]["val"])[: args.predict_cases]
    images, labels = work / "predict_input", work / "reference_labels"
    link_inputs(dataset, cases, images, labels)
    bench_plans = json.loads((Path(env["nnUNet_preprocessed"]) / folder / f"{args.plans_name}.json").read_text())
    ctx = {"work": work, "model": model, "checkpoint": checkpoint, "cases": cases, "images": images,
           "ending": ending, "plans": plan_summary(plans_json), "bench_plans": plan_summary(bench_plans)}

    # step 2: nnU-Net's predictor
    nn_pred = predict_nnunet(args, env, ctx, logs)
    scores = {"nnunet": add_case_means(evaluate(args, Path(nn_pred["output"]), labels, label_names, "nnunet", logs))}
    print(f"nnU-Net: {len(cases)} cases in {nn_pred['wall_s']:.0f} s; mean Dice {scores['nnunet']['mean_dice']:.4f} "
          + " ".join(f"{k} {v:.4f}" for k, v in scores["nnunet"]["dice"].items()), flush=True)
    finish = shlex.join([str(args.viseg_python), str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None
                                                                                  else argv)])
    if "--reuse-nnunet-predictions" not in finish:
        finish += " --reuse-nnunet-predictions"
    finish = finish.replace(" --nnunet-only", "").replace(" --retrain", "")
    if args.nnunet_only:
        print(f"--nnunet-only: stopping before viseg. To finish:\n  {finish}")
        return 0

    # step 3: viseg's predictor on the nnU-Net model folder
    vi_pred = predict_viseg(args, ctx, logs)
    if vi_pred["returncode"] != 0:
        tail = "\n".join(Path(vi_pred["log"]).read_text(errors="replace").splitlines()[-25:])
        print(f"viseg.predict exited with {vi_pred['returncode']}; last lines of {vi_pred['log']}:\n{tail}\n"
              f"No results written. Once viseg reads nnU-Net model folders, finish with:\n  {finish}")
        return 1
    missing = [c for c in cases if not (Path(vi_pred["output"]) / f"{c}{ending}").is_file()]
    if missing:
        sys.exit(f"viseg wrote no prediction for {missing}; see {vi_pred['log']}")

    # step 4: compare and score
    rows = compare(cases, images, labels, {"nnunet": Path(nn_pred["output"]), "viseg": Path(vi_pred["output"])},
                   ending, [int(k) for k in label_names])
    scores["viseg"] = add_case_means(evaluate(args, Path(vi_pred["output"]), labels, label_names, "viseg", logs))
    checks = checks_for(args, ctx, train, ck, nn_pred, vi_pred, rows, scores)
    summary = summarize(rows, nn_pred, vi_pred)
    result = {
        "benchmark": "a trained nnU-Net v2 model folder: viseg.predict vs nnUNetPredictor, label agreement",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
        "dataset": {"path": str(args.dataset), "name": dataset_json.get("name", args.dataset.name),
                    "num_cases": dataset_json["numTraining"], "nnunet_folder": folder,
                    "train_cases": len(split[args.fold]["train"]), "val_cases": len(split[args.fold]["val"]),
                    "predicted": cases},
        "machine": machine,
        "viseg_source": viseg_source(),
        "settings": {"configuration": CONFIGURATION, "trainer": args.trainer, "epochs": trainer_epochs(args.trainer),
                     "iterations_per_epoch": 250, "plans_name": args.plans_name, "patch": args.patch,
                     "batch": args.batch, "fold": args.fold, "group_pattern": args.group_pattern,
                     "mirror": args.mirror, "tile_step": 0.5, "gaussian": True, "checkpoint": "checkpoint_final.pth",
                     "device": "cpu", "threads": args.threads, "work_dir": str(work), "model_folder": str(model),
                     "train_reused": not trained_now,
                     "nnunet_predictions_reused": nn_pred["reused"],
                     "viseg_command": vi_pred["command"],
                     "viseg_command_short": f"python -m viseg.predict model=<model folder> folds={args.fold} "
                     f"mirror={'true' if args.mirror == 'on' else 'false'} step=0.5 device=cpu",
                     "nnunet_predict": nn_pred["command"]},
        "plan": {"bench": ctx["plans"], "nnunet_own": plan_summary(own_plans)},
        "training": {k: v for k, v in train.items() if k not in ("train", "val")},
        "checkpoint": ck,
        "summary": summary,
        "cases": rows,
        "scores": scores,
        "prediction": {"nnunet": {k: v for k, v in nn_pred.items() if k != "stamp"}, "viseg": vi_pred},
        "checks": {"all_ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]},
    }
    write_results(args.out, result, checks, markdown)
    print()
    for r in rows:
        print(f"{r['case']}: agreement {fmt(r['agreement'])}, foreground {fmt(r['foreground_agreement'])}")
    print(f"min agreement {fmt(summary['min_agreement'])}, mean {fmt(summary['mean_agreement'])}; target >= "
          f"{TARGET_AGREEMENT}: {'yes' if summary['target_met'] else 'NO'}")
    print(f"mean Dice nnU-Net {scores['nnunet']['mean_dice']:.4f}, viseg {scores['viseg']['mean_dice']:.4f}")
    print()
    print(agreement_table(checks))
    print(f"results: {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
