"""Process-parallel map over cases with progress (viseg/progress.py), shared by verification, fingerprinting and
preprocessing."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from viseg.progress import progress_bar

T = TypeVar("T")
R = TypeVar("R")


def default_num_processes(requested: int | None = None) -> int:
    """`requested`, or the cores this process may use."""
    if requested is not None and requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T] | Iterable[T],
    num_processes: int | None = None,
    desc: str = "",
    progress: bool = True,
) -> list[R]:
    """`[fn(x) for x in items]` in worker processes, results in input order.

    One process runs inline (no pool start-up cost, easy debugging). Workers are started with
    'forkserver' so that a parent holding threads (torch, Ray) is never forked.
    """
    items = list(items)
    workers = min(default_num_processes(num_processes), max(1, len(items)))
    bar = progress_bar(len(items), desc, enabled=progress)
    try:
        if workers == 1:
            results = []
            for item in items:
                results.append(fn(item))
                bar.update()
            return results
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            results = []
            for result in pool.map(fn, items, chunksize=1):
                results.append(result)
                bar.update()
            return results
    finally:
        bar.close()
