"""The examples the documentation shows are run: README / docs code blocks and every module's doctests.

* Each ``python`` fenced block of README.md, README.zh-CN.md and docs/*.md runs; the blocks of one file run in
  order in one namespace (later blocks may use earlier names), with a temporary directory as cwd.
* Every module of the ``attnkit`` package is imported (one that cannot import fails) and its doctests run.
  Only ``__main__`` modules are not imported (importing one runs the command line); a test checks that they hold
  no examples to run.
"""

from __future__ import annotations

import doctest
import importlib
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attnkit"
READMES = ["README.md", "README.zh-CN.md"]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?:python|py)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)


def _markdown_files() -> list[str]:
    files = [name for name in READMES if (ROOT / name).exists()]
    files += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
    return files


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced python block, dedented (blocks inside admonitions are indented)."""
    return [
        (text[: m.start()].count("\n") + 1, textwrap.dedent(m.group("body")))
        for m in FENCE.finditer(text)
    ]


def test_block_parser_reads_indented_and_plain_fences() -> None:
    text = "a\n```python\nx = 1\n```\n!!! note\n    ```python\n    y = x + 1\n    ```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n"), (6, "y = x + 1\n")]


@pytest.mark.parametrize("name", READMES)
def test_readmes_exist(name: str) -> None:
    assert (ROOT / name).exists(), f"{name} is missing: its examples cannot be run"


@pytest.mark.parametrize("name", _markdown_files())
def test_markdown_python_blocks_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ROOT / name
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_example_{path.stem}"}
    for line, code in blocks:
        try:
            exec(compile(code, f"{name}:{line}", "exec"), namespace)
        except Exception as err:  # name the file and line of the block that failed
            raise AssertionError(f"the python block at {name}:{line} failed: {type(err).__name__}: {err}") from err


def _module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] != "__main__":
            names.append(".".join(parts))
    return names


def test_main_modules_hold_no_examples() -> None:
    mains = sorted(PACKAGE.rglob("__main__.py"))
    assert mains, "expected attnkit/__main__.py"
    for path in mains:
        assert ">>>" not in path.read_text(encoding="utf-8"), f"{path} has doctest examples that are never run"


@pytest.mark.parametrize("module_name", _module_names())
def test_module_doctests(module_name: str) -> None:
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in finder.find(module, module_name):
        if test.examples and test.name.startswith(module_name):  # not the doctests of names it imports
            runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed:\n" + "".join(report)
