"""Every option of every ``attnkit`` command is checked while parsing, before anything is created or trained.

The cases are read from :func:`attnkit.cli.build_parser` itself, so a new subcommand or option is covered without
editing this file: every option of a numeric type gets the values its type refuses among ``0``, ``-1`` and ``x``,
and every ``--out`` gets an existing file. A refusal is exit status 2 and one line on stderr that names the option,
no traceback, and an empty working directory. The task modules' ``run`` is replaced by a function that fails the
test, so a value that slipped through would be reported, not trained on.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from attnkit import _argtypes as T
from attnkit.cli import TASKS, build_parser, main

PROBES = ("0", "-1", "x")


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """``(command words, parser)`` of every leaf (sub)command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _commands(sub, (*path, name))


def _positionals(parser: argparse.ArgumentParser) -> list[str]:
    """Values for the required positional arguments (a choice, or a word)."""
    return [
        str(next(iter(a.choices))) if a.choices else "word"
        for a in parser._actions
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction) and a.dest != "help"
    ]


def _option(action: argparse.Action) -> str:
    return next(s for s in action.option_strings if s.startswith("--"))


def _refuses(kind: object, text: str) -> bool:
    try:
        kind(text)  # type: ignore[operator]
    except T.ArgumentTypeError:
        return True
    return False


COMMANDS = list(_commands(build_parser()))
NUMERIC_CASES = [
    pytest.param(
        " ".join(words), [*words, *_positionals(p)], _option(a), value, id=f"{' '.join(words)} {_option(a)} {value}"
    )
    for words, p in COMMANDS
    for a in p._actions
    if a.option_strings and a.type in T.NUMERIC_TYPES
    for value in PROBES
    if _refuses(a.type, value)
]
OUT_CASES = [
    pytest.param([*words, *_positionals(p)], id=" ".join(words))
    for words, p in COMMANDS
    if any("--out" in a.option_strings for a in p._actions)
]


def _must_not_run(args: argparse.Namespace) -> int:
    raise AssertionError(f"the command ran with {args}: its options should have been refused while parsing")


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Work in an empty folder; every task's ``run`` fails the test."""
    for module_name in TASKS.values():
        monkeypatch.setattr(importlib.import_module(module_name), "run", _must_not_run)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _main(argv: Sequence[str]) -> int:
    try:
        return main(list(argv))
    except SystemExit as err:  # main returns the status; this would be a parser escaping it
        return int(err.code or 0)


def test_every_command_and_numeric_option_is_enumerated() -> None:
    words = {" ".join(w) for w, _ in COMMANDS}
    expected = {"tour", "classify", "caption", "glimpse", "explain", "bench", "translate train", "translate evaluate",
                "translate translate"}  # fmt: skip
    assert expected <= words, words
    assert len(NUMERIC_CASES) > 80
    assert len(OUT_CASES) == len(COMMANDS)  # every command writes somewhere, and says where with --out


def test_no_option_takes_an_unchecked_number() -> None:
    """Plain ``int`` / ``float`` accept 0 and negatives: every numeric option uses a type of attnkit._argtypes."""
    loose = [
        f"{' '.join(words)} {a.option_strings}" for words, p in COMMANDS for a in p._actions if a.type in (int, float)
    ]
    assert not loose


def test_parsers_are_attnkit_parsers() -> None:
    """The one-line error format comes from attnkit._argtypes.ArgumentParser, at every level."""
    assert all(isinstance(p, T.ArgumentParser) for _, p in COMMANDS)


@pytest.mark.parametrize(("command", "argv", "option", "value"), NUMERIC_CASES)
def test_refused_number_is_one_line_and_creates_nothing(
    command: str, argv: list[str], option: str, value: str, no_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = _main([*argv, option, value])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"attnkit {command}: error: {option}: expected "), err
    assert "Traceback" not in err
    assert list(no_run.iterdir()) == []


@pytest.mark.parametrize("argv", OUT_CASES)
def test_out_naming_a_file_is_refused(argv: list[str], no_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = no_run / "taken"
    taken.write_text("not a folder")
    assert _main([*argv, "--out", "taken"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out: expected a folder" in err and "'taken'" in err
    assert list(no_run.iterdir()) == [taken]
    assert _main([*argv, "--out", "taken/sub"]) == 2  # a file in the way further up
    assert "under the file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["classify", "--batch-size", "0"],
            "attnkit classify: error: --batch-size: expected a positive integer, got 0",
        ),
        (["classify", "--train-size", "-5"], "--train-size: expected a positive integer, got -5"),
        (["classify", "--train-size", "20"], "expected at least 8 training steps"),
        (["classify", "--lr", "nan"], "--lr: expected a positive number, got nan"),
        (["classify", "--widths", "16,0"], "--widths: expected comma-separated positive integers"),
        (["caption", "--epochs", "0"], "attnkit caption: error: --epochs: expected a positive integer, got 0"),
        (["caption", "--expected-prob", "1.5"], "--expected-prob: expected a number in [0, 1], got 1.5"),
        (["caption", "--attention", "soft,fuzzy"], "expected --attention as comma-separated names"),
        (["glimpse", "--epochs", "-1"], "attnkit glimpse: error: --epochs: expected a positive integer, got -1"),
        (["glimpse", "--glimpses", "4,0"], "expected --glimpses as comma-separated positive integers"),
        (["translate", "evaluate", "--beam", "-2"], "attnkit translate evaluate: error: --beam: expected a positive"),
        (["translate", "evaluate", "--limit", "-1"], "--limit: expected a non-negative integer, got -1"),
        (
            ["translate", "train", "--steps", "0"],
            "attnkit translate train: error: --steps: expected a positive integer",
        ),
        (["translate", "train", "--dropout", "2"], "--dropout: expected a number in [0, 1], got 2"),
        (["translate", "train", "--src", "xx"], "--src: expected a language code"),
        (["translate", "train", "--src", "4", "--tgt", "en"], "two different versions"),
        (["translate", "train", "--hidden-dim", "15"], "--hidden-dim: expected an even number, got 15"),
        (["translate", "train", "--model", "transformer", "--hidden-dim", "30", "--heads", "4"], "try --heads 3"),
        (["translate", "translate", "text", "--plot", "a.txt"], "--plot: expected a file name ending in .png"),
        (["tour", "--only", "kernels,nonsense", "--out", "D"], "--only: expected comma-separated sections"),
        (["explain", "text", "--top", "0"], "attnkit explain: error: --top: expected a positive integer, got 0"),
        (["bench", "warp"], "attnkit bench: error: suite: invalid choice"),
        (["classify", "--bogus"], "attnkit classify: error: unrecognized arguments: --bogus"),
        (["translate", "train", "--bogus"], "attnkit translate train: error: unrecognized arguments: --bogus"),
    ],
)
def test_the_reported_cases(argv: list[str], line: str, no_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The sweep of issue 13 (and its neighbours): refused while parsing, one line, nothing created."""
    assert _main(argv) == 2
    err = capsys.readouterr().err
    assert line in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert list(no_run.iterdir()) == []


def test_zero_is_not_read_as_the_default(tmp_path: Path) -> None:
    """The tasks' own entry points take ``None`` for "default": 0 is an error there too, not the default."""
    from attnkit.tasks import caption, glimpse

    with pytest.raises(ValueError, match="--epochs >= 1"):
        caption.run_experiment(["soft"], quick=True, out_dir=tmp_path / "c", epochs=0)
    with pytest.raises(ValueError, match="--batch-size >= 1"):
        glimpse.run_experiment("translated", [4], quick=True, out_dir=tmp_path / "g", batch_size=-1)
    assert list(tmp_path.iterdir()) == []


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["classify", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--threads" in out and "0 = follow the cores left free" in out


# ---- the types themselves -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "good", "bad", "message"),
    [
        (T.positive_int, {"1": 1, "64": 64}, ["0", "-1", "1.5", "x", ""], "expected a positive integer, got 0"),
        (T.non_negative_int, {"0": 0, "7": 7}, ["-1", "x", "2.0"], "expected a non-negative integer, got -1"),
        (T.positive_float, {"1e-3": 1e-3, "2": 2.0}, ["0", "-1", "x", "inf", "nan"], "expected a positive number"),
        (T.non_negative_float, {"0": 0.0, "0.5": 0.5}, ["-0.1", "x", "inf"], "expected a non-negative number"),
        (
            T.probability,
            {"0": 0.0, "1": 1.0, "0.25": 0.25},
            ["-0.1", "1.01", "x", "nan"],
            "expected a number in [0, 1]",
        ),
    ],
)
def test_numeric_types(kind, good: dict[str, object], bad: list[str], message: str) -> None:  # noqa: ANN001
    for text, value in good.items():
        assert kind(text) == value
    for text in bad:
        with pytest.raises(T.ArgumentTypeError, match="expected"):
            kind(text)
    with pytest.raises(T.ArgumentTypeError) as info:
        kind(bad[0])
    assert str(info.value).startswith(message.split(", got")[0])
    with pytest.raises(T.ArgumentTypeError, match="got 'x'"):
        kind("x")  # a non-number is quoted, a number is not


def test_list_and_path_types(tmp_path: Path) -> None:
    names = T.choice_list(("soft", "hard", "gumbel"))
    assert names("hard, soft,hard") == ["hard", "soft"]
    for text in ("", ",", "soft,fuzzy"):
        with pytest.raises(T.ArgumentTypeError, match="comma-separated names from soft, hard, gumbel"):
            names(text)
    ints = T.int_list(example="16,32,64")
    assert ints("16,32, 64") == [16, 32, 64]
    for text in ("", "a,b", "4,0", "4,-1"):
        with pytest.raises(T.ArgumentTypeError, match="comma-separated positive integers.*try 16,32,64"):
            ints(text)
    (tmp_path / "file").write_text("")
    assert T.output_dir(str(tmp_path)) == str(tmp_path)
    assert T.output_dir(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    for text in (str(tmp_path / "file"), str(tmp_path / "file" / "sub"), ""):
        with pytest.raises(T.ArgumentTypeError, match="expected a folder"):
            T.output_dir(text)
    plot = T.output_file(".png", ".svg")
    assert plot(str(tmp_path / "a.PNG")) == str(tmp_path / "a.PNG")
    for text in (str(tmp_path / "a.txt"), str(tmp_path / "file" / "a.png")):
        with pytest.raises(T.ArgumentTypeError, match="expected a file"):
            plot(text)
    assert not list(tmp_path.glob("new"))  # checking a path creates nothing


def test_parser_error_format(capsys: pytest.CaptureFixture[str]) -> None:
    parser = T.ArgumentParser(prog="tool")
    sub = parser.add_subparsers(dest="cmd", required=True).add_parser("run")
    sub.add_argument("--n", type=T.positive_int, default=1)
    sub.add_argument("--m", type=T.positive_int, default=1)

    def check(args: argparse.Namespace) -> None:
        if args.n > args.m:
            raise T.ArgumentTypeError(f"--n / --m: expected --n <= --m, got {args.n} and {args.m}")

    sub.add_check(check)
    assert parser.parse_args(["run", "--n", "2", "--m", "3"]).n == 2
    for argv, line in [
        (["run", "--n", "0"], "tool run: error: --n: expected a positive integer, got 0"),
        (["run", "--n", "3", "--m", "2"], "tool run: error: --n / --m: expected --n <= --m, got 3 and 2"),
        (["run", "--n"], "tool run: error: --n: expected one argument"),
        (["walk"], "tool: error: cmd: invalid choice"),
    ]:
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(line) and err.count("\n") == 1, err


# ---- end to end: a real process, its exit status and its whole stderr ---------------------------------------------


@pytest.mark.parametrize(
    ("argv", "stderr"),
    [
        (
            ["classify", "--batch-size", "0"],
            "attnkit classify: error: --batch-size: expected a positive integer, got 0\n",
        ),
        (
            ["translate", "train", "--steps", "0"],
            "attnkit translate train: error: --steps: expected a positive integer, got 0\n",
        ),
    ],
)
def test_end_to_end_in_a_process(argv: list[str], stderr: str, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "attnkit", *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []
