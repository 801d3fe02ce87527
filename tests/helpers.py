"""Helpers shared by tests: compose typed configs exactly as the command lines do; build the wheel."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from viseg.cli import to_typed
from viseg.config import BaseConfig, register_configs
from viseg.resources import conf_dir


def compose_typed(config_name: str = "anatomy_config", overrides: list[str] | None = None) -> BaseConfig:
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir())):
        return to_typed(compose(config_name, overrides=list(overrides or [])))


def tiny_run(demo: Path, work: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long CPU run on `demo` (3 folds, 2 iterations, no loader workers)."""
    return [f"dataset.basepath={demo}", f"paths.cache={work / 'cache'}", f"paths.results={work / 'results'}",
            "splits.n_folds=3", "num_processes=1", "loader.num_workers=0", "trainer.iterations_per_epoch=2",
            "trainer.val_iterations=1", *extra]


WHEEL_INPUTS = ("pyproject.toml", "README.md", "viseg", "conf", "sweeps")  # what pyproject.toml packages


def build_wheel(work: Path) -> Path:
    """viseg's wheel, built as launch/submit.sh builds it: from a copy of its inputs, so that two tests (two
    xdist workers) never share setuptools' build/ and *.egg-info in the checkout."""
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    source = work / "src"
    source.mkdir(parents=True)
    for name in WHEEL_INPUTS:
        copy = shutil.copytree if (repo / name).is_dir() else shutil.copy2
        copy(repo / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                             if (repo / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(work / "dist"), str(source)], check=True, capture_output=True, text=True)
    (wheel,) = (work / "dist").glob("viseg-*.whl")
    return wheel
