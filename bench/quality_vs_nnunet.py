"""Segmentation quality at an equal iteration budget, nnU-Net v2 vs viseg: train, predict, score, on real data.

Both tools train the 2d configuration on the same ACDC cases (all 200 by default) with the same fold split,
plan and number of iterations, on the CPU, then predict fold ``--fold``'s validation cases at full resolution
with their FINAL weights, each with its own predictor, and both predictions are scored by the same evaluator
(``python -m viseg.evaluate``) against the original label files. What it answers: at equal iterations, does
viseg's training reach nnU-Net's Dice, and in how much wall time?

Setup (untimed):

* viseg plans and preprocesses (``prepare`` + ``preprocess_dataset``, composed from ``conf/anatomy_config.yaml``
  with exactly the overrides the training command gets, so the training reuses that cache): 2d, patch
  ``--patch`` (snapped by the planner, which derives the network topology for it), batch ``--batch``, fold
  split grouped by patient (``splits.group_pattern='(patient\\d+)'``: ACDC's two frames of a patient stay in
  one fold).
* nnU-Net: ``nnUNetv2_plan_and_preprocess -c 2d``, then a copy of its plans under a new plans identifier
  (``--plans-name``) with viseg's 2d patch, batch and topology (all else nnU-Net's own; the preprocessed data
  is shared, as preprocessing does not depend on them), and viseg's split written as nnU-Net's
  ``splits_final.json``, so both train on identical cases.

Training (timed, both at once, side by side): each tool in its own process pinned to its own core
(``taskset -c 0`` viseg, ``taskset -c 1`` nnU-Net), one torch thread (OMP/MKL/OpenBLAS_NUM_THREADS=1,
``torch.set_num_threads(1)``), no background augmentation workers, each tool's defaults otherwise (SGD
nesterov lr 1e-2, momentum 0.99, poly lr, Dice+CE with deep supervision, its own augmentation):

* viseg: ``python -m viseg.train model=plain_conv_unet_2d ... trainer.max_epochs=E
  trainer.iterations_per_epoch=I trainer.val_iterations=V loader.num_workers=0 num_processes=1``. Its wall
  time includes its end-of-training whole-case validation (preprocessed grid, no mirroring); the JSON also
  gives the training loop alone (sum of metrics.csv's epoch times).
* nnU-Net: ``nnUNetTrainer_<E>epochs`` (a training-length variant: E x 250 iterations, 50 validation
  iterations per epoch; plain ``nnUNetTrainer`` with those attributes set when no variant matches) through
  ``nnunetv2.run.run_training.get_trainer_from_args`` + ``run_training()``, i.e. ``nnUNetv2_train`` without
  two things: its ``-device cpu`` branch sets ``torch.set_num_threads(cpu_count())`` (2 threads on a core
  pinned to one: an oversubscription that would slow nnU-Net, not a fair setting), and its end-of-training
  ``perform_actual_validation`` (a mirrored full-resolution prediction of the validation cases that this
  bench does separately below; on one CPU core it would cost minutes that viseg's cheaper validation does
  not). ``nnUNet_n_proc_DA=0`` (in-process augmentation), ``nnUNet_compile=f`` (nnU-Net disables compile
  on the CPU anyway).

Prediction (timed, side by side the same way): the validation cases' images, full resolution, tile step 0.5,
Gaussian weighting, test-time mirroring ``--mirror`` (on: both tools' default), final weights:
viseg ``python -m viseg.predict checkpoint=last`` (last.ckpt is the weights after the last epoch), nnU-Net
``nnUNetPredictor.predict_from_files_sequential`` with ``checkpoint_final.pth`` (what ``nnUNetv2_predict -f
0 -chk checkpoint_final.pth`` does, but in-process and at one thread: ``nnUNetv2_predict -device cpu`` too
raises torch to ``cpu_count()`` threads and starts preprocessing/export workers).

Scoring: ``python -m viseg.evaluate labels=[1,2,3]`` of each prediction folder against the original label
files (linked into a folder holding only the validation cases): Dice per class (1 RV, 2 MYO, 3 LV) and the
mean over classes, averaged over cases.

Checks: both sides used the same patch, batch, network (parameter count of the trained networks), split
(train and validation case lists as each trainer read them) and budget. The load average is recorded before
and after; background load hits both tools alike since they run at the same time.

Reading the result: Dice difference = viseg - nnU-Net (target >= -0.01); time ratio = viseg / nnU-Net
(target <= 1 for training).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
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
    THREAD_VARS,
    Check,
    _load,
    agreement_table,
    machine_info,
    make_nnunet_raw,
    timed,
    write_results,
)
from preprocess_vs_nnunet import nnunet_env, subset_dataset

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DATASET = Path("/work/shared/data/acdc")
DEFAULT_OUT = BENCH_DIR / "results" / "quality_vs_nnunet.json"
DEFAULT_WORK = Path("/tmp/viseg_quality_bench")
CONFIGURATION = "2d"
TOOLS = ("viseg", "nnunet")
NAMES = {"nnunet": "nnU-Net", "viseg": "viseg"}
CORES = {"viseg": 0, "nnunet": 1}
TOPOLOGY_KEYS = ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
                 "n_conv_per_stage_decoder")
GROUP_PATTERN = r"(patient\d+)"
LABELS = {"1": "RV", "2": "MYO", "3": "LV"}

# viseg's venv, untimed: `python -c VISEG_SETUP overrides.json out.json`. Composes the training config from
# conf/ with the training command's own overrides (so `python -m viseg.train` finds this cache), plans,
# preprocesses, and reports the plan, the split and the network's parameter count.
VISEG_SETUP = """
import json, sys
from dataclasses import asdict
from hydra import compose, initialize_config_dir
from viseg.cli import to_typed
from viseg.resources import conf_dir
from viseg.config import register_configs
from viseg.planning.network import build_model
from viseg.preprocessing.prepare import prepare
from viseg.preprocessing.preprocess import preprocess_dataset

overrides = json.loads(open(sys.argv[1]).read())
register_configs()
with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
    cfg = to_typed(compose(config_name="anatomy_config", overrides=overrides))
prepared = prepare(cfg, progress=False)
folder = preprocess_dataset(prepared, cfg.num_processes, progress=False)
plan = prepared.plans.configuration(prepared.configuration)
network = build_model(prepared.plans, prepared.configuration, deep_supervision=True)
open(sys.argv[2], "w").write(json.dumps({
    "configuration": prepared.configuration, "plans_dir": str(prepared.plans_dir), "folder": str(folder),
    "patch_size": list(plan.patch_size), "batch_size": plan.batch_size, "spacing": list(plan.spacing),
    "network": asdict(plan.network), "parameters": sum(p.numel() for p in network.parameters()),
    "splits": prepared.splits, "viseg_file": __import__("viseg").__file__}))
"""

# nnU-Net's venv, timed: `python -c NNUNET_TRAIN settings.json out.json`. nnUNetv2_train's single-process
# path (get_trainer_from_args, run_training) at one thread; see the module docstring for what it leaves out.
NNUNET_TRAIN = """
import json, sys, time
start = time.perf_counter()
import torch
s = json.loads(open(sys.argv[1]).read())
torch.set_num_threads(s["threads"])
from nnunetv2.run.run_training import get_trainer_from_args
trainer = get_trainer_from_args(str(s["dataset_id"]), s["configuration"], s["fold"], s["trainer"], s["plans"],
                                False, device=torch.device("cpu"))
# a variant sets num_epochs itself; set all three anyway, so a budget without a variant is the same trainer
trainer.num_epochs = s["epochs"]
trainer.num_iterations_per_epoch = s["iterations"]
trainer.num_val_iterations_per_epoch = s["val_iterations"]
t = time.perf_counter()
trainer.run_training()
fit_s = time.perf_counter() - t
tr_keys, val_keys = trainer.do_split()
log = getattr(trainer.logger, "local_logger", trainer.logger).my_fantastic_logging  # 2.8: MetaLogger
open(sys.argv[2], "w").write(json.dumps({
    "fit_s": fit_s, "process_s": time.perf_counter() - start, "output_folder": trainer.output_folder,
    "trainer_class": type(trainer).__name__, "num_epochs": trainer.num_epochs,
    "iterations_per_epoch": trainer.num_iterations_per_epoch,
    "val_iterations_per_epoch": trainer.num_val_iterations_per_epoch,
    "batch_size": trainer.batch_size, "patch_size": list(trainer.configuration_manager.patch_size),
    "parameters": sum(p.numel() for p in trainer.network.parameters()), "torch_threads": torch.get_num_threads(),
    "initial_lr": trainer.initial_lr, "weight_decay": trainer.weight_decay,
    "train": sorted(tr_keys), "val": sorted(val_keys),
    "log": {k: [float(v) if not isinstance(v, list) else [float(x) for x in v] for v in vals]
            for k, vals in log.items()}}))
"""

# nnU-Net's venv, timed: `python -c NNUNET_PREDICT settings.json out.json`.
NNUNET_PREDICT = """
import json, sys, time
start = time.perf_counter()
import torch
s = json.loads(open(sys.argv[1]).read())
torch.set_num_threads(s["threads"])
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=s["mirror"],
                            perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                            verbose_preprocessing=False, allow_tqdm=False)
predictor.initialize_from_trained_model_folder(s["model"], use_folds=(s["fold"],),
                                               checkpoint_name="checkpoint_final.pth")
import os
os.makedirs(s["output"], exist_ok=True)  # predict_from_files_sequential writes its args file there first
predictor.predict_from_files_sequential(s["input"], s["output"], save_probabilities=False, overwrite=True)
open(sys.argv[2], "w").write(json.dumps({
    "process_s": time.perf_counter() - start, "torch_threads": torch.get_num_threads(),
    "mirror_axes": list(predictor.allowed_mirroring_axes or []) if s["mirror"] else [],
    "parameters": sum(p.numel() for p in predictor.network.parameters())}))
"""


# -- command line ---------------------------------------------------------------------------------------


def size_arg(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YxX, got {text!r}") from None
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected two positive sizes YxX (2d), got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Needs bench/.venv-nnunet: run `bash bench/setup_nnunet_env.sh` first. "
                                     "Smoke test: --cases 10 --epochs 1 --iterations-per-epoch 10 --val-iterations 2 "
                                     "--mirror off --work-dir /tmp/q_smoke --fresh --out /tmp/q_smoke/r.json")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET,
                        help="raw dataset in nnU-Net v2 layout; default: %(default)s")
    parser.add_argument("--cases", type=int, default=None,
                        help="only the first N cases (sorted; keep it even for ACDC's frame pairs), for a smoke "
                        "test; default: all")
    parser.add_argument("--epochs", type=int, default=5,
                        help="training epochs for both (nnU-Net: nnUNetTrainer_<N>epochs); default: %(default)s")
    parser.add_argument("--iterations-per-epoch", type=int, default=250,
                        help="training iterations per epoch for both (nnU-Net's 250); default: %(default)s")
    parser.add_argument("--val-iterations", type=int, default=50,
                        help="validation iterations per epoch for both (nnU-Net's 50); default: %(default)s")
    parser.add_argument("--patch", type=size_arg, default=[128, 128], metavar="YxX",
                        help="2d patch for both, snapped by viseg's planner, which derives the topology for it "
                        "(default: 128x128)")
    parser.add_argument("--batch", type=int, default=12, help="batch size for both (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=12345,
                        help="viseg's training seed (seed=; its default %(default)s). nnU-Net seeds nothing, so each "
                        "of its runs is a new draw anyway; run the bench again with another --seed, --work-dir and "
                        "--out to read the difference against the run-to-run spread")
    parser.add_argument("--fold", type=int, default=0,
                        help="fold trained and whose validation cases are predicted and scored (default: 0)")
    parser.add_argument("--mirror", choices=("on", "off"), default="on",
                        help="test-time mirroring for both predictors (default: on, both tools' default)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OMP/MKL/OpenBLAS threads per tool (default: %(default)s, one per core)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the tools to cores 0 and 1 with taskset")
    parser.add_argument("--np", type=int, default=2, dest="num_processes",
                        help="processes for the untimed planning/preprocessing (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK,
                        help="folder for both tools' caches, preprocessed data, runs and predictions; kept "
                        "afterwards so --skip-train can re-predict (default: %(default)s)")
    parser.add_argument("--skip-train", action="store_true",
                        help="reuse the trained runs in --work-dir: only predict and score again (training times and "
                        "load are read from --work-dir/train_result.json, written by the training run)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete --work-dir first (a new training needs no previous runs in it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="results JSON; the .md summary goes beside it, logs to raw/ (default: %(default)s)")
    parser.add_argument("--nnunet-id", type=int, default=27, help="dataset ID given to nnU-Net (default: 27)")
    parser.add_argument("--plans-name", default="nnUNetPlans_quality_bench",
                        help="plans identifier of nnU-Net's plans copy with the bench plan (default: %(default)s)")
    parser.add_argument("--viseg-python", type=Path, default=REPO / ".venv" / "bin" / "python",
                        help="python of viseg's venv (default: %(default)s)")
    parser.add_argument("--viseg-ref", default="HEAD",
                        help="git revision of viseg to benchmark: its viseg/ and conf/ are exported into "
                        "--work-dir and put first on PYTHONPATH, so edits to the working tree during the "
                        "hour-long run cannot change the code under test; 'worktree' runs the working tree "
                        "as it is (default: %(default)s)")
    args = parser.parse_args(argv)
    positive = ("epochs", "iterations_per_epoch", "batch", "threads", "num_processes")
    if any(getattr(args, k) < 1 for k in positive) or args.val_iterations < 0 or args.fold < 0:
        parser.error("--epochs, --iterations-per-epoch, --batch, --threads and --np must be at least 1, "
                     "--val-iterations and --fold at least 0")
    if args.cases is not None and args.cases < 10:
        parser.error("--cases must be at least 10 (5 folds of whole patients)")
    return args


# -- setup (untimed) ------------------------------------------------------------------------------------


def thread_env(threads: int) -> dict[str, str]:
    return {k: str(threads) for k in THREAD_VARS}


def viseg_overrides(args: argparse.Namespace, dataset: Path, work: Path) -> list[str]:
    """Hydra overrides that fix the plan and the split: shared by the setup snippet and the training."""
    return [f"dataset.basepath={dataset}", "model=plain_conv_unet_2d",
            f"patch_size=[{args.patch[0]},{args.patch[1]}]", f"batch_size={args.batch}", f"fold={args.fold}",
            f"splits.group_pattern='{GROUP_PATTERN}'", f"paths.cache={work / 'viseg_cache'}",
            f"paths.results={work / 'viseg_results'}"]


def viseg_train_overrides(args: argparse.Namespace) -> list[str]:
    return [f"seed={args.seed}", f"trainer.max_epochs={args.epochs}",
            f"trainer.iterations_per_epoch={args.iterations_per_epoch}",
            f"trainer.val_iterations={args.val_iterations}", "loader.num_workers=0", "num_processes=1",
            "devices=auto"]


def viseg_source(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """The viseg code under test: a snapshot of `--viseg-ref` (or the working tree), and its commit."""
    if args.viseg_ref == "worktree":
        return {"ref": "worktree", "commit": git(["rev-parse", "HEAD"]) + " + uncommitted changes", "path": ""}
    commit = git(["rev-parse", args.viseg_ref])
    snapshot = work / f"viseg_src_{commit[:12]}"
    if not (snapshot / "viseg" / "__init__.py").is_file():
        snapshot.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "viseg", "conf"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(snapshot)], input=archive, check=True)
    return {"ref": args.viseg_ref, "commit": commit, "path": str(snapshot)}


def git(cmd: list[str]) -> str:
    return subprocess.run(["git", "-C", str(REPO), *cmd], check=True, capture_output=True, text=True).stdout.strip()


def viseg_env(source: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, **extra)
    if source["path"]:  # before the editable install's finder, which sys.meta_path consults after sys.path
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source["path"], os.environ.get("PYTHONPATH")) if p)
    return env


def setup_viseg(args: argparse.Namespace, dataset: Path, work: Path, env: dict[str, str], logs: Path
                ) -> dict[str, Any]:
    overrides = [*viseg_overrides(args, dataset, work), f"num_processes={args.num_processes}"]
    settings, out = work / "viseg_setup_overrides.json", work / "viseg_setup.json"
    settings.write_text(json.dumps(overrides))
    seconds = timed([str(args.viseg_python), "-c", VISEG_SETUP, str(settings), str(out)], env,
                    logs / "quality_viseg_setup.log")
    print(f"viseg verify + fingerprint + plan + preprocess (untimed): {seconds:.1f} s", flush=True)
    return json.loads(out.read_text())


def setup_nnunet(args: argparse.Namespace, env: dict[str, str], preprocessed: Path, viseg: dict[str, Any],
                 logs: Path) -> dict[str, Any]:
    """nnU-Net's own 2d plan and preprocessing, then the bench plans copy and viseg's split."""
    if not (preprocessed / "nnUNetPlans.json").is_file() or not (preprocessed / "nnUNetPlans_2d").is_dir():
        cmd = [str(NNUNET_VENV / "bin" / "nnUNetv2_plan_and_preprocess"), "-d", str(args.nnunet_id), "-c",
               CONFIGURATION, "-np", str(args.num_processes), "-npfp", str(args.num_processes), "--no_pbar"]
        seconds = timed(cmd, env, logs / "quality_nnunet_setup.log")
        print(f"nnU-Net fingerprint + plan + preprocess 2d (untimed): {seconds:.1f} s", flush=True)
    own = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans = json.loads(json.dumps(own))
    plans["plans_name"] = args.plans_name
    conf = plans["configurations"][CONFIGURATION]
    conf["patch_size"] = list(viseg["patch_size"])
    conf["batch_size"] = int(viseg["batch_size"])
    arch = conf["architecture"]["arch_kwargs"]
    for key in TOPOLOGY_KEYS:
        arch[key] = json.loads(json.dumps(viseg["network"][key]))
    (preprocessed / f"{args.plans_name}.json").write_text(json.dumps(plans, indent=1))
    # nnU-Net reads splits_final.json from the preprocessed dataset folder before making its own
    (preprocessed / "splits_final.json").write_text(json.dumps(viseg["splits"], indent=1))
    return {"own": plan_summary(own), "bench": plan_summary(plans)}


def plan_summary(plans: dict[str, Any]) -> dict[str, Any]:
    conf = plans["configurations"][CONFIGURATION]
    arch = conf["architecture"]["arch_kwargs"]
    return {"plans_name": plans["plans_name"], "patch_size": conf["patch_size"], "batch_size": conf["batch_size"],
            "spacing": conf["spacing"], "data_identifier": conf["data_identifier"],
            "network_class": conf["architecture"]["network_class_name"],
            "network": {k: arch[k] for k in TOPOLOGY_KEYS}}


def nnunet_trainer_name(args: argparse.Namespace) -> str:
    """The training-length variant that is this budget, when nnU-Net ships one."""
    variant = f"nnUNetTrainer_{args.epochs}epochs"
    source = next((NNUNET_VENV / "lib").glob("python3*/site-packages/nnunetv2/training/nnUNetTrainer/variants/"
                                             "training_length/nnUNetTrainer_Xepochs.py"), None)
    standard = args.iterations_per_epoch == 250 and args.val_iterations == 50
    if standard and source is not None and f"class {variant}(nnUNetTrainer)" in source.read_text():
        return variant
    return "nnUNetTrainer"


def link_inputs(dataset: Path, cases: list[str], images: Path, labels: Path) -> None:
    """The validation cases' images (imagesTs naming) and their original labels, in folders of their own."""
    ending = json.loads((dataset / "dataset.json").read_text()).get("file_ending", ".nii.gz")
    for folder in (images, labels):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    for case in cases:
        for image in sorted((dataset / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}")):
            (images / image.name).symlink_to(image.resolve())
        (labels / f"{case}{ending}").symlink_to((dataset / "labelsTr" / f"{case}{ending}").resolve())


# -- the timed runs: both tools at once -----------------------------------------------------------------


def pinned(tool: str, cmd: list[str], args: argparse.Namespace) -> list[str]:
    return cmd if args.no_pin else ["taskset", "-c", str(CORES[tool]), *cmd]


def side_by_side(cmds: dict[str, list[str]], envs: dict[str, dict[str, str]], logs: dict[str, Path]
                 ) -> dict[str, dict[str, float]]:
    """Start both commands at once; each one's wall time from the common start to its own end, and its CPU
    time (user + system, its waited-for children included), which foreign load on its core does not inflate."""
    procs, handles, wall, cpu, codes = {}, {}, {}, {}, {}
    start = time.perf_counter()
    for tool, cmd in cmds.items():
        handles[tool] = logs[tool].open("w")
        handles[tool].write(f"$ {shlex.join(cmd)}\n")
        handles[tool].flush()
        procs[tool] = subprocess.Popen(cmd, env=envs[tool], stdout=handles[tool], stderr=subprocess.STDOUT)
    pending = set(procs)
    while pending:
        for tool in sorted(pending):
            pid, status, usage = os.wait4(procs[tool].pid, os.WNOHANG)
            if pid:
                wall[tool] = time.perf_counter() - start
                cpu[tool] = usage.ru_utime + usage.ru_stime
                codes[tool] = os.waitstatus_to_exitcode(status)
                procs[tool].returncode = codes[tool]  # reaped here: Popen must not wait for it again
                handles[tool].close()
                pending.discard(tool)
        time.sleep(1.0)
    failed = [t for t in procs if codes[t] != 0]
    if failed:
        tails = "\n".join(f"--- {logs[t]}:\n" + "\n".join(logs[t].read_text(errors="replace").splitlines()[-30:])
                          for t in failed)
        raise RuntimeError(f"{', '.join(NAMES[t] for t in failed)} failed:\n{tails}")
    return {"wall": wall, "cpu": cpu}


def viseg_run_dir(results: Path) -> Path:
    runs = sorted(p.parent for p in results.rglob("finished.json"))
    if len(runs) != 1:
        raise RuntimeError(f"expected one finished viseg run under {results}, found {runs}")
    return runs[0]


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open() as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def train_both(args: argparse.Namespace, ctx: dict[str, Any], logs: Path) -> dict[str, Any]:
    work = ctx["work"]
    viseg_cmd = [str(args.viseg_python), "-m", "viseg.train",
                 *viseg_overrides(args, ctx["dataset"], work), *viseg_train_overrides(args)]
    settings = work / "nnunet_train.json"
    settings.write_text(json.dumps({
        "dataset_id": args.nnunet_id, "configuration": CONFIGURATION, "fold": args.fold, "plans": args.plans_name,
        "trainer": ctx["trainer"], "epochs": args.epochs, "iterations": args.iterations_per_epoch,
        "val_iterations": args.val_iterations, "threads": args.threads}))
    nn_out = work / "nnunet_train_out.json"
    nnunet_cmd = [str(NNUNET_VENV / "bin" / "python"), "-c", NNUNET_TRAIN, str(settings), str(nn_out)]
    cmds = {"viseg": pinned("viseg", viseg_cmd, args), "nnunet": pinned("nnunet", nnunet_cmd, args)}
    print(f"training both side by side: {args.epochs} epochs x {args.iterations_per_epoch} iterations ...",
          flush=True)
    times = side_by_side(cmds, ctx["envs"], {t: logs / f"quality_{t}_train.log" for t in TOOLS})
    nnunet = json.loads(nn_out.read_text())
    run_dir = viseg_run_dir(work / "viseg_results")
    finished = json.loads((run_dir / "finished.json").read_text())
    metrics = read_metrics(run_dir)
    log = nnunet.pop("log")
    epochs_nn = list(zip(log.get("epoch_start_timestamps", []), log.get("epoch_end_timestamps", [])))
    return {
        "wall_s": {t: round(v, 1) for t, v in times["wall"].items()},
        "cpu_s": {t: round(v, 1) for t, v in times["cpu"].items()},
        "loop_s": {"viseg": round(sum(m.get("epoch_time", 0.0) for m in metrics), 1),
                   "nnunet": round(sum(b - a for a, b in epochs_nn), 1)},
        # the same work on both sides: nnU-Net's run here skips its end-of-training validation, so viseg's
        # (timed by the trainer itself) is taken out of its wall time
        "same_work_s": {"viseg": round(times["wall"]["viseg"] - finished.get("validation_seconds", 0.0), 1),
                        "nnunet": round(times["wall"]["nnunet"], 1)},
        "viseg": {"run_dir": str(run_dir), "finished": finished, "metrics": metrics,
                  "command": shlex.join(cmds["viseg"])},
        "nnunet": {**nnunet, "log": log, "command": shlex.join([*cmds["nnunet"][:-4], "-c", "NNUNET_TRAIN",
                                                                *cmds["nnunet"][-2:]])},
    }


def predict_both(args: argparse.Namespace, ctx: dict[str, Any], train: dict[str, Any], logs: Path
                 ) -> dict[str, Any]:
    work = ctx["work"]
    outputs = {t: work / f"pred_{t}" for t in TOOLS}
    for folder in outputs.values():
        if folder.exists():
            shutil.rmtree(folder)
    viseg_cmd = [str(args.viseg_python), "-m", "viseg.predict", f"model={train['viseg']['run_dir']}",
                 f"input={ctx['images']}", f"output={outputs['viseg']}", "checkpoint=last",
                 f"mirror={'true' if args.mirror == 'on' else 'false'}", "step=0.5", "device=cpu"]
    settings, nn_out = work / "nnunet_predict.json", work / "nnunet_predict_out.json"
    model = Path(train["nnunet"]["output_folder"]).parent
    settings.write_text(json.dumps({"model": str(model), "fold": args.fold, "input": str(ctx["images"]),
                                    "output": str(outputs["nnunet"]), "mirror": args.mirror == "on",
                                    "threads": args.threads}))
    nnunet_cmd = [str(NNUNET_VENV / "bin" / "python"), "-c", NNUNET_PREDICT, str(settings), str(nn_out)]
    cmds = {"viseg": pinned("viseg", viseg_cmd, args), "nnunet": pinned("nnunet", nnunet_cmd, args)}
    print(f"predicting {len(ctx['val'])} validation cases side by side (mirroring {args.mirror}) ...", flush=True)
    times = side_by_side(cmds, ctx["envs"], {t: logs / f"quality_{t}_predict.log" for t in TOOLS})
    return {"wall_s": {t: round(v, 1) for t, v in times["wall"].items()},
            "cpu_s": {t: round(v, 1) for t, v in times["cpu"].items()},
            "outputs": {t: str(p) for t, p in outputs.items()},
            "nnunet": json.loads(nn_out.read_text()), "viseg_command": shlex.join(cmds["viseg"]),
            "nnunet_model": str(model)}


def score(args: argparse.Namespace, ctx: dict[str, Any], outputs: dict[str, str], logs: Path) -> dict[str, Any]:
    """The same evaluator for both: viseg.evaluate against the original label files."""
    scores = {}
    for tool in TOOLS:
        summary = ctx["work"] / f"summary_{tool}.json"
        cmd = [str(args.viseg_python), "-m", "viseg.evaluate", f"pred={outputs[tool]}", f"ref={ctx['labels']}",
               "labels=[1,2,3]", f"output={summary}", f"num_processes={args.num_processes}"]
        timed(cmd, ctx["envs"]["viseg"], logs / f"quality_{tool}_evaluate.log")
        data = json.loads(summary.read_text())
        per_class = {k: data["mean"][k]["Dice"] for k in LABELS}
        scores[tool] = {"dice": per_class, "mean_dice": data["foreground_mean"]["Dice"],
                        "cases": len(data["metric_per_case"]), "summary": str(summary),
                        "per_case": {c["case"]: {k: c["metrics"][k]["Dice"] for k in LABELS}
                                     for c in data["metric_per_case"]}}
    return scores


# -- checks and report ----------------------------------------------------------------------------------


def checks_for(ctx: dict[str, Any], train: dict[str, Any], pred: dict[str, Any], args: argparse.Namespace
               ) -> list[Check]:
    viseg, plans, nn = ctx["viseg"], ctx["nnunet_plans"]["bench"], train["nnunet"]
    run = Path(train["viseg"]["run_dir"])
    run_plans = json.loads((run / "plans.json").read_text())
    run_splits = json.loads((run / "splits.json").read_text())[args.fold]
    split = viseg["splits"][args.fold]
    same_net = all(plans["network"][k] == viseg["network"][k] for k in TOPOLOGY_KEYS)
    patients = {c.split("_")[0] for c in split["val"]} & {c.split("_")[0] for c in split["train"]}
    finished = train["viseg"]["finished"]
    epochs_nn = len(nn["log"].get("epoch_end_timestamps", []))
    return [
        Check("patch", nn["patch_size"] == viseg["patch_size"] == run_plans["configurations"][CONFIGURATION]
              ["patch_size"], f"nnU-Net {nn['patch_size']}, viseg {viseg['patch_size']}"),
        Check("batch", nn["batch_size"] == viseg["batch_size"],
              f"nnU-Net {nn['batch_size']}, viseg {viseg['batch_size']}"),
        Check("network topology", same_net and plans["network_class"].endswith(".PlainConvUNet"),
              f"PlainConvUNet, {viseg['network']['n_stages']} stages, features "
              f"{viseg['network']['features_per_stage']}, "
              f"strides {viseg['network']['strides']}"),
        Check("network parameters", nn["parameters"] == viseg["parameters"] == pred["nnunet"]["parameters"],
              f"nnU-Net trained {nn['parameters']:,} (predictor {pred['nnunet']['parameters']:,}), viseg "
              f"{viseg['parameters']:,}"),
        Check("split: train cases", nn["train"] == sorted(split["train"]) == sorted(run_splits["train"]),
              f"{len(nn['train'])} nnU-Net, {len(run_splits['train'])} viseg run"),
        Check("split: validation cases", nn["val"] == sorted(split["val"]) == sorted(run_splits["val"]),
              f"{len(nn['val'])} nnU-Net, {len(run_splits['val'])} viseg run"),
        Check("split: patients not shared", not patients,
              f"{len(patients)} patients in both train and val" if patients else "each patient in one side only"),
        Check("budget", nn["num_epochs"] == finished["epochs"] == args.epochs and nn["iterations_per_epoch"]
              == args.iterations_per_epoch and epochs_nn == args.epochs,
              f"nnU-Net {epochs_nn} epochs x {nn['iterations_per_epoch']} (+{nn['val_iterations_per_epoch']} val), "
              f"viseg {finished['epochs']} epochs x {args.iterations_per_epoch} (+{args.val_iterations} val)"),
        Check("torch threads", nn["torch_threads"] == pred["nnunet"]["torch_threads"] == args.threads,
              f"nnU-Net {nn['torch_threads']} (train), {pred['nnunet']['torch_threads']} (predict); viseg via "
              f"OMP_NUM_THREADS={args.threads}"),
    ]


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def summarize(train: dict[str, Any], pred: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
    vi, nn = scores["viseg"], scores["nnunet"]
    return {
        "mean_dice": {t: round(scores[t]["mean_dice"], 4) for t in TOOLS},
        "dice_per_class": {t: {LABELS[k]: round(v, 4) for k, v in scores[t]["dice"].items()} for t in TOOLS},
        "dice_difference_viseg_minus_nnunet": {
            "mean": round(vi["mean_dice"] - nn["mean_dice"], 4),
            **{LABELS[k]: round(vi["dice"][k] - nn["dice"][k], 4) for k in LABELS}},
        "train_wall_s": train["wall_s"], "train_loop_s": train["loop_s"], "predict_wall_s": pred["wall_s"],
        "train_same_work_s": train.get("same_work_s"),
        "train_cpu_s": train.get("cpu_s"), "predict_cpu_s": pred["cpu_s"],
        "time_ratio_viseg_over_nnunet": {
            "train_wall": ratio(train["wall_s"]["viseg"], train["wall_s"]["nnunet"]),
            "train_cpu": ratio(train["cpu_s"]["viseg"], train["cpu_s"]["nnunet"]) if "cpu_s" in train else None,
            "predict_cpu": ratio(pred["cpu_s"]["viseg"], pred["cpu_s"]["nnunet"]),
            "train_loop": ratio(train["loop_s"]["viseg"], train["loop_s"]["nnunet"]),
            "train_same_work": ratio(train["same_work_s"]["viseg"], train["same_work_s"]["nnunet"])
            if "same_work_s" in train else None,
            "predict_wall": ratio(pred["wall_s"]["viseg"], pred["wall_s"]["nnunet"])},
        "targets": {"viseg_mean_dice_at_least_nnunet_minus_0.01": vi["mean_dice"] >= nn["mean_dice"] - 0.01,
                    "viseg_train_wall_at_most_nnunet": _same_work(train, "viseg") <= _same_work(train, "nnunet"),
                    "nnunet_mean_dice_above_0.7": nn["mean_dice"] > 0.7},
    }


def _same_work(train: dict[str, Any], tool: str) -> float:
    """Training wall time for the same work (viseg's end-of-training validation left out, as nnU-Net's is)."""
    return (train.get("same_work_s") or train["wall_s"])[tool]


def loss_curves(train: dict[str, Any]) -> dict[str, Any]:
    """Per-epoch losses and pseudo-Dice of both, to compare how training progressed (not only where it ended)."""
    log, metrics = train["nnunet"]["log"], train["viseg"]["metrics"]
    pick = {k: [m.get(k) for m in metrics] for k in sorted({k for m in metrics for k in m})}
    return {"nnunet": {k: log.get(k) for k in ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "lrs")},
            "viseg": pick}


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_pair(values: dict[str, float] | None) -> str:
    if not values:
        return "not measured"
    return f"nnU-Net {values['nnunet']:.0f} s, viseg {values['viseg']:.0f} s"


def markdown(result: dict[str, Any], checks: list[Check]) -> str:
    m, s, d, sm = result["machine"], result["settings"], result["dataset"], result["summary"]
    nn, vi = m["nnunet_env"], m["viseg_env"]
    dc, diff, tr = sm["dice_per_class"], sm["dice_difference_viseg_minus_nnunet"], sm["time_ratio_viseg_over_nnunet"]
    plan = result["plan"]["viseg"]
    rows = [f"| {NAMES[t]} | {dc[t]['RV']:.4f} | {dc[t]['MYO']:.4f} | {dc[t]['LV']:.4f} | **{sm['mean_dice'][t]:.4f}** "
            f"| {sm['train_wall_s'][t]:.0f} | {sm['train_loop_s'][t]:.0f} | {sm['predict_wall_s'][t]:.0f} |"
            for t in ("nnunet", "viseg")]
    targets = sm["targets"]
    return "\n".join([
        f"# Quality at equal iterations ({CONFIGURATION}, CPU): nnU-Net v2 vs viseg ({d['name']})",
        "",
        f"{result['timestamp']}; {d['num_cases']} cases of `{d['path']}`, fold {s['fold']} "
        f"({d['train_cases']} train / {d['val_cases']} validation cases, patients grouped, identical for both). "
        f"Budget: **{s['epochs']} epochs x {s['iterations_per_epoch']} iterations = {s['iterations']} iterations** "
        f"(+{s['val_iterations']} validation iterations per epoch), nnU-Net trainer `{s['nnunet_trainer']}`. "
        f"Plan: patch {plan['patch_size']}, batch {plan['batch_size']}, PlainConvUNet with "
        f"{plan['network']['n_stages']} stages, {result['plan']['parameters']:,} parameters (nnU-Net's own 2d plan: "
        f"patch {result['plan']['nnunet_own']['patch_size']}, batch {result['plan']['nnunet_own']['batch_size']}).",
        f"Both trained at the same time, each pinned to its own core with {s['threads']} torch thread and no "
        f"augmentation workers, then predicted the same way (final weights, full resolution, mirroring "
        f"{s['mirror']}, step 0.5). Scored by `python -m viseg.evaluate` against the original labels.",
        f"Machine: {m['cpu_count']} CPUs, no GPU, Python {m['python']}; nnunetv2 {nn['nnunetv2']} "
        f"(torch {nn['torch']}), viseg {vi['viseg']} (torch {vi['torch']}). Load average (1/5/15 min): before "
        f"training {_load(result['load']['before_train'])}, after training {_load(result['load']['after_train'])}, "
        f"after prediction {_load(result['load']['after_predict'])}.",
        "",
        "| tool | Dice RV | Dice MYO | Dice LV | mean Dice | train wall [s] | train loop [s] | predict wall [s] |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        f"| viseg - nnU-Net / viseg / nnU-Net | {diff['RV']:+.4f} | {diff['MYO']:+.4f} | {diff['LV']:+.4f} | "
        f"**{diff['mean']:+.4f}** | {fmt(tr['train_wall'])} | {fmt(tr['train_loop'])} | {fmt(tr['predict_wall'])} |",
        "",
        f"CPU seconds (user + system; unaffected by foreign load on the core): train "
        f"{fmt_pair(sm['train_cpu_s'])}, predict {fmt_pair(sm['predict_cpu_s'])}; ratio viseg / nnU-Net train "
        f"{fmt(tr['train_cpu'])}, predict {fmt(tr['predict_cpu'])}.",
        "",
        "Train wall: process start to end (viseg's includes its end-of-training whole-case validation, "
        "nnU-Net's leaves out `perform_actual_validation`). Train loop: the epochs alone (viseg: metrics.csv "
        "epoch_time; nnU-Net: its epoch timestamps), validation iterations included. Same work: the train wall "
        "without viseg's end-of-training validation (its `validation_seconds` in finished.json), i.e. the work "
        f"nnU-Net did here: viseg / nnU-Net = {fmt(tr.get('train_same_work'))}; the wall-time target uses it.",
        "",
        "Targets: viseg mean Dice >= nnU-Net's - 0.01: "
        f"**{'yes' if targets['viseg_mean_dice_at_least_nnunet_minus_0.01'] else 'NO'}**; "
        f"viseg train wall (same work) <= nnU-Net's: "
        f"**{'yes' if targets['viseg_train_wall_at_most_nnunet'] else 'NO'}**; nnU-Net mean Dice > 0.7: "
        f"**{'yes' if targets['nnunet_mean_dice_above_0.7'] else 'NO'}**.",
        *([""] + [f"Note: {n}" for n in result.get("notes", [])] if result.get("notes") else []),
        "",
        "| check | ok | detail |",
        "| --- | --- | --- |",
        *(f"| {c.field} | {'yes' if c.ok else '**NO**'} | {c.detail} |" for c in checks),
        "",
    ])


# -- main -----------------------------------------------------------------------------------------------


def prepare_context(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """Everything untimed: datasets, both tools' plans and preprocessing, the split, the input folders."""
    work = args.work_dir.resolve()
    if args.fresh and work.exists() and not args.skip_train:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset
    if args.cases is not None:
        dataset = work / "data" / args.dataset.name
        if not dataset.exists():
            subset_dataset(args.dataset, dataset, args.cases)
    if not (work / "nnUNet_raw").exists():
        make_nnunet_raw(work, dataset, args.nnunet_id)
    raw = work / "nnUNet_raw"
    folder = next(raw.iterdir()).name
    env = nnunet_env(raw, work / "nnunet")
    source = viseg_source(args, work)
    threads = thread_env(args.threads)
    vis_env = viseg_env(source, threads)
    # the viseg commands start in the work folder: `python -c`/`-m` put the current folder first on sys.path,
    # and from the repository that would import the working tree's viseg instead of the snapshot
    os.chdir(work)
    viseg = setup_viseg(args, dataset, work, viseg_env(source, {}), logs)
    if source["path"] and not viseg["viseg_file"].startswith(source["path"]):
        raise RuntimeError(f"viseg was imported from {viseg['viseg_file']}, not from the snapshot {source['path']}")
    preprocessed = work / "nnunet" / "preprocessed" / folder
    nnunet_plans = setup_nnunet(args, env, preprocessed, viseg, logs)
    val = sorted(viseg["splits"][args.fold]["val"])
    images, labels = work / "predict_input", work / "reference_labels"
    link_inputs(dataset, val, images, labels)
    envs = {"nnunet": dict(env, nnUNet_n_proc_DA="0", nnUNet_compile="f", nnUNet_def_n_proc=str(args.threads),
                           **threads),
            "viseg": vis_env}
    return {"source": source, "work": work, "dataset": dataset, "folder": folder, "viseg": viseg,
            "nnunet_plans": nnunet_plans, "val": val, "images": images, "labels": labels, "envs": envs,
            "trainer": nnunet_trainer_name(args)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dataset, args.out, args.viseg_python = args.dataset.resolve(), args.out.resolve(), args.viseg_python.absolute()
    if not (NNUNET_VENV / "bin" / "nnUNetv2_plan_and_preprocess").exists():
        sys.exit("bench/.venv-nnunet is missing: run `bash bench/setup_nnunet_env.sh` first")
    if not args.no_pin and len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs two usable cores (cores 0 and 1) for side-by-side pinning, or pass --no-pin")
    logs = args.out.parent / "raw"
    logs.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.viseg_python)
    ctx = prepare_context(args, logs)
    previous = ctx["work"] / "train_result.json"
    load = {"before_train": list(os.getloadavg())}
    if args.skip_train:
        if not previous.is_file():
            sys.exit(f"--skip-train: no previous training in {ctx['work']} ({previous.name} is missing)")
        train = json.loads(previous.read_text())
        load["before_train"], load["after_train"] = train.pop("load")
    else:
        if (ctx["work"] / "viseg_results").exists() or (ctx["work"] / "nnunet" / "results").exists():
            sys.exit(f"{ctx['work']} already holds trained runs: pass --skip-train to re-predict them, or "
                     "--fresh to start over")
        train = train_both(args, ctx, logs)
        load["after_train"] = list(os.getloadavg())
        previous.write_text(json.dumps({**train, "load": [load["before_train"], load["after_train"]]}))
    print(f"training wall [s]: viseg {train['wall_s']['viseg']}, nnU-Net {train['wall_s']['nnunet']}", flush=True)
    pred = predict_both(args, ctx, train, logs)
    load["after_predict"] = list(os.getloadavg())
    print(f"prediction wall [s]: viseg {pred['wall_s']['viseg']}, nnU-Net {pred['wall_s']['nnunet']}", flush=True)
    scores = score(args, ctx, pred["outputs"], logs)
    checks = checks_for(ctx, train, pred, args)
    split = ctx["viseg"]["splits"][args.fold]
    result = {
        "benchmark": "segmentation quality at equal iterations on CPU: nnUNetTrainer vs viseg (2d)",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
        "dataset": {"path": str(args.dataset), "name": json.loads((args.dataset / "dataset.json").read_text())
                    .get("name", args.dataset.name), "num_cases": len(split["train"]) + len(split["val"]),
                    "train_cases": len(split["train"]), "val_cases": len(split["val"]),
                    "nnunet_folder": ctx["folder"], "val": ctx["val"]},
        "machine": machine,
        "viseg_source": {**ctx["source"], "imported_from": ctx["viseg"]["viseg_file"]},
        "settings": {"configuration": CONFIGURATION, "fold": args.fold, "epochs": args.epochs,
                     "iterations_per_epoch": args.iterations_per_epoch, "val_iterations": args.val_iterations,
                     "iterations": args.epochs * args.iterations_per_epoch, "patch": args.patch, "batch": args.batch,
                     "threads": args.threads, "pinned_cores": None if args.no_pin else CORES,
                     "mirror": args.mirror, "tile_step": 0.5, "checkpoint": "viseg last.ckpt, nnU-Net "
                     "checkpoint_final.pth (the weights after the last epoch)", "augmentation_workers": 0,
                     "nnunet_trainer": ctx["trainer"], "nnunet_plans": args.plans_name,
                     "viseg_seed": args.seed,
                     "split": f"viseg's grouped split ({GROUP_PATTERN}) as nnU-Net's splits_final.json",
                     "work_dir": str(ctx["work"]), "skip_train": args.skip_train,
                     "viseg_train_command": train["viseg"]["command"], "viseg_predict_command": pred["viseg_command"],
                     "nnunet_train_command": train["nnunet"]["command"]},
        "plan": {"viseg": {k: ctx["viseg"][k] for k in ("patch_size", "batch_size", "spacing", "network")},
                 "nnunet_bench": ctx["nnunet_plans"]["bench"], "nnunet_own": ctx["nnunet_plans"]["own"],
                 "parameters": ctx["viseg"]["parameters"]},
        "load": {k: [round(v, 2) for v in vals] for k, vals in load.items()},
        "summary": summarize(train, pred, scores),
        "scores": scores,
        "training": {"viseg": {k: v for k, v in train["viseg"].items() if k != "metrics"},
                     "nnunet": {k: v for k, v in train["nnunet"].items() if k not in ("log", "train", "val")},
                     "viseg_pseudo_dice_ema": train["viseg"]["finished"].get("ema_pseudo_dice"),
                     "viseg_validation_mean_dice": train["viseg"]["finished"].get("mean_dice")},
        "curves": loss_curves(train),
        "prediction": {k: v for k, v in pred.items() if k != "viseg_command"},
        "checks": {"all_ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]},
    }
    write_results(args.out, result, checks, markdown)
    sm = result["summary"]
    print()
    for tool in ("nnunet", "viseg"):
        d = sm["dice_per_class"][tool]
        print(f"{NAMES[tool]:>8}: Dice RV {d['RV']:.4f} MYO {d['MYO']:.4f} LV {d['LV']:.4f} mean "
              f"{sm['mean_dice'][tool]:.4f}; train {sm['train_wall_s'][tool]:.0f} s, predict "
              f"{sm['predict_wall_s'][tool]:.0f} s")
    print(f"viseg - nnU-Net mean Dice {sm['dice_difference_viseg_minus_nnunet']['mean']:+.4f}; time ratio viseg / "
          f"nnU-Net: train {sm['time_ratio_viseg_over_nnunet']['train_wall']}, predict "
          f"{sm['time_ratio_viseg_over_nnunet']['predict_wall']}")
    print(f"load average before {_load(load['before_train'])}, after training {_load(load['after_train'])}, "
          f"after prediction {_load(load['after_predict'])}")
    print()
    print(agreement_table(checks))
    print(f"results: {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
