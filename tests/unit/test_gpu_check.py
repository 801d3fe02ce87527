"""bench/gpu_check.sh and bench/gpu_check.py: the one prepared GPU check.

A machine with a GPU is lent for minutes, so the check must work the first time it runs there: these tests
keep its shell syntax, its `--help` (which must not import torch: it has to answer on a machine whose torch
is broken), its no-CUDA exit, its pure helpers and, in CPU smoke mode, the JSON it writes, working on a CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"
WRAPPER = REPO / "bench" / "gpu_check.sh"
STEP_NAMES = ("env", "train_demo", "train_acdc", "sweep", "ddp", "predict", "augment", "epoch_ratio")


def _load() -> ModuleType:
    """The script as a module (bench/ is no package); importing it must not import torch."""
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "VISEG_PYTHON": sys.executable, **extra}


def test_wrapper_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(WRAPPER)], check=True)


def test_help_names_the_json_and_imports_no_torch() -> None:
    out = subprocess.run(["bash", str(WRAPPER), "--help"], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "JSON" in out.stdout and "bench/results/gpu_check.json" in out.stdout
    for step in STEP_NAMES:
        assert step in out.stdout
    probe = ("import runpy, sys\nsys.argv = ['gpu_check.py', '--help']\ntry:\n"
             f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "False", "gpu_check.py --help imported torch"


def test_step_names_and_parsing() -> None:
    gc = _load()
    assert gc.STEP_NAMES == STEP_NAMES
    assert set(gc.STEPS) == set(STEP_NAMES)
    assert set(gc.GPU_SIZES.budgets) == set(STEP_NAMES) == set(gc.SMOKE_SIZES.budgets)
    assert gc.parse_steps("epoch_ratio,train_demo") == ["env", "train_demo", "epoch_ratio"]  # env always, in order
    with pytest.raises(Exception, match="unknown step"):
        gc.parse_steps("train,env")


def test_budgets_fit_ten_minutes() -> None:
    """On one GPU ddp is skipped: the other steps' own budgets must fit the default 600 s with the reserve."""
    gc = _load()
    one_gpu = sum(v for k, v in gc.GPU_SIZES.budgets.items() if k != "ddp")
    assert one_gpu + gc.RESERVE_S <= 600
    assert gc.step_budget(90, deadline=100.0, now=50.0) == 50.0 - gc.RESERVE_S  # cut to what is left
    assert gc.step_budget(90, deadline=10.0, now=50.0) == 0.0


def test_max_overlap() -> None:
    gc = _load()
    assert gc.max_overlap([]) == 0
    assert gc.max_overlap([(0, 2), (2, 4)]) == 1  # one ends as the next starts
    assert gc.max_overlap([(0, 3), (1, 4), (5, 6), (5.5, 7)]) == 2


def test_read_sweep_counts_finished_trials_and_overlap(tmp_path: Path) -> None:
    """Tune's result.json lines and the run folders' config.yaml/finished.json times, as a sweep leaves them."""
    gc = _load()
    experiment = tmp_path / "exp"
    for i, (start, end) in enumerate([(100.0, 110.0), (101.0, 111.0), (112.0, 120.0), (113.0, 119.0)]):
        trial = experiment / f"v_fold{i % 2}_abc_{i:05d}"
        trial.mkdir(parents=True)
        lines = [{"epoch": 0, "pid": 10 + i % 2, "time_total_s": 1.0},
                 {"final/mean_dice": 0.5, "pid": 10 + i % 2, "time_total_s": 2.0}]
        (trial / "result.json").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        run = experiment / "runs" / "D" / "P" / f"v{i // 2}" / f"fold_{i % 2}"
        run.mkdir(parents=True)
        for name, stamp in (("config.yaml", start), ("finished.json", end)):
            (run / name).write_text("{}")
            os.utime(run / name, (stamp, stamp))
    found = gc.read_sweep(experiment)
    assert found["trials_finished"] == 4
    assert found["max_concurrent_runs"] == 2
    assert found["distinct_trial_pids"] == 2
    assert sorted(run["start_s"] for run in found["runs"]) == [0.0, 1.0, 12.0, 13.0]


@pytest.mark.slow
def test_no_cuda_is_recorded_and_exits_2(tmp_path: Path) -> None:
    """A CPU torch wheel (here: CUDA hidden) stops after the env step, says so in the JSON and exits 2."""
    out = tmp_path / "check.json"
    ran = subprocess.run(["bash", str(WRAPPER), "--out", str(out), "--logs", str(tmp_path / "logs")],
                         capture_output=True, text=True, env=_env(CUDA_VISIBLE_DEVICES=""), timeout=120)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "torch.cuda.is_available() is False" in ran.stderr
    report = json.loads(out.read_text())
    assert report["cuda_available"] is False and report["ok"] is False
    assert "torch.cuda.is_available() is False" in report["error"]
    assert report["steps"]["env"]["status"] == "ok"
    assert all(report["steps"][name]["status"] == "skipped" for name in STEP_NAMES[1:])


@pytest.mark.slow
def test_cpu_smoke_writes_every_step_key(tmp_path: Path) -> None:
    """The smoke mode on the demo data (ACDC off, so it runs anywhere): a training command, an in-process
    measurement worker and the JSON with every step's record, the unselected ones marked as such."""
    out = tmp_path / "smoke.json"
    ran = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--acdc", "none", "--steps",
                          "train_demo,augment", "--out", str(out), "--logs", str(tmp_path / "logs"),
                          "--work-dir", str(tmp_path / "work")],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-smoke" and report["ok"] is True
    assert tuple(report["steps"]) == STEP_NAMES
    status = {name: record["status"] for name, record in report["steps"].items()}
    assert status == {**dict.fromkeys(STEP_NAMES, "skipped"), "env": "ok", "train_demo": "ok", "augment": "ok"}
    assert report["steps"]["sweep"]["error"] == "skipped: not selected (--steps)"
    demo = report["steps"]["train_demo"]["result"]
    assert demo["complete"] and demo["precision"] == "32-true" and len(demo["epoch_times_s"]) == 2
    augment = report["steps"]["augment"]["result"]
    assert augment["dataset"] == "demo" and augment["train_step"]["median_ms"] > 0
    assert len(report["summary"]) == len(STEP_NAMES)
    assert (tmp_path / "logs" / "train_demo.log").is_file()
