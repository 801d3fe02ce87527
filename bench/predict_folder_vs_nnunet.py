"""Folder prediction, nnU-Net v2 vs viseg: cases per minute of whole commands, same network, weights and cores.

``predict_vs_nnunet.py`` times one case at a time inside one process; this bench times what a user runs on a
folder: each tool's command line in a fresh process, its background workers (or Ray) included, on the same
``--cases`` ACDC cases (the first images of ``imagesTr``, linked into a temporary input folder in imagesTs
naming), on the CPU, with the same network and weights, tile step 0.5, Gaussian weighting and mirroring
``--mirroring`` (default off). The modes:

* ``nnunet``: ``nnUNetv2_predict -i IN -o OUT -d Dataset027_ACDC -c CONF -f 0 -chk checkpoint_final.pth -npp P
  -nps P -device cpu --disable_progress_bar [--disable_tta]``, nnU-Net's own CLI on a model folder (linked into a
  temporary ``nnUNet_results``) that holds viseg's weights (``predict_vs_nnunet.setup_nnunet``);
* ``viseg_overlap``: ``python -m viseg.predict model=RUN input=IN output=OUT checkpoint=best mirror=.. step=0.5
  device=cpu ray=false num_processes_preprocessing=P num_processes_export=P``: reading/preprocessing and export
  in worker processes while the network predicts, as ``-npp P -nps P`` does;
* ``viseg_ray``: the same with ``ray=true ray_actors=A ray_cpus_per_actor=C`` on a local Ray that the command
  starts (``RAY_ADDRESS=local``, so it can never join another Ray on the machine) and stops;
* ``viseg_sequential``: the same with ``num_processes_preprocessing=0 num_processes_export=0`` (viseg's default
  on the CPU), everything in one process: the reference the overlapped modes must beat.

Timing: each mode in a fresh process per round; the rounds alternate the order (round 1 in ``--modes`` order,
round 2 reversed, ...), and each mode's median over rounds is compared. Every line a command prints is time-stamped
as it arrives (``PYTHONUNBUFFERED=1``), and each output file's mtime says when its case was finished, so a run is
split into: start-up (process start to the line that says the tool is about to predict: imports, model loading,
finding the cases), the first case (to the first output file), the *steady span* from the k-th to the last output
file (k = the cases predicted at once: 1, or the Ray actors, whose first cases finish together), and the tail (last
output to exit: worker and Ray shutdown). Two rates per mode: ``cases/min (command)`` = N / process wall time, and
``cases/min (steady)`` = (N - k) / steady span, which leaves start-up out and is the number that scales to a large
folder. The Ray mode also reports its start-up (``import ray`` + ``ray.init``, from
viseg's line before it to the line after it) and, within the tail, its shutdown.

Ratios: ``cases/min (viseg mode) / cases/min (nnU-Net)``, medians over rounds; above 1 viseg is faster (2: twice as
fast). Beside the wall times: the CPU seconds of each command's whole process tree (this script is a child
subreaper, so the workers and Ray's daemons that outlive their parents are reaped, and counted, here; the tree is
also sampled from ``/proc`` 4 times a second, which counts the Ray workers that the raylet lets the kernel reap;
the larger of the two is used), and the cores the machine's *other* jobs took meanwhile (``/proc/stat`` busy time
less the command's CPU, over its run). On a shared machine that last number says which runs were disturbed: the
report gives the medians over all rounds and, beside them, over the *quiet* runs (``--quiet-cores``, default 0.25).
Alternating the order evens out a slow drift of the load, not another job that starts and stops within a round.

Threads alike: OMP/MKL/OpenBLAS threads = ``--threads`` in every process of nnU-Net and the local viseg modes;
nnU-Net's CLI sets ``torch.set_num_threads(cpu_count)`` on ``-device cpu`` (2 here) and gets
``nnUNet_def_n_proc=--threads`` (its prediction and export cap torch's threads at it); viseg's torch takes
OMP_NUM_THREADS. The Ray mode runs without those variables, so that Ray gives each worker OMP_NUM_THREADS = its CPUs
(floored, at least 1): each actor predicts with 1 thread for ``ray_cpus_per_actor`` <= 1. With Ray's rule a
2-core machine runs 2 actors x 1 thread; with the variables set every actor would take ``--threads`` threads and
oversubscribe the cores.

Agreement (untimed, after the rounds): the fraction of voxels on which each viseg mode's label maps agree with
nnU-Net's (last round), geometry (shape, affine), whether the viseg modes wrote identical label maps (they must:
the same stages in the same order), and whether each mode wrote the same maps in every round. nnU-Net's and
viseg's maps are not bit-identical by construction (float16 vs float32 accumulation, logits vs probabilities
resampled; see ``predict_vs_nnunet.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
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
    write_results,
)
from predict_vs_nnunet import (
    CONFIGURATIONS,
    DEFAULT_DATASET,
    MIRRORING,
    REFERENCE_PLANS,
    link_inputs,
    mirroring_arg,
    network_checks,
    nnunet_bench_plans,
    nnunet_plan_summary,
    patch_arg,
    plan_checks,
    read_files,
    setup_nnunet,
    setup_viseg,
    thread_env,
)
from preprocess_vs_nnunet import nnunet_env

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results" / "predict_folder_vs_nnunet.json"
MODES = ("nnunet", "viseg_overlap", "viseg_ray", "viseg_sequential")
NAMES = {"nnunet": "nnU-Net -npp/-nps", "viseg_overlap": "viseg overlapped", "viseg_ray": "viseg Ray",
         "viseg_sequential": "viseg sequential"}
VISEG_MODES = tuple(m for m in MODES if m != "nnunet")
RUN_TIMEOUT_S = 900  # one command; a hung run (a Ray that never starts) fails the bench instead of blocking it

# The line after which each tool predicts: nnU-Net's predict_from_files has found its cases and the model is
# loaded; viseg's predict_command has loaded the ensemble, found the cases and described them (`_describe`).
READY = {"nnunet": re.compile(r"^There are \d+ cases that I would like to predict"),
         "viseg": re.compile(r"^device .+?, mirror axes ")}
RAY_STARTED = re.compile(r"^predicting \d+ case\(s\) with Ray Data: ")  # logged after ray.init and the pool
REPORTED = re.compile(r"^predicted \d+ case\(s\) into ")  # viseg's last line, after Ray's shutdown
# What each viseg mode must have logged, so that a key that was not applied cannot pass for the mode
MODE_LINES = {"viseg_overlap": re.compile(r"^reading and preprocessing in \d+ worker processes, export in \d+ "
                                          r"worker processes"),
              "viseg_ray": RAY_STARTED}


@dataclass
class Line:
    """One line a command printed, with the seconds since the command started."""

    t: float
    text: str


@dataclass
class Run:
    """What one command did: its exit, the time-stamped lines, the output files' finishing times."""

    wall_s: float
    cpu_s: float  # the command's process tree (see `run_command`)
    lines: list[Line] = field(default_factory=list)
    outputs: dict[str, float] = field(default_factory=dict)  # case -> seconds since start when its file was done
    # the whole machine's busy CPU seconds from the start until the command's last descendant exited (window_s)
    machine_cpu_s: float | None = None
    window_s: float = 0.0
    orphans_cpu_s: float = 0.0  # of the reaped: descendants that outlived their parent, reaped here
    reaped_cpu_s: float = 0.0  # the process's rusage with its reaped descendants, plus the orphans reaped here
    sampled_cpu_s: float = 0.0  # the descendants' CPU as sampled from /proc (`TreeSampler`)
    descendants_killed: int = 0  # descendants still running 30 s after the command exited
    descendants_linger_s: float = 0.0  # how long after the command's exit its last descendant exited


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Needs bench/.venv-nnunet: run `bash bench/setup_nnunet_env.sh` first.")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET,
                        help="raw dataset in nnU-Net v2 layout, planned whole; default: %(default)s")
    parser.add_argument("--cases", type=int, default=8,
                        help="predict the first N images of imagesTr, one folder (default: %(default)s)")
    parser.add_argument("--configuration", choices=CONFIGURATIONS, default="2d",
                        help="plan configuration both tools use (default: %(default)s: 3d_fullres takes about 10 s "
                        "a case on 2 cores, so 4 modes x 2 rounds of 8 cases would not fit in 25 minutes)")
    parser.add_argument("--patch", type=patch_arg, default=None, metavar="ZxYxX|YxX|plan",
                        help="patch size for both tools, snapped by viseg's planner (default: the plan's)")
    parser.add_argument("--mirroring", type=mirroring_arg, default=["off"], metavar="off,on",
                        help="test-time mirroring settings to time (default: off)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma list of {', '.join(MODES)}; nnunet is always run (default: all)")
    parser.add_argument("--threads", type=int, default=2,
                        help="OMP/MKL/OpenBLAS threads and nnUNet_def_n_proc (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=2,
                        help="-npp/-nps of nnU-Net = num_processes_preprocessing/_export of viseg_overlap "
                        "(default: %(default)s)")
    parser.add_argument("--ray-actors", type=int, default=2, help="ray_actors of viseg_ray (default: %(default)s)")
    parser.add_argument("--ray-cpus-per-actor", type=float, default=None,
                        help="ray_cpus_per_actor of viseg_ray (default: (CPUs - 1) / actors, at most 1: viseg "
                        "keeps one CPU free for the reading and export tasks; 0.5 on 2 CPUs)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds, the order reversed every round (default: %(default)s: an odd count has a true "
                        "median; 3 rounds of the 4 modes on 8 cases, 2d, took 6 minutes on 2 quiet cores, 15 while "
                        "another job ran the test suite)")
    parser.add_argument("--np", type=int, default=2, dest="num_processes",
                        help="processes for viseg's untimed planning (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the network weights (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="results JSON; the .md summary goes beside it, logs to raw/ (default: %(default)s)")
    parser.add_argument("--reference-plans", type=Path, default=REFERENCE_PLANS,
                        help="nnU-Net's nnUNetPlans.json of the dataset: nnU-Net's plan (default: %(default)s)")
    parser.add_argument("--viseg-python", type=Path, default=REPO / ".venv" / "bin" / "python",
                        help="python of viseg's venv (default: %(default)s)")
    parser.add_argument("--quiet-cores", type=float, default=0.25,
                        help="a run is quiet when the machine's other jobs took at most this many cores meanwhile; "
                        "the report gives the medians over the quiet runs beside those over all (default: "
                        "%(default)s)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="measure nothing: recompute the summary of a results JSON (e.g. with another "
                        "--quiet-cores) and rewrite it and its .md; a \"notes\" list of strings added to the JSON by "
                        "hand (the reading of the run) is rendered as a section of the .md")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    args.modes = [m for m in MODES if m in modes or m == "nnunet"]
    if args.cases < 2 or ("viseg_ray" in args.modes and args.cases <= args.ray_actors):
        parser.error("--cases must be at least 2 and more than --ray-actors: the steady rate needs outputs after "
                     "the first of each parallel predictor")
    if min(args.threads, args.repeats, args.num_processes, args.ray_actors) < 1 or args.processes < 0:
        parser.error("--threads, --repeats, --np and --ray-actors must be at least 1, --processes at least 0")
    if args.patch is not None and len(args.patch) != (3 if args.configuration == "3d_fullres" else 2):
        parser.error(f"--patch {args.patch} does not fit --configuration {args.configuration}")
    if args.ray_cpus_per_actor is None:
        args.ray_cpus_per_actor = min(1.0, max(1, (os.cpu_count() or 1) - 1) / args.ray_actors)
    return args


# -- running one command --------------------------------------------------------------------------------


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux PR_SET_CHILD_SUBREAPER), so that the CPU
    time of every process a command starts is counted: a forkserver's workers, Ray's raylet and actors outlive or
    lose their parents, and without this they would be reparented to init, their CPU time lost."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (/proc/stat: user, nice, system, irq, softirq, steal)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields[:8]]
    return (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")


def reap_descendants(deadline_s: float) -> tuple[float, int, float]:
    """Wait for the command's orphaned descendants (reparented here: `become_subreaper`) until `deadline_s`
    from now, then kill those left, one by one by pid; their CPU seconds, how many were killed, the seconds it
    took for the last to exit."""
    cpu, killed, start = 0.0, 0, time.perf_counter()
    while True:
        try:
            pid, _, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return cpu, killed, time.perf_counter() - start
        if pid:
            cpu += usage.ru_utime + usage.ru_stime
            continue
        if time.perf_counter() - start < deadline_s:
            time.sleep(0.05)
            continue
        for child in children_of(os.getpid()):
            try:
                os.kill(child, 9)
                killed += 1
            except ProcessLookupError:
                pass
        deadline_s = float("inf")  # the killed ones are reaped by the next rounds of the loop


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid` (/proc/<pid>/stat field 4)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def process_table() -> dict[int, tuple[int, int, float]]:
    """pid -> (parent pid, start time in ticks, CPU seconds so far) of every process (/proc/<pid>/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[19]), cpu)
        except (OSError, IndexError, ValueError):
            continue
    return table


class TreeSampler:
    """The CPU seconds of this process's descendants, sampled from /proc every `every_s` seconds: the last value
    seen of each process (pid and start time), summed. It counts what reaping cannot: a process whose parent
    ignores SIGCHLD (Ray's raylet does) is reaped by the kernel and its CPU time reported to nobody. A process
    that lives less than `every_s` may be missed; the larger of this and the reaped total is used."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.every_s, self.seen = every_s, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = os.getpid()
        while True:
            table = process_table()
            children: dict[int, list[int]] = {}
            for pid, (parent, _, _) in table.items():
                children.setdefault(parent, []).append(pid)
            todo = list(children.get(me, []))
            while todo:
                pid = todo.pop()
                _, started, cpu = table[pid]
                self.seen[(pid, started)] = cpu
                todo.extend(children.get(pid, []))
            if self.stop.wait(self.every_s):
                return

    def __enter__(self) -> TreeSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def cpu_s(self) -> float:
        return sum(self.seen.values())


def run_command(cmd: list[str], env: dict[str, str], log: Path, output: Path, cases: list[str]) -> Run:
    """Run `cmd` in its own session, time-stamping each line it prints; the outputs' mtimes afterwards.

    Lines are read in a thread while this one waits for the process with `os.wait4`: a daemon that inherited
    the pipe (Ray's) cannot hold the wait up. CPU seconds: the process's, with every descendant it reaped, and
    those of its descendants that outlived their parents (reaped here). The wall time ends when the command's
    own process exits; descendants still running then are waited for (up to 30 s) before the next command."""
    lines: list[Line] = []
    busy_before = machine_busy_s()
    start_wall = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, start_new_session=True)
    assert proc.stdout is not None

    def read() -> None:
        assert proc.stdout is not None
        for text in proc.stdout:
            lines.append(Line(time.perf_counter() - start, text.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timer = threading.Timer(RUN_TIMEOUT_S, lambda: os.killpg(proc.pid, 9))
    timer.start()
    with TreeSampler() as sampler:
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        orphans_cpu, killed, linger = reap_descendants(30.0)
    busy_after, window = machine_busy_s(), time.perf_counter() - start
    reader.join(timeout=10)
    log.write_text("".join(f"[{line.t:8.3f}] {line.text}\n" for line in lines))
    if proc.returncode != 0:
        tail = "\n".join(line.text for line in lines[-30:])
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode} after {wall:.0f} s; last lines of "
                           f"{log}:\n{tail}")
    machine = busy_after - busy_before if busy_before is not None and busy_after is not None else None
    reaped = usage.ru_utime + usage.ru_stime + orphans_cpu
    run = Run(wall, max(reaped, sampler.cpu_s), lines, machine_cpu_s=machine, window_s=window, reaped_cpu_s=reaped,
              sampled_cpu_s=sampler.cpu_s,
              orphans_cpu_s=orphans_cpu, descendants_killed=killed, descendants_linger_s=linger)
    for case in cases:
        path = output / f"{case}.nii.gz"
        if path.is_file():
            run.outputs[case] = path.stat().st_mtime_ns / 1e9 - start_wall
    return run


def first_line(run: Run, pattern: re.Pattern[str]) -> Line | None:
    return next((line for line in run.lines if pattern.search(line.text)), None)


def timings(run: Run, tool: str, n_cases: int, lanes: int = 1) -> dict[str, Any]:
    """A run's split: start-up, first case, steady span, tail; the two rates.

    The steady span runs from the `lanes`-th output to the last, `lanes` being the cases predicted at once (1, or
    the Ray actors): k actors finish their first cases at about the same time, and counting from the very first
    output would credit the span with k - 1 cases it did not predict (+17 % for 2 actors on 8 cases)."""
    done = sorted(run.outputs.values())
    ready = first_line(run, READY["nnunet" if tool == "nnunet" else "viseg"])
    out: dict[str, Any] = {
        "wall_s": round(run.wall_s, 3), "cpu_s": round(run.cpu_s, 2), "reaped_cpu_s": round(run.reaped_cpu_s, 2),
        "sampled_cpu_s": round(run.sampled_cpu_s, 2), "orphans_cpu_s": round(run.orphans_cpu_s, 2),
        "machine_cpu_s": None if run.machine_cpu_s is None else round(run.machine_cpu_s, 2),
        # the cores the machine's other jobs took on average while this command and its descendants ran
        "others_cores": None if run.machine_cpu_s is None or run.window_s <= 0
        else round((run.machine_cpu_s - run.cpu_s) / run.window_s, 2),
        "descendants_killed": run.descendants_killed, "descendants_linger_s": round(run.descendants_linger_s, 2),
        "outputs_written": len(done),
        "ready_s": round(ready.t, 3) if ready else None,
        "first_output_s": round(done[0], 3) if done else None, "last_output_s": round(done[-1], 3) if done else None,
        "output_times_s": [round(t, 3) for t in done],
    }
    if len(done) == n_cases:
        span = done[-1] - done[lanes - 1]
        out.update(steady_span_s=round(span, 3), steady_cases=n_cases - lanes, tail_s=round(run.wall_s - done[-1], 3),
                   first_case_s=round(done[0] - ready.t, 3) if ready else None,
                   cases_per_min_command=round(n_cases / run.wall_s * 60, 3),
                   cases_per_min_steady=round((n_cases - lanes) / span * 60, 3) if span > 0 else None)
    if tool == "viseg_ray":
        started, reported = first_line(run, RAY_STARTED), first_line(run, REPORTED)
        out["ray_start_s"] = round(started.t - ready.t, 3) if started and ready else None
        out["ray_shutdown_s"] = round(reported.t - done[-1], 3) if reported and done else None
    return out


def command(mode: str, mirroring: str, output: Path, args: argparse.Namespace, ctx: dict[str, Any]) -> list[str]:
    if mode == "nnunet":
        cmd = [str(NNUNET_VENV / "bin" / "nnUNetv2_predict"), "-i", str(ctx["input"]), "-o", str(output),
               "-d", ctx["nnunet_dataset"], "-c", args.configuration, "-f", "0", "-chk", "checkpoint_final.pth",
               "-npp", str(args.processes), "-nps", str(args.processes), "-device", "cpu", "--disable_progress_bar"]
        return cmd + ([] if MIRRORING[mirroring] else ["--disable_tta"])
    cmd = [str(args.viseg_python), "-m", "viseg.predict", f"model={ctx['run_dir']}", f"input={ctx['input']}",
           f"output={output}", "checkpoint=best", f"mirror={str(MIRRORING[mirroring]).lower()}", "step=0.5",
           "device=cpu"]
    if mode == "viseg_ray":
        return [*cmd, "ray=true", f"ray_actors={args.ray_actors}", f"ray_cpus_per_actor={args.ray_cpus_per_actor:g}"]
    processes = args.processes if mode == "viseg_overlap" else 0
    return [*cmd, "ray=false", f"num_processes_preprocessing={processes}", f"num_processes_export={processes}"]


def measure(mode: str, mirroring: str, round_no: int, args: argparse.Namespace, ctx: dict[str, Any]
            ) -> dict[str, Any]:
    name = f"{mode}_{mirroring}_round{round_no}"
    output = ctx["tmp"] / "out" / mode / mirroring / f"round{round_no}"
    cmd = command(mode, mirroring, output, args, ctx)
    load_at_start = [round(v, 2) for v in os.getloadavg()]
    run = run_command(cmd, ctx["env"][mode], ctx["logs"] / f"predict_folder_{name}.log", output, ctx["case_ids"])
    lanes = min(args.ray_actors, len(ctx["case_ids"]) - 1) if mode == "viseg_ray" else 1
    result = {"mode": mode, "load_at_start": load_at_start, **timings(run, mode, len(ctx["case_ids"]), lanes),
              "output": str(output), "command": shlex.join(cmd)}
    if mode != "nnunet":
        for key, pattern in (("ready_line", READY["viseg"]), *((f"{m}_line", p) for m, p in MODE_LINES.items())):
            line = first_line(run, pattern)
            result[key] = line.text if line else None
    return result


def run_rounds(args: argparse.Namespace, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """Per round and mirroring setting every mode once; the order reverses every round."""
    rounds = []
    for i in range(1, args.repeats + 1):
        order = list(args.modes) if i % 2 else list(args.modes)[::-1]
        row: dict[str, Any] = {"round": i, "order": order}
        for mirroring in args.mirroring:
            row[mirroring] = {}
            for mode in order:
                r = row[mirroring][mode] = measure(mode, mirroring, i, args, ctx)
                extra = f", Ray start {r['ray_start_s']:.1f} s" if mode == "viseg_ray" and r["ray_start_s"] else ""
                print(f"round {i}/{args.repeats}, mirroring {mirroring}, {NAMES[mode]}: wall {r['wall_s']:.1f} s, "
                      f"start-up {r['ready_s'] or 0:.1f} s, steady {r.get('cases_per_min_steady') or 0:.1f} "
                      f"cases/min{extra} (load {_load(r['load_at_start'])})", flush=True)
        rounds.append(row)
    return rounds


# -- agreement (untimed) --------------------------------------------------------------------------------


def compare_outputs(rounds: list[dict[str, Any]], args: argparse.Namespace, cases: list[str]) -> dict[str, Any]:
    """Last round: each viseg mode against nnU-Net, the viseg modes against each other; every mode across rounds."""
    import nibabel as nib
    import numpy as np

    def load(folder: str, case: str) -> tuple[Any, Any]:
        image = nib.load(str(Path(folder) / f"{case}.nii.gz"))
        return np.asarray(image.dataobj), image.affine

    out: dict[str, Any] = {}
    last = rounds[-1]
    visegs = [m for m in args.modes if m != "nnunet"]
    for m in args.mirroring:
        maps = {mode: {case: load(last[m][mode]["output"], case) for case in cases} for mode in args.modes}
        versus: dict[str, Any] = {}
        for mode in visegs:
            rows = []
            for case in cases:
                (a, affine_a), (b, affine_b) = maps["nnunet"][case], maps[mode][case]
                same_shape = a.shape == b.shape
                rows.append({"case": case, "shape": {"nnunet": list(a.shape), mode: list(b.shape)},
                             "affine_max_abs_diff": float(np.abs(affine_a - affine_b).max()),
                             "agreement": float((a == b).mean()) if same_shape else None})
            agreements = [r["agreement"] for r in rows]
            versus[mode] = {"cases": rows, "mean_agreement": statistics.fmean(agreements)
                            if None not in agreements else None,
                            "min_agreement": min(agreements) if None not in agreements else None}
        identical = {}
        for i, a_mode in enumerate(visegs):
            for b_mode in visegs[i + 1:]:
                identical[f"{a_mode} == {b_mode}"] = all(
                    maps[a_mode][c][0].dtype == maps[b_mode][c][0].dtype
                    and np.array_equal(maps[a_mode][c][0], maps[b_mode][c][0]) for c in cases)
        stable = {mode: all(np.array_equal(load(row[m][mode]["output"], c)[0], maps[mode][c][0])
                            for row in rounds[:-1] for c in cases) for mode in args.modes}
        out[m] = {"versus_nnunet": versus, "viseg_modes_identical": identical, "identical_across_rounds": stable}
    return out


def run_checks(rounds: list[dict[str, Any]], args: argparse.Namespace, agreement: dict[str, Any]) -> list[Check]:
    checks = []
    n = args.cases
    every = [r[m][mode] for r in rounds for m in args.mirroring for mode in args.modes]
    checks.append(Check("every run wrote every case", all(r["outputs_written"] == n for r in every),
                        f"{n} cases expected; written: {sorted({r['outputs_written'] for r in every})}"))
    checks.append(Check("no process left running after a command", all(r["descendants_killed"] == 0 for r in every),
                        f"killed 30 s after the command's exit: {sum(r['descendants_killed'] for r in every)}; the "
                        f"last descendant exited at most {max(r['descendants_linger_s'] for r in every):.1f} s after "
                        "its command"))
    for mode in (m for m in args.modes if m != "nnunet"):  # each mode logged its own way of predicting, only it
        runs = [r[m][mode] for r in rounds for m in args.mirroring]
        logged = {other: [r[f"{other}_line"] for r in runs] for other in MODE_LINES}
        ok = all(all(lines) if other == mode else not any(lines) for other, lines in logged.items())
        seen = sorted({line for lines in logged.values() for line in lines if line})
        checks.append(Check(f"{mode}: ran as configured", ok, "; ".join(seen) or "no worker processes, no Ray "
                            "(one process)"))
    for m in args.mirroring:
        ready = {r[m][mode].get("ready_line") for r in rounds for mode in args.modes if mode != "nnunet"}
        want = "mirror axes off" if not MIRRORING[m] else "mirror axes ["
        checks.append(Check(f"mirroring {m}: viseg's logged setting", all(line and want in line for line in ready),
                            "; ".join(map(str, sorted(ready, key=str)))))
        a = agreement[m]
        for mode, v in a["versus_nnunet"].items():
            geometry = all(c["shape"]["nnunet"] == c["shape"][mode] and c["affine_max_abs_diff"] < 1e-4
                           for c in v["cases"])
            checks.append(Check(f"mirroring {m}: {mode} geometry = nnU-Net's", geometry,
                                f"{len(v['cases'])} cases, shapes and affines"))
            checks.append(Check(f"mirroring {m}: {mode} labels vs nnU-Net", v["min_agreement"] is not None
                                and v["min_agreement"] >= 0.99,
                                f"mean {v['mean_agreement']:.6f}, min {v['min_agreement']:.6f} of the voxels equal"))
        for pair, same in a["viseg_modes_identical"].items():
            checks.append(Check(f"mirroring {m}: {pair} (label maps identical)", same, "every case, dtype included"))
        checks.append(Check(f"mirroring {m}: same output every round", all(a["identical_across_rounds"].values()),
                            ", ".join(f"{k} {v}" for k, v in a["identical_across_rounds"].items())))
    return checks


# -- reporting ------------------------------------------------------------------------------------------

SUMMARY_KEYS = ("wall_s", "cpu_s", "others_cores", "ready_s", "first_case_s", "steady_span_s", "tail_s",
                "cases_per_min_command", "cases_per_min_steady", "ray_start_s", "ray_shutdown_s")


def summarize(rounds: list[dict[str, Any]], mirroring: list[str], modes: list[str], quiet_cores: float
              ) -> dict[str, Any]:
    """Medians over all rounds, and over the *quiet* runs alone: those during which the machine's other jobs took
    at most `quiet_cores` cores on average. Alternating the order evens out slow drifts of the load, not another
    job that starts and stops within a round; the quiet medians show the comparison without such runs."""

    def medians_of(runs: list[dict[str, Any]]) -> dict[str, float]:
        return {k: round(statistics.median(r[k] for r in runs), 3) for k in SUMMARY_KEYS
                if runs and all(r.get(k) is not None for r in runs)}

    def ratios_of(medians: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        nn = medians.get("nnunet", {})
        return {mode: {rate: round(medians[mode][rate] / nn[rate], 4) for rate in
                       ("cases_per_min_steady", "cases_per_min_command") if rate in medians[mode] and rate in nn}
                for mode in modes if mode != "nnunet"}

    out: dict[str, Any] = {}
    for m in mirroring:
        runs = {mode: [r[m][mode] for r in rounds] for mode in modes}
        medians = {mode: medians_of(runs[mode]) for mode in modes}
        quiet = {mode: [r for r in runs[mode] if r.get("others_cores") is not None
                        and r["others_cores"] <= quiet_cores] for mode in modes}
        quiet_medians = {mode: medians_of(quiet[mode]) for mode in modes}
        out[m] = {"median": medians, "ratio_over_nnunet": ratios_of(medians),
                  "quiet": {"others_cores_at_most": quiet_cores,
                            "runs": {mode: [r["output"] for r in quiet[mode]] for mode in modes},
                            "median": quiet_medians, "ratio_over_nnunet": ratios_of(quiet_medians)}}
    return out


def faster(ratio: float) -> str:
    return "viseg faster" if ratio > 1 else "viseg slower" if ratio < 1 else "equal"


def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any], checks: list[Check]) -> str:
    m, s, sm = result["machine"], result["settings"], result["summary"]
    nn, vi = m["nnunet_env"], m["viseg_env"]
    plan = result["plan"]["used"]
    n = len(result["dataset"]["cases"])
    rows = []
    for r in result["rounds"]:
        for mir in s["mirroring"]:
            for mode in r["order"]:
                x = r[mir][mode]
                rows.append(f"| {r['round']} | {mir} | {NAMES[mode]} | {x['wall_s']:.1f} | {_f(x['ready_s'])} | "
                            f"{_f(x.get('ray_start_s'))} | {_f(x.get('first_case_s'))} | "
                            f"{_f(x.get('steady_span_s'))} | {_f(x.get('tail_s'))} | "
                            f"{_f(x.get('cases_per_min_command'))} | {_f(x.get('cases_per_min_steady'))} | "
                            f"{x['cpu_s']:.0f} | {_f(x.get('others_cores'), 2)} | {_load(x['load_at_start'])} |")
    medians, verdicts, quiet = [], [], []
    for mir in s["mirroring"]:
        for mode in s["modes"]:
            x = sm[mir]["median"][mode]
            medians.append(f"| {mir} | {NAMES[mode]} | {_f(x.get('wall_s'))} | {_f(x.get('ready_s'))} | "
                           f"{_f(x.get('ray_start_s'))} | {_f(x.get('first_case_s'))} | "
                           f"{_f(x.get('steady_span_s'))} | {_f(x.get('tail_s'))} | "
                           f"**{_f(x.get('cases_per_min_command'))}** | **{_f(x.get('cases_per_min_steady'))}** | "
                           f"{_f(x.get('cpu_s'), 0)} | {_f(x.get('others_cores'), 2)} |")
        for mode, ratio in sm[mir]["ratio_over_nnunet"].items():
            steady, whole = ratio.get("cases_per_min_steady"), ratio.get("cases_per_min_command")
            ag = result["agreement"][mir]["versus_nnunet"][mode]
            verdicts.append(f"- mirroring {mir}, {NAMES[mode]}: steady **{_f(steady, 3)}** "
                            f"({faster(steady) if steady else '-'}), whole command **{_f(whole, 3)}** "
                            f"({faster(whole) if whole else '-'}); labels vs nnU-Net: mean {ag['mean_agreement']:.5f}, "
                            f"min {ag['min_agreement']:.5f} of the voxels equal")
        identical = result["agreement"][mir]["viseg_modes_identical"]
        if identical:
            verdicts.append(f"- mirroring {mir}, viseg modes against each other: " + ", ".join(
                f"{pair} {'identical' if same else '**differ**'}" for pair, same in identical.items()))
        quiet.extend(quiet_lines(mir, sm[mir]["quiet"], s["modes"]))
    patch_source = "the plan's" if s["patch_override"] is None else f"--patch {s['patch_override']}, applied to both"
    budget = result["budget"]
    return "\n".join([
        f"# Folder prediction ({s['configuration']}, CPU): nnU-Net v2 vs viseg, cases per minute "
        f"({result['dataset']['name']})",
        "",
        f"{result['timestamp']}; a folder of {n} cases of `{result['dataset']['path']}/imagesTr` "
        f"({result['dataset']['cases'][0]} ... {result['dataset']['cases'][-1]}, linked in imagesTs naming); patch "
        f"{plan['patch_size']} ({patch_source}), PlainConvUNet with {plan['network']['n_stages']} stages, the same "
        f"seeded weights in both (checked: same state dict, same output on a probe); tile step 0.5, Gaussian "
        f"weighting, mirroring {', '.join(s['mirroring'])}. {s['repeats']} rounds, order reversed every round, a "
        "fresh process per command.",
        f"Machine: os.cpu_count() = {m['cpu_count']} ({m['usable_cpus']} usable), no GPU, Python {m['python']}; "
        f"nnunetv2 {nn['nnunetv2']} (torch {nn['torch']}), viseg {vi['viseg']} (torch {vi['torch']}). Load average "
        f"(1/5/15 min) before the rounds {_load(result['load_before'])}, after {_load(result['load_after'])}: the "
        "machine is shared with other jobs, so compare the ratios (each round runs every mode within minutes), not the "
        "absolute rates.",
        f"Budget: the whole bench took {budget['total_s'] / 60:.1f} min ({budget['setup_s']:.0f} s untimed setup: "
        f"viseg's plan of the dataset, the network, both model folders; {budget['rounds_s']:.0f} s of timed commands).",
        "",
        "The commands (P = " + str(s["processes"]) + f", threads {s['threads']}):",
        "",
        *(f"- {NAMES[mode]}: `{cmd}`" for mode, cmd in s["commands"].items()),
        "",
        "Columns: wall = process start to exit. start-up = to the line that says the tool is about to predict "
        "(imports, model loading, finding the cases). Ray = `import ray` + `ray.init`, part of the Ray mode's first "
        "case. first case = start-up to the first output file. steady = from the k-th to the last output file, k "
        f"= the cases predicted at once (1; Ray: {s['ray_actors']} actors, whose first cases finish together). tail "
        f"= last output to exit (workers and Ray stopping). cases/min: command = {n} / wall, steady = (N - k) / "
        "steady span. CPU = CPU seconds of the command's whole process tree (Ray's "
        "daemons and actors included: this script reaps the orphaned descendants and samples the tree in /proc). "
        "others = the cores the machine's other jobs took on average meanwhile (/proc/stat's busy time less the "
        "command's CPU, over its run; about +-0.2 cores): a round "
        "where they took a core is a disturbed round.",
        "",
        "| round | mirroring | mode | wall [s] | start-up [s] | Ray [s] | first case [s] | steady [s] | tail [s] | "
        "cases/min command | cases/min steady | CPU [s] | others [cores] | load at start |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        *rows,
        "",
        "Medians over the rounds:",
        "",
        "| mirroring | mode | wall [s] | start-up [s] | Ray [s] | first case [s] | steady [s] | tail [s] | "
        "cases/min command | cases/min steady | CPU [s] | others [cores] |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *medians,
        "",
        "**ratio cases/min (viseg mode) / cases/min (nnU-Net)**, medians (> 1: viseg faster, 2 = twice as fast):",
        "",
        *verdicts,
        "",
        *quiet,
        "",
        *notes_section(result.get("notes", [])),
        "| check | ok | detail |",
        "| --- | --- | --- |",
        *(f"| {c.field} | {'yes' if c.ok else '**NO**'} | {c.detail.replace('|', chr(92) + '|')} |" for c in checks),
        "",
    ])


def notes_section(notes: list[str]) -> list[str]:
    """The JSON's "notes": the reading of a run, added by hand after it (`--render` keeps them), one per item."""
    if not notes:
        return []
    return ["## Reading this run (written after it; the JSON's \"notes\")", "", *(f"- {n}" for n in notes), ""]


def quiet_lines(mirroring: str, quiet: dict[str, Any], modes: list[str]) -> list[str]:
    """The Markdown paragraph of the quiet runs: how many each mode had, their medians and ratios."""
    limit = quiet["others_cores_at_most"]
    counts = ", ".join(f"{NAMES[mode]} {len(quiet['runs'][mode])}" for mode in modes)
    lines = [f"Quiet runs only (mirroring {mirroring}; the other jobs took at most {limit:g} cores meanwhile): "
             f"{counts}."]
    if not quiet["runs"]["nnunet"]:
        return [*lines[:1], "No quiet nnU-Net run: no quiet ratio."]
    lines[0] += " Medians over them, cases/min steady (command):"
    lines.append("")
    for mode in modes:
        x = quiet["median"][mode]
        ratio = quiet["ratio_over_nnunet"].get(mode, {})
        rel = (f"; ratio {_f(ratio.get('cases_per_min_steady'), 3)} ({_f(ratio.get('cases_per_min_command'), 3)})"
               if ratio else "")
        lines.append(f"- {NAMES[mode]}: {_f(x.get('cases_per_min_steady'))} ({_f(x.get('cases_per_min_command'))})"
                     f"{rel}" if x else f"- {NAMES[mode]}: no quiet run")
    return lines


def summary_table(summary: dict[str, Any]) -> str:
    rows = ["mirroring  mode               cases/min steady  cases/min command  ratio steady  ratio command",
            "---------  -----------------  ----------------  -----------------  ------------  -------------"]
    for m, s in summary.items():
        for mode, x in s["median"].items():
            ratio = s["ratio_over_nnunet"].get(mode, {})
            rows.append(f"{m:<9}  {NAMES[mode]:<17}  {_f(x.get('cases_per_min_steady')):>16}  "
                        f"{_f(x.get('cases_per_min_command')):>17}  {_f(ratio.get('cases_per_min_steady'), 3):>12}  "
                        f"{_f(ratio.get('cases_per_min_command'), 3):>13}")
    return "\n".join(rows)


# -- main -----------------------------------------------------------------------------------------------


def link_nnunet_results(model_dir: Path, results: Path, dataset_name: str, configuration: str) -> None:
    """nnUNetv2_predict -d finds a model only as nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>.
    `results` is a fresh folder: the setup's nnUNet_results holds the log of the trainer it constructed."""
    folder = results / dataset_name / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    folder.parent.mkdir(parents=True)
    folder.symlink_to(model_dir, target_is_directory=True)


def environments(args: argparse.Namespace, nn_env: dict[str, str]) -> dict[str, dict[str, str]]:
    """Each mode's environment: unbuffered output (the time stamps), no RAY_ADDRESS to join by accident, threads
    alike in the local modes and Ray's own per-worker rule in the Ray mode (see the module docstring)."""
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    local = dict(base, PYTHONUNBUFFERED="1", **thread_env(args.threads))
    ray = {k: v for k, v in base.items() if k not in THREAD_VARS}
    ray.update(PYTHONUNBUFFERED="1", RAY_ADDRESS="local")
    return {"nnunet": dict(nn_env, PYTHONUNBUFFERED="1"), "viseg_overlap": local, "viseg_sequential": local,
            "viseg_ray": ray}


def render(path: Path, quiet_cores: float) -> int:
    """`--render`: the summary and report of a results JSON, recomputed from its rounds (nothing is measured)."""
    result = json.loads(path.read_text())
    s = result["settings"]
    result["summary"] = summarize(result["rounds"], s["mirroring"], s["modes"], quiet_cores)
    checks = [Check(**c) for c in result["checks"]["checks"]]
    write_results(path, result, checks, markdown)
    print(summary_table(result["summary"]))
    print(f"rewrote {path} and {path.with_suffix('.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.render is not None:
        return render(args.render, args.quiet_cores)
    args.dataset = args.dataset.resolve()
    subreaper = become_subreaper()
    if not (NNUNET_VENV / "bin" / "python").exists():
        sys.exit("bench/.venv-nnunet is missing: run `bash bench/setup_nnunet_env.sh` first")
    logs = args.out.parent / "raw"
    logs.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.viseg_python)
    reference = json.loads(args.reference_plans.read_text())
    with tempfile.TemporaryDirectory(prefix="bench_predict_folder_") as tmp_name:
        tmp = Path(tmp_name)
        cases = link_inputs(args.dataset, tmp / "input", args.cases)
        print(f"{len(cases)} case(s): {cases[0][0]} ... {cases[-1][0]}; "
              f"{read_files([f for _, files in cases for f in files]) / 2**20:.1f} MiB read", flush=True)
        viseg = setup_viseg(args, tmp, logs)
        bench_plans = nnunet_bench_plans(reference, args.configuration, viseg["plan"])
        plans_file = tmp / "nnunet_bench_plans.json"
        plans_file.write_text(json.dumps(bench_plans, indent=1))
        (tmp / "nnunet" / "raw").mkdir(parents=True)
        nn_env = dict(nnunet_env(tmp / "nnunet" / "raw", tmp / "nnunet"), nnUNet_compile="f",
                      nnUNet_def_n_proc=str(args.threads), **thread_env(args.threads))
        nnunet = setup_nnunet(args, plans_file, viseg, nn_env, tmp, logs)
        dataset_name = reference["dataset_name"]
        nn_env["nnUNet_results"] = str(tmp / "nnunet_results")
        link_nnunet_results(Path(nnunet["model_dir"]), tmp / "nnunet_results", dataset_name, args.configuration)
        # untimed: read Ray's modules once, so that the first Ray run does not pay for a cold page cache alone
        subprocess.run([str(args.viseg_python), "-c", "import ray, ray.data"], check=True, capture_output=True)
        ctx = {"tmp": tmp, "logs": logs, "input": tmp / "input", "case_ids": [c for c, _ in cases],
               "run_dir": viseg["run_dir"], "nnunet_dataset": dataset_name, "env": environments(args, nn_env)}
        setup_s = time.perf_counter() - started
        load_before = list(os.getloadavg())
        rounds_started = time.perf_counter()
        rounds = run_rounds(args, ctx)
        rounds_s = time.perf_counter() - rounds_started
        load_after = list(os.getloadavg())
        agreement = compare_outputs(rounds, args, ctx["case_ids"])
        commands = {mode: command(mode, args.mirroring[0], Path("OUT"), args, ctx) for mode in args.modes}
    for row in rounds:  # the temporary paths are gone
        for m in args.mirroring:
            for mode in args.modes:
                row[m][mode]["output"] = Path(row[m][mode]["output"]).name
    short = {mode: shlex.join(c.replace(str(REPO) + "/", "").replace(tmp_name, "$TMP") for c in cmd)
             for mode, cmd in commands.items()}
    plan = {"nnunet_reference": nnunet_plan_summary(reference, args.configuration),
            "viseg_default": viseg["default_plan"], "used": viseg["plan"],
            "nnunet_used": nnunet_plan_summary(bench_plans, args.configuration)}
    checks = plan_checks(plan["nnunet_reference"], plan["viseg_default"], "default plan")
    if args.patch is not None:
        checks += plan_checks(plan["nnunet_used"], plan["used"], "benchmark plan")
    checks += network_checks(viseg, nnunet)
    checks += run_checks(rounds, args, agreement)
    summary = summarize(rounds, args.mirroring, args.modes, args.quiet_cores)
    result = {
        "benchmark": "folder prediction on CPU, whole commands: nnUNetv2_predict vs python -m viseg.predict "
                     "(overlapped, Ray, sequential)",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).as_posix(), *sys.argv]) if argv is None else shlex.join(argv),
        "dataset": {"path": str(args.dataset), "name": json.loads((args.dataset / "dataset.json").read_text())
                    .get("name", args.dataset.name), "cases": ctx["case_ids"]},
        "machine": machine,
        "settings": {"configuration": args.configuration, "patch_override": args.patch,
                     "patch": viseg["plan"]["patch_size"], "threads": args.threads, "processes": args.processes,
                     "ray_actors": args.ray_actors, "ray_cpus_per_actor": args.ray_cpus_per_actor,
                     "repeats": args.repeats, "mirroring": args.mirroring, "modes": args.modes, "seed": args.seed,
                     "tile_step_size": 0.5, "gaussian": True, "device": "cpu", "commands": short,
                     "cpu_accounting": "process tree incl. orphaned descendants (child subreaper)" if subreaper
                     else "the command's process and the descendants it reaped (no subreaper: orphans not counted)",
                     "order": "every mode once per round and mirroring setting, --modes order in odd rounds, "
                              "reversed in even rounds",
                     "threads_env": {"nnunet": {**thread_env(args.threads), "nnUNet_def_n_proc": str(args.threads),
                                                "torch.set_num_threads": "cpu_count (nnUNetv2_predict -device cpu)"},
                                     "viseg_overlap": thread_env(args.threads),
                                     "viseg_sequential": thread_env(args.threads),
                                     "viseg_ray": "unset: Ray sets OMP_NUM_THREADS per worker to its CPUs "
                                                  "(floored, at least 1); RAY_ADDRESS=local"}},
        "plan": plan,
        "network": {"viseg": {k: viseg[k] for k in ("parameters", "state_dict_keys", "probe_shape",
                                                    "training_mirror_axes")},
                    "nnunet": {k: v for k, v in nnunet.items() if k != "model_dir"}},
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in load_after],
        "budget": {"total_s": round(time.perf_counter() - started, 1), "setup_s": round(setup_s, 1),
                   "rounds_s": round(rounds_s, 1)},
        "rounds": rounds,
        "summary": summary,
        "agreement": agreement,
        "checks": {"all_ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]},
    }
    write_results(args.out, result, checks, markdown)
    print()
    print(summary_table(summary))
    print(f"ratio > 1: viseg faster; load average before {_load(load_before)}, after {_load(load_after)}; "
          f"{result['budget']['total_s'] / 60:.1f} min in all")
    print()
    print(agreement_table(checks))
    print(f"results: {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
