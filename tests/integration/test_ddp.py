"""`python -m viseg.train devices=2` on CPU: Lightning DDP over two gloo processes, as on two GPUs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_run

pytestmark = pytest.mark.slow


def test_two_processes_share_the_batch_and_write_one_run(demo: Path, tmp_path: Path):
    args = [*tiny_run(demo, tmp_path, "devices=2", "batch_size=4", "trainer.max_epochs=2",
                      "sampling.oversample_foreground_percent=0.33")]
    result = subprocess.run([sys.executable, "-m", "viseg.train", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    # each rank drew its half of the planned batch; the last sample of the 4 is the forced one, rank 1's
    assert "rank 0 of 2: 2 of the 4 samples of each batch, 0 of them forced to foreground" in output
    assert "rank 1 of 2: 2 of the 4 samples of each batch, 1 of them forced to foreground" in output
    (run_dir,) = (tmp_path / "results").rglob("fold_0")
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and not [n for n in checkpoints if "tmp" in n], checkpoints
    assert (run_dir / "finished.json").is_file() and (run_dir / "validation" / "summary.json").is_file()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and "viseg" in checkpoint
    log = (run_dir / "training_log.txt").read_text()
    assert log.count("training from epoch 0") == 1 and log.count("epoch 1/1") == 1  # rank 0 alone writes
    assert output.count("run folder ") == 1
