"""`python -m viseg.demo`: write (or reuse) the built-in demo dataset and print its folder.

What the dataset holds, and why, is described in `viseg.data.demo`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from viseg.data import demo
from viseg.data.demo import DemoSpec, demo_dataset_dir, generate_demo_dataset, is_demo_dataset
from viseg.errors import VisegError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m viseg.demo", description=demo.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="dataset folder to write (default: the cache, .viseg_cache/demo/Dataset900_...)")
    parser.add_argument("--n-cases", type=int, default=DemoSpec.n_cases, help="number of cases (default: 20)")
    parser.add_argument("--seed", type=int, default=DemoSpec.seed, help="random seed (default: 0)")
    parser.add_argument("--regions", action="store_true",
                        help="the region-based variant: organ including its lesions, vessel, lesion as regions")
    parser.add_argument("--force", action="store_true", help="regenerate even if an up-to-date copy exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI: generate (or reuse) the demo dataset and print its folder on stdout."""
    args = _parser().parse_args(argv)
    try:
        spec = DemoSpec(n_cases=args.n_cases, seed=args.seed, regions=args.regions)
        path = args.out if args.out is not None else demo_dataset_dir(Path(".viseg_cache"), spec)
        if args.force or not is_demo_dataset(path, spec):
            generate_demo_dataset(path, spec, progress=not args.quiet)
    except VisegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    main()
