"""One prepared GPU check of viseg: every GPU path exercised once, in at most 10 minutes, into one JSON.

Why one script: a machine with a GPU is lent for minutes, not hours, so whoever has one runs
`bash bench/gpu_check.sh` once and commits `bench/results/gpu_check.json`; nothing has to be typed or decided
while the machine is held. Every step is timed, has its own time budget (a hard timeout: each step runs in
its own process group, killed when its budget is spent) and records its own failure, and the next step
runs anyway; a global budget (`--budget-s`, 600 s) shrinks the last steps rather than overrun. The JSON is
rewritten after every step, so a run killed half-way still leaves the steps it finished.

Steps (`--steps` picks a subset; `env` always runs, since every other step needs its answer):

  env          GPU name and memory, CUDA / cuDNN / torch versions, CPU count, nvidia-smi, viseg's commit.
               Without CUDA (a CPU torch wheel) the check stops here: the JSON says so, exit status 2.
  train_demo   `python -m viseg.train` on the built-in demo dataset, 2 epochs of 100 iterations, precision auto
               (bf16-mixed on a GPU, checked in the training log): epoch times, pseudo-Dice, the run folder
               complete.
  train_acdc   the same on 6 real ACDC cases (3 patients, patient-grouped 3-fold split), linked into a temporary
               nnU-Net raw folder (viseg has no case limit of its own).
  sweep        `python -m viseg.sweep folds=0-1 lr_scheduler=step_lr,poly resources.gpu=0.5
               trainer.max_epochs=1 trainer.iterations_per_epoch=250` on a local Ray: 4 trials finished, and
               whether two ran at once on the one GPU (their run folders' start/end times overlap, or
               nvidia-smi saw two compute processes at once).
  ddp          `devices=2` on the demo, only with >= 2 GPUs (else recorded as skipped).
  predict      `python -m viseg.predict` of a folder of ACDC images with the train_acdc run: cases/minute,
               over the whole command and between the first and the last written case.
  augment      batches/s of BatchAugmenter on the GPU (data and a torch.Generator on cuda; and on the CPU
               for comparison) against the CPU loader's batch production (PatchSampler.sample_batch, one
               process), and the train step time (forward + loss + backward + clipping + optimizer step of
               the planned network at the planned patch and batch, bf16 autocast as Lightning's bf16-mixed),
               with cudnn.benchmark off (as viseg trains) and on.
  epoch_ratio  nnU-Net's nnUNetTrainerBenchmark_5epochs vs _noDataLoading pair: the same number of iterations
               of the same network, once with the real loader (loader.num_workers worker processes, pinned
               with the process to --cores-per-gpu CPUs, augmentation on the GPU) and once on one dummy batch
               already on the GPU. ratio = real / dummy; the goal is <= 1.1 with 2 CPU cores per GPU.
               (The affinity is set on the main thread before the loader forks its workers, so the main
               thread, the pin-memory thread and the workers share those CPUs; torch's intra-op threads,
               started earlier, are only limited in number.)

Expected on one H200: about 5-7 minutes (an estimate from the step sizes; the budgets cap it at 10).

`--cpu-smoke` runs every step on the CPU (CUDA hidden) with tiny sizes, so the whole script, its commands
and its JSON are exercised on a machine without a GPU in 1.5-3 minutes (2 cores); its numbers mean nothing.

Nothing here imports torch: the GPU work runs in child processes (`--worker`), so `--help` never touches the
GPU, and a step that crashes, hangs or runs out of GPU memory takes no other step with it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_OUT = BENCH / "results" / "gpu_check.json"
SMOKE_OUT = BENCH / "results" / "raw" / "gpu_check_cpu_smoke.json"  # ignored by git: smoke numbers mean nothing
LOG_DIR = BENCH / "results" / "raw" / "gpu_check"
SCHEMA = 1
STEP_NAMES = ("env", "train_demo", "train_acdc", "sweep", "ddp", "predict", "augment", "epoch_ratio")
RESERVE_S = 15.0  # kept back from the global budget: killing a step past its budget (<= 10 s), the JSON, cleanup
MIN_STEP_S = 10.0  # a step with less than this left is skipped: it could not even import torch
RATIO_GOAL = 1.1  # nnU-Net's rule of thumb: real loading within 10 % of no loading
ACDC_TRAIN_CASES = 6  # 3 patients x 2 frames: enough for a patient-grouped 3-fold split
RUN_FILES = ("plans.json", "splits.json", "dataset.json", "config.yaml", "code.json", "metrics.csv", "progress.png",
             "training_log.txt", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "validation/summary.json",
             "tensorboard", "finished.json")  # README "Train": what a finished run folder holds


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU check and the CPU smoke run, in one place."""

    budgets: dict[str, float]  # seconds per step, before the global budget shrinks them
    train_epochs: int
    train_iterations: int
    val_iterations: int
    demo_overrides: tuple[str, ...]
    acdc_overrides: tuple[str, ...]
    sweep_overrides: tuple[str, ...]
    num_processes: int | None  # preprocessing workers; None: all cores
    predict_cases: int
    predict_mirror: bool
    augment_seconds: float
    ratio_iterations: int
    ratio_warmup: int
    step_warmup: int  # untimed train steps before timing them (cuDNN and allocator warm-up)


GPU_SIZES = Sizes(
    # env 60: the first `import torch` of a fresh machine reads its CUDA libraries (GiBs) from a cold disk
    budgets={"env": 60, "train_demo": 90, "train_acdc": 110, "sweep": 140, "ddp": 90, "predict": 50, "augment": 45,
             "epoch_ratio": 80},
    train_epochs=2, train_iterations=100, val_iterations=20, demo_overrides=(), acdc_overrides=(),
    # 250 iterations (nnU-Net's epoch; the demo spec has 25): a trial that trains for a few seconds only might end
    # before its neighbour has finished importing, and the check wants to see two trials train at once
    sweep_overrides=("resources.gpu=0.5", "trainer.iterations_per_epoch=250"), num_processes=None, predict_cases=12,
    predict_mirror=True, augment_seconds=4.0, ratio_iterations=100, ratio_warmup=10, step_warmup=5)

# Tiny networks and patches that a 2-core CPU trains in seconds; fewer validation cases (n_folds) for the same
# reason. resources.gpu=0: the trials would wait for a GPU forever, and resources.cpu=1 still runs two at once.
SMOKE_SIZES = Sizes(
    budgets={"env": 30, "train_demo": 90, "train_acdc": 90, "sweep": 120, "ddp": 60, "predict": 60, "augment": 60,
             "epoch_ratio": 60},
    train_epochs=2, train_iterations=3, val_iterations=1,
    demo_overrides=("patch_size=[16,64,64]", "plan.base_num_features=8", "splits.n_folds=10"),
    acdc_overrides=("patch_size=[10,128,128]", "plan.base_num_features=4"),
    sweep_overrides=("resources.gpu=0", "trainer.iterations_per_epoch=3", "trainer.val_iterations=1",
                     "splits.n_folds=10"),
    num_processes=2, predict_cases=2, predict_mirror=False, augment_seconds=1.0, ratio_iterations=3, ratio_warmup=1,
    step_warmup=1)


@dataclass
class Context:
    """What the steps share: settings, the work folder, and the results of the steps before them."""

    args: argparse.Namespace
    sizes: Sizes
    work: Path
    logs: Path
    smoke: bool
    acdc: Path | None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    @property
    def cache(self) -> Path:
        return self.work / "cache"

    def env(self) -> dict[str, str]:
        """The children's environment: unbuffered logs, a sweep-state key of this run's own (never the user's
        ~/.config/viseg/state.key), and no GPU at all in smoke mode, so that it also stays on the CPU where
        there is one."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", VISEG_STATE_KEY=str(self.work / "state.key"))
        if self.smoke:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def gpu_count(self) -> int:
        return int(self.results.get("env", {}).get("result", {}).get("cuda_device_count") or 0)


# ------------------------------------------------------------------------------------------------- processes
@dataclass
class Ran:
    """One finished (or killed) child process."""

    command: list[str]
    returncode: int | None
    seconds: float
    timed_out: bool
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def tail(self, lines: int = 25) -> str:
        """The log's last lines without progress-bar redraws, for the JSON: enough to see why a step failed."""
        kept = [line for line in self.text().replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
        return "\n".join(kept[-lines:])

    def check(self, what: str) -> None:
        if self.timed_out:
            raise StepTimeout(f"{what} ran past its budget ({self.seconds:.0f} s) and was killed; log {self.log}")
        if self.returncode != 0:
            raise StepError(f"{what} exited with status {self.returncode}; log {self.log}:\n{self.tail()}")


class StepError(RuntimeError):
    """A step's own failure, with a message that says what failed (no traceback needed in the JSON), and
    optionally what the step had measured before it failed (its second argument), which the JSON keeps."""


class StepTimeout(StepError):
    """A child process ran past the step's budget and was killed with its process group."""


class Skip(Exception):
    """Raised by a step that does not apply here (one GPU for DDP, no ACDC copy), with the reason."""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's whole process group (a sweep's Ray workers, a training's loader workers), then
    SIGKILL what is left after 5 s: the first gives Ray's driver the chance to shut its local cluster down."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(command: Sequence[str], log: Path, timeout: float, ctx: Context) -> Ran:
    """Run `command` in the work folder, output to `log`, killed (with its children) after `timeout` s."""
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [str(c) for c in command]
    started = time.perf_counter()
    timed_out = False
    with log.open("w") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ctx.work, env=ctx.env(),
                                start_new_session=True)
        try:
            proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
    return Ran(command, proc.returncode, time.perf_counter() - started, timed_out, log)


def run_worker(name: str, params: dict[str, Any], timeout: float, ctx: Context) -> dict[str, Any]:
    """Run one in-process measurement (`--worker name`) in a child process and return what it wrote."""
    io_dir = ctx.work / "workers"
    io_dir.mkdir(parents=True, exist_ok=True)
    params_file, out_file = io_dir / f"{name}.in.json", io_dir / f"{name}.out.json"
    params_file.write_text(json.dumps(params, indent=1))
    out_file.unlink(missing_ok=True)
    ran = run_logged([sys.executable, Path(__file__), "--worker", name, str(params_file), str(out_file)],
                     ctx.logs / f"{name}.log", timeout, ctx)
    ran.check(f"the {name} measurement")
    if not out_file.is_file():
        raise StepError(f"the {name} measurement wrote no result; log {ran.log}:\n{ran.tail()}")
    return json.loads(out_file.read_text())


class GpuSampler:
    """Polls nvidia-smi once a second while a step runs: peak memory, mean and peak utilisation, and the most
    compute processes seen at once (two sweep trials sharing the GPU show up as two). Without nvidia-smi
    (a CPU machine) it records nothing."""

    QUERY_GPU = ["--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
    QUERY_APPS = ["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]

    def __init__(self, period_s: float = 1.0) -> None:
        self.smi = shutil.which("nvidia-smi")
        self.period_s = period_s
        self.samples: list[tuple[float, float, int]] = []  # (max utilisation %, total memory MiB, processes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if self.smi:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _query(self, args: list[str]) -> list[list[str]]:
        try:
            out = subprocess.run([self.smi or "nvidia-smi", *args], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [[v.strip() for v in line.split(",")] for line in out.splitlines() if line.strip()]

    def _poll(self) -> None:
        while not self._stop.is_set():
            gpus, apps = self._query(self.QUERY_GPU), self._query(self.QUERY_APPS)
            util = [_number(row[1]) for row in gpus if len(row) >= 3]
            memory = [_number(row[2]) for row in gpus if len(row) >= 3]
            if util:
                self.samples.append((max(util), sum(memory), len({row[0] for row in apps if row})))
            self._stop.wait(self.period_s)

    def summary(self) -> dict[str, Any] | None:
        if not self.samples:
            return None
        util = [s[0] for s in self.samples]
        return {"samples": len(self.samples), "utilization_mean_pct": round(statistics.mean(util), 1),
                "utilization_max_pct": max(util), "memory_used_max_mib": max(s[1] for s in self.samples),
                "compute_processes_max": max(s[2] for s in self.samples)}


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


# ------------------------------------------------------------------------------------------- run folders
def run_folder_of(ran: Ran) -> Path:
    """The run folder `python -m viseg.train` printed (`run folder   <path>`)."""
    for line in reversed(ran.text().splitlines()):
        if line.startswith("run folder"):
            return Path(line.split(None, 2)[2].strip())
    raise StepError(f"no 'run folder' line in the training output; log {ran.log}")


def read_run_folder(run_dir: Path) -> dict[str, Any]:
    """What a finished run folder says about its training: completeness, epoch times, pseudo-Dice."""
    missing = [name for name in RUN_FILES if not (run_dir / name).exists()]
    info: dict[str, Any] = {"run_dir": str(run_dir), "complete": not missing, "missing": missing}
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        rows = [row for row in csv.DictReader(metrics.open()) if row.get("epoch_time")]
        info["epoch_times_s"] = [round(float(row["epoch_time"]), 3) for row in rows]
        if rows:
            last = rows[-1]
            info["final_mean_pseudo_dice"] = _maybe_float(last.get("val/mean_pseudo_dice"))
            info["final_ema_pseudo_dice"] = _maybe_float(last.get("val/ema_pseudo_dice"))
            info["final_train_loss"] = _maybe_float(last.get("train/loss"))
    finished = run_dir / "finished.json"
    if finished.is_file():
        info["finished"] = json.loads(finished.read_text())
    log = run_dir / "training_log.txt"
    if log.is_file():
        first = log.read_text().splitlines()[:1]
        info["training_log_start"] = first[0] if first else None
        # "training from epoch 0 of 2 on cuda (bf16-mixed precision), lr 0.01": what Lightning trained with
        if first and "(" in first[0] and " precision)" in first[0]:
            info["precision"] = first[0].split("(", 1)[1].split(" precision)", 1)[0]
            info["device"] = first[0].split(" on ", 1)[1].split(" (", 1)[0] if " on " in first[0] else None
    return info


def _maybe_float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals open at one moment (an end at the same instant as a start does not overlap it)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda event: (event[0], event[1]))
    best = current = 0
    for _, change in events:
        current += change
        best = max(best, current)
    return best


# ---------------------------------------------------------------------------------------------- datasets
def find_acdc(explicit: str | None) -> Path | None:
    """`--acdc`, else the first ACDC copy found: the shared folder beside the checkout (where this project
    keeps it; VISEG_SHARED overrides, as for the tests), one inside it, or a subset made with
    --make-acdc-subset into the ignored bench/results/raw/ (a device machine may get only the checkout)."""
    if explicit is not None:
        return None if explicit.lower() in ("", "none") else Path(explicit).resolve()
    shared = os.environ.get("VISEG_SHARED")
    candidates = [Path(shared) / "data" / "acdc"] if shared else []
    candidates += [REPO.parent / "shared" / "data" / "acdc", REPO / "shared" / "data" / "acdc",
                   BENCH / "results" / "raw" / "acdc_subset"]
    return next((c.resolve() for c in candidates if (c / "dataset.json").is_file()), None)


def acdc_train_cases(root: Path, n: int = ACDC_TRAIN_CASES) -> list[str]:
    ending = json.loads((root / "dataset.json").read_text()).get("file_ending", ".nii.gz")
    return [p.name[: -len(ending)] for p in sorted((root / "labelsTr").glob(f"*{ending}"))][:n]


def link_acdc_subset(root: Path, dest: Path, n: int = ACDC_TRAIN_CASES) -> list[str]:
    """The first `n` cases of `root` linked into a fresh nnU-Net raw folder `dest` (viseg plans from whatever
    cases a dataset folder holds, so a subset is a folder of fewer cases)."""
    dataset_json = json.loads((root / "dataset.json").read_text())
    ending = dataset_json.get("file_ending", ".nii.gz")
    cases = acdc_train_cases(root, n)
    if len(cases) < n:
        raise StepError(f"{root} holds {len(cases)} labelled cases, the check needs {n}")
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    for case in cases:
        (dest / "labelsTr" / f"{case}{ending}").symlink_to((root / "labelsTr" / f"{case}{ending}").resolve())
        for image in sorted((root / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}")):
            (dest / "imagesTr" / image.name).symlink_to(image.resolve())
    dataset_json["numTraining"] = len(cases)
    (dest / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    return cases


def make_acdc_subset(source: Path, dest: Path, predict_cases: int) -> None:
    """Copy (not link) what the check reads from ACDC into `dest`: the training cases in imagesTr/labelsTr and
    `predict_cases` images in imagesTs. A few MiB, small enough to carry to a machine that has the checkout
    but not the shared data folder."""
    dataset_json = json.loads((source / "dataset.json").read_text())
    ending = dataset_json.get("file_ending", ".nii.gz")
    cases = acdc_train_cases(source)
    images = sorted((source / "imagesTr").glob(f"*_[0-9][0-9][0-9][0-9]{ending}"))[:predict_cases]
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (dest / folder).mkdir(parents=True, exist_ok=True)
    for case in cases:
        shutil.copy2(source / "labelsTr" / f"{case}{ending}", dest / "labelsTr")
        for image in sorted((source / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}")):
            shutil.copy2(image, dest / "imagesTr")
    for image in images:
        shutil.copy2(image, dest / "imagesTs")
    dataset_json["numTraining"] = len(cases)
    (dest / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"{len(cases)} training cases and {len(images)} images to predict in {dest} ({size / 2**20:.1f} MiB); "
          f"run the check with --acdc {dest}")


def demo_images(ctx: Context) -> Path | None:
    """The demo dataset's imagesTr, generated by the first demo training into the work cache."""
    return next(iter(sorted((ctx.cache / "demo").glob("*/imagesTr"))), None)


def training_overrides(ctx: Context, extra: Sequence[str]) -> list[str]:
    """Overrides shared by every training of the check: its own cache and results, its epoch budget."""
    s = ctx.sizes
    overrides = [f"paths.cache={ctx.cache}", f"paths.results={ctx.work / 'results'}",
                 f"trainer.max_epochs={s.train_epochs}", f"trainer.iterations_per_epoch={s.train_iterations}",
                 f"trainer.val_iterations={s.val_iterations}", *extra]
    if s.num_processes is not None:
        overrides.append(f"num_processes={s.num_processes}")
    return overrides


def acdc_overrides(ctx: Context) -> list[str]:
    """ACDC's subset: two frames per patient, so a patient-grouped split (README "Plan") of 3 folds."""
    return [f"dataset.basepath={ctx.work / 'acdc_train'}", "splits.n_folds=3", "splits.group_pattern='(patient\\d+)'",
            *ctx.sizes.acdc_overrides]


def throughput_dataset(ctx: Context) -> tuple[str, list[str]]:
    """The dataset the augment and epoch_ratio steps measure: the ACDC subset when there is one (its plan is a
    real nnU-Net 3d_fullres network and patch), else the demo (a small plan: numbers not representative)."""
    if ctx.acdc is not None:
        if not (ctx.work / "acdc_train" / "dataset.json").is_file():
            link_acdc_subset(ctx.acdc, ctx.work / "acdc_train")
        return "acdc", acdc_overrides(ctx)
    return "demo", list(ctx.sizes.demo_overrides)


# ------------------------------------------------------------------------------------------------- steps
StepFn = Callable[[Context, float], dict[str, Any]]


def step_env(ctx: Context, budget: float) -> dict[str, Any]:
    """Versions and hardware, so the numbers of this JSON are never read against another machine's."""
    result = run_worker("env", {}, budget, ctx)
    smi = shutil.which("nvidia-smi")
    if smi:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            out = subprocess.run([smi], capture_output=True, text=True, timeout=15)
            result["nvidia_smi"] = (out.stdout or out.stderr).strip()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            result["nvidia_smi_query"] = out.stdout.strip().splitlines()
    else:
        result["nvidia_smi"] = None
    result["nvidia_smi_path"] = smi
    with contextlib.suppress(OSError):
        result["load_average"] = list(os.getloadavg())
    with contextlib.suppress(OSError, ValueError):
        meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0]
        result["memory_total_gib"] = round(int(meminfo.split()[1]) / 2**20, 1)
    result["acdc"] = str(ctx.acdc) if ctx.acdc else None
    return result


def step_train_demo(ctx: Context, budget: float) -> dict[str, Any]:
    return _train(ctx, budget, "train_demo", [*ctx.sizes.demo_overrides, "name=gpu_check_demo"])


def step_train_acdc(ctx: Context, budget: float) -> dict[str, Any]:
    if ctx.acdc is None:
        raise Skip("no ACDC copy found (../shared/data/acdc, or --acdc PATH; --make-acdc-subset makes a small one)")
    cases = link_acdc_subset(ctx.acdc, ctx.work / "acdc_train")
    result = _train(ctx, budget, "train_acdc", [*acdc_overrides(ctx), "name=gpu_check_acdc"])
    result["cases"] = cases
    return result


def _train(ctx: Context, budget: float, name: str, extra: Sequence[str]) -> dict[str, Any]:
    """One `python -m viseg.train`, then its run folder read back. Precision is left at `auto`, so the check
    also covers the rule that picks bf16-mixed on a GPU; the training log's first line says what it picked."""
    command = [sys.executable, "-m", "viseg.train", *training_overrides(ctx, extra)]
    with GpuSampler() as gpu:
        ran = run_logged(command, ctx.logs / f"{name}.log", budget, ctx)
    result: dict[str, Any] = {"command": shlex.join(command), "wall_s": round(ran.seconds, 2), "gpu": gpu.summary()}
    ran.check("python -m viseg.train")
    result.update(read_run_folder(run_folder_of(ran)))
    expected = "32-true" if ctx.smoke else "bf16-mixed"
    result["precision_expected"] = expected
    problems = []
    if not result["complete"]:
        problems.append(f"run folder incomplete, missing {result['missing']}")
    if result.get("precision") != expected:
        problems.append(f"trained with precision {result.get('precision')!r}, expected {expected}")
    epochs = len(result.get("epoch_times_s", []))
    if epochs != ctx.sizes.train_epochs:
        problems.append(f"{epochs} epochs in metrics.csv, expected {ctx.sizes.train_epochs}")
    if problems:
        raise StepError("; ".join(problems), result)
    return result


def step_sweep(ctx: Context, budget: float) -> dict[str, Any]:
    """README "Sweep": 2 folds x 2 schedulers on the demo's sweep spec, each trial half a GPU, so that two
    trials share the one GPU; the check is that all 4 finish and that two really trained at the same time."""
    storage = ctx.work / "sweeps"
    command = [sys.executable, "-m", "viseg.sweep", "folds=0-1", "lr_scheduler=step_lr,poly", "trainer.max_epochs=1",
               *ctx.sizes.sweep_overrides, f"storage_path={storage}", "experiment=gpu_check",
               f"paths.cache={ctx.cache}"]
    with GpuSampler() as gpu:
        ran = run_logged(command, ctx.logs / "sweep.log", budget, ctx)
    result: dict[str, Any] = {"command": shlex.join(command), "wall_s": round(ran.seconds, 2), "gpu": gpu.summary()}
    ran.check("python -m viseg.sweep")
    result.update(read_sweep(storage / "gpu_check"))
    gpu_share = next((float(o.split("=", 1)[1]) for o in ctx.sizes.sweep_overrides if o.startswith("resources.gpu=")),
                     0.0)
    result["resources_gpu"] = gpu_share
    problems = []
    if result["trials_finished"] != 4:
        problems.append(f"{result['trials_finished']} of 4 trials finished")
    # Two kinds of evidence that trials shared the GPU: run folders whose training overlapped in time, and two
    # trial processes holding the GPU at one nvidia-smi sample (the actors are reused, so they hold it all along)
    evidence = []
    if result["max_concurrent_runs"] >= 2:
        evidence.append(f"{result['max_concurrent_runs']} run folders trained at once")
    processes = (result["gpu"] or {}).get("compute_processes_max", 0)
    if processes >= 2:
        evidence.append(f"{processes} processes on the GPU at once (nvidia-smi)")
    result["concurrency_evidence"] = evidence
    result["ran_concurrently"] = bool(evidence)
    if not evidence:
        problems.append(f"at most {result['max_concurrent_runs']} trial(s) trained at once; expected 2"
                        + (f" on the one GPU (resources.gpu={gpu_share:g})" if gpu_share else ""))
    if problems:
        raise StepError("; ".join(problems), result)
    return result


def read_sweep(experiment: Path) -> dict[str, Any]:
    """Finished trials from Tune's result files and viseg's summary, and concurrency from the run folders:
    a run starts when its config.yaml is written (its data ready) and ends with finished.json."""
    trials = []
    for result_file in sorted(experiment.glob("*/result.json")):
        reports = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        final = next((r for r in reversed(reports) if "final/mean_dice" in r), None)
        last = reports[-1] if reports else {}
        trials.append({"trial": result_file.parent.name, "pid": last.get("pid"), "finished": final is not None,
                       "time_total_s": last.get("time_total_s"),
                       "final_mean_dice": final.get("final/mean_dice") if final else None})
    intervals, runs = [], []
    for finished in sorted((experiment / "runs").rglob("finished.json")):
        run = finished.parent
        start, end = (run / "config.yaml").stat().st_mtime, finished.stat().st_mtime
        intervals.append((start, end))
        runs.append({"run_dir": str(run.relative_to(experiment)), "seconds": round(end - start, 2)})
    first = min((s for s, _ in intervals), default=0.0)
    for run, (start, end) in zip(runs, intervals):
        run["start_s"], run["end_s"] = round(start - first, 2), round(end - first, 2)
    summary_file = experiment / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else []
    return {"experiment": str(experiment), "trials": trials,
            "trials_finished": sum(t["finished"] for t in trials),
            "summary_folds_finished": sum(len(v.get("folds_finished", [])) for v in summary),
            "runs": runs, "max_concurrent_runs": max_overlap(intervals),
            "distinct_trial_pids": len({t["pid"] for t in trials if t["pid"] is not None})}


def step_ddp(ctx: Context, budget: float) -> dict[str, Any]:
    gpus = ctx.gpu_count()
    if gpus < 2:
        raise Skip(f"{gpus} GPU{'s' if gpus != 1 else ''}: DDP needs at least 2")
    result = _train(ctx, budget, "ddp", [*ctx.sizes.demo_overrides, "devices=2", "name=gpu_check_ddp"])
    result["devices"] = 2
    return result


def step_predict(ctx: Context, budget: float) -> dict[str, Any]:
    """Sliding-window prediction of a folder with the ACDC run (the demo run when ACDC did not train)."""
    model, images = None, None
    for source in ("train_acdc", "train_demo"):
        run_dir = ctx.results.get(source, {}).get("result", {}).get("run_dir")
        if run_dir and ctx.results[source]["status"] == "ok":
            model = Path(run_dir)
            images = _prediction_images(ctx, source)
            break
    if model is None or images is None:
        raise Skip("no finished training run to predict with (train_acdc and train_demo failed or did not run)")
    output = ctx.work / "predicted"
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "viseg.predict", f"model={model}", f"input={images}", f"output={output}",
               f"mirror={str(ctx.sizes.predict_mirror).lower()}"]
    with GpuSampler() as gpu:
        ran = run_logged(command, ctx.logs / "predict.log", budget, ctx)
    n_inputs = len(list(images.glob("*_0000.nii.gz")))
    result: dict[str, Any] = {"command": shlex.join(command), "wall_s": round(ran.seconds, 2), "gpu": gpu.summary(),
                              "model": str(model), "cases_in": n_inputs}
    ran.check("python -m viseg.predict")
    written = sorted(p.stat().st_mtime for p in output.glob("*.nii.gz"))
    result["cases_out"] = len(written)
    result["device_line"] = next((line for line in ran.text().splitlines() if line.startswith("device ")), None)
    result["cases_per_minute_wall"] = round(len(written) / ran.seconds * 60, 2) if written else 0.0
    if len(written) >= 2 and written[-1] > written[0]:
        # first to last written case: the steady rate, without interpreter start-up and model loading
        result["cases_per_minute_steady"] = round((len(written) - 1) / (written[-1] - written[0]) * 60, 2)
    if len(written) != n_inputs:
        raise StepError(f"{len(written)} of {n_inputs} cases predicted", result)
    return result


def _prediction_images(ctx: Context, source: str) -> Path:
    """A folder of images to predict: an ACDC subset's imagesTs when it has one, else the first images of its
    imagesTr (linked); for the demo run, the demo's imagesTr linked the same way."""
    if source == "train_acdc" and ctx.acdc is not None:
        if (ctx.acdc / "imagesTs").is_dir():
            pool = sorted((ctx.acdc / "imagesTs").glob("*_0000.nii.gz"))
        else:
            pool = sorted((ctx.acdc / "imagesTr").glob("*_0000.nii.gz"))
    else:
        demo = demo_images(ctx)
        pool = sorted(demo.glob("*_0000.nii.gz")) if demo else []
    folder = ctx.work / "predict_input"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for image in pool[: ctx.sizes.predict_cases]:
        (folder / image.name).symlink_to(image.resolve())
    return folder


def step_augment(ctx: Context, budget: float) -> dict[str, Any]:
    dataset, overrides = throughput_dataset(ctx)
    params = {"overrides": [f"paths.cache={ctx.cache}", *overrides, *_processes(ctx)], "device": ctx.device,
              "seconds": ctx.sizes.augment_seconds, "cores_per_gpu": ctx.args.cores_per_gpu,
              "step_warmup": ctx.sizes.step_warmup}
    result = run_worker("augment", params, budget, ctx)
    result["dataset"] = dataset
    return result


def step_epoch_ratio(ctx: Context, budget: float) -> dict[str, Any]:
    dataset, overrides = throughput_dataset(ctx)
    params = {"overrides": [f"paths.cache={ctx.cache}", *overrides, *_processes(ctx),
                            f"loader.num_workers={ctx.args.cores_per_gpu}"],
              "device": ctx.device, "iterations": ctx.sizes.ratio_iterations, "warmup": ctx.sizes.ratio_warmup,
              "cores_per_gpu": ctx.args.cores_per_gpu, "deadline": time.time() + budget - 10}
    # no nvidia-smi polling here: its driver queries could stall the GPU in the very epochs being compared
    result = run_worker("epoch_ratio", params, budget, ctx)
    result["dataset"] = dataset
    return result


def _processes(ctx: Context) -> list[str]:
    return [] if ctx.sizes.num_processes is None else [f"num_processes={ctx.sizes.num_processes}"]


STEPS: dict[str, StepFn] = {"env": step_env, "train_demo": step_train_demo, "train_acdc": step_train_acdc,
                            "sweep": step_sweep, "ddp": step_ddp, "predict": step_predict, "augment": step_augment,
                            "epoch_ratio": step_epoch_ratio}


# ----------------------------------------------------------------------------------- workers (torch here)
def _compose(overrides: Sequence[str]) -> Any:
    """A typed training config composed exactly as `python -m viseg.train` composes it."""
    from hydra import compose, initialize_config_dir

    from viseg.cli import to_typed
    from viseg.config import register_configs, reject_derived_overrides
    from viseg.resources import conf_dir

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir())):
        cfg = to_typed(compose("anatomy_config", overrides=list(overrides)))
    reject_derived_overrides(cfg)
    return cfg


def _setup(params: dict[str, Any]) -> tuple[Any, Any, Path]:
    """Config, prepared dataset and preprocessed folder, as train() has them before it builds the module."""
    from viseg.preprocessing.prepare import prepare
    from viseg.preprocessing.preprocess import preprocess_dataset
    from viseg.training.resolve import resolve_config

    cfg = _compose(params["overrides"])
    prepared = prepare(cfg, progress=False)
    cfg = resolve_config(cfg, prepared.plans, prepared.configuration)
    folder = preprocess_dataset(prepared, cfg.num_processes, progress=False)
    return cfg, prepared, folder


def _plan_info(cfg: Any, input_size: Sequence[int], network: Any) -> dict[str, Any]:
    return {"patch_size": list(cfg.patch_size), "batch_size": cfg.batch_size, "loader_input_size": list(input_size),
            "features_per_stage": list(cfg.model.model_args.features_per_stage),
            "parameters": sum(p.numel() for p in network.parameters())}


def _train_step(module: Any, optimizer: Any, device: Any, clip: float) -> Callable[[Any, Any], Any]:
    """Lightning's step for this module, without the loop around it: zero_grad, forward and loss under bf16
    autocast on a GPU (precision auto = bf16-mixed) or fp32 on the CPU, backward, gradient clipping, step."""
    import torch

    use_autocast = device.type == "cuda"

    def step(data: Any, seg: Any) -> Any:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            loss = module.loss(module.network(data), seg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.network.parameters(), clip)
        optimizer.step()
        return loss

    return step


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn: Callable[[], object], seconds: float, device: Any, warmup: int = 2) -> dict[str, Any]:
    """Calls of `fn` per second over about `seconds` after `warmup` calls, each call timed to the device."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 2:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"calls": len(times), "per_s": round(len(times) / sum(times), 3),
            "median_ms": round(statistics.median(times) * 1000, 3)}


def worker_env(params: dict[str, Any]) -> dict[str, Any]:
    import torch

    from viseg.provenance import code_version

    result: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(), "cuda_device_count": torch.cuda.device_count(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "code": code_version().to_dict()}
    for module in ("lightning", "ray", "numpy", "viseg"):
        with contextlib.suppress(Exception):
            result[f"{module}_version"] = __import__(module).__version__
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({"index": index, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 2),
                        "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count})
    result["devices"] = devices
    if torch.cuda.is_available():
        result["bf16_supported"] = torch.cuda.is_bf16_supported()
        x = torch.randn(256, 256, device="cuda")  # one real kernel: a driver that only half works fails here
        result["matmul_ok"] = bool(torch.isfinite(x @ x).all().item())
    return result


def worker_augment(params: dict[str, Any]) -> dict[str, Any]:
    """Loader sampling (CPU, one process) against GPU augmentation and the train step, batch for batch."""
    import numpy as np
    import torch

    from viseg.training.train import build_datamodule, build_module

    cfg, prepared, folder = _setup(params)
    device = torch.device(params["device"])
    seconds = float(params["seconds"])
    module, input_size = build_module(cfg, prepared)
    datamodule = build_datamodule(cfg, prepared, folder, input_size)
    sampler = datamodule.train_batches.sampler
    result: dict[str, Any] = {"device": str(device), "plan": _plan_info(cfg, input_size, module.network),
                              "loader_num_workers": cfg.loader.num_workers}
    rng = np.random.default_rng(0)
    result["sampler_cpu_one_process"] = _rate(lambda: sampler.sample_batch(rng), seconds, torch.device("cpu"))
    result["sampler_batches_per_s_with_workers"] = round(
        result["sampler_cpu_one_process"]["per_s"] * max(cfg.loader.num_workers, 1), 3)  # an upper bound

    data_np, seg_np = sampler.sample_batch(rng)
    data, seg = torch.from_numpy(data_np).to(device), torch.from_numpy(seg_np).to(device)
    augment = module.train_transform
    generator = torch.Generator(device=device).manual_seed(0)
    result["augment_on_device"] = _rate(lambda: augment(data, seg, generator), seconds, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(params["cores_per_gpu"]))  # what CPU augmentation would have per GPU
    cpu_data, cpu_seg = torch.from_numpy(data_np), torch.from_numpy(seg_np)
    cpu_generator = torch.Generator().manual_seed(0)
    result["augment_on_cpu"] = _rate(lambda: augment(cpu_data, cpu_seg, cpu_generator), seconds / 2,
                                     torch.device("cpu"), warmup=1)
    result["augment_on_cpu"]["threads"] = int(params["cores_per_gpu"])
    torch.set_num_threads(threads)

    module.to(device).train()
    optimizer = module.configure_optimizers()["optimizer"]
    step = _train_step(module, optimizer, device, cfg.trainer.gradient_clip_val)
    batch = augment(data, seg, generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    benchmark = torch.backends.cudnn.benchmark
    result["cudnn_benchmark_default"] = benchmark
    warm = int(params["step_warmup"])
    result["train_step"] = _rate(lambda: step(*batch), seconds, device, warmup=warm)
    if device.type == "cuda":
        result["train_step"]["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.backends.cudnn.benchmark = True  # nnU-Net turns it on; viseg (Lightning's default) does not
        result["train_step_cudnn_benchmark"] = _rate(lambda: step(*batch), seconds, device, warmup=warm + 2)
        torch.backends.cudnn.benchmark = benchmark
    step_ms = result["train_step"]["median_ms"]
    augment_ms = result["augment_on_device"]["median_ms"]
    # per training iteration the device augments one batch and trains on it; the workers must keep up with that
    result["iteration_ms_augment_plus_step"] = round(step_ms + augment_ms, 3)
    result["augment_share_of_iteration"] = round(augment_ms / (step_ms + augment_ms), 3)
    needed = 1000 / (step_ms + augment_ms)
    result["batches_per_s_needed"] = round(needed, 3)
    result["loader_keeps_up"] = result["sampler_batches_per_s_with_workers"] >= needed
    return result


def worker_epoch_ratio(params: dict[str, Any]) -> dict[str, Any]:
    """nnUNetTrainerBenchmark_5epochs against _noDataLoading: the same iterations of the same step, with real
    batches (workers sampling, pinned transfer, augmentation on the device) and with one dummy batch that
    already sits on the device. The whole process is pinned to `cores_per_gpu` CPUs for the real arm (its
    loader workers inherit the affinity), which is what a node with that many cores per GPU gives it."""
    import gc

    import numpy as np
    import torch

    from viseg.training.train import build_datamodule, build_module

    cfg, prepared, folder = _setup(params)
    device = torch.device(params["device"])
    iterations, warmup = int(params["iterations"]), int(params["warmup"])
    cfg.trainer.iterations_per_epoch = iterations + warmup
    module, input_size = build_module(cfg, prepared)
    datamodule = build_datamodule(cfg, prepared, folder, input_size)
    module.to(device).train()
    optimizer = module.configure_optimizers()["optimizer"]
    step = _train_step(module, optimizer, device, cfg.trainer.gradient_clip_val)
    augment = module.train_transform
    all_cores = sorted(os.sched_getaffinity(0))
    cores = int(params["cores_per_gpu"])
    result: dict[str, Any] = {"device": str(device), "plan": _plan_info(cfg, input_size, module.network),
                              "iterations": iterations, "warmup": warmup, "cores_per_gpu": cores,
                              "loader_num_workers": cfg.loader.num_workers, "machine_cpus": len(all_cores),
                              "cudnn_benchmark": torch.backends.cudnn.benchmark}

    def real_epoch(affinity: list[int]) -> dict[str, Any]:
        os.sched_setaffinity(0, affinity)  # before the loader starts its workers: they inherit it
        threads = torch.get_num_threads()
        torch.set_num_threads(len(affinity))
        try:
            loader = datamodule.train_dataloader()
            batches = iter(loader)
            for _ in range(warmup):  # worker start-up and the first transfers, as nnU-Net's first epoch
                data, seg = next(batches)
                step(*augment(data.to(device, non_blocking=True), seg.to(device, non_blocking=True)))
            _sync(device)
            t0 = time.perf_counter()
            for data, seg in batches:
                step(*augment(data.to(device, non_blocking=True), seg.to(device, non_blocking=True)))
            _sync(device)
            seconds = time.perf_counter() - t0
            del batches, loader
            gc.collect()
        finally:
            os.sched_setaffinity(0, all_cores)
            torch.set_num_threads(threads)
        return {"cpus": len(affinity), "seconds": round(seconds, 3),
                "ms_per_iteration": round(seconds / iterations * 1000, 3)}

    data_np, seg_np = datamodule.train_batches.sampler.sample_batch(np.random.default_rng(0))
    dummy = augment(torch.from_numpy(data_np).to(device), torch.from_numpy(seg_np).to(device))
    for _ in range(warmup):
        step(*dummy)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iterations):
        step(*dummy)
    _sync(device)
    dummy_s = time.perf_counter() - t0
    result["no_data_loading"] = {"seconds": round(dummy_s, 3),
                                 "ms_per_iteration": round(dummy_s / iterations * 1000, 3)}

    result["real_loading"] = real_epoch(all_cores[:cores])
    result["ratio"] = round(result["real_loading"]["seconds"] / dummy_s, 3)
    result["goal"] = RATIO_GOAL
    result["meets_goal"] = result["ratio"] <= RATIO_GOAL
    needed = result["real_loading"]["seconds"] + 10  # a loader of more workers to start, a margin
    if len(all_cores) > cores and time.time() + needed < float(params["deadline"]):
        result["real_loading_all_cpus"] = real_epoch(all_cores)  # how much the pinned arm lost to its cores
        result["ratio_all_cpus"] = round(result["real_loading_all_cpus"]["seconds"] / dummy_s, 3)
    return result


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "env": worker_env, "augment": worker_augment, "epoch_ratio": worker_epoch_ratio}


def worker_main(name: str, params_file: Path, out_file: Path) -> int:
    result = WORKERS[name](json.loads(params_file.read_text()))
    write_json(out_file, result)
    return 0


# ---------------------------------------------------------------------------------------------- the check
def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a kill while writing leaves the previous complete file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def step_budget(default: float, deadline: float, now: float) -> float:
    """A step's budget: its own, cut to what the global budget has left after the reserve for the JSON."""
    return max(0.0, min(default, deadline - now - RESERVE_S))


def run_step(name: str, fn: StepFn, ctx: Context, deadline: float) -> dict[str, Any]:
    """Run one step within its budget; whatever happens, return a record and never raise."""
    budget = step_budget(ctx.sizes.budgets[name], deadline, time.monotonic())
    record: dict[str, Any] = {"status": "skipped", "budget_s": round(budget, 1), "seconds": 0.0, "error": None,
                              "result": {}, "log": str(ctx.logs / f"{name}.log")}
    if budget < MIN_STEP_S:
        record["error"] = f"skipped: global budget spent ({budget:.0f} s left for this step)"
        return record
    started = time.monotonic()
    print(f"[gpu_check] {name}: budget {budget:.0f} s", flush=True)
    try:
        record["result"] = fn(ctx, budget)
        record["status"] = "ok"
    except Skip as exc:
        record["error"] = f"skipped: {exc}"
    except StepError as exc:
        record["status"] = "timeout" if isinstance(exc, StepTimeout) else "failed"
        record["error"] = str(exc.args[0])
        if len(exc.args) > 1 and isinstance(exc.args[1], dict):
            record["result"] = exc.args[1]
    except Exception as exc:
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=8)
    record["seconds"] = round(time.monotonic() - started, 2)
    return record


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per step with its key numbers: what a reader of the commit wants without opening the JSON."""
    lines = []
    for name in STEP_NAMES:
        record = report["steps"].get(name)
        if record is None:
            continue
        r = record.get("result") or {}
        detail = ""
        if record["status"] != "ok":
            detail = (record.get("error") or "").splitlines()[0][:150] if record.get("error") else ""
        elif name == "env":
            gpus = r.get("devices") or []
            device = f"{len(gpus)} x {gpus[0]['name']} {gpus[0]['memory_gib']} GiB" if gpus else "no CUDA device"
            detail = f"{device}, torch {r.get('torch')} (CUDA {r.get('torch_cuda')}), {r.get('cpu_count')} CPUs"
        elif name in ("train_demo", "train_acdc", "ddp"):
            detail = (f"epochs {r.get('epoch_times_s')} s, EMA pseudo-Dice {_fmt(r.get('final_ema_pseudo_dice'))}, "
                      f"{r.get('precision')} on {r.get('device')}, run folder complete")
        elif name == "sweep":
            detail = (f"{r.get('trials_finished')}/4 trials finished, up to {r.get('max_concurrent_runs')} at once"
                      + (f", up to {r['gpu']['compute_processes_max']} GPU processes" if r.get("gpu") else ""))
        elif name == "predict":
            detail = (f"{r.get('cases_out')} cases, {r.get('cases_per_minute_wall')} cases/min (whole command), "
                      f"{r.get('cases_per_minute_steady', '-')} cases/min (steady)")
        elif name == "augment":
            detail = (f"augment {r['augment_on_device']['per_s']} batches/s on {r['device']}, sampler "
                      f"{r['sampler_cpu_one_process']['per_s']} batches/s per process, train step "
                      f"{r['train_step']['median_ms']} ms ({r.get('dataset')})")
        elif name == "epoch_ratio":
            detail = (f"real/dummy {r.get('ratio')} with {r.get('cores_per_gpu')} CPUs and "
                      f"{r.get('loader_num_workers')} workers (goal <= {RATIO_GOAL}: "
                      f"{'met' if r.get('meets_goal') else 'NOT met'})"
                      + (f"; {r['ratio_all_cpus']} with all {r.get('machine_cpus')} CPUs" if "ratio_all_cpus" in r
                         else ""))
        lines.append(f"{name:12s} {record['status']:8s} {record['seconds']:7.1f} s  {detail}")
    return lines


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def parse_steps(text: str | None) -> list[str]:
    if not text:
        return list(STEP_NAMES)
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STEP_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {unknown}; choose from {', '.join(STEP_NAMES)}")
    return ["env", *[s for s in STEP_NAMES if s in chosen and s != "env"]]


def build_parser() -> argparse.ArgumentParser:
    budgets = ", ".join(f"{name} {int(GPU_SIZES.budgets[name])}" for name in STEP_NAMES)
    parser = argparse.ArgumentParser(
        prog="bash bench/gpu_check.sh",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validate viseg on a GPU machine in one run of at most --budget-s seconds, and write every\n"
                    f"result to one JSON file (default {DEFAULT_OUT.relative_to(REPO)}; commit it).\n\n"
                    f"Steps: {', '.join(STEP_NAMES)}.\n"
                    f"Budgets [s]: {budgets}.\n"
                    "Each step is timed and killed at its budget; a failed step is recorded and the next one runs.\n"
                    "Without CUDA (a CPU torch wheel) the check records that in the JSON and exits with status 2.\n"
                    "The module docstring (bench/gpu_check.py) and bench/README.md say what each step measures.",
        epilog="Examples:\n"
               "  bash bench/gpu_check.sh                                 # all of it: ~5-7 min on one GPU\n"
               "  bash bench/gpu_check.sh --steps train_demo,epoch_ratio  # a subset (env always runs)\n"
               "  .venv/bin/python bench/gpu_check.py --cpu-smoke          # everything on the CPU, tiny sizes\n"
               "  .venv/bin/python bench/gpu_check.py --make-acdc-subset bench/results/raw/acdc_subset\n"
               "Exit status: 0 every step ok or skipped, 1 a step failed or timed out, 2 no CUDA.")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the JSON file to write (default {DEFAULT_OUT.relative_to(REPO)}; with --cpu-smoke "
                             f"{SMOKE_OUT.relative_to(REPO)}, which git ignores)")
    parser.add_argument("--budget-s", type=float, default=600.0, help="global time budget in seconds (default 600)")
    parser.add_argument("--steps", type=parse_steps, default=None,
                        help=f"comma list of steps to run (default all): {','.join(STEP_NAMES)}")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every step on the CPU (CUDA hidden) with tiny sizes: exercises the script "
                             "without a GPU in 1.5-3 minutes; its numbers mean nothing")
    parser.add_argument("--acdc", default=None,
                        help="ACDC folder (nnU-Net raw layout; default: ../shared/data/acdc beside the checkout, "
                             "or bench/results/raw/acdc_subset); 'none' to use the demo data only")
    parser.add_argument("--cores-per-gpu", type=int, default=2,
                        help="CPUs the epoch_ratio step pins its real-loading epoch to, and its loader workers "
                             "(loader.num_workers; default 2, viseg's default)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="work folder for datasets, caches, runs (default: a new temporary folder)")
    parser.add_argument("--logs", type=Path, default=None,
                        help=f"folder for every step's full log (default {LOG_DIR.relative_to(REPO)}/<mode>, which git "
                             "ignores; the JSON keeps each failed step's last lines)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder (default: removed at the end)")
    parser.add_argument("--make-acdc-subset", type=Path, default=None, metavar="DIR",
                        help="copy the ACDC cases the check reads (a few MiB) into DIR and exit: for a machine that "
                             "gets the checkout but not the shared data folder")
    parser.add_argument("--worker", nargs=3, metavar=("NAME", "PARAMS", "OUT"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        name, params_file, out_file = args.worker
        return worker_main(name, Path(params_file), Path(out_file))
    if args.make_acdc_subset is not None:
        source = find_acdc(args.acdc)
        if source is None:
            print("gpu_check: no ACDC copy found; give --acdc PATH", file=sys.stderr)
            return 2
        make_acdc_subset(source, args.make_acdc_subset.resolve(), GPU_SIZES.predict_cases)
        return 0
    return run_check(args)


def run_check(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    smoke = args.cpu_smoke
    out = (args.out or (SMOKE_OUT if smoke else DEFAULT_OUT)).resolve()
    steps = args.steps or list(STEP_NAMES)
    work = (args.work_dir.resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="viseg_gpu_check_")))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("results", "sweeps"):  # a reused --work-dir trains again (no run is overwritten), keeps its cache
        shutil.rmtree(work / name, ignore_errors=True)
    if args.logs is None:  # the default folder is the check's own: emptied, so it holds this run's logs only
        logs = LOG_DIR / ("cpu_smoke" if smoke else "gpu")
        shutil.rmtree(logs, ignore_errors=True)
    else:  # a folder the user named is never emptied; the step logs in it are overwritten
        logs = args.logs.resolve()
    logs.mkdir(parents=True, exist_ok=True)
    ctx = Context(args=args, sizes=SMOKE_SIZES if smoke else GPU_SIZES, work=work, logs=logs, smoke=smoke,
                  acdc=find_acdc(args.acdc))
    report: dict[str, Any] = {
        "schema": SCHEMA, "tool": "bench/gpu_check.py", "mode": "cpu-smoke" if smoke else "gpu",
        "command": shlex.join([sys.executable, *sys.argv]), "started": _now(), "finished": None,
        "budget_s": args.budget_s, "steps_selected": steps, "work_dir": str(work), "logs": str(logs),
        "acdc": str(ctx.acdc) if ctx.acdc else None, "cuda_available": None, "ok": False, "steps": {}}
    status = 1
    try:
        for name in STEP_NAMES:
            if name not in steps:
                report["steps"][name] = {"status": "skipped", "error": "skipped: not selected (--steps)",
                                         "seconds": 0.0, "budget_s": 0.0, "result": {}}
                continue
            record = run_step(name, STEPS[name], ctx, deadline)
            ctx.results[name] = record
            report["steps"][name] = record
            report["elapsed_s"] = round(time.monotonic() - t_start, 1)
            write_json(out, report)
            print(f"[gpu_check] {name}: {record['status']} in {record['seconds']:.1f} s"
                  + (f" ({record['error'].splitlines()[0][:200]})" if record.get("error") else ""), flush=True)
            if name == "env":
                report["cuda_available"] = bool(record["result"].get("cuda_available"))
                if not smoke and not report["cuda_available"]:
                    report["error"] = no_cuda_message(record)
                    for rest in STEP_NAMES[1:]:
                        report["steps"][rest] = {"status": "skipped", "error": "skipped: no CUDA", "seconds": 0.0,
                                                 "budget_s": 0.0, "result": {}}
                    break
        failed = [n for n, r in report["steps"].items() if r["status"] in ("failed", "timeout")]
        report["failed_steps"] = failed
        report["ok"] = not failed and (smoke or bool(report["cuda_available"]))
        status = 2 if (not smoke and not report["cuda_available"]) else (1 if failed else 0)
    finally:
        report["finished"] = _now()
        report["elapsed_s"] = round(time.monotonic() - t_start, 1)
        report["summary"] = summary_lines(report)
        write_json(out, report)
        if not args.keep_work and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(["", f"viseg GPU check ({report['mode']}), {report['elapsed_s']} s of {args.budget_s:.0f} s:",
                     *report["summary"], f"json: {out}"]))
    if report.get("error"):
        print(f"gpu_check: {report['error']}", file=sys.stderr)
    return status


def no_cuda_message(record: dict[str, Any]) -> str:
    r = record.get("result") or {}
    if record["status"] != "ok":
        return f"the environment step failed, so CUDA is unknown: {record.get('error')}"
    return (f"torch.cuda.is_available() is False (torch {r.get('torch')}, built for CUDA {r.get('torch_cuda')}; "
            f"CUDA_VISIBLE_DEVICES={r.get('cuda_visible_devices')!r}; nvidia-smi "
            f"{'found' if r.get('nvidia_smi') else 'not found'}): the venv's torch is "
            f"{'a CPU build' if not r.get('torch_cuda') else 'a CUDA build that sees no GPU'}. Install a CUDA build "
            "of the same torch version into .venv first (README: 'on a GPU machine install your CUDA build of torch "
            "first'), then run the check again; nothing else was run.")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
