"""Loader throughput and train-step time, nnU-Net v2 vs viseg: same cases, patch, batch, network and cores.

Both tools train on the same ACDC cases (the first ``--cases``, linked into a temporary dataset), each from
its own preprocessed copy (made untimed first: nnU-Net ``nnUNetv2_plan_and_preprocess -c 3d_fullres``,
viseg ``prepare`` + ``preprocess_dataset``). Both use viseg's 3d_fullres plan values: the patch and batch
size (``--patch``/``--batch`` override them identically for both, since a full-size patch is slow on a small
CPU) and the network topology the planner derives for that patch, which is written into a copy of nnU-Net's
plans. Without overrides viseg's plan of these cases equals nnU-Net's; the script checks it. The plan is made
from the chosen cases: 20 ACDC cases plan 10x256x256 x 2, all 200 plan 10x256x224 x 7 (``--patch 10x256x224
--batch 7`` times those values).

Two measurements, both on the CPU, in a fresh subprocess per tool and round, with the same
``torch.set_num_threads(--threads)`` and no background loader workers (0 on both sides):

1. Loader throughput [batches/s]: ``--loader-batches`` batches after ``--loader-warmup``, timed one by one,
   each a full training batch with the full default augmentation.
   nnU-Net: its own trainer builds it: ``nnUNetTrainer.get_dataloaders()`` with ``nnUNet_n_proc_DA=0``,
   i.e. nnUNetDataLoader (blosc2 data, foreground oversampling 0.33, the larger initial patch) with
   ``get_training_transforms`` (rotation/scaling/dummy-2D/mirroring as the trainer configures them, noise,
   blur, brightness, contrast, low resolution, gamma, mirroring, deep-supervision target downsampling), run
   in-process by a SingleThreadedAugmenter. nnU-Net applies the transforms per sample under
   ``threadpool_limits(1)``, which also caps torch at 1 thread (it relies on worker processes instead).
   viseg: ``PatchSampler.sample_batch`` (memory-mapped .npy) then ``BatchAugmenter`` on the whole batch on
   the CPU. In real training viseg's augmenter runs on the GPU after the batch transfer, so this CPU
   number is its worst case; the JSON splits it into sampling and augmentation time.
2. Train-step time [s]: the median of ``--steps`` steps after ``--step-warmup``, on batches from the tool's
   own loader: zero_grad, forward of PlainConvUNet (deep supervision on), the tool's loss, backward, gradient
   clipping at norm 12, SGD step (lr 0.01, momentum 0.99, nesterov, weight decay 3e-5; both tools' defaults).
   nnU-Net: ``nnUNetTrainer.train_step`` (DC_and_CE_loss in DeepSupervisionWrapper, targets downsampled by
   the loader). viseg: the same sequence with ``DeepSupervisionLoss(DiceCELoss)`` (targets downsampled in
   the loss), without Lightning's loop around it.

The tools alternate, their order flipping every round (nnU-Net first in odd rounds), for ``--repeats``
rounds; the medians over rounds are compared.

Reading the results: both metrics are reported as "viseg speed relative to nnU-Net", above 1 viseg is faster
(2.0: twice as fast), below 1 slower:
  loader:     viseg batches/s / nnU-Net batches/s
  train step: nnU-Net step time / viseg step time
The load average before and after is recorded; on a loaded machine compare the ratios, not the absolutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
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
    warm_page_cache,
    write_results,
)
from preprocess_vs_nnunet import nnunet_env, subset_dataset, timed_to

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DATASET = Path("/work/shared/data/acdc")
DEFAULT_OUT = BENCH_DIR / "results" / "loader_step_acdc.json"
# nnU-Net's own plan of all 200 ACDC cases: only to say whether the benchmarked network is that plan's network
REFERENCE_PLANS = Path("/work/shared/reference/acdc/nnUNetPlans.json")
CONFIGURATION = "3d_fullres"
TOOLS = ("nnunet", "viseg")
NAMES = {"nnunet": "nnU-Net", "viseg": "viseg"}

# The viseg setup (untimed), `python -c VISEG_SETUP root cache num_processes overrides_json`: plans with and
# without the overrides, preprocesses, prints what the timed runs need.
VISEG_SETUP = """
import json, sys
from dataclasses import asdict
from omegaconf import OmegaConf
from viseg.config import BaseConfig, PlainConvUnet3DConfig
from viseg.preprocessing.prepare import prepare
from viseg.preprocessing.preprocess import preprocess_dataset

root, cache, num_processes, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])

def config(extra):
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BaseConfig), {
        "model": OmegaConf.structured(PlainConvUnet3DConfig), "lr_scheduler": {"type": "PolyLR"},
        "dataset": {"basepath": root}, "paths": {"cache": cache}, "splits": {"n_folds": 2},
        "num_processes": num_processes, **extra}))

def describe(prepared):
    plan = prepared.plans.configuration(prepared.configuration)
    return {"patch_size": list(plan.patch_size), "batch_size": plan.batch_size, "spacing": list(plan.spacing),
            "batch_dice": plan.batch_dice, "network": asdict(plan.network)}

default = prepare(config({}), progress=False)
used = prepare(config(overrides), progress=False) if overrides else default
folder = preprocess_dataset(used, num_processes=num_processes, progress=False)
print(json.dumps({"folder": str(folder), "plans": str(used.plans_path), "cases": [c.case_id for c in used.cases],
                  "default_plan": describe(default), "plan": describe(used)}))
"""

# Shared by both measurement snippets: reads the settings, seeds, sets threads, times a callable.
COMMON = """
import json, random, statistics, sys, time
import numpy as np
import torch

cfg = json.loads(open(sys.argv[1]).read())
torch.set_num_threads(cfg["threads"])
random.seed(cfg["seed"]); np.random.seed(cfg["seed"]); torch.manual_seed(cfg["seed"])

def clock(fn, warmup, n):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times

def loader_result(times):
    return {"batches": len(times), "seconds": sum(times), "batches_per_s": len(times) / sum(times),
            "median_batch_s": statistics.median(times)}

def step_result(times, losses):
    return {"steps": len(times), "times_s": times, "median_s": statistics.median(times),
            "losses": [float(v) for v in losses]}
"""

NNUNET_RUN = COMMON + """
import os
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

plans = json.loads(open(cfg["plans"]).read())
plans["continue_training"] = False  # run_training adds this key; the trainer pops it
dataset_json = json.loads(open(cfg["dataset_json"]).read())
trainer = nnUNetTrainer(plans, "3d_fullres", "all", dataset_json, device=torch.device("cpu"))
trainer.initialize()  # network, SGD, DC_and_CE_loss in DeepSupervisionWrapper
train_gen, _ = trainer.get_dataloaders()  # nnUNet_n_proc_DA=0: SingleThreadedAugmenter, in-process
trainer.network.train()
batches = []

def draw():
    batches.append(next(train_gen))
    del batches[:-2]

loader = loader_result(clock(draw, cfg["loader_warmup"], cfg["loader_batches"]))

# one more batch, untimed, through a wrapper that records how many threads torch has inside the transforms
seen = []
dl = train_gen.data_loader
inner = dl.transforms
def spy(**kw):
    seen.append(torch.get_num_threads())
    return inner(**kw)
dl.transforms = spy
next(train_gen)
dl.transforms = inner
loader["torch_threads_in_transforms"] = sorted(set(seen))

losses = []
k = [0]
def step():
    losses.append(trainer.train_step(batches[k[0] % len(batches)])["loss"])
    k[0] += 1

times = clock(step, cfg["step_warmup"], cfg["steps"])
b = batches[-1]
shapes = {"data": list(b["data"].shape), "target": [list(t.shape) for t in b["target"]]}
out = {"loader": loader, "step": step_result(times, losses[cfg["step_warmup"]:]), "shapes": shapes,
       "torch_threads": torch.get_num_threads(), "batch_size": trainer.batch_size,
       "initial_patch_size": [int(v) for v in dl.patch_size],
       "parameters": sum(p.numel() for p in trainer.network.parameters())}
open(sys.argv[2], "w").write(json.dumps(out))
"""

VISEG_RUN = COMMON + """
from pathlib import Path
from viseg.config import AugmentationConfig
from viseg.training.augment import BatchAugmenter, augmentation_input_size, is_anisotropic
from viseg.training.loader import PatchSampler
from viseg.data.labels import LabelEncoding
from viseg.training.loss import DeepSupervisionLoss, DiceCELoss, deep_supervision_scales
from viseg.planning.network import build_model
from viseg.planning.plans import Plans

plans = Plans.load(Path(cfg["plans"]))
plan = plans.configuration("3d_fullres")
patch = tuple(plan.patch_size)
aug_cfg = AugmentationConfig()
anisotropic = is_anisotropic(patch, plan.spacing)
input_size = augmentation_input_size(patch, aug_cfg, anisotropic)
sampler = PatchSampler(Path(cfg["folder"]), cfg["cases"], input_size, plan.batch_size, plans.foreground_labels,
                       0.33, 3, network_patch_size=patch, ignore_label=plans.ignore_label)
augment = BatchAugmenter(patch, aug_cfg, anisotropic, plans.label_encoding(), plan.use_mask_for_norm)
rng = np.random.default_rng(cfg["seed"])
generator = torch.Generator().manual_seed(cfg["seed"])
batches, split = [], {"sample_s": 0.0, "augment_s": 0.0}

def draw():
    t0 = time.perf_counter()
    data, seg = sampler.sample_batch(rng)
    data, seg = torch.from_numpy(data), torch.from_numpy(seg)
    t1 = time.perf_counter()
    batches.append(augment(data, seg, generator))
    del batches[:-2]
    split["sample_s"] += t1 - t0
    split["augment_s"] += time.perf_counter() - t1

for _ in range(cfg["loader_warmup"]):
    draw()
split = {"sample_s": 0.0, "augment_s": 0.0}
loader = loader_result(clock(draw, 0, cfg["loader_batches"]))
loader.update(split)

network = build_model(plans, "3d_fullres", deep_supervision=True)
loss_fn = DeepSupervisionLoss(DiceCELoss(plan.batch_dice), len(deep_supervision_scales(plan.network.strides)))
optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, weight_decay=3e-5, nesterov=True)
network.train()
losses = []
k = [0]
def step():
    data, seg = batches[k[0] % len(batches)]
    k[0] += 1
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(network(data), seg)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
    optimizer.step()
    losses.append(loss.detach().cpu().numpy())

times = clock(step, cfg["step_warmup"], cfg["steps"])
data, seg = batches[-1]
out = {"loader": loader, "step": step_result(times, losses[cfg["step_warmup"]:]),
       "shapes": {"data": list(data.shape), "target": [list(seg.shape)]}, "torch_threads": torch.get_num_threads(),
       "batch_size": plan.batch_size, "initial_patch_size": list(input_size),
       "parameters": sum(p.numel() for p in network.parameters())}
open(sys.argv[2], "w").write(json.dumps(out))
"""


# -- command line ---------------------------------------------------------------------------------------


def patch_arg(text: str) -> list[int] | None:
    if text == "plan":
        return None
    try:
        values = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ZxYxX or 'plan', got {text!r}") from None
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive sizes ZxYxX, got {text!r}")
    return values


def batch_arg(text: str) -> int | None:
    if text == "plan":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'plan', got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Needs bench/.venv-nnunet: run `bash bench/setup_nnunet_env.sh` first.")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET,
                        help="raw dataset in nnU-Net v2 layout; default: %(default)s")
    parser.add_argument("--cases", type=int, default=20, help="first N cases (sorted); default: %(default)s")
    parser.add_argument("--patch", type=patch_arg, default=[10, 128, 128], metavar="ZxYxX|plan",
                        help="patch size for both tools, snapped by viseg's planner, which derives the network "
                        "topology for it; 'plan' keeps the plan's (default: 10x128x128)")
    parser.add_argument("--batch", type=batch_arg, default=2, metavar="N|plan",
                        help="batch size for both tools; 'plan' keeps the plan's (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads (and OMP/MKL/OpenBLAS threads) in both (default: %(default)s, "
                        "the usable CPUs)")
    parser.add_argument("--loader-batches", type=int, default=50, help="timed batches (default: %(default)s)")
    parser.add_argument("--loader-warmup", type=int, default=3, help="untimed batches first (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="timed train steps (default: %(default)s)")
    parser.add_argument("--step-warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (default: %(default)s)")
    parser.add_argument("--np", type=int, default=2, dest="num_processes",
                        help="processes for the untimed planning/preprocessing (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=12345, help="seed for both (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="results JSON; the .md summary goes beside it, logs to raw/ (default: %(default)s)")
    parser.add_argument("--nnunet-id", type=int, default=27, help="dataset ID given to nnU-Net (default: 27)")
    parser.add_argument("--reference-plans", type=Path, default=REFERENCE_PLANS,
                        help="an nnUNetPlans.json of the full dataset, if present: the results say whether the "
                        "benchmarked network equals its 3d_fullres network (default: %(default)s)")
    parser.add_argument("--viseg-python", type=Path, default=REPO / ".venv" / "bin" / "python",
                        help="python of viseg's venv (default: %(default)s)")
    args = parser.parse_args(argv)
    positive = ("cases", "threads", "loader_batches", "steps", "repeats", "num_processes")
    if any(getattr(args, k) < 1 for k in positive) or args.loader_warmup < 0 or args.step_warmup < 0:
        parser.error("--cases, --threads, --loader-batches, --steps, --repeats and --np must be at least 1, "
                     "the warm-ups at least 0")
    return args


# -- setup (untimed) ------------------------------------------------------------------------------------


def thread_env(threads: int) -> dict[str, str]:
    return {k: str(threads) for k in THREAD_VARS}


def setup_nnunet(args: argparse.Namespace, env: dict[str, str], logs: Path) -> None:
    cmd = [str(NNUNET_VENV / "bin" / "nnUNetv2_plan_and_preprocess"), "-d", str(args.nnunet_id), "-c",
           CONFIGURATION, "-np", str(args.num_processes), "-npfp", str(args.num_processes), "--no_pbar"]
    seconds = timed(cmd, env, logs / "loader_step_nnunet_setup.log")
    print(f"nnU-Net fingerprint + plan + preprocess (untimed): {seconds:.1f} s", flush=True)


def setup_viseg(args: argparse.Namespace, dataset: Path, cache: Path, logs: Path) -> dict[str, Any]:
    overrides = {k: v for k, v in (("patch_size", args.patch), ("batch_size", args.batch)) if v is not None}
    out, log = logs / "loader_step_viseg_setup.json", logs / "loader_step_viseg_setup.log"
    cmd = [str(args.viseg_python), "-c", VISEG_SETUP, str(dataset), str(cache), str(args.num_processes),
           json.dumps(overrides)]
    with out.open("w") as handle:
        seconds = timed_to(cmd, handle, log)
    print(f"viseg verify + fingerprint + plan + preprocess (untimed): {seconds:.1f} s", flush=True)
    return json.loads(out.read_text().strip().splitlines()[-1])


def nnunet_bench_plans(nnunet_plans: dict[str, Any], viseg_plan: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net's plans with viseg's patch, batch and topology in its 3d_fullres (all else nnU-Net's own)."""
    plans = copy.deepcopy(nnunet_plans)
    conf = plans["configurations"][CONFIGURATION]
    conf["patch_size"] = list(viseg_plan["patch_size"])
    conf["batch_size"] = int(viseg_plan["batch_size"])
    arch = conf["architecture"]["arch_kwargs"]
    for key in ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
                "n_conv_per_stage_decoder"):
        arch[key] = copy.deepcopy(viseg_plan["network"][key])
    return plans


def nnunet_plan_summary(plans: dict[str, Any]) -> dict[str, Any]:
    conf = plans["configurations"][CONFIGURATION]
    arch = conf["architecture"]["arch_kwargs"]
    return {"patch_size": conf["patch_size"], "batch_size": conf["batch_size"], "spacing": conf["spacing"],
            "batch_dice": conf["batch_dice"], "network_class": conf["architecture"]["network_class_name"],
            "network": {k: arch[k] for k in ("n_stages", "features_per_stage", "kernel_sizes", "strides",
                                             "n_conv_per_stage", "n_conv_per_stage_decoder")}}


def plan_checks(nnunet_default: dict[str, Any], viseg_default: dict[str, Any], used: dict[str, Any],
                nnunet_used: dict[str, Any]) -> list[Check]:
    """viseg's unmodified plan against nnU-Net's (same cases), and the values both runs use."""
    checks = []
    for key in ("patch_size", "batch_size", "spacing", "batch_dice"):
        a, b = nnunet_default[key], viseg_default[key]
        checks.append(Check(f"default plan.{key}", a == b, f"nnU-Net {a}, viseg {b}"))
    for key, a in nnunet_default["network"].items():
        b = viseg_default["network"][key]
        checks.append(Check(f"default plan.network.{key}", a == b, f"nnU-Net {a}, viseg {b}"))
    checks.append(Check("default plan.network class", nnunet_default["network_class"].endswith(".PlainConvUNet")
                        and viseg_default["network"]["architecture"] == "PlainConvUNet",
                        f"nnU-Net {nnunet_default['network_class']}, viseg {viseg_default['network']['architecture']}"))
    same = nnunet_used["patch_size"] == used["patch_size"] and nnunet_used["batch_size"] == used["batch_size"] and all(
        nnunet_used["network"][k] == used["network"][k] for k in nnunet_used["network"])
    checks.append(Check("benchmark plan identical", same, f"patch {used['patch_size']}, batch {used['batch_size']}, "
                        f"{used['network']['n_stages']} stages, strides {used['network']['strides']}"))
    return checks


def run_checks(results: dict[str, dict[str, Any]], threads: int) -> list[Check]:
    """What the last round's subprocesses actually used."""
    nn, vi = results["nnunet"], results["viseg"]
    return [
        Check("batch data shape", nn["shapes"]["data"] == vi["shapes"]["data"],
              f"nnU-Net {nn['shapes']['data']}, viseg {vi['shapes']['data']}"),
        Check("loader input patch", nn["initial_patch_size"] == vi["initial_patch_size"],
              f"nnU-Net {nn['initial_patch_size']}, viseg {vi['initial_patch_size']}"),
        Check("network parameters", nn["parameters"] == vi["parameters"],
              f"nnU-Net {nn['parameters']:,}, viseg {vi['parameters']:,}"),
        Check("torch threads", nn["torch_threads"] == vi["torch_threads"] == threads,
              f"nnU-Net {nn['torch_threads']}, viseg {vi['torch_threads']} (requested {threads}); nnU-Net's "
              f"transforms ran with {nn['loader']['torch_threads_in_transforms']} (its threadpool_limits(1))"),
    ]


# -- the timed rounds -----------------------------------------------------------------------------------


def measure(tool: str, args: argparse.Namespace, settings: Path, env: dict[str, str], tmp: Path, round_no: int,
            logs: Path) -> dict[str, Any]:
    python = NNUNET_VENV / "bin" / "python" if tool == "nnunet" else args.viseg_python
    snippet = NNUNET_RUN if tool == "nnunet" else VISEG_RUN
    out = tmp / f"{tool}_round{round_no}.json"
    timed([str(python), "-c", snippet, str(settings), str(out)], env, logs / f"loader_step_{tool}_round{round_no}.log")
    return json.loads(out.read_text())


def run_rounds(args: argparse.Namespace, settings: dict[str, Path], envs: dict[str, dict[str, str]], tmp: Path,
               logs: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Alternate the tools, flipping the order every round, so drifting background load hits both alike."""
    rounds, last = [], {}
    for i in range(1, args.repeats + 1):
        order = TOOLS if i % 2 else TOOLS[::-1]
        row: dict[str, Any] = {"round": i, "order": [NAMES[t] for t in order]}
        for tool in order:
            last[tool] = result = measure(tool, args, settings[tool], envs[tool], tmp, i, logs)
            row[tool] = {"loader_batches_per_s": round(result["loader"]["batches_per_s"], 4),
                         "step_median_s": round(result["step"]["median_s"], 4), "loader": result["loader"],
                         "step": result["step"]}
        print(f"round {i}/{args.repeats} ({' then '.join(row['order'])}): loader nnU-Net "
              f"{row['nnunet']['loader_batches_per_s']:.2f}, viseg {row['viseg']['loader_batches_per_s']:.2f} "
              f"batches/s; step nnU-Net {row['nnunet']['step_median_s']:.3f} s, viseg "
              f"{row['viseg']['step_median_s']:.3f} s", flush=True)
        rounds.append(row)
    return rounds, last


# -- reporting ------------------------------------------------------------------------------------------


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    loader = {t: statistics.median(r[t]["loader_batches_per_s"] for r in rounds) for t in TOOLS}
    step = {t: statistics.median(r[t]["step_median_s"] for r in rounds) for t in TOOLS}
    viseg_split = {k: statistics.median(r["viseg"]["loader"][k] / r["viseg"]["loader"]["batches"] for r in rounds)
                   for k in ("sample_s", "augment_s")}
    return {
        "median_loader_batches_per_s": {t: round(v, 4) for t, v in loader.items()},
        "median_step_s": {t: round(v, 4) for t, v in step.items()},
        "viseg_loader_seconds_per_batch": {k: round(v, 5) for k, v in viseg_split.items()},
        "viseg_speed_relative_to_nnunet": {"loader": round(loader["viseg"] / loader["nnunet"], 4),
                                           "train_step": round(step["nnunet"] / step["viseg"], 4)},
        "time_ratio_viseg_over_nnunet": {"loader": round(loader["nnunet"] / loader["viseg"], 4),
                                         "train_step": round(step["viseg"] / step["nnunet"], 4)},
    }


def faster(ratio: float) -> str:
    return "viseg faster" if ratio > 1 else "viseg slower" if ratio < 1 else "equal"


def reference_line(plan: dict[str, Any]) -> list[str]:
    ref = plan.get("reference")
    if ref is None:
        return []
    same = "the same network as" if ref["same_network_as_benchmark"] else "a different network from"
    return [f"The benchmarked PlainConvUNet is {same} nnU-Net's plan of the full dataset (`{ref['path']}`: patch "
            f"{ref['patch_size']}, batch {ref['batch_size']}, {ref['network']['n_stages']} stages)."]


def markdown(result: dict[str, Any], checks: list[Check]) -> str:
    m, s, d, sm = result["machine"], result["settings"], result["dataset"], result["summary"]
    nn, vi = m["nnunet_env"], m["viseg_env"]
    rel = sm["viseg_speed_relative_to_nnunet"]
    split = sm["viseg_loader_seconds_per_batch"]
    plan = result["plan"]["used"]
    return "\n".join([
        f"# Loader throughput and train step ({CONFIGURATION}, CPU): nnU-Net v2 vs viseg ({d['name']})",
        "",
        f"{result['timestamp']}; first {d['num_cases']} cases of `{d['path']}`; patch {plan['patch_size']}, batch "
        f"{plan['batch_size']}, PlainConvUNet with {plan['network']['n_stages']} stages (the plan's topology for "
        f"that patch; without overrides the plan of these cases is {result['plan']['viseg_default']['patch_size']} "
        f"x {result['plan']['viseg_default']['batch_size']}). `torch.set_num_threads({s['threads']})`, no loader "
        f"workers, {s['repeats']} rounds alternating the order; each tool in a fresh process per round.",
        f"Machine: {m['cpu_count']} CPUs, no GPU, Python {m['python']}; nnunetv2 {nn['nnunetv2']} "
        f"(torch {nn['torch']}), viseg {vi['viseg']} (torch {vi['torch']}). Load average (1/5/15 min) before "
        f"{_load(result['load_before'])}, after {_load(result['load_after'])}.",
        *reference_line(result["plan"]),
        "",
        f"Loader: {s['loader_batches']} batches after {s['loader_warmup']} warm-up, full augmentation. "
        f"Train step: median of {s['steps']} steps after {s['step_warmup']} warm-up (forward, loss, backward, "
        "clip 12, SGD nesterov lr 0.01 momentum 0.99).",
        "",
        "| round | order | loader nnU-Net [batches/s] | loader viseg [batches/s] | step nnU-Net [s] | step viseg [s] |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
        *(f"| {r['round']} | {' then '.join(r['order'])} | {r['nnunet']['loader_batches_per_s']:.2f} | "
          f"{r['viseg']['loader_batches_per_s']:.2f} | {r['nnunet']['step_median_s']:.3f} | "
          f"{r['viseg']['step_median_s']:.3f} |" for r in result["rounds"]),
        f"| **median** | | **{sm['median_loader_batches_per_s']['nnunet']:.2f}** | "
        f"**{sm['median_loader_batches_per_s']['viseg']:.2f}** | **{sm['median_step_s']['nnunet']:.3f}** | "
        f"**{sm['median_step_s']['viseg']:.3f}** |",
        "",
        "**viseg speed relative to nnU-Net** (> 1: viseg faster, 2 = twice as fast):",
        "",
        f"- loader throughput: **{rel['loader']:.2f}** ({faster(rel['loader'])}; viseg batches/s / nnU-Net "
        "batches/s)",
        f"- train step: **{rel['train_step']:.2f}** ({faster(rel['train_step'])}; nnU-Net step time / viseg "
        "step time)",
        "",
        f"viseg's batch time splits into {split['sample_s'] * 1e3:.0f} ms patch sampling and "
        f"{split['augment_s'] * 1e3:.0f} ms augmentation (median over rounds); in training the augmentation runs "
        "on the GPU, here it ran on the CPU.",
        "",
        "Caveats: nnU-Net augments per sample under `threadpool_limits(1)` (torch at 1 thread in its transforms; "
        "it scales with worker processes, 0 here), viseg augments the whole batch with all "
        f"{s['threads']} threads. nnU-Net's loader also downsamples the deep-supervision targets, viseg's loss "
        "does. viseg's step is timed without Lightning's loop.",
        "",
        "| check | ok | detail |",
        "| --- | --- | --- |",
        *(f"| {c.field} | {'yes' if c.ok else '**NO**'} | {c.detail} |" for c in checks),
        "",
    ])



# -- main -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dataset = args.dataset.resolve()
    if not (NNUNET_VENV / "bin" / "nnUNetv2_plan_and_preprocess").exists():
        sys.exit("bench/.venv-nnunet is missing: run `bash bench/setup_nnunet_env.sh` first")
    logs = args.out.parent / "raw"
    logs.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.viseg_python)
    with tempfile.TemporaryDirectory(prefix="bench_loader_step_") as tmp_name:
        tmp = Path(tmp_name)
        dataset = tmp / "data" / args.dataset.name
        n_cases = subset_dataset(args.dataset, dataset, args.cases)
        print(f"{n_cases} cases; warming the page cache: {warm_page_cache(dataset) / 2**20:.0f} MiB read", flush=True)
        raw, folder = make_nnunet_raw(tmp, dataset, args.nnunet_id)
        nn_env = nnunet_env(raw, tmp / "nnunet")
        setup_nnunet(args, nn_env, logs)
        viseg = setup_viseg(args, dataset, tmp / "viseg_cache", logs)
        preprocessed = tmp / "nnunet" / "preprocessed" / folder
        nnunet_plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
        bench_plans = nnunet_bench_plans(nnunet_plans, viseg["plan"])
        plans_file = tmp / "nnunet_bench_plans.json"
        plans_file.write_text(json.dumps(bench_plans, indent=1))
        common = {"threads": args.threads, "seed": args.seed, "loader_batches": args.loader_batches,
                  "loader_warmup": args.loader_warmup, "steps": args.steps, "step_warmup": args.step_warmup}
        settings = {"nnunet": tmp / "settings_nnunet.json", "viseg": tmp / "settings_viseg.json"}
        settings["nnunet"].write_text(json.dumps({**common, "plans": str(plans_file),
                                                  "dataset_json": str(preprocessed / "dataset.json")}))
        settings["viseg"].write_text(json.dumps({**common, "plans": viseg["plans"], "folder": viseg["folder"],
                                                 "cases": viseg["cases"]}))
        envs = {"nnunet": dict(nn_env, nnUNet_n_proc_DA="0", nnUNet_compile="f", **thread_env(args.threads)),
                "viseg": dict(os.environ, **thread_env(args.threads))}
        load_before = list(os.getloadavg())
        rounds, last = run_rounds(args, settings, envs, tmp, logs)
        load_after = list(os.getloadavg())
    plan = {"viseg_default": viseg["default_plan"], "nnunet_default": nnunet_plan_summary(nnunet_plans),
            "used": viseg["plan"], "nnunet_used": nnunet_plan_summary(bench_plans)}
    if args.reference_plans.is_file():
        reference = nnunet_plan_summary(json.loads(args.reference_plans.read_text()))
        plan["reference"] = {"path": str(args.reference_plans), **reference,
                             "same_network_as_benchmark": reference["network"] == plan["nnunet_used"]["network"]}
    checks = plan_checks(plan["nnunet_default"], plan["viseg_default"], plan["used"], plan["nnunet_used"])
    checks += run_checks(last, args.threads)
    result = {
        "benchmark": "loader throughput and train-step time on CPU: nnUNetTrainer vs viseg",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"path": str(args.dataset), "name": json.loads((args.dataset / "dataset.json").read_text())
                    .get("name", args.dataset.name), "num_cases": n_cases, "nnunet_folder": folder},
        "machine": machine,
        "settings": {"threads": args.threads, "loader_workers": 0, "repeats": args.repeats,
                     "loader_batches": args.loader_batches, "loader_warmup": args.loader_warmup,
                     "steps": args.steps, "step_warmup": args.step_warmup, "seed": args.seed,
                     "patch_override": args.patch, "batch_override": args.batch, "device": "cpu",
                     "order": "nnU-Net first in odd rounds, viseg first in even rounds",
                     "optimizer": "SGD lr 0.01 momentum 0.99 nesterov weight_decay 3e-5, grad clip norm 12",
                     "nnunet": "nnUNetTrainer(fold='all').get_dataloaders() with nnUNet_n_proc_DA=0, train_step()",
                     "viseg": "PatchSampler.sample_batch + BatchAugmenter (CPU), DeepSupervisionLoss(DiceCELoss)"},
        "plan": plan,
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in load_after],
        "rounds": rounds,
        "summary": summarize(rounds),
        "last_round": {t: {k: v for k, v in last[t].items() if k not in ("loader", "step")} for t in TOOLS},
        "checks": {"all_ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]},
    }
    write_results(args.out, result, checks, markdown)
    sm = result["summary"]
    print()
    print(f"loader [batches/s]: nnU-Net {sm['median_loader_batches_per_s']['nnunet']:.2f}, viseg "
          f"{sm['median_loader_batches_per_s']['viseg']:.2f}")
    print(f"train step [s]:     nnU-Net {sm['median_step_s']['nnunet']:.3f}, viseg {sm['median_step_s']['viseg']:.3f}")
    rel = sm["viseg_speed_relative_to_nnunet"]
    print(f"viseg speed relative to nnU-Net (> 1: viseg faster): loader {rel['loader']:.2f}, "
          f"train step {rel['train_step']:.2f}")
    print(f"load average before {_load(load_before)}, after {_load(load_after)}")
    print()
    print(agreement_table(checks))
    print(f"results: {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
