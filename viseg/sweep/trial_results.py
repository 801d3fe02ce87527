"""What each trial of an experiment reported, read from the trials' `result.json` files as JSON only.

Ray's own reader (`ExperimentAnalysis`) loads the experiment state, whose entries it decodes with cloudpickle,
so reading a shared experiment folder with it runs whatever code someone put there. Each trial folder's
`result.json` (one JSON object per report, written by Tune's JSON logger) holds everything the candidates of a
search and the notebook's curves need: the trial id, its config and every metric it reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"
FINAL_METRIC = "final/mean_dice"  # only the trial's last report (after full-case validation) has it


@dataclass
class TrialReports:
    """One trial's reports, oldest first. `finished`: it reached its full-case validation."""

    trial_id: str
    folder: Path
    config: dict[str, Any]
    reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, Any]:
        return self.reports[-1] if self.reports else {}

    @property
    def finished(self) -> bool:
        return FINAL_METRIC in self.last

    def epochs(self) -> list[dict[str, Any]]:
        """The per-epoch reports (the last one, after the full-case validation, has no epoch)."""
        return [r for r in self.reports if r.get("epoch") is not None]


def _reports(path: Path) -> list[dict[str, Any]]:
    """Every whole line that parses; a line cut by a kill or a full disk is skipped."""
    reports = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if isinstance(report, dict):
            reports.append(report)
    return reports


def _config(folder: Path, reports: list[dict[str, Any]]) -> dict[str, Any]:
    for report in reversed(reports):
        if isinstance(report.get("config"), dict):
            return report["config"]
    try:
        config = json.loads((folder / "params.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def read_trials(experiment: Path) -> list[TrialReports]:
    """The experiment's trials that reported at least once, by trial id."""
    trials = []
    for path in sorted(Path(experiment).glob(f"*/{RESULT_FILE}")):
        reports = _reports(path)
        trial_id = next((r["trial_id"] for r in reversed(reports) if isinstance(r.get("trial_id"), str)), None)
        if trial_id is None:
            continue
        trials.append(TrialReports(trial_id=trial_id, folder=path.parent, config=_config(path.parent, reports),
                                   reports=reports))
    return sorted(trials, key=lambda t: t.trial_id)
