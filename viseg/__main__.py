"""`viseg <command> [args]`: every viseg command behind one console script, as `python -m viseg.<command>`.

    viseg verify   check a dataset and report every problem at once
    viseg plan     verify, fingerprint and plan a dataset; print the plan
    viseg train    train one fold into a run folder (or continue_from=<run folder>)
    viseg predict  predict images with a run, an ensemble or a sweep's best
    viseg evaluate score predicted label maps against references
    viseg sweep    folds x variants as Ray Tune trials; resume, summary, best, cross-validation
    viseg demo     write the built-in demo dataset

`viseg <command> --help` explains each one.
"""

from __future__ import annotations

import importlib
import sys

# A fixed table of literal module names: the command line picks a key, never an import path.
COMMANDS = {
    "verify": "viseg.verify",
    "plan": "viseg.plan",
    "train": "viseg.train",
    "predict": "viseg.predict",
    "evaluate": "viseg.evaluate",
    "sweep": "viseg.sweep.__main__",
    "demo": "viseg.demo",
}


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
    # Imported on use: `viseg sweep --help` must not wait for what `viseg train` needs.
    result = importlib.import_module(COMMANDS[command]).main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
