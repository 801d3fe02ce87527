"""`python -m viseg.evaluate pred=DIR ref=DIR`: metrics of predicted label maps against references.

The work is `viseg.evaluation.evaluate.evaluate_folders`; this module parses, calls and prints a table.
"""

from __future__ import annotations

from typing import Any

from viseg.cli import run_app
from viseg.evaluation.evaluate import (
    CONFIG_NAME,
    TABLE_METRICS,
    EvaluateConfig,
    evaluate_folders,
    register_evaluate_config,
)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def render_table(summary: dict[str, Any]) -> str:
    """Per-label means (and the foreground mean) as a fixed-width text table."""
    rows = [("label", *TABLE_METRICS)]
    rows += [(label, *(_cell(m.get(k)) for k in TABLE_METRICS)) for label, m in summary["mean"].items()]
    rows.append(("mean", *(_cell(summary["foreground_mean"].get(k)) for k in TABLE_METRICS)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def evaluate_command(cfg: EvaluateConfig) -> int:
    summary, output = evaluate_folders(cfg)
    print(f"{len(summary['metric_per_case'])} cases; means over cases ('-': no case defines it)")
    print(render_table(summary))
    print(f"wrote {output}")
    return 0


def main(argv: list[str] | None = None) -> None:
    run_app(evaluate_command, app="evaluate", argv=argv, config_name=CONFIG_NAME, register=register_evaluate_config)


if __name__ == "__main__":
    main()
