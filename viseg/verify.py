"""`python -m viseg.verify`: check a dataset and print one report of every problem."""

from __future__ import annotations

from viseg.cli import run_app
from viseg.config import BaseConfig


def verify_command(cfg: BaseConfig) -> int:

    from viseg.data.verify import verify_dataset
    from viseg.preprocessing.prepare import discover
    report = verify_dataset(discover(cfg), num_processes=cfg.num_processes)
    print(report.render())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> None:
    run_app(verify_command, app="verify", argv=argv)


if __name__ == "__main__":
    main()
