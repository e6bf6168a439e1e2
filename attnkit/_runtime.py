"""Process-wide torch settings: the thread count a process should use, and settings a task or benchmark changes for
a while and then gives back.

On a shared machine PyTorch's defaults collapse: one intra-op thread per core (``os.cpu_count()``, whatever the
process may actually use), and OpenMP threads that spin at every barrier before they sleep. With one other busy
process on two cores, one of the two threads keeps losing its core, every parallel region waits for it, and the
spinning partner burns the time slice the competitor needed: a small model trained 7-9x slower beside one plain
Python loop (``python -m attnkit.bench load``; docs/performance.md). :func:`configure_process`, which the
``attnkit`` command calls before torch starts its thread pool, sets the thread count from the cores the process may
use (:func:`available_cores`: CPU affinity and the cgroup CPU quota) and makes OpenMP threads sleep at once when
they wait (``OMP_WAIT_POLICY=PASSIVE``), unless the user has set those variables.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup's CPU quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), ``None`` when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def _cpuinfo(key: str) -> str | None:
    """The value of the first ``key`` line of /proc/cpuinfo (``None`` where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one, else what :mod:`platform` knows)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (``avx2``, ``avx512f``, ...); empty elsewhere."""
    return set((_cpuinfo("flags") or "").split())


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by the cgroup CPU quota (at least 1).

    Unlike ``os.cpu_count()`` (every CPU of the machine) this follows ``taskset``, container CPU sets and quotas.

    >>> available_cores() >= 1
    True
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cpu_jiffies() -> tuple[int, int, int] | None:
    """(busy jiffies of the whole machine, this process's jiffies, total jiffies of all CPUs) from /proc."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    busy = total - fields[3] - fields[4]
    return busy, int(mine[11]) + int(mine[12]), total  # utime + stime of every thread of this process


class ThreadGovernor:
    """Keeps the intra-op thread count at the cores that other processes leave free.

    Every ``interval`` seconds, :meth:`tick` reads how much CPU time the rest of the machine used since the last
    look (``/proc/stat`` minus this process's own time) and sets ``torch.set_num_threads`` to the available cores
    (:func:`available_cores`) less the cores the others kept busy, at least 1. A training loop calls it once per
    step (it returns at once between looks). On a quiet machine every available core is used; beside one busy
    process on two cores, one thread runs alone instead of two that wait for each other at every barrier.
    ``ATTNKIT_THREADS`` or ``OMP_NUM_THREADS`` (or ``--threads``) fix the count and turn the governor off.
    """

    def __init__(self, interval: float = 2.0, *, fixed: int | None = None) -> None:
        self.interval = interval
        self.fixed = fixed
        self.cores = available_cores()
        now = _cpu_jiffies() if fixed is None else None
        self._last: tuple[float, tuple[int, int, int]] | None = None if now is None else (time.monotonic(), now)

    def free_cores(self, seconds: float = 0.2) -> float | None:
        """Sample for ``seconds`` (or since the last look): the cores not kept busy by other processes."""
        first = self._last if self._last is not None else (time.monotonic(), _cpu_jiffies())
        if first[1] is None:
            return None
        if self._last is None:
            time.sleep(seconds)
        now = _cpu_jiffies()
        if now is None:
            return None
        self._last = (time.monotonic(), now)
        busy, mine, total = (b - a for a, b in zip(first[1], now, strict=True))
        if total <= 0:
            return None
        cpus = os.cpu_count() or 1
        others = max(0.0, (busy - mine) * cpus / total)  # cores' worth of other processes' work
        return self.cores - others

    def tick(self) -> int:
        """Re-pick the thread count if ``interval`` has passed since the last look; returns the count."""
        if self.fixed is not None:
            return torch.get_num_threads()
        if self._last is not None and time.monotonic() - self._last[0] < self.interval:
            return torch.get_num_threads()
        free = self.free_cores()
        if free is not None:
            threads = min(self.cores, max(1, math.floor(free + 0.3)))  # a core 70% free counts
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        return torch.get_num_threads()


_GOVERNOR: ThreadGovernor | None = None


def configure_process(threads: int | None = None) -> ThreadGovernor:
    """Thread settings for a process that trains or benchmarks on a machine it may share.

    ``threads`` (``--threads``), else ``ATTNKIT_THREADS`` or ``OMP_NUM_THREADS`` when set, fix the intra-op thread
    count; otherwise it follows the cores that other processes leave free, sampled now and re-checked by
    :func:`governor_tick` (see :class:`ThreadGovernor`). Returns the process's governor.
    """
    global _GOVERNOR
    if threads is None:
        for name in ("ATTNKIT_THREADS", "OMP_NUM_THREADS"):
            env = os.environ.get(name, "").strip()
            if env.isdigit() and int(env) > 0:
                threads = int(env)
                break
    _GOVERNOR = ThreadGovernor(fixed=threads)
    if threads is not None:
        torch.set_num_threads(threads)
    else:
        torch.set_num_threads(_GOVERNOR.cores)  # the first look at the others comes with the first tick after 2 s
    return _GOVERNOR


def governor_tick() -> None:
    """Let the process's :class:`ThreadGovernor` (if :func:`configure_process` made one) re-pick the thread
    count; training loops call this once per step."""
    if _GOVERNOR is not None:
        _GOVERNOR.tick()


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (``None``: leave the count as it is), then restore the old count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
