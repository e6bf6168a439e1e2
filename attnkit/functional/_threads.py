"""The thread pool of the CPU kernels: rows of ``B*H`` (or ranges of them) pulled from one queue.

When other work shares the cores, a thread that gets less CPU time simply takes fewer rows, where a kernel's own
threads split the work evenly up front and wait for the slowest. Used by the causal band's PyTorch kernels
(:mod:`attnkit.functional.local`) and by the native bridge (:mod:`attnkit.functional._native_bridge`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from attnkit._runtime import torch_threads

__all__ = ["MIN_THREADED", "over_rows", "run_tasks", "worker_count"]

_T = TypeVar("_T")
MIN_THREADED = 1 << 21  # elements of q below which the band kernels stay in the calling thread (pool overhead)


def over_rows(task: Callable[[int, int], None], bh: int, numel: int, workers: int | None = None) -> None:
    """Run ``task(lo, hi)`` over the rows ``[0, bh)`` of ``B*H``, each row exactly once (``task`` must write only
    its own rows).

    Small inputs (or one intra-op thread) run as one call in this thread. Otherwise every row is its own task, pulled
    from one queue by ``workers`` threads (default: the intra-op thread count) that each run single-threaded kernels:
    the count is set to 1 meanwhile and restored after. When other work shares the cores, a thread that gets less CPU
    time simply takes fewer rows, where a kernel's own threads split the work evenly up front and wait for the
    slowest; and thousands of small multithreaded calls would each wait on a barrier.
    """
    workers = min(bh, worker_count(numel, workers))
    if workers <= 1:
        task(0, bh)
        return
    run_tasks([functools.partial(task, row, row + 1) for row in range(bh)], workers)


def worker_count(numel: int, workers: int | None) -> int:
    """Threads for a band kernel on ``numel`` query elements: ``workers``, else 1 when small, else intra-op count."""
    if workers is not None:
        return workers
    return 1 if numel < MIN_THREADED else torch.get_num_threads()


def run_tasks(tasks: Sequence[Callable[[], _T]], workers: int, *, torch_ops: bool = True) -> list[_T]:
    """Results of ``tasks``, pulled from one queue by ``workers`` threads with one intra-op thread each.

    ``torch_ops=False``: the tasks run no multithreaded PyTorch kernels (native calls), so the process's intra-op
    thread count is left alone.
    """

    def run(task: Callable[[], _T]) -> _T:
        with torch.no_grad():  # grad mode is thread-local and on by default in a new thread
            return task()

    if workers <= 1:
        return [run(task) for task in tasks]

    with torch_threads(1 if torch_ops else None), ThreadPoolExecutor(workers) as pool:
        jobs = [pool.submit(run, task) for task in tasks]
        return [job.result() for job in jobs]  # re-raises a worker's exception here
