"""Shared fixtures: where ../shared lives, and real datasets generated on demand (session-scoped)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The key that seals sweeps' Ray state (viseg/sweep/state_seal.py): one per test process and the sweeps it
# starts, never the user's own ~/.config/viseg/state.key.
os.environ.setdefault("VISEG_STATE_KEY", os.path.join(tempfile.mkdtemp(prefix="viseg-test-key-"), "state.key"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with slow end-to-end tests first: on two xdist workers, a long test started last would run
    alone at the end. Each module's tests stay together, in their order, so module fixtures are built once."""
    modules = list(dict.fromkeys(item.module.__name__ for item in items))
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    rank = {name: (name not in slow, i) for i, name in enumerate(modules)}
    items.sort(key=lambda item: rank[item.module.__name__])


def shared_dir() -> Path:
    """The project's shared folder (../shared beside the checkout; VISEG_SHARED overrides)."""
    return Path(os.environ.get("VISEG_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not (path / "reference").is_dir():
        pytest.fail(f"shared folder not found at {path}; set VISEG_SHARED")
    return path


@pytest.fixture(scope="session")
def synthetic_reference_dataset(shared: Path, tmp_path_factory: pytest.TempPathFactory):
    """Generate nnU-Net's synthetic reference datasets with the reference script (deterministic)."""
    made: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in made:
            dataset_id = {"aniso": 901, "iso": 902}[variant]
            out = tmp_path_factory.mktemp(f"synth_{variant}")
            subprocess.run([sys.executable, str(shared / "reference" / "make_synthetic.py"), "--out", str(out),
                            "--variant", variant, "--seed", "0", "--dataset-id", str(dataset_id)],
                           check=True, capture_output=True)
            made[variant] = next(out.glob(f"Dataset{dataset_id}_*"))
        return made[variant]

    return make


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-case demo dataset for seconds-long training runs (modules with their own `demo` shadow it)."""
    from viseg.data.demo import DemoSpec, generate_demo_dataset

    return generate_demo_dataset(tmp_path_factory.mktemp("data") / "demo", DemoSpec(n_cases=6), progress=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Other jobs (and the other xdist worker) share this machine's two cores: two OpenMP threads then spin
    against them and made the convolutions 5-20x slower than one thread in measurements."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
