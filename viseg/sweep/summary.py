"""Cross-validation summary of a sweep experiment from its files alone (no Ray), so it works on a finished
experiment, on a running one and after the driver died. It reads what every trial leaves behind:

    <experiment>/runs/<dataset>/<plan>/<variant>/fold_<k>/validation/summary.json  + finished.json
    <experiment>/errors.json   (optional; [{"variant": str, "fold": int, "error": str}], from the driver)

A fold counts only once `finished.json` exists (train() writes it after the validation summary), so a
half-done fold never moves a mean. Spreads are numpy std with ddof=0: they describe the folds at hand
(3-5 of them, not a sample to infer from), and a single fold gives 0.0 instead of NaN.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from viseg.io.atomic import write_atomically, write_text_atomically
from viseg.io.jsonio import read_json, write_json_atomic
from viseg.io.layout import EXPERIMENT_RUNS, FINISHED_MARKER, experiment_variants

log = logging.getLogger(__name__)


class Stat(NamedTuple):
    """(mean, std, n) over folds; mean and std are None when no fold gave a value (n == 0)."""

    mean: float | None
    std: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass
class VariantSummary:
    variant: str
    folds_finished: list[int]
    folds_failed: list[int]
    dice_per_class: dict[str, Stat]  # label -> over folds' mean_dice_per_class
    overall: Stat  # over folds' mean_dice
    best: bool = False
    fold_dice: dict[int, float | None] = field(default_factory=dict)  # fold -> mean_dice, for the plot
    folds_unfinished: list[int] = field(default_factory=list)  # a folder but neither finished nor failed
    errors: dict[int, str] = field(default_factory=dict)  # failed fold -> message from errors.json

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: Stats become {"mean", "std", "n"}, fold keys become strings."""
        return {"variant": self.variant, "best": self.best, "folds_finished": self.folds_finished,
                "folds_failed": self.folds_failed, "folds_unfinished": self.folds_unfinished,
                "dice_per_class": {k: s.to_dict() for k, s in self.dice_per_class.items()},
                "overall": self.overall.to_dict(), "fold_dice": {str(k): v for k, v in self.fold_dice.items()},
                "errors": {str(k): v for k, v in self.errors.items()}}


NO_VALUE = Stat(None, None, 0)


def _stat(values: list[float]) -> Stat:
    if not values:
        return NO_VALUE
    array = np.asarray(values, dtype=float)
    return Stat(float(array.mean()), float(array.std(ddof=0)), len(values))


def _label_order(label: str) -> tuple[int, Any]:
    """Numeric labels in numeric order ("2" before "10"), anything else after them by name."""
    return (0, int(label)) if label.isdigit() else (1, label)


def _read_validation(run_dir: Path) -> dict[str, Any] | None:
    """The fold's validation summary, or None (with a warning) when a finished run lacks a readable one."""
    path = run_dir / "validation" / "summary.json"
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        log.warning("%s is finished but %s is unreadable (%s); fold left out", run_dir, path, exc)
        return None


def read_errors(experiment: Path) -> list[tuple[str, int, str]]:
    """(variant, fold, message) from errors.json; a missing file means no known errors."""
    path = experiment / "errors.json"
    try:
        entries = read_json(path) if path.is_file() else []
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); no folds marked failed", path, exc)
        return []
    errors = []
    for entry in entries if isinstance(entries, list) else []:
        try:
            errors.append((str(entry["variant"]), int(entry["fold"]), str(entry.get("error", ""))))
        except (KeyError, TypeError, ValueError):
            log.warning("%s: entry %r lacks a variant or an integer fold; skipped", path, entry)
    return errors


def _assign_errors(errors: list[tuple[str, int, str]], keys: set[str]) -> dict[str, dict[int, str]]:
    """errors.json names bare variants; a key '<plan>/<name>' matches its name. A variant that failed
    before creating any run folder still gets a key of its own."""
    failed: dict[str, dict[int, str]] = defaultdict(dict)
    for variant, fold, message in errors:
        matches = [k for k in keys if k == variant or k.rsplit("/", 1)[-1] == variant] or [variant]
        for key in matches:
            failed[key][fold] = message
    return failed


def _summarize_variant(variant: str, folds: dict[int, Path], errors: dict[int, str]) -> VariantSummary:
    fold_dice: dict[int, float | None] = {}
    per_class: dict[str, list[float]] = defaultdict(list)
    for fold, run_dir in sorted(folds.items()):
        validation = _read_validation(run_dir) if (run_dir / FINISHED_MARKER).is_file() else None
        if validation is None:
            continue
        fold_dice[fold] = validation.get("mean_dice")
        for label, value in (validation.get("mean_dice_per_class") or {}).items():
            values = per_class[label]  # a label whose folds are all None still gets a column (n == 0)
            if value is not None:
                values.append(float(value))
    # a fold retried to completion after an error counts as finished, not failed
    failed = {f: m for f, m in errors.items() if f not in fold_dice}
    unfinished = sorted(set(folds) - set(fold_dice) - set(failed))
    return VariantSummary(
        variant=variant, folds_finished=sorted(fold_dice), folds_failed=sorted(failed),
        dice_per_class={k: _stat(per_class[k]) for k in sorted(per_class, key=_label_order)},
        overall=_stat([v for v in fold_dice.values() if v is not None]), fold_dice=fold_dice,
        folds_unfinished=unfinished, errors=dict(sorted(failed.items())))


def _rank_key(summary: VariantSummary) -> tuple[Any, ...]:
    """Highest overall mean first, then fewer failures, then name; variants without a mean last."""
    mean = summary.overall.mean
    return (mean is None, -(mean or 0.0), len(summary.folds_failed), summary.variant)


def summarize(experiment: Path) -> list[VariantSummary]:
    """One summary per variant, best first (`_rank_key`); works while the sweep runs: unfinished folds are
    listed but never counted."""
    runs = experiment_variants(Path(experiment) / EXPERIMENT_RUNS)
    failed = _assign_errors(read_errors(Path(experiment)), set(runs))
    summaries = [_summarize_variant(v, runs.get(v, {}), failed.get(v, {})) for v in set(runs) | set(failed)]
    summaries.sort(key=_rank_key)
    if summaries and summaries[0].overall.mean is not None:
        summaries[0].best = True
    return summaries


def _labels(summaries: list[VariantSummary]) -> list[str]:
    return sorted({label for s in summaries for label in s.dice_per_class}, key=_label_order)


def _csv_text(summaries: list[VariantSummary]) -> str:
    """One row per variant; fold columns are counts (the fold lists are in summary.json), None is empty."""
    labels = _labels(summaries)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["variant", "best", "folds_finished", "folds_failed", "overall_mean", "overall_std",
                     *[f"dice_{label}_{part}" for label in labels for part in ("mean", "std")]])
    for s in summaries:
        per_class = [getattr(s.dice_per_class.get(label, NO_VALUE), part) for label in labels
                     for part in ("mean", "std")]
        row = [s.variant, int(s.best), len(s.folds_finished), len(s.folds_failed), s.overall.mean, s.overall.std,
               *per_class]
        writer.writerow(["" if value is None else value for value in row])
    return out.getvalue()


def _draw_variant(ax: Any, i: int, s: VariantSummary) -> None:
    """A box over the folds at x=i, each fold a dot labelled with its number; the best one in orange."""
    color = "tab:orange" if s.best else "tab:blue"
    folds = [(f, v) for f, v in s.fold_dice.items() if v is not None]
    if not folds:
        ax.text(i, 0.5, "no finished\nfold", ha="center", va="center", color="gray",
                transform=ax.get_xaxis_transform())
        return
    ax.boxplot([v for _, v in folds], positions=[i], widths=0.5, showfliers=False, patch_artist=True,
               boxprops={"facecolor": color, "alpha": 0.25, "edgecolor": color},
               medianprops={"color": color}, whiskerprops={"color": color}, capprops={"color": color})
    offsets = np.linspace(-0.12, 0.12, len(folds)) if len(folds) > 1 else [0.0]
    for (fold, value), dx in zip(folds, offsets):
        ax.plot(i + dx, value, "o", color=color, markeredgecolor="black", markersize=6, zorder=3)
        ax.annotate(str(fold), (i + dx, value), xytext=(5, 0), textcoords="offset points", fontsize=7, va="center")


def _plot(summaries: list[VariantSummary], title: str, path: Path) -> None:
    """Per-fold mean Dice per variant, so the spread over folds is seen next to the means in the table."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without pyplot's global state
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(max(6.0, 1.3 * len(summaries) + 2), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, s in enumerate(summaries):
        _draw_variant(ax, i, s)
    names = [f"{'* ' if s.best else ''}{s.variant}\n({len(s.folds_finished)} ok, {len(s.folds_failed)} failed)"
             for s in summaries]
    ax.set_xticks(range(len(summaries)), names, rotation=20 if len(summaries) > 4 else 0,
                  ha="right" if len(summaries) > 4 else "center")
    ax.set_xlim(-0.6, max(len(summaries), 1) - 0.4)
    if not summaries:
        ax.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="variant", ylabel="validation mean Dice per fold", title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(handles=[Line2D([], [], marker="o", ls="", color="tab:blue", markeredgecolor="black",
                              label="fold (number beside)"),
                       Line2D([], [], marker="s", ls="", color="tab:orange", alpha=0.6, label="* best variant")],
              loc="best", fontsize=8)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def write_summary(experiment: Path, summaries: list[VariantSummary]) -> dict[str, Path]:
    """summary.json, summary.csv and summary.png in the experiment folder, each written atomically so a
    reader polling a running sweep never sees half a file."""
    experiment = Path(experiment)
    experiment.mkdir(parents=True, exist_ok=True)
    paths = {kind: experiment / f"summary.{kind}" for kind in ("json", "csv", "png")}
    write_json_atomic(paths["json"], [s.to_dict() for s in summaries])
    text = _csv_text(summaries)
    write_text_atomically(paths["csv"], text)
    _plot(summaries, f"{experiment.name}: validation Dice per fold", paths["png"])
    return paths


def _mean_std(stat: Stat) -> str:
    return "-" if stat.mean is None else f"{stat.mean:.4f} ± {stat.std:.4f}"


def render_table(summaries: list[VariantSummary]) -> str:
    """Fixed-width table for the end of a sweep: Dice per class and overall as mean ± std over folds."""
    if not any(s.folds_finished for s in summaries):
        return "no finished trials yet" + (f" ({len(summaries)} variant(s) started or failed)" if summaries else "")
    labels = _labels(summaries)
    header = ["  variant", "folds ok/failed", *[f"dice {label}" for label in labels], "overall"]
    rows = [[f"{'*' if s.best else ' '} {s.variant}", f"{len(s.folds_finished)}/{len(s.folds_failed)}",
             *[_mean_std(s.dice_per_class.get(label, NO_VALUE)) for label in labels], _mean_std(s.overall)]
            for s in summaries]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("* best overall mean Dice; mean ± std over finished folds (std with ddof=0)")
    unfinished = sum(len(s.folds_unfinished) for s in summaries)
    if unfinished:
        lines.append(f"{unfinished} fold(s) still unfinished (running or not started) are not counted")
    return "\n".join(lines)
