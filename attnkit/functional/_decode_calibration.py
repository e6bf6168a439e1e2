"""Where the native decode kernel beats PyTorch's fused SDPA on *this* machine: a one-time calibration.

The native decode kernel (``csrc/decode.c``) streams a KV cache once, but whether that beats PyTorch's fused kernel
depends on the CPU: on the Intel Xeon (AVX-512, 2 cores) of issue 14 PyTorch's kernel was faster at 1k and 8k tokens
in float32 and at every context in bfloat16 (the decode body is AVX2-only), where other machines measured the native
kernel ahead.
So before ``backend="auto"`` first sends a decoding step to ``native_decode``, it times both kernels on this
machine, once, and routes steps to the native kernel only where it measured faster.

What is measured: one decoding step (1 query, ``HEADS`` heads of ``DIM``, batch 1) per cache dtype (float32 and
bfloat16; a float16 cache reads the bfloat16 rows), per grouped-query ratio (``GROUPS``: ``HEADS`` key/value heads,
and ``HEADS / 4`` of them as in GQA models: the native kernel reads each key/value head once for its group, and
on SmolLM2's shapes at 8k keys it measured 433 against SDPA's 603 us, where without GQA SDPA can be ahead) and
context length (``CONTEXTS``): the native one-pass kernel, ``torch.nn.functional.scaled_dot_product_attention`` and,
where ``auto`` could take it (a half-precision cache at one thread), the PyTorch decode path (``torch_decode``);
calls alternate between them, the median of the repeats counts. A kernel more than ``CLEARLY_SLOWER`` times behind
after the first round is not timed again. It costs about a second, once per machine and thread count (allocating
the 32k-token caches and PyTorch's half-precision SDPA there dominate). A call with ``S`` keys and ``H / Hkv``
query heads per key/value head reads the row of the nearest measured ratio and context (both in log scale).
``auto`` takes a decode kernel only where its median was not above that of the kernel it would otherwise run
(SDPA, or the PyTorch decode path where that one would serve).

Where it is kept: JSON beside the built native library (``<library>.decode_calibration.json`` in attnkit's cache
folder, see :mod:`attnkit.functional._native`), keyed by the intra-op thread count, and stamped with the CPU model,
the library and the PyTorch version; a file that does not match, or does not parse, is measured again and
rewritten (atomically). Within a process the table is kept in memory.

``ATTNKIT_DECODE_CALIBRATION``: unset, ``1`` or ``on`` - calibrate once and use the cache; ``0`` or ``off`` - no
calibration, ``auto`` takes the native decode kernel wherever it can run (deterministic; the tests use it);
``force`` - measure again in this process, ignoring the cache.

Example:
    >>> from attnkit.functional import _decode_calibration as cal
    >>> cal.mode() in ("on", "off", "force")
    True
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attnkit._runtime import cpu_model

from . import _native

__all__ = ["CONTEXTS", "ENV", "GROUPS", "cache_path", "describe", "fingerprint", "measure", "mode", "table", "timings"]

ENV = "ATTNKIT_DECODE_CALIBRATION"
#: context lengths timed (the bench's decode rows)
CONTEXTS = (1024, 8192, 32768)
#: query heads per key/value head timed (1: multi-head attention; 4: grouped-query attention)
GROUPS = (1, 4)
#: cache dtypes timed; a float16 cache reads the bfloat16 rows (both are converted the same way by PyTorch)
DTYPES = (torch.float32, torch.bfloat16)
#: the step timed: the heads of a small model, as ``python -m attnkit.bench modules`` times it
HEADS, DIM = 8, 64
#: a kernel more than this many times slower than the best after one timed round is not timed again
CLEARLY_SLOWER = 3.0
VERSION = 2  # 2: rows per grouped-query ratio
_TABLES: dict[int, dict[str, list[list[float | None]]]] = {}  # threads -> dtype -> [[ctx, native, torch, sdpa s]]
_GENERATION = [0]  # bumped whenever _TABLES changes (see fingerprint)
_LOCK = threading.Lock()


def mode() -> str:
    """``"on"`` (default), ``"off"`` or ``"force"``, from :data:`ENV`."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    return "force" if value == "force" else "on"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cache_path() -> Path | None:
    """The JSON file beside the native library, or ``None`` when no library is loaded."""
    lib = _native.library_path()
    return None if lib is None else lib.with_name(lib.stem + ".decode_calibration.json")


def _stamp() -> dict[str, Any]:
    lib = _native.library_path()
    return {"version": VERSION, "cpu": cpu_model(), "library": lib.name if lib else None, "torch": torch.__version__,
            "step": {"heads": HEADS, "dim": DIM, "contexts": list(CONTEXTS), "groups": list(GROUPS)}}


def _rows_name(dtype_name: str, group: int) -> str:
    """The table's key for a cache dtype and a grouped-query ratio (``"float32"``, ``"float32/gqa4"``)."""
    return dtype_name if group == 1 else f"{dtype_name}/gqa{group}"


def measure(threads: int, contexts: tuple[int, ...] = CONTEXTS, dtypes: tuple[torch.dtype, ...] = DTYPES,
            repeats: int = 5, groups: tuple[int, ...] = GROUPS) -> dict[str, list[list[float | None]]]:
    """Time one decoding step at ``threads`` intra-op threads: per dtype name and grouped-query ratio
    (:func:`_rows_name`) the rows ``[context, native seconds, torch_decode seconds or None, sdpa seconds]`` (medians
    of interleaved repeats; the PyTorch decode path only where ``auto`` could take it: a half-precision cache at one
    thread). Long contexts get 3 repeats."""
    from .decode import decode_attention

    old = torch.get_num_threads()
    if threads != old:
        torch.set_num_threads(threads)
    out: dict[str, list[list[float | None]]] = {}
    try:
        with torch.no_grad():
            for dtype, group in ((d, g) for d in dtypes for g in groups):
                rows: list[list[float | None]] = []
                for ctx in contexts:
                    q = torch.randn(1, HEADS, 1, DIM).to(dtype)
                    block = torch.randn(2, HEADS // group, min(ctx, 1024), DIM).to(dtype)  # values: not the speed
                    k, v = (block[i : i + 1].repeat(1, 1, -(-ctx // 1024), 1)[:, :, :ctx].contiguous() for i in (0, 1))
                    fns = {"native": lambda: decode_attention(q, k, v, impl="native", need_weights=False),  # noqa: B023
                           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v,  # noqa: B023
                                                                          enable_gqa=group > 1)}  # noqa: B023
                    if dtype != torch.float32 and threads == 1:
                        fns["torch"] = lambda: decode_attention(q, k, v, impl="torch", need_weights=False)  # noqa: B023
                    times: dict[str, list[float]] = {name: [] for name in fns}
                    for fn in fns.values():  # warm-up: first touches, thread pools
                        fn()
                    timed = dict(fns)
                    for rep in range(repeats if ctx < 16384 else 3):
                        for name, fn in timed.items():  # interleaved: a load change hits all alike
                            t0 = time.perf_counter()
                            fn()
                            times[name].append(time.perf_counter() - t0)
                        if rep == 0:  # a kernel far behind after one round is not timed again (saves most time)
                            best = min(t[0] for t in times.values())
                            timed = {n: f for n, f in timed.items() if times[n][0] <= CLEARLY_SLOWER * best}
                    med = {name: statistics.median(t) for name, t in times.items()}
                    rows.append([ctx, med["native"], med.get("torch"), med["sdpa"]])
                out[_rows_name(_dtype_name(dtype), group)] = rows
    finally:
        if threads != old:
            torch.set_num_threads(old)
    return out


def _valid(entry: object) -> bool:
    """A thread entry of the file: ``{dtype name (and ratio): [[context, native s, torch s, sdpa s], ...]}`` for
    every dtype."""
    if not isinstance(entry, dict) or not {_dtype_name(d) for d in DTYPES} <= set(entry):
        return False
    for rows in entry.values():
        if not isinstance(rows, list) or not rows:
            return False
        for row in rows:
            if not isinstance(row, list) or len(row) != 4:
                return False
            numbers = [x for i, x in enumerate(row) if not (i == 2 and x is None)]  # torch_decode: None = not timed
            if not all(isinstance(x, int | float) and math.isfinite(x) and x > 0 for x in numbers):
                return False
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The file's content when it parses and matches this machine, library and PyTorch, else ``None``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("threads"), dict):
        return None
    if any(data.get(key) != value for key, value in _stamp().items()):
        return None
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a temporary file in the same folder, then a rename (racing processes never read half a file)."""
    try:
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:  # a read-only cache folder: the table stays in memory for this process
        pass


def table(threads: int | None = None, *, run: bool = True) -> dict[str, list[list[float | None]]] | None:
    """The calibration at ``threads`` (default: the current intra-op thread count): from memory, else the JSON file,
    else measured now and written (``run=False``: only what this process already holds). ``None`` when calibration
    is off or no native library is loaded."""
    if mode() == "off" or _native.load() is None:
        return None
    threads = torch.get_num_threads() if threads is None else threads
    if threads in _TABLES or not run:
        return _TABLES.get(threads)
    with _LOCK:
        if threads in _TABLES:
            return _TABLES[threads]
        path = cache_path()
        data = _read(path) if path is not None and mode() != "force" else None
        entry = data["threads"].get(str(threads)) if data is not None else None
        if not _valid(entry):
            entry = measure(threads)
            data = data if data is not None else {**_stamp(), "threads": {}}
            data["threads"][str(threads)] = entry
            if path is not None:
                _write(path, data)
        assert isinstance(entry, dict)
        _TABLES[threads] = entry
        _GENERATION[0] += 1
        return entry


def fingerprint() -> tuple[str, int]:
    """What the routing reads of the calibration besides the call: the mode and which tables are loaded (a kept
    choice of the dispatcher is only reused while this stays the same)."""
    return mode(), _GENERATION[0]


def timings(dtype: torch.dtype, k_len: int, threads: int | None = None, *, group: int = 1, run: bool = True
            ) -> dict[str, float] | None:
    """The calibration row nearest ``k_len`` keys and ``group`` query heads per key/value head (both in log scale)
    for a ``dtype`` cache: ``{"context", "native_decode", "torch_decode", "sdpa"}`` (seconds; ``torch_decode`` is
    ``inf`` where it was not timed), or ``None`` without a calibration (off, no native library)."""
    tab = table(threads, run=run)
    name = _dtype_name(torch.bfloat16 if dtype == torch.float16 else dtype)
    measured = [g for g in GROUPS if tab is not None and _rows_name(name, g) in tab]
    if measured:
        name = _rows_name(name, min(measured, key=lambda g: abs(math.log(g) - math.log(max(group, 1)))))
    rows = None if tab is None else tab.get(name)
    if not rows:
        return None
    row = min(rows, key=lambda r: abs(math.log(float(r[0] or 1)) - math.log(max(k_len, 1))))
    values = [math.inf if x is None else float(x) for x in row]
    return dict(zip(("context", "native_decode", "torch_decode", "sdpa"), values, strict=True))


def describe(row: dict[str, float], dtype: torch.dtype) -> str:
    """One line on a calibration row, for :func:`~attnkit.functional.which_backend`."""
    times = ", ".join(f"{name} {row[name] * 1e3:.3f} ms" for name in ("native_decode", "torch_decode", "sdpa")
                      if math.isfinite(row[name]))
    return f"this machine's calibration at {int(row['context'])} keys, {_dtype_name(dtype)}: {times}"


def _forget() -> None:
    """Drop the in-memory tables (tests)."""
    _TABLES.clear()
    _GENERATION[0] += 1
