"""Sliding-window prediction, nnU-Net v2 vs viseg: seconds per case, same network, weights, patch and cores.

Both tools predict the same ACDC cases (the first ``--cases`` images of ``imagesTr``, linked into a temporary
input folder in imagesTs naming) from NIfTI to a written label NIfTI, on the CPU, with the same network and
the same weights, tile step 0.5 and Gaussian weighting, once without and once with test-time mirroring:

* The plan: viseg plans the whole dataset (``prepare``, untimed; it equals nnU-Net's reference plan
  ``--reference-plans``, which the script checks) and both tools use its ``--configuration`` (3d_fullres or
  2d). ``--patch`` overrides the patch identically for both: viseg re-plans with ``patch_size`` (snapped,
  topology derived for it) and the same patch and topology are written into a copy of nnU-Net's plans.
* The weights: viseg's venv builds the network (``viseg.planning.network.build_model``, seeded He initialisation) and
  saves its ``state_dict``. viseg gets a minimal run folder that ``load_ensemble`` accepts (config.yaml,
  plans.json, dataset.json, checkpoints/best.ckpt holding the config, the plan and the ``network.``-prefixed
  state dict). nnU-Net's venv builds its own network from its plans (``nnUNetTrainer.build_network_architecture``,
  i.e. ``get_network_from_plans`` -> PlainConvUNet), loads the same state dict with ``strict=True``, checks
  that both networks give the same output on a probe input, takes ``inference_allowed_mirroring_axes`` from
  ``nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size`` as its training would, and
  writes an nnU-Net model folder (plans.json, dataset.json, fold_0/checkpoint_final.pth).
* Timed per case, from reading the input to the written file (imports and model loading excluded, reported
  separately), in a fresh subprocess per tool, mirroring setting and round:
  nnU-Net: ``nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=..., perform_everything_on_
  device=False, device=cpu)`` initialised from the model folder (``initialize_from_trained_model_folder``,
  as ``nnUNetv2_predict`` does), then per case the body of ``predict_from_files_sequential``:
  ``preprocessor.run_case`` -> ``predict_logits_from_preprocessed_data`` -> ``export_prediction_from_logits``.
  viseg: ``load_ensemble`` on the run folder, then per case ``viseg.inference.predict.predict_one`` (read, preprocess,
  sliding window, revert geometry, argmax, write), what ``python -m viseg.predict`` does per case.
  Both run ``torch.set_num_threads(--threads)`` with OMP/MKL/OpenBLAS threads alike; nnU-Net also gets
  ``nnUNet_def_n_proc=--threads`` (otherwise its prediction and export raise torch to 8 threads).

Order: per round and mirroring setting the two tools run back to back, nnU-Net first in odd rounds, viseg
first in even ones; the medians over rounds are compared. A forward hook counts each network's forward
passes and their input shapes, to show that both did the same work.

Reading the ratio: ``median seconds per case (viseg) / median seconds per case (nnU-Net)``, per mirroring
setting; below 1 viseg is faster (0.5: twice as fast). The load average is recorded: on a shared machine
compare ratios, not absolute seconds.

Agreement (untimed, after the rounds): the fraction of voxels on which the two label maps agree, per case
and mirroring setting, plus geometry (shape, affine) and whether each tool wrote identical files in every
round. The two do not compute bit-identical logits: nnU-Net accumulates the sliding-window logits in float16
on the CPU and resamples logits, viseg accumulates in float32, takes the softmax and resamples probabilities.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
    timed,
    write_results,
)
from preprocess_vs_nnunet import nnunet_env, timed_to

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DATASET = Path("/work/shared/data/acdc")
DEFAULT_OUT = BENCH_DIR / "results" / "predict_vs_nnunet.json"
REFERENCE_PLANS = Path("/work/shared/reference/acdc/nnUNetPlans.json")
CONFIGURATIONS = ("3d_fullres", "2d")
TOOLS = ("nnunet", "viseg")
NAMES = {"nnunet": "nnU-Net", "viseg": "viseg"}
MIRRORING = {"off": False, "on": True}
TOPOLOGY_KEYS = ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
                 "n_conv_per_stage_decoder")

# viseg's venv, untimed: `python -c VISEG_SETUP settings.json`; plans the dataset, builds and saves the
# network, writes the run folder; prints what the rest needs as one JSON line.
VISEG_SETUP = """
import json, shutil, sys
from dataclasses import asdict
from pathlib import Path
import torch
from omegaconf import OmegaConf
from viseg.config import BaseConfig, PlainConvUnet2DConfig, PlainConvUnet3DConfig
from viseg.inference.ensemble import training_mirror_axes
from viseg.inference.export import PROBABILITY_ORDER
from viseg.planning.network import build_model
from viseg.preprocessing.prepare import prepare

s = json.loads(open(sys.argv[1]).read())
model = PlainConvUnet3DConfig if s["configuration"] == "3d_fullres" else PlainConvUnet2DConfig

def config(extra):
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BaseConfig), {
        "model": OmegaConf.structured(model), "lr_scheduler": {"type": "PolyLR"},
        "dataset": {"basepath": s["dataset"]}, "paths": {"cache": s["cache"]}, "num_processes": s["np"],
        "seed": s["seed"], **extra}))

def describe(prepared):
    plans = prepared.plans
    plan = plans.configuration(prepared.configuration)
    return {"configuration": prepared.configuration, "patch_size": list(plan.patch_size),
            "batch_size": plan.batch_size, "spacing": list(plan.spacing),
            "transpose_forward": list(plans.transpose_forward),
            "normalization_schemes": list(plan.normalization_schemes),
            "use_mask_for_norm": list(plan.use_mask_for_norm),
            "resampling": asdict(plan.resampling), "probability_order": PROBABILITY_ORDER,
            "network": asdict(plan.network)}

default_cfg = config({})
default = prepare(default_cfg, progress=False)
cfg = config({"patch_size": s["patch"]}) if s["patch"] else default_cfg
used = prepare(cfg, progress=False) if s["patch"] else default
plans, configuration = used.plans, used.configuration

torch.manual_seed(s["seed"])
network = build_model(plans, configuration, deep_supervision=False).eval()
state = network.state_dict()
# a small probe input: the other venv's network must give the same output for it
strides = plans.configuration(configuration).network.strides
probe_shape = [2 * int(torch.tensor([st[i] for st in strides]).prod()) for i in range(len(strides[0]))]
generator = torch.Generator().manual_seed(s["seed"] + 1)
probe = torch.randn(1, plans.num_channels, *probe_shape, generator=generator)
with torch.no_grad():
    probe_output = network(probe)
torch.save({"state_dict": state, "probe_input": probe, "probe_output": probe_output}, s["weights"])

run = Path(s["run_dir"])
(run / "checkpoints").mkdir(parents=True)
config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))  # as viseg.train.config_yaml
(run / "config.yaml").write_text(config_yaml)
plans.save(run / "plans.json")
shutil.copyfile(Path(s["dataset"]) / "dataset.json", run / "dataset.json")
# what viseg.training.callbacks.RunCheckpoints adds to Lightning's checkpoint, and the LightningModule's state dict
torch.save({"state_dict": {f"network.{k}": v for k, v in state.items()},
            "viseg": {"config_yaml": config_yaml, "plans": plans.to_dict()}}, run / "checkpoints" / "best.ckpt")
print(json.dumps({"default_plan": describe(default), "plan": describe(used),
                  "training_mirror_axes": list(training_mirror_axes(cfg)),
                  "parameters": sum(v.numel() for v in network.parameters()),
                  "state_dict_keys": len(state), "probe_shape": [1, plans.num_channels, *probe_shape]}))
"""

# nnU-Net's venv, untimed: `python -c NNUNET_SETUP settings.json out.json`; its network from its plans with
# viseg's weights, its mirroring axes, and its model folder.
NNUNET_SETUP = """
import json, sys
from pathlib import Path
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

s = json.loads(open(sys.argv[1]).read())
plans = json.loads(open(s["plans"]).read())
dataset_json = json.loads(open(s["dataset_json"]).read())
configuration = s["configuration"]
pm = PlansManager(plans)
cm = pm.get_configuration(configuration)
n_in = determine_num_input_channels(pm, cm, dataset_json)
n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
# what nnUNetPredictor.initialize_from_trained_model_folder builds
network = nnUNetTrainer.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=False)
saved = torch.load(s["weights"], map_location="cpu", weights_only=True)
ours, theirs = network.state_dict(), saved["state_dict"]
missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
mismatched = sorted(k for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape)
network.load_state_dict(theirs, strict=True)
network.eval()
with torch.no_grad():
    probe_output = network(saved["probe_input"])
probe_diff = float((probe_output - saved["probe_output"]).abs().max())

# the mirroring axes nnU-Net's training would store in its checkpoint
# (run_training adds continue_training to the plans; the trainer pops it)
trainer = nnUNetTrainer(dict(plans, continue_training=False), configuration, 0, dataset_json,
                        device=torch.device("cpu"))
axes = tuple(trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3])

model = Path(s["model_dir"])
(model / "fold_0").mkdir(parents=True)
(model / "plans.json").write_text(json.dumps(plans, indent=1))
(model / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
            "init_args": {"plans": plans, "configuration": configuration, "fold": 0, "dataset_json": dataset_json,
                          "device": "cpu"},
            "inference_allowed_mirroring_axes": axes}, model / "fold_0" / "checkpoint_final.pth")
Path(sys.argv[2]).write_text(json.dumps({
    "network_class": type(network).__module__ + "." + type(network).__name__,
    "parameters": sum(v.numel() for v in network.parameters()), "state_dict_keys": len(ours),
    "missing": missing, "unexpected": unexpected, "shape_mismatch": mismatched,
    "probe_max_abs_diff": probe_diff, "inference_allowed_mirroring_axes": list(axes)}))
"""

# Shared by both timed snippets: `python -c SNIPPET settings.json out.json`. `start` is taken before any
# import but json/sys/time, so import_s covers torch and the tool.
COMMON = """
import json, sys, time
start = time.perf_counter()
cfg = json.loads(open(sys.argv[1]).read())
import os
from collections import Counter
from pathlib import Path
import torch
torch.set_num_threads(cfg["threads"])
output = Path(cfg["output"])
output.mkdir(parents=True, exist_ok=True)
forwards = []

def count_forwards(module, inputs, result):
    forwards.append(tuple(inputs[0].shape))

def case_row(case_id, seconds, cpu_seconds, path):
    shapes = Counter(forwards)
    row = {"case": case_id, "seconds": seconds, "cpu_seconds": cpu_seconds, "output": str(path),
           "forward_passes": len(forwards), "forward_samples": sum(k[0] for k in forwards),
           "forward_inputs": {"x".join(map(str, k)): v for k, v in sorted(shapes.items())},
           "sample_shapes": sorted({"x".join(map(str, k[1:])) for k in shapes})}
    forwards.clear()
    return row

def finish(import_s, load_s, rows, **extra):
    Path(sys.argv[2]).write_text(json.dumps({"import_s": import_s, "load_s": load_s, "cases": rows,
                                             "torch_threads": torch.get_num_threads(),
                                             "load_average": list(os.getloadavg()), **extra}))
"""

NNUNET_RUN = COMMON + """
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
import_s = time.perf_counter() - start

t = time.perf_counter()
predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=cfg["mirror"],
                            perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                            verbose_preprocessing=False, allow_tqdm=False)
predictor.initialize_from_trained_model_folder(cfg["model"], use_folds=(0,), checkpoint_name="checkpoint_final.pth")
preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
load_s = time.perf_counter() - t
predictor.network.register_forward_hook(count_forwards)

rows = []
for case_id, files in cfg["cases"]:
    t, cpu = time.perf_counter(), time.process_time()
    # the loop body of nnUNetPredictor.predict_from_files_sequential, one case
    data, _, properties = preprocessor.run_case(files, None, predictor.plans_manager, predictor.configuration_manager,
                                                predictor.dataset_json)
    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
    export_prediction_from_logits(logits, properties, predictor.configuration_manager, predictor.plans_manager,
                                  predictor.dataset_json, str(output / case_id), False)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    rows.append(case_row(case_id, seconds, cpu, output / (case_id + predictor.dataset_json["file_ending"])))
    rows[-1]["preprocessed_shape"] = list(data.shape)
finish(import_s, load_s, rows, mirror_axes=list(predictor.allowed_mirroring_axes or []) if cfg["mirror"] else [],
       default_num_processes=default_num_processes)
"""

VISEG_RUN = COMMON + """
from viseg.inference.ensemble import load_ensemble
from viseg.inference.predict import InferenceOptions, predict_one
from viseg.data.prediction_inputs import find_cases
# what predict_one imports on first use, imported here so that case 1 does not pay for it
import viseg.data.nifti, viseg.inference.export, viseg.inference.sliding_window, viseg.preprocessing.preprocess  # noqa
import_s = time.perf_counter() - start

t = time.perf_counter()
ensemble = load_ensemble([Path(cfg["model"])], "best", "cpu")
load_s = time.perf_counter() - t
ensemble.networks[0].register_forward_hook(count_forwards)
inputs = {c.case_id: c for c in find_cases(cfg["input"], ensemble.plans.channel_names, ensemble.pathfinder)}
options = InferenceOptions(mirror=cfg["mirror"], step=0.5)  # batch_size: python -m viseg.predict's default

rows = []
for case_id, _ in cfg["cases"]:
    t, cpu = time.perf_counter(), time.process_time()
    path = predict_one(ensemble, inputs[case_id], output, options)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    rows.append(case_row(case_id, seconds, cpu, path))
finish(import_s, load_s, rows, mirror_axes=list(ensemble.mirror_axes) if cfg["mirror"] else [],
       batch_size=options.batch_size)
"""


def patch_arg(value: str) -> list[int] | None:
    if value == "plan":
        return None
    try:
        patch = [int(v) for v in value.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not 'plan' or sizes like 10x256x224") from None
    if len(patch) not in (2, 3) or min(patch) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give 2 (2d) or 3 (3d_fullres) positive sizes")
    return patch


def mirroring_arg(value: str) -> list[str]:
    settings = [v.strip() for v in value.split(",") if v.strip()]
    if not settings or any(v not in MIRRORING for v in settings) or len(set(settings)) != len(settings):
        raise argparse.ArgumentTypeError(f"{value!r}: give off, on or off,on")
    return settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Needs bench/.venv-nnunet: run `bash bench/setup_nnunet_env.sh` first.")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET,
                        help="raw dataset in nnU-Net v2 layout, planned whole; default: %(default)s")
    parser.add_argument("--cases", type=int, default=1,
                        help="predict the first N images of imagesTr (default: %(default)s: 3d_fullres with "
                        "mirroring takes over a minute per case and tool on 2 shared cores; the default run took "
                        "9 minutes, --repeats 4 14 minutes)")
    parser.add_argument("--configuration", choices=CONFIGURATIONS, default="3d_fullres",
                        help="plan configuration both tools use (default: %(default)s)")
    parser.add_argument("--patch", type=patch_arg, default=None, metavar="ZxYxX|YxX|plan",
                        help="patch size for both tools, snapped by viseg's planner, which derives the topology "
                        "for it (default: the plan's)")
    parser.add_argument("--mirroring", type=mirroring_arg, default=["off", "on"], metavar="off,on",
                        help="test-time mirroring settings to time (default: off,on)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads (and OMP/MKL/OpenBLAS, nnUNet_def_n_proc) in both "
                        "(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds (default: %(default)s)")
    parser.add_argument("--np", type=int, default=2, dest="num_processes",
                        help="processes for viseg's untimed planning (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the network weights (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="results JSON; the .md summary goes beside it, logs to raw/ (default: %(default)s)")
    parser.add_argument("--reference-plans", type=Path, default=REFERENCE_PLANS,
                        help="nnU-Net's nnUNetPlans.json of the dataset: nnU-Net's plan (default: %(default)s)")
    parser.add_argument("--viseg-python", type=Path, default=REPO / ".venv" / "bin" / "python",
                        help="python of viseg's venv (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.cases, args.threads, args.repeats, args.num_processes) < 1:
        parser.error("--cases, --threads, --repeats and --np must be at least 1")
    if args.patch is not None and len(args.patch) != (3 if args.configuration == "3d_fullres" else 2):
        parser.error(f"--patch {args.patch} does not fit --configuration {args.configuration}")
    return args


# -- setup (untimed) ------------------------------------------------------------------------------------


def link_inputs(dataset: Path, dest: Path, n_cases: int) -> list[tuple[str, list[str]]]:
    """The first `n_cases` cases of imagesTr (all channels), linked into `dest` in imagesTs naming."""
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    ending = dataset_json.get("file_ending", ".nii.gz")
    n_channels = len(dataset_json["channel_names"])
    first = sorted((dataset / "imagesTr").glob(f"*_0000{ending}"))[:n_cases]
    dest.mkdir(parents=True)
    cases = []
    for image in first:
        case = image.name[: -len(f"_0000{ending}")]
        files = []
        for channel in range(n_channels):
            source = dataset / "imagesTr" / f"{case}_{channel:04d}{ending}"
            (dest / source.name).symlink_to(source.resolve())
            files.append(str(dest / source.name))
        cases.append((case, files))
    return cases


def read_files(paths: list[str]) -> int:
    """Read the inputs once, so that round 1's first tool does not pay for a cold page cache alone."""
    return sum(len(Path(p).read_bytes()) for p in paths)


def thread_env(threads: int) -> dict[str, str]:
    return {k: str(threads) for k in THREAD_VARS}


def setup_viseg(args: argparse.Namespace, tmp: Path, logs: Path) -> dict[str, Any]:
    settings = {"dataset": str(args.dataset), "cache": str(tmp / "viseg_cache"), "np": args.num_processes,
                "seed": args.seed, "configuration": args.configuration, "patch": args.patch,
                "weights": str(tmp / "weights.pt"), "run_dir": str(tmp / "viseg_run")}
    path = tmp / "viseg_setup.json"
    path.write_text(json.dumps(settings))
    out = logs / "predict_viseg_setup.json"
    with out.open("w") as handle:
        seconds = timed_to([str(args.viseg_python), "-c", VISEG_SETUP, str(path)], handle,
                           logs / "predict_viseg_setup.log")
    print(f"viseg plan + network + run folder (untimed): {seconds:.1f} s", flush=True)
    return {**json.loads(out.read_text().strip().splitlines()[-1]), "weights": settings["weights"],
            "run_dir": settings["run_dir"]}


def nnunet_bench_plans(reference: dict[str, Any], configuration: str, plan: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net's plans with viseg's patch and topology in `configuration` (equal unless --patch)."""
    plans = json.loads(json.dumps(reference))
    conf = plans["configurations"][configuration]
    conf["patch_size"] = list(plan["patch_size"])
    arch = conf["architecture"]["arch_kwargs"]
    for key in TOPOLOGY_KEYS:
        arch[key] = json.loads(json.dumps(plan["network"][key]))
    return plans


def setup_nnunet(args: argparse.Namespace, plans_file: Path, viseg: dict[str, Any], env: dict[str, str],
                 tmp: Path, logs: Path) -> dict[str, Any]:
    settings = {"plans": str(plans_file), "dataset_json": str(args.dataset / "dataset.json"),
                "configuration": args.configuration, "weights": viseg["weights"],
                "model_dir": str(tmp / "nnunet_model")}
    path, out = tmp / "nnunet_setup.json", tmp / "nnunet_setup_out.json"
    path.write_text(json.dumps(settings))
    seconds = timed([str(NNUNET_VENV / "bin" / "python"), "-c", NNUNET_SETUP, str(path), str(out)], env,
                    logs / "predict_nnunet_setup.log")
    print(f"nnU-Net network + weights + model folder (untimed): {seconds:.1f} s", flush=True)
    return {**json.loads(out.read_text()), "model_dir": settings["model_dir"]}


def nnunet_plan_summary(plans: dict[str, Any], configuration: str) -> dict[str, Any]:
    conf = plans["configurations"][configuration]
    arch = conf["architecture"]["arch_kwargs"]
    data_kwargs = conf["resampling_fn_data_kwargs"]
    return {"configuration": configuration, "patch_size": conf["patch_size"], "batch_size": conf["batch_size"],
            "spacing": conf["spacing"], "transpose_forward": plans["transpose_forward"],
            "normalization_schemes": [n.replace("Normalization", "") for n in conf["normalization_schemes"]],
            "use_mask_for_norm": conf["use_mask_for_norm"],
            "resampling": {"data_order": data_kwargs["order"], "seg_order": conf["resampling_fn_seg_kwargs"]["order"],
                           "order_z": data_kwargs["order_z"], "force_separate_z": data_kwargs["force_separate_z"]},
            "probability_order": conf["resampling_fn_probabilities_kwargs"]["order"],
            "network_class": conf["architecture"]["network_class_name"],
            "network": {k: arch[k] for k in TOPOLOGY_KEYS}}


def plan_checks(nnunet: dict[str, Any], viseg: dict[str, Any], label: str) -> list[Check]:
    """viseg's plan against nnU-Net's: every value prediction depends on."""
    checks = []
    for key in ("patch_size", "spacing", "transpose_forward", "use_mask_for_norm", "probability_order"):
        checks.append(Check(f"{label}.{key}", nnunet[key] == viseg[key], f"nnU-Net {nnunet[key]}, viseg {viseg[key]}"))
    schemes = [s.replace("Normalization", "") for s in viseg["normalization_schemes"]]
    checks.append(Check(f"{label}.normalization", [s.lower() for s in nnunet["normalization_schemes"]]
                        == [s.lower() for s in schemes], f"nnU-Net {nnunet['normalization_schemes']}, viseg {schemes}"))
    resampling = {k: viseg["resampling"][k] for k in nnunet["resampling"]}
    checks.append(Check(f"{label}.resampling", nnunet["resampling"] == resampling,
                        f"nnU-Net {nnunet['resampling']}, viseg {resampling}"))
    same_net = all(nnunet["network"][k] == viseg["network"][k] for k in TOPOLOGY_KEYS)
    checks.append(Check(f"{label}.network", same_net and nnunet["network_class"].endswith(".PlainConvUNet")
                        and viseg["network"]["architecture"] == "PlainConvUNet",
                        f"PlainConvUNet, {viseg['network']['n_stages']} stages, features "
                        f"{viseg['network']['features_per_stage']}, strides {viseg['network']['strides']}"
                        if same_net else f"nnU-Net {nnunet['network']}, viseg {viseg['network']}"))
    return checks


def network_checks(viseg: dict[str, Any], nnunet: dict[str, Any]) -> list[Check]:
    keys_ok = not (nnunet["missing"] or nnunet["unexpected"] or nnunet["shape_mismatch"])
    return [
        Check("weights: state_dict keys", keys_ok,
              f"{nnunet['state_dict_keys']} keys in nnU-Net's {nnunet['network_class'].rsplit('.', 1)[-1]}, "
              f"{viseg['state_dict_keys']} saved by viseg; missing {len(nnunet['missing'])}, unexpected "
              f"{len(nnunet['unexpected'])}, shape mismatches {len(nnunet['shape_mismatch'])} (loaded strict=True)"),
        Check("weights: parameters", nnunet["parameters"] == viseg["parameters"],
              f"nnU-Net {nnunet['parameters']:,}, viseg {viseg['parameters']:,}"),
        Check("weights: probe output", nnunet["probe_max_abs_diff"] == 0.0,
              f"max abs difference of the outputs {nnunet['probe_max_abs_diff']:.3g} on a {viseg['probe_shape']} "
              "input"),
        Check("mirroring axes", nnunet["inference_allowed_mirroring_axes"] == viseg["training_mirror_axes"],
              f"nnU-Net inference_allowed_mirroring_axes {nnunet['inference_allowed_mirroring_axes']}, viseg "
              f"training_mirror_axes {viseg['training_mirror_axes']}"),
    ]


# -- the timed rounds -----------------------------------------------------------------------------------


def measure(tool: str, mirroring: str, round_no: int, args: argparse.Namespace, ctx: dict[str, Any]
            ) -> dict[str, Any]:
    tmp, logs = ctx["tmp"], ctx["logs"]
    name = f"{tool}_{mirroring}_round{round_no}"
    settings = {"threads": args.threads, "mirror": MIRRORING[mirroring], "cases": ctx["cases"],
                "input": str(ctx["input"]), "model": ctx["model"][tool],
                "output": str(tmp / "out" / tool / mirroring / f"round{round_no}")}
    path, out = tmp / f"settings_{name}.json", tmp / f"result_{name}.json"
    path.write_text(json.dumps(settings))
    python = NNUNET_VENV / "bin" / "python" if tool == "nnunet" else args.viseg_python
    snippet = NNUNET_RUN if tool == "nnunet" else VISEG_RUN
    load_at_start = list(os.getloadavg())
    wall = timed([str(python), "-c", snippet, str(path), str(out)], ctx["env"][tool], logs / f"predict_{name}.log")
    result = json.loads(out.read_text())
    case_total = sum(r["seconds"] for r in result["cases"])
    cpu_per_case = sum(r["cpu_seconds"] for r in result["cases"]) / len(result["cases"])
    result.update(wall_s=wall, load_at_start=load_at_start, seconds_per_case=case_total / len(result["cases"]),
                  cpu_seconds_per_case=cpu_per_case,
                  other_s=wall - result["import_s"] - result["load_s"] - case_total)
    return result


def run_rounds(args: argparse.Namespace, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """Per round and mirroring setting both tools back to back; the order flips every round."""
    rounds = []
    for i in range(1, args.repeats + 1):
        order = TOOLS if i % 2 else TOOLS[::-1]
        row: dict[str, Any] = {"round": i, "order": [NAMES[t] for t in order], "order_tools": list(order)}
        for mirroring in args.mirroring:
            row[mirroring] = {tool: measure(tool, mirroring, i, args, ctx) for tool in order}
            r = row[mirroring]
            print(f"round {i}/{args.repeats}, mirroring {mirroring} ({' then '.join(row['order'])}): s/case "
                  f"nnU-Net {r['nnunet']['seconds_per_case']:.2f}, viseg {r['viseg']['seconds_per_case']:.2f} "
                  f"(load {_load(r[order[0]]['load_at_start'])})", flush=True)
        rounds.append(row)
    return rounds


# -- agreement (untimed) --------------------------------------------------------------------------------


def compare_outputs(rounds: list[dict[str, Any]], mirroring: list[str]) -> dict[str, Any]:
    """Label maps of the last round, nnU-Net vs viseg, and each tool's outputs across rounds."""
    import nibabel as nib
    import numpy as np

    def load(path: str) -> tuple[Any, Any]:
        image = nib.load(path)
        return np.asarray(image.dataobj), image.affine

    out: dict[str, Any] = {}
    last = rounds[-1]
    for m in mirroring:
        cases = []
        for nn_row, vi_row in zip(last[m]["nnunet"]["cases"], last[m]["viseg"]["cases"]):
            (a, affine_a), (b, affine_b) = load(nn_row["output"]), load(vi_row["output"])
            same_shape = a.shape == b.shape
            labels = sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist())) if same_shape else []
            cases.append({
                "case": nn_row["case"], "shape": {"nnunet": list(a.shape), "viseg": list(b.shape)},
                "affine_max_abs_diff": float(np.abs(affine_a - affine_b).max()),
                "dtype": {"nnunet": str(a.dtype), "viseg": str(b.dtype)},
                "agreement": float((a == b).mean()) if same_shape else None,
                "voxels": int(a.size),
                "label_voxels": {str(v): {"nnunet": int((a == v).sum()), "viseg": int((b == v).sum())}
                                 for v in labels},
            })
        stable = {}
        for tool in TOOLS:
            first = [load(r["output"])[0] for r in last[m][tool]["cases"]]
            stable[tool] = all(np.array_equal(load(r["output"])[0], ref) for row in rounds[:-1]
                               for r, ref in zip(row[m][tool]["cases"], first))
        out[m] = {"cases": cases, "identical_across_rounds": stable,
                  "mean_agreement": statistics.fmean(c["agreement"] for c in cases)
                  if all(c["agreement"] is not None for c in cases) else None}
    return out


def run_checks(rounds: list[dict[str, Any]], args: argparse.Namespace, agreement: dict[str, Any]) -> list[Check]:
    checks = []
    last = rounds[-1]
    for m in args.mirroring:
        nn, vi = last[m]["nnunet"], last[m]["viseg"]
        work = [(a["forward_samples"], a["sample_shapes"]) == (b["forward_samples"], b["sample_shapes"])
                for a, b in zip(nn["cases"], vi["cases"])]
        detail = "; ".join(f"{a['case']}: nnU-Net {a['forward_samples']} in {a['forward_inputs']}, viseg "
                           f"{b['forward_samples']} in {b['forward_inputs']}" for a, b in zip(nn["cases"], vi["cases"]))
        checks.append(Check(f"mirroring {m}: network inputs (windows x mirrorings)", all(work), detail))
        checks.append(Check(f"mirroring {m}: mirror axes used", nn["mirror_axes"] == vi["mirror_axes"],
                            f"nnU-Net {nn['mirror_axes']}, viseg {vi['mirror_axes']}"))
        checks.append(Check(f"mirroring {m}: torch threads", nn["torch_threads"] == vi["torch_threads"] == args.threads,
                            f"nnU-Net {nn['torch_threads']} (nnUNet_def_n_proc {nn['default_num_processes']}), "
                            f"viseg {vi['torch_threads']} (requested {args.threads})"))
        a = agreement[m]
        geometry = all(c["shape"]["nnunet"] == c["shape"]["viseg"] and c["affine_max_abs_diff"] < 1e-4
                       for c in a["cases"])
        checks.append(Check(f"mirroring {m}: output geometry", geometry, "; ".join(
            f"{c['case']}: shape {c['shape']['viseg']}, affine max diff {c['affine_max_abs_diff']:.2g}"
            for c in a["cases"])))
        checks.append(Check(f"mirroring {m}: label agreement", a["mean_agreement"] is not None
                            and a["mean_agreement"] >= 0.99, "; ".join(
                                f"{c['case']}: {c['agreement']:.6f}" for c in a["cases"])))
        checks.append(Check(f"mirroring {m}: same output every round", all(a["identical_across_rounds"].values()),
                            f"nnU-Net {a['identical_across_rounds']['nnunet']}, viseg "
                            f"{a['identical_across_rounds']['viseg']}"))
    return checks


# -- reporting ------------------------------------------------------------------------------------------


def summarize(rounds: list[dict[str, Any]], mirroring: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in mirroring:
        per_case = {t: statistics.median(r[m][t]["seconds_per_case"] for r in rounds) for t in TOOLS}
        cpu = {t: statistics.median(r[m][t]["cpu_seconds_per_case"] for r in rounds) for t in TOOLS}
        cases = [c["case"] for c in rounds[0][m]["nnunet"]["cases"]]
        by_case = {case: {t: round(statistics.median(r[m][t]["cases"][i]["seconds"] for r in rounds), 3)
                          for t in TOOLS} for i, case in enumerate(cases)}
        for row in by_case.values():
            row["ratio"] = round(row["viseg"] / row["nnunet"], 4)
        out[m] = {
            "median_seconds_per_case": {t: round(v, 3) for t, v in per_case.items()},
            "ratio_viseg_over_nnunet": round(per_case["viseg"] / per_case["nnunet"], 4),
            "median_cpu_seconds_per_case": {t: round(v, 3) for t, v in cpu.items()},
            "cpu_ratio_viseg_over_nnunet": round(cpu["viseg"] / cpu["nnunet"], 4),
            "median_seconds_by_case": by_case,
            "median_import_s": {t: round(statistics.median(r[m][t]["import_s"] for r in rounds), 3) for t in TOOLS},
            "median_model_load_s": {t: round(statistics.median(r[m][t]["load_s"] for r in rounds), 3) for t in TOOLS},
            "median_process_wall_s": {t: round(statistics.median(r[m][t]["wall_s"] for r in rounds), 3)
                                      for t in TOOLS},
        }
    return out


def faster(ratio: float) -> str:
    return "viseg faster" if ratio < 1 else "viseg slower" if ratio > 1 else "equal"


def markdown(result: dict[str, Any], checks: list[Check]) -> str:
    m, s, sm, ag = result["machine"], result["settings"], result["summary"], result["agreement"]
    nn, vi = m["nnunet_env"], m["viseg_env"]
    plan = result["plan"]["used"]
    rows = []
    for r in result["rounds"]:
        for mir in s["mirroring"]:
            nn_run, vi_run = r[mir]["nnunet"], r[mir]["viseg"]
            load = _load(r[mir][r["order_tools"][0]]["load_at_start"])
            rows.append(f"| {r['round']} | {mir} | {' then '.join(r['order'])} | {nn_run['seconds_per_case']:.2f} | "
                        f"{vi_run['seconds_per_case']:.2f} | {nn_run['cpu_seconds_per_case']:.1f} | "
                        f"{vi_run['cpu_seconds_per_case']:.1f} | {load} |")
    medians = [f"| **median** | {mir} | | **{sm[mir]['median_seconds_per_case']['nnunet']:.2f}** | "
               f"**{sm[mir]['median_seconds_per_case']['viseg']:.2f}** | "
               f"{sm[mir]['median_cpu_seconds_per_case']['nnunet']:.1f} | "
               f"{sm[mir]['median_cpu_seconds_per_case']['viseg']:.1f} | |" for mir in s["mirroring"]]
    ratios = []
    for mir in s["mirroring"]:
        ratio = sm[mir]["ratio_viseg_over_nnunet"]
        agree = ", ".join(f"{c['case']} {c['agreement']:.5f}" for c in ag[mir]["cases"])
        ratios.append(f"- mirroring {mir}: **{ratio:.3f}** ({faster(ratio)}; CPU-time ratio "
                      f"{sm[mir]['cpu_ratio_viseg_over_nnunet']:.3f}); label agreement {agree}")
    first = s["mirroring"][0]
    patch_source = "the plan's" if s["patch_override"] is None else f"--patch {s['patch_override']}, applied to both"
    return "\n".join([
        f"# Prediction per case ({s['configuration']}, CPU): nnU-Net v2 vs viseg ({result['dataset']['name']})",
        "",
        f"{result['timestamp']}; {len(result['dataset']['cases'])} case(s) of `{result['dataset']['path']}/imagesTr` "
        f"({', '.join(result['dataset']['cases'])}); patch {plan['patch_size']} "
        f"({patch_source}), "
        f"PlainConvUNet with {plan['network']['n_stages']} stages, the same seeded weights in both; tile step 0.5, "
        f"Gaussian weighting, mirroring axes {result['network']['nnunet']['inference_allowed_mirroring_axes']} "
        f"when on. `torch.set_num_threads({s['threads']})`, {s['repeats']} rounds alternating the order, a fresh "
        "process per tool, mirroring setting and round.",
        f"Machine: {m['cpu_count']} CPUs, no GPU, Python {m['python']}; nnunetv2 {nn['nnunetv2']} "
        f"(torch {nn['torch']}), viseg {vi['viseg']} (torch {vi['torch']}). Load average (1/5/15 min) before "
        f"{_load(result['load_before'])}, after {_load(result['load_after'])}.",
        "",
        "Seconds per case from reading the NIfTI to the written label NIfTI (imports and model loading excluded): "
        "nnU-Net `nnUNetPredictor` (`run_case`, `predict_logits_from_preprocessed_data`, "
        "`export_prediction_from_logits`), viseg `viseg.inference.predict.predict_one`. CPU: the process's CPU "
        "time over the same span (all threads; up to 2x the seconds with 2 threads), less sensitive to other jobs than "
        "wall time.",
        "",
        "| round | mirroring | order | nnU-Net [s/case] | viseg [s/case] | nnU-Net CPU [s/case] | viseg CPU [s/case] "
        "| load at start |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
        *rows,
        *medians,
        "",
        "**ratio median(viseg) / median(nnU-Net)** (< 1: viseg faster, 0.5 = twice as fast):",
        "",
        *ratios,
        "",
        f"Outside the timed cases (median, mirroring {first}): imports nnU-Net "
        f"{sm[first]['median_import_s']['nnunet']:.1f} s, viseg {sm[first]['median_import_s']['viseg']:.1f} s; "
        f"model loading nnU-Net {sm[first]['median_model_load_s']['nnunet']:.2f} s, viseg "
        f"{sm[first]['median_model_load_s']['viseg']:.2f} s.",
        "",
        "The label maps are not bit-identical by construction: nnU-Net accumulates the window logits in float16 "
        "on the CPU and resamples logits; viseg accumulates in float32 and resamples softmax probabilities "
        "(for ACDC nothing is resampled: its cases are at the plan's spacing). Untrained weights give small logit "
        "margins, so the agreement is a lower bound of what a trained network gives.",
        "",
        "| check | ok | detail |",
        "| --- | --- | --- |",
        *(f"| {c.field} | {'yes' if c.ok else '**NO**'} | {c.detail.replace('|', chr(92) + '|')} |" for c in checks),
        "",
    ])



def summary_table(summary: dict[str, Any], agreement: dict[str, Any]) -> str:
    rows = ["mirroring  nnU-Net [s/case]  viseg [s/case]  ratio viseg/nnU-Net  CPU-time ratio  label agreement",
            "---------  ----------------  --------------  -------------------  --------------  ---------------"]
    for m, s in summary.items():
        rows.append(f"{m:<9}  {s['median_seconds_per_case']['nnunet']:>16.2f}  "
                    f"{s['median_seconds_per_case']['viseg']:>14.2f}  {s['ratio_viseg_over_nnunet']:>19.3f}  "
                    f"{s['cpu_ratio_viseg_over_nnunet']:>14.3f}  {agreement[m]['mean_agreement']:>15.5f}")
    return "\n".join(rows)


# -- main -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dataset = args.dataset.resolve()
    if not (NNUNET_VENV / "bin" / "python").exists():
        sys.exit("bench/.venv-nnunet is missing: run `bash bench/setup_nnunet_env.sh` first")
    logs = args.out.parent / "raw"
    logs.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.viseg_python)
    reference = json.loads(args.reference_plans.read_text())
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp_name:
        tmp = Path(tmp_name)
        cases = link_inputs(args.dataset, tmp / "input", args.cases)
        print(f"{len(cases)} case(s): {', '.join(c for c, _ in cases)}; "
              f"{read_files([f for _, files in cases for f in files]) / 2**20:.1f} MiB read", flush=True)
        viseg = setup_viseg(args, tmp, logs)
        bench_plans = nnunet_bench_plans(reference, args.configuration, viseg["plan"])
        plans_file = tmp / "nnunet_bench_plans.json"
        plans_file.write_text(json.dumps(bench_plans, indent=1))
        (tmp / "nnunet" / "raw").mkdir(parents=True)
        nn_env = dict(nnunet_env(tmp / "nnunet" / "raw", tmp / "nnunet"), nnUNet_compile="f",
                      nnUNet_def_n_proc=str(args.threads), **thread_env(args.threads))
        nnunet = setup_nnunet(args, plans_file, viseg, nn_env, tmp, logs)
        ctx = {"tmp": tmp, "logs": logs, "cases": cases, "input": tmp / "input",
               "model": {"nnunet": nnunet["model_dir"], "viseg": viseg["run_dir"]},
               "env": {"nnunet": nn_env, "viseg": dict(os.environ, **thread_env(args.threads))}}
        load_before = list(os.getloadavg())
        rounds = run_rounds(args, ctx)
        load_after = list(os.getloadavg())
        agreement = compare_outputs(rounds, args.mirroring)
    for row in rounds:  # the temporary paths are gone
        for m in args.mirroring:
            for tool in TOOLS:
                for case in row[m][tool]["cases"]:
                    case["output"] = Path(case["output"]).name
    plan = {"nnunet_reference": nnunet_plan_summary(reference, args.configuration),
            "viseg_default": viseg["default_plan"], "used": viseg["plan"],
            "nnunet_used": nnunet_plan_summary(bench_plans, args.configuration)}
    checks = plan_checks(plan["nnunet_reference"], plan["viseg_default"], "default plan")
    if args.patch is not None:
        checks += plan_checks(plan["nnunet_used"], plan["used"], "benchmark plan")
    checks += network_checks(viseg, nnunet)
    checks += run_checks(rounds, args, agreement)
    summary = summarize(rounds, args.mirroring)
    result = {
        "benchmark": "sliding-window prediction per case on CPU: nnUNetPredictor vs viseg.predict",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).as_posix(), *sys.argv]) if argv is None else shlex.join(argv),
        "dataset": {"path": str(args.dataset), "name": json.loads((args.dataset / "dataset.json").read_text())
                    .get("name", args.dataset.name), "cases": [c for c, _ in cases]},
        "machine": machine,
        "settings": {"configuration": args.configuration, "patch_override": args.patch,
                     "patch": viseg["plan"]["patch_size"], "threads": args.threads, "repeats": args.repeats,
                     "mirroring": args.mirroring, "seed": args.seed, "tile_step_size": 0.5, "gaussian": True,
                     "device": "cpu", "reference_plans": str(args.reference_plans),
                     "order": "per round and mirroring setting both tools back to back; nnU-Net first in odd "
                              "rounds, viseg first in even rounds",
                     "nnunet": "nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring, "
                               "perform_everything_on_device=False, device=cpu).initialize_from_trained_model_folder;"
                               " per case run_case + predict_logits_from_preprocessed_data + "
                               "export_prediction_from_logits (predict_from_files_sequential's loop body); "
                               f"nnUNet_def_n_proc={args.threads}",
                     "viseg": "load_ensemble(run folder, 'best', 'cpu'); per case predict_one(InferenceOptions("
                              "mirror, step=0.5)) (python -m viseg.predict's per-case work)"},
        "plan": plan,
        "network": {"viseg": {k: viseg[k] for k in ("parameters", "state_dict_keys", "probe_shape",
                                                    "training_mirror_axes")},
                    "nnunet": {k: v for k, v in nnunet.items() if k != "model_dir"}},
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in load_after],
        "rounds": rounds,
        "summary": summary,
        "agreement": agreement,
        "checks": {"all_ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]},
    }
    write_results(args.out, result, checks, markdown)
    print()
    print(summary_table(summary, agreement))
    print(f"ratio < 1: viseg faster; load average before {_load(load_before)}, after {_load(load_after)}")
    print()
    print(agreement_table(checks))
    print(f"results: {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
