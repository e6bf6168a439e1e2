"""attnkit._progress: a live bar on a terminal, a bounded number of plain lines (no carriage returns) in a log."""

from __future__ import annotations

import io
import re

import pytest

from attnkit import _progress
from attnkit._progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_about_twenty_plain_lines() -> None:
    log = io.StringIO()
    with progress(1000, "train", file=log) as bar:
        assert not bar.live
        for i in range(1000):
            bar.update(1)
            bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert 19 <= len(lines) <= 21  # one every 5 %
    assert re.fullmatch(r"train: 1000/1000 \(100%\), \S+ step/s, 0:\d\d elapsed, loss=0\.001", lines[-1]), lines[-1]
    assert lines[0].startswith("train: 50/1000 (5%), ")


def test_long_steps_write_a_line_every_30_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(_progress, "_clock", lambda: now[0])
    log = io.StringIO()
    with progress(10_000, "slow", file=log, unit="img") as bar:
        for _ in range(10):
            now[0] += 31.0
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0] == "slow: 1/10000 (0%), 0.0323 img/s, 0:31 elapsed"
    assert lines[-1].endswith("5:10 elapsed")


def test_unknown_total_and_resumed_count(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(_progress, "_clock", lambda: now[0])
    log = io.StringIO()
    bar = progress(None, "", file=log)
    for _ in range(3):
        now[0] += 40.0
        bar.update(5)
    bar.close()
    bar.close()  # twice is harmless
    assert log.getvalue().splitlines() == [f"{n} step, 0.125 step/s, {t} elapsed" for n, t in
                                           ((5, "0:40"), (10, "1:20"), (15, "2:00"))]  # fmt: skip
    log = io.StringIO()
    with progress(100, "train", initial=60, file=log) as bar:  # a resumed run: the rate counts this run's steps
        now[0] += 10.0
        bar.update(40)
    assert log.getvalue() == "train: 100/100 (100%), 4 step/s, 0:10 elapsed\n"


def test_disabled_writes_nothing() -> None:
    log = io.StringIO()
    with progress(10, "x", file=log, disable=True) as bar:
        bar.update(10)
        bar.set_postfix(a=1)
    assert log.getvalue() == ""


def test_terminal_gets_the_live_bar() -> None:
    tty = _Terminal()
    with progress(10, "live", file=tty) as bar:
        assert bar.live
        for _ in range(10):
            bar.update(1)
        bar.set_postfix(loss="0.5")
    assert "\r" in tty.getvalue() and "live" in tty.getvalue()


def test_no_task_uses_tqdm_directly() -> None:
    """Every progress display goes through attnkit._progress (tqdm itself only behind it)."""
    from pathlib import Path

    import attnkit

    root = Path(attnkit.__file__).parent
    users = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.name != "_progress.py" and re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M)
    ]
    assert not users
