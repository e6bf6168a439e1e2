"""Shared timing helpers for the benchmark suites: medians, ratios, peak memory, tables."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnkit._runtime import cpu_model
from attnkit._table import format_table


def median_time(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs.

    With ``min_time`` > 0, keeps repeating until that much time was spent (for very fast calls).
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return statistics.median(times)


def _rss() -> int:
    """Current resident set size in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_peak_memory(fn: Callable[[], Any], interval: float = 0.002) -> int:
    """Extra resident memory at peak while ``fn()`` runs: RSS sampled every ``interval`` s, minus RSS before.

    Freed heap is handed back to the OS first (``malloc_trim``) so the baseline is honest. (Summing the torch
    profiler's per-op bytes instead counts a nested kernel's allocations once per enclosing op.)
    """
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: no trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(interval)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        fn()
    finally:
        stop.set()
        watcher.join()
    return max(peak[0], _rss()) - base


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], *, rounds: int, warmup: int = 1
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each function over ``rounds`` rounds that call every function once, in turn.

    CPU time (all threads of this process) counts only the time the kernel actually ran, so on a machine shared
    with other jobs it moves less than wall time; both are reported.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def machine_line() -> str:
    """One line that says where the numbers were measured."""
    return (f"{cpu_model()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, python {platform.python_version()}")


@dataclass
class Table:
    """Rows of benchmark results that print as text and save as markdown + JSON."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append([c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    def text(self) -> str:
        out = [self.title, format_table([self.columns, *self.rows])]
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out)

    def save(self, out: str | Path | None, stem: str) -> None:
        if out is None:
            return
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.md").write_text(self.markdown() + "\n", encoding="utf-8")
        (folder / f"{stem}.json").write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")


def ratio(t: float, baseline: float) -> str:
    """``baseline / t`` as 'x.xx×' (above 1 = faster than the baseline)."""
    return f"{baseline / t:.2f}x"
