"""notebooks/sweep_analysis.ipynb: committed without outputs, and executed end to end (nbclient, a real
kernel) on a tiny finished sweep, as a user would run it after `python -m viseg.sweep`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "sweep_analysis.ipynb"


def code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_committed_notebook_has_no_outputs_and_names_the_experiment_first():
    cells = code_cells(json.loads(NOTEBOOK.read_text()))
    assert cells, "the notebook has no code cell"
    # outputs would put one machine's results (and paths) into git and make every run a diff
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in cells)
    first = "".join(cells[0]["source"])
    assert "EXPERIMENT =" in first and "VISEG_EXPERIMENT" in first


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 variant x 2 folds x 1 epoch on the demo dataset, all under a temporary folder."""
    cwd = tmp_path_factory.mktemp("notebook_sweep")
    # RAY_ADDRESS=local: a cluster someone started here with `ray start` must not be joined
    result = subprocess.run([sys.executable, "-m", "viseg.sweep", "folds=0-1", "trainer.max_epochs=1",
                             "trainer.iterations_per_epoch=2", "trainer.val_iterations=1", "splits.n_folds=3",
                             "experiment=notebook"], cwd=cwd, capture_output=True, text=True, timeout=900,
                            env=os.environ | {"RAY_ADDRESS": "local"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd / "results" / "sweeps" / "notebook"


def outputs(notebook) -> list[dict]:
    return [out for cell in code_cells(notebook) for out in cell.get("outputs", [])]


def text_of(out: dict) -> str:
    return out.get("text", "") if out["output_type"] == "stream" else out.get("data", {}).get("text/plain", "")


def executed(experiment: Path, work: Path) -> list[dict]:
    """The notebook run end to end on `experiment` by a real kernel: every output, none an error."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(work)}})
    # a failing cell raises CellExecutionError with the cell's traceback
    client.execute(env=os.environ | {"VISEG_EXPERIMENT": str(experiment)})
    produced = outputs(notebook)
    assert not [out for out in produced if out["output_type"] == "error"]
    return produced


@pytest.mark.slow
def test_notebook_runs_on_a_finished_sweep_and_draws_its_figures(finished_sweep: Path, tmp_path: Path):
    produced = executed(finished_sweep, tmp_path)
    text = "\n".join(text_of(out) for out in produced)
    assert f"experiment: {finished_sweep}" in text
    assert "* default  2/0" in text  # the cross-validation table, both folds counted
    assert text.count("stopped or running") == 0 and text.count("finished") >= 2  # the trials table (result.json)
    figures = [out for out in produced if "image/png" in out.get("data", {})]
    assert len(figures) == 2, "expected the learning curves and the final-Dice box plot"


@pytest.fixture(scope="module")
def finished_pbt_search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PBT search of 3 configurations x 1 fold x 3 epochs: enough for importance and a learning-rate plot."""
    cwd = tmp_path_factory.mktemp("notebook_search")
    result = subprocess.run([sys.executable, "-m", "viseg.sweep", "optimizer.lr=tag(log, interval(1e-3, 1e-1))",
                             "num_samples=3", "search.folds=[0]", "search.scheduler=pbt",
                             "search.perturbation_interval=1", "trainer.max_epochs=3", "trainer.iterations_per_epoch=2",
                             "trainer.val_iterations=1", "splits.n_folds=3", "experiment=notebook-search"],
                            cwd=cwd, capture_output=True, text=True, timeout=900,
                            env=os.environ | {"RAY_ADDRESS": "local"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd / "results" / "sweeps" / "notebook-search"


@pytest.mark.slow
def test_notebook_shows_a_search_its_fold_spread_importance_and_pbt_learning_rates(finished_pbt_search: Path,
                                                                                   tmp_path: Path):
    produced = executed(finished_pbt_search, tmp_path)
    text = "\n".join(text_of(out) for out in produced)
    assert "mean ± std" in text and "finished" in text  # the configurations table
    assert "not a PBT search" not in text and "importance needs" not in text
    figures = [out for out in produced if "image/png" in out.get("data", {})]
    # learning curves, final Dice per variant, fold spread per configuration, importance, PBT learning rates
    assert len(figures) == 5
