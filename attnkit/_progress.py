"""Progress of long loops, suited to where it goes: a live tqdm bar on a terminal, plain lines in a log.

On a terminal (the stream's ``isatty()``) :func:`progress` is tqdm's bar, as before. Anywhere else (``make demo >
log 2>&1``, CI, a pipe) it writes one plain line (description, n/total, percent, rate, elapsed, postfix) every
5 % of the total or every 30 s, whichever comes first, and a last one when it closes; no carriage returns::

    caption soft: 250/500 (50%), 12.3 step/s, 0:20 elapsed, nll=1.234

Example:
    >>> import io
    >>> log = io.StringIO()
    >>> with progress(total=4, desc="demo", file=log) as bar:
    ...     for _ in range(4):
    ...         bar.update(1)
    >>> log.getvalue().splitlines()[-1].split(",")[0]
    'demo: 4/4 (100%)'
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any

from attnkit._runtime import governor_tick


def _clock() -> float:
    return time.monotonic()


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """What :func:`progress` returns: ``update(n)``, ``set_postfix(**values)``, ``close()``; a context manager."""

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        *,
        unit: str = "step",
        initial: int = 0,
        file: IO[str] | None = None,
        disable: bool = False,
        live: bool | None = None,
        every: float = 0.05,
        seconds: float = 30.0,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.disable = disable
        self._file = file if file is not None else sys.stderr
        self._postfix = ""
        self._bar: Any = None
        self._closed = False
        if disable:
            return
        if live is None:
            isatty = getattr(self._file, "isatty", None)
            live = bool(isatty and isatty())
        if live:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self._file, leave=False)
            return
        self._step = max(1, round((total or 0) * every)) if total else 0  # 0: unknown total, time-based lines only
        self._seconds = seconds
        self._start = self._last_time = _clock()
        self._start_n = self._last_n = initial

    @property
    def live(self) -> bool:
        """Whether this is tqdm's live bar (a terminal) rather than plain lines."""
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps. A progress update marks a training step, so it also lets the process's thread
        governor re-pick the thread count (at most every 2 s; :func:`attnkit._runtime.governor_tick`)."""
        governor_tick()
        if self.disable or self._closed:
            return
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = _clock()
        due = (self._step and self.n - self._last_n >= self._step) or now - self._last_time >= self._seconds
        if due or (self.total is not None and self.n >= self.total > self._last_n):
            self._write(now)

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the counts (``loss=0.123``); on a terminal, tqdm's postfix."""
        if self.disable:
            return
        if self._bar is not None:
            self._bar.set_postfix(**values)
        else:
            self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def line(self, now: float | None = None) -> str:
        """The plain line for the current count."""
        now = _clock() if now is None else now
        spent = max(now - self._start, 0.0)
        done = self.n - self._start_n
        rate = f"{done / spent:.3g} {self.unit}/s" if spent > 0 and done > 0 else f"? {self.unit}/s"
        head = f"{self.desc}: " if self.desc else ""
        counts = f"{self.n} {self.unit}"
        if self.total:
            counts = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)"
        parts = [head + counts, rate, f"{_elapsed(spent)} elapsed"]
        if self._postfix:
            parts.append(self._postfix)
        return ", ".join(parts)

    def _write(self, now: float) -> None:
        self._file.write(self.line(now) + "\n")
        self._file.flush()
        self._last_n, self._last_time = self.n, now

    def close(self) -> None:
        if self._closed or self.disable:
            self._closed = True
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.n != self._last_n:
            self._write(_clock())

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def progress(
    total: int | None,
    desc: str = "",
    *,
    unit: str = "step",
    initial: int = 0,
    file: IO[str] | None = None,
    disable: bool = False,
) -> Progress:
    """Progress over ``total`` units: tqdm's live bar when ``file`` (default stderr) is a terminal, else a plain
    line every 5 % or 30 s (whichever is sooner) and one at the end. ``disable`` shows nothing."""
    return Progress(total, desc, unit=unit, initial=initial, file=file, disable=disable)
