"""`viseg <command> [args]`: every viseg command behind one console script, as `python -m viseg.<command>`.

    viseg verify   check a dataset and report every problem at once
    viseg plan     verify, fingerprint and plan a dataset; print the plan
    viseg train    train one fold into a run folder (or continue_from=<run folder>)
    viseg predict  predict images with a run, an ensemble or a sweep's best
    viseg evaluate score predicted label maps against references
    viseg export-model  trained runs as one model.zip to share (predict model=model.zip, init_from=model.zip)
    viseg sweep    folds x variants as Ray Tune trials; resume, summary, best, cross-validation
    viseg demo     write the built-in demo dataset

`viseg <command> --help` explains each one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def _command(name: str) -> Callable[[list[str]], Any]:
    """The command's main, imported on use (`viseg sweep --help` must not wait for what `viseg train`
    needs); literal imports only: the command line picks a name, never an import path."""
    if name == "verify":
        from viseg.verify import main
    elif name == "plan":
        from viseg.plan import main
    elif name == "train":
        from viseg.train import main
    elif name == "predict":
        from viseg.predict import main
    elif name == "evaluate":
        from viseg.evaluate import main
    elif name == "sweep":
        from viseg.sweep.__main__ import main
    elif name == "export-model":
        from viseg.export_model import main
    else:
        from viseg.demo import main
    return main


COMMANDS = ("verify", "plan", "train", "predict", "evaluate", "sweep", "export-model", "demo")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"viseg: unknown command {command!r}; choose one of {', '.join(COMMANDS)} (viseg --help)",
              file=sys.stderr)
        return 2
    result = _command(command)(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
