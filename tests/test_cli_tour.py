"""The `attnkit` command: clean errors for bad input, and the quick tour end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from attnkit.cli import TASKS, build_parser, main
from attnkit.tasks import tour


def _run(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "attnkit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_every_task_module_is_wired() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(TASKS), "a task module listed in attnkit.cli.TASKS failed to import"


def test_unknown_tour_section_is_a_clean_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "tour"
    rc = main(["tour", "--only", "nope", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("attnkit tour: error: --only: expected comma-separated sections from kernels, ")
    assert "'nope'" in err and err.count("\n") == 1
    assert "Traceback" not in err
    assert not out.exists()  # refused while parsing: the folder is not made


def test_out_naming_a_file_is_a_clean_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    assert main(["tour", "--only", "kernels", "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit tour: error: --out: expected a folder") and "Traceback" not in err


def test_kernels_section_writes_its_picture(tmp_path: Path) -> None:
    rc = main(["tour", "--only", "kernels", "--quick", "--out", str(tmp_path)])
    assert rc == 0
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "Kernels: scaled dot-product attention" in index
    png = tmp_path / "kernels" / "masks.png"
    assert png.stat().st_size > 10_000
    for src in re.findall(r'<img src="([^"]+)"', index):
        assert (tmp_path / src).exists(), src
    docs = [h for h in re.findall(r'<a href="([^"]+)"', index) if h.endswith("sdpa.md")]
    assert len(docs) == 1 and (tmp_path / docs[0]).resolve() == (tour._DOCS_DIR / "sdpa.md").resolve()


def test_every_section_links_an_existing_docs_page() -> None:
    for name, (_, _, page) in tour.SECTIONS.items():
        assert (tour._DOCS_DIR / page).is_file(), (name, page)


@pytest.mark.slow
def test_quick_tour_end_to_end(tmp_path: Path) -> None:
    proc = _run("tour", "--quick", "--out", str(tmp_path / "tour"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    index = (tmp_path / "tour" / "index.html").read_text(encoding="utf-8")
    titles = re.findall(r"<h2>(.*?)</h2>", index)
    assert titles[0] == "What the tutorial claims — what this run measured"  # computed from the run's JSON
    assert (tmp_path / "tour" / "claims.json").exists()
    titles = titles[1:]
    assert len(titles) == len(tour.SECTIONS) and not [t for t in titles if t.endswith(": failed")], titles
    images = re.findall(r'<img src="([^"]+)"', index)
    assert len(images) >= 6
    for src in images:
        assert (tmp_path / "tour" / src).stat().st_size > 1000, src
