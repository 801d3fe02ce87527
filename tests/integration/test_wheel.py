"""viseg installs as a normal package: a wheel built from the checkout, installed outside it, runs from an
empty folder with the configs it carries (conf/ and sweeps/ as package data), through the one `viseg` script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import build_wheel

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The wheel, installed into its own target folder; the environment that uses it instead of the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    site = root / "site"
    wheel = build_wheel(root)
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
         cwd=root, env=dict(os.environ))
    # The wheel's viseg comes first on the path; the venv still provides torch, Ray and the rest.
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return site, env


def test_the_installed_package_is_the_wheel_and_carries_its_configs(installed: tuple[Path, dict[str, str]],
                                                                    tmp_path: Path) -> None:
    site, env = installed
    probe = ("import viseg, viseg.resources as r; print(viseg.__file__); print(r.conf_dir()); print(r.sweeps_dir()); "
             "print(sorted(p.name for p in r.conf_dir().glob('*.yaml')))")
    out = _run([sys.executable, "-c", probe], cwd=tmp_path, env=env).stdout.splitlines()
    package, conf, sweeps, yamls = out[0], Path(out[1]), Path(out[2]), out[3]
    assert Path(package).is_relative_to(site), f"imported {package}, not the wheel in {site}"
    assert conf == site / "viseg" / "conf" and sweeps == site / "viseg" / "sweeps"
    assert "anatomy_config.yaml" in yamls and (conf / "lr_scheduler" / "poly.yaml").is_file()
    assert (sweeps / "demo.yaml").is_file() and (conf / "hydra" / "help" / "train.yaml").is_file()


def test_plan_train_and_sweep_dry_run_from_an_empty_folder(installed: tuple[Path, dict[str, str]],
                                                           tmp_path: Path) -> None:
    site, env = installed
    viseg = str(site / "bin" / "viseg")
    work = tmp_path / "empty"
    work.mkdir()

    assert "viseg train" in _run([viseg, "--help"], cwd=work, env=env).stdout
    planned = _run([viseg, "plan"], cwd=work, env=env).stdout
    assert "patch size" in planned and (work / ".viseg_cache").is_dir()

    tiny = ["plan.base_num_features=8", "patch_size=[16,32,32]", "trainer.max_epochs=1",
            "trainer.iterations_per_epoch=2", "trainer.val_iterations=1", "loader.num_workers=0", "num_processes=1"]
    trained = _run([viseg, "train", *tiny], cwd=work, env=env).stdout
    run_dir = work / trained.split("run folder", 1)[1].split("\n", 1)[0].strip()
    assert (run_dir / "finished.json").is_file() and run_dir.is_relative_to(work / "results"), trained

    dry = _run([viseg, "sweep", "folds=0-1", "lr_scheduler=step_lr,poly", "dry_run=true"], cwd=work, env=env).stdout
    assert "trials      4 (2 variant(s) x folds [0, 1])" in dry, dry
    assert dry.count("lr_scheduler=poly") == 2 and not (work / "results" / "sweeps").exists()


def test_a_users_config_folder_adds_to_the_packaged_one(installed: tuple[Path, dict[str, str]],
                                                        tmp_path: Path) -> None:
    """Hydra's --config-dir puts the user's folder on top: their config extends a packaged one by name."""
    site, env = installed
    mine = tmp_path / "my_conf"
    mine.mkdir()
    (mine / "my_config.yaml").write_text("defaults:\n  - anatomy_config\n  - _self_\ntrainer:\n  max_epochs: 3\n")
    shown = _run([str(site / "bin" / "viseg"), "train", "--config-dir", str(mine), "--config-name", "my_config",
                  "--cfg", "job"], cwd=tmp_path, env=env).stdout
    assert "trainer:\n  max_epochs: 3\n  iterations_per_epoch: 250" in shown, shown
