"""`python -m viseg.train`: train one fold into a run folder, or `continue_from=<run folder>` to resume one.

The work is `viseg.training.train.train`; this module parses, calls and prints.
"""

from __future__ import annotations

from pathlib import Path

from viseg.cli import run_app
from viseg.config import BaseConfig, reject_derived_overrides
from viseg.preprocessing.prepare import prepared_from_run
from viseg.training.continue_run import continue_config, last_checkpoint
from viseg.training.ranks import process_rank
from viseg.training.train import train


def train_command(cfg: BaseConfig) -> int:
    """`python -m viseg.train`: a new run, or `continue_from=<run folder>` to resume one."""
    if cfg.continue_from:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(cfg.continue_from)
        cfg = continue_config(run_dir, list(HydraConfig.get().overrides.task))
        result = train(cfg, prepared=prepared_from_run(cfg, run_dir), resume_from=last_checkpoint(run_dir),
                       run_dir=run_dir)
    else:
        reject_derived_overrides(cfg)
        result = train(cfg)
    if process_rank() != 0:  # a DDP rank besides the first: rank 0 prints the run
        return 0
    print(f"run folder         {result.run_dir}")
    print(f"epochs             {result.epochs}")
    print(f"pseudo Dice (EMA)  {result.ema_pseudo_dice}")
    print(f"validation Dice    {result.validation['mean_dice_per_class']} (mean {result.validation['mean_dice']})")
    return 0


def main(argv: list[str] | None = None) -> None:
    run_app(train_command, app="train", argv=argv)


if __name__ == "__main__":
    main()
