"""The command lines as a user runs them: real `python -m viseg.*` subprocesses on a real (tiny) demo
dataset, with the cache (.viseg_cache) in a temporary working directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from viseg.data.demo import DemoSpec, generate_demo_dataset
from viseg.planning.plans import Plans

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
N_FOLDS = 3
DERIVED_MESSAGE = "derived from the dataset and the plan"


def viseg(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m viseg.<module> args...` in `cwd`, as a user would type it."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", f"viseg.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def dataset_args(root: Path) -> list[str]:
    return [f"dataset.basepath={root}", "num_processes=1", f"splits.n_folds={N_FOLDS}"]


def printed(stdout: str, key: str) -> str:
    """The value of a `key   value` line of the plan summary."""
    match = re.search(rf"^{re.escape(key)} +(\S+)", stdout, flags=re.MULTILINE)
    assert match, f"no {key!r} line in:\n{stdout}"
    return match.group(1)


def cache_files(cwd: Path, name: str) -> list[Path]:
    return sorted((cwd / ".viseg_cache").rglob(name))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("data") / "demo", DemoSpec(n_cases=6), progress=False)


class Planned:
    """A working directory whose cache has been filled by one `python -m viseg.plan` run."""

    def __init__(self, cwd: Path, first: subprocess.CompletedProcess[str]) -> None:
        self.cwd = cwd
        self.first = first
        [self.fingerprint] = cache_files(cwd, "fingerprint.json")
        self.fingerprint_mtime = self.fingerprint.stat().st_mtime_ns


@pytest.fixture(scope="module")
def planned(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Planned:
    cwd = tmp_path_factory.mktemp("work")
    result = viseg("plan", *dataset_args(demo), cwd=cwd)
    assert result.returncode == 0, result.stderr
    return Planned(cwd, result)


# -- python -m viseg.plan ---------------------------------------------------------------------------
def test_plan_writes_plans_and_splits_then_reuses_the_fingerprint(planned: Planned, demo: Path) -> None:
    first = planned.first.stdout
    assert "fingerprint        extracted" in first
    assert "predicting [1, 2, 3]" in first
    plans_path = planned.cwd / printed(first, "plans")
    splits_path = planned.cwd / printed(first, "splits")
    assert plans_path.is_file() and splits_path.is_file()
    assert plans_path.is_relative_to(planned.cwd / ".viseg_cache")
    plans = Plans.load(plans_path)
    assert plans.dataset_name == "VisegDemo"
    assert plans.foreground_labels == (1, 2, 3)
    assert set(plans.configurations) == {"3d_fullres", "2d"}
    assert f"({N_FOLDS} folds, [2, 2, 2] validation cases)" in first
    plans_mtime = plans_path.stat().st_mtime_ns

    again = viseg("plan", *dataset_args(demo), cwd=planned.cwd)

    assert again.returncode == 0, again.stderr
    assert "fingerprint        reused from cache" in again.stdout
    assert cache_files(planned.cwd, "fingerprint.json") == [planned.fingerprint]
    assert planned.fingerprint.stat().st_mtime_ns == planned.fingerprint_mtime
    assert printed(again.stdout, "plans") == printed(first, "plans")
    assert plans_path.stat().st_mtime_ns == plans_mtime  # the contract is written once
    assert Plans.load(plans_path) == plans


def test_lesion_config_predicts_only_the_lesion(planned: Planned, demo: Path) -> None:
    result = viseg("plan", "--config-name=lesion_config", *dataset_args(demo), cwd=planned.cwd)
    assert result.returncode == 0, result.stderr
    assert "predicting [3]" in result.stdout
    assert "fingerprint        reused from cache" in result.stdout
    assert Plans.load(planned.cwd / printed(result.stdout, "plans")).foreground_labels == (3,)
    assert planned.fingerprint.stat().st_mtime_ns == planned.fingerprint_mtime


def test_config_name_after_overrides(planned: Planned, demo: Path) -> None:
    result = viseg("plan", *dataset_args(demo), "--config-name=lesion_config", cwd=planned.cwd)
    assert result.returncode == 0, result.stderr
    assert "predicting [3]" in result.stdout


def test_patch_size_override_is_snapped_to_a_valid_size(planned: Planned, demo: Path) -> None:
    requested = [17, 33, 45]
    result = viseg("plan", *dataset_args(demo), f"patch_size=[{','.join(map(str, requested))}]",
                   cwd=planned.cwd)
    assert result.returncode == 0, result.stderr
    plans = Plans.load(planned.cwd / printed(result.stdout, "plans"))
    plan = plans.configurations["3d_fullres"]
    divisor = np.prod(np.array(plan.network.strides), axis=0)
    assert all(p % d == 0 for p, d in zip(plan.patch_size, divisor, strict=True)), (plan.patch_size, divisor)
    assert list(plan.patch_size) != requested
    assert plans.planner["patch_size"] == requested  # what the user asked for is recorded
    assert printed(result.stdout, "patch size") == "x".join(map(str, plan.patch_size))
    assert printed(result.stdout, "plans") != printed(planned.first.stdout, "plans")  # its own plan folder


@pytest.mark.parametrize(("override", "words"), [
    ("model.model_args.n_stages=3", ["model.model_args.n_stages", "derived"]),
    ("num_classes=4", ["num_classes", "derived"]),
    ("fold=9", ["fold=9", "out of range"]),
])
def test_invalid_overrides_exit_2_before_any_work(tmp_path: Path, demo: Path, override: str,
                                                  words: list[str]) -> None:
    result = viseg("plan", *dataset_args(demo), override, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    for word in words:
        assert word in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".viseg_cache").exists()


def test_unknown_scheduler_is_refused(tmp_path: Path, demo: Path) -> None:
    result = viseg("plan", *dataset_args(demo), "lr_scheduler=nope", cwd=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "lr_scheduler" in output and "nope" in output
    assert not (tmp_path / ".viseg_cache").exists()


def test_foreground_label_not_in_the_dataset(planned: Planned, demo: Path) -> None:
    result = viseg("plan", *dataset_args(demo), "foreground_labels=[7]", cwd=planned.cwd)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "foreground_labels" in result.stderr and "[7]" in result.stderr
    assert "Traceback" not in result.stderr


# -- python -m viseg.verify on a broken dataset ---------------------------------------------------------
def _edit(path: Path, change: Callable[[np.ndarray], None]) -> None:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).copy()
    change(data)
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))


def _break(root: Path) -> None:
    _edit(root / "imagesTr" / "demo_000_0000.nii.gz", lambda d: d.__setitem__((5, 5, 2), np.nan))
    _edit(root / "labelsTr" / "demo_001.nii.gz", lambda d: d.__setitem__((0, 0, 0), 9))
    image = root / "imagesTr" / "demo_002_0000.nii.gz"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])


def test_broken_dataset_is_reported_whole_and_never_planned(tmp_path: Path, demo: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(demo, broken)
    _break(broken)

    verified = viseg("verify", f"dataset.basepath={broken}", "num_processes=1", cwd=tmp_path)

    assert verified.returncode == 1, verified.stdout + verified.stderr
    report = verified.stdout
    assert "nan: [demo_000]" in report
    assert "label-outside-set: [demo_001]" in report
    assert "unreadable: [demo_002]" in report
    assert "FAILED: 3 errors" in report
    assert not (tmp_path / ".viseg_cache").exists()  # verification writes nothing

    planned = viseg("plan", *dataset_args(broken), cwd=tmp_path)

    assert planned.returncode == 2, planned.stdout + planned.stderr
    for case in ("demo_000", "demo_001", "demo_002"):
        assert f"[{case}]" in planned.stderr
    assert "Traceback" not in planned.stderr
    cache = tmp_path / ".viseg_cache"
    assert not cache.exists() or not any(cache.iterdir()), sorted(cache.rglob("*"))
    assert not list(tmp_path.rglob("fingerprint.json")) and not list(tmp_path.rglob("plans.json"))


# -- --help ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("module", "word"), [("plan", "patch_size"), ("verify", "NaN"),
                                              ("demo", "--n-cases")])
def test_help(tmp_path: Path, module: str, word: str) -> None:
    result = viseg(module, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert word in result.stdout
    assert list(tmp_path.iterdir()) == []  # --help writes nothing
