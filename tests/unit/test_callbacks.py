"""The run folder's progress plot, drawn without global matplotlib state (Ray reuses a worker across trials)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from pathlib import Path
import matplotlib
matplotlib.use("svg")  # what a user's own code may have chosen: the plot must leave it so
from viseg.training.callbacks import plot_progress
rows = [{"epoch": e, "train/loss": 1.0 / (e + 1), "val/loss": 1.2 / (e + 1), "val/mean_pseudo_dice": 0.1 * e,
         "val/ema_pseudo_dice": 0.08 * e, "lr": 0.01, "epoch_time": 3.0} for e in range(4)]
plot_progress(rows, Path(sys.argv[1]))
assert matplotlib.get_backend() == "svg", "backend switched to " + matplotlib.get_backend()
import matplotlib.pyplot as plt
assert plt.get_fignums() == [], "a pyplot figure was left open"
"""


def test_progress_plot_is_written_without_pyplot_or_a_backend_switch(tmp_path: Path):
    png = tmp_path / "progress.png"
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(png)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["progress.png"]  # no temporary file left beside it
