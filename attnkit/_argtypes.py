"""Argument types and the argument parser of every ``attnkit`` command.

Every option is checked while the command line is parsed, before anything is created, loaded or trained: a bad
value exits with status 2 and one line on stderr that names the option, its accepted range and the value given,
for example::

    attnkit classify: error: --batch-size: expected a positive integer, got 0

The types are plain callables (``type=positive_int``); they raise :class:`argparse.ArgumentTypeError` whose
message is ``"expected ..., got ..."``, and :class:`ArgumentParser` puts the option's name in front. Checks that
involve several options go in a function given to :meth:`ArgumentParser.add_check`; they run right after parsing.

This module is the ground floor of the command line: it imports nothing from attnkit.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

__all__ = [
    "ArgumentParser",
    "ArgumentTypeError",
    "choice_list",
    "int_list",
    "non_negative_float",
    "non_negative_int",
    "output_dir",
    "output_file",
    "positive_float",
    "positive_int",
    "probability",
]

ArgumentTypeError = argparse.ArgumentTypeError


def _shown(text: str) -> str:
    """The value as the message shows it: numbers bare (``got 0``), anything else quoted (``got 'x'``)."""
    try:
        float(text)
    except ValueError:
        return repr(text)
    return text.strip()


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ArgumentTypeError(f"expected {what}, got {_shown(text)}") from None


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ArgumentTypeError(f"expected {what}, got {_shown(text)}") from None
    if not math.isfinite(value):
        raise ArgumentTypeError(f"expected {what}, got {_shown(text)}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes, steps, epochs)."""
    what = "a positive integer"
    value = _int(text, what)
    if value < 1:
        raise ArgumentTypeError(f"expected {what}, got {_shown(text)}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0, for options where 0 means something (a seed, ``--threads 0``, ``--limit 0``)."""
    what = "a non-negative integer"
    value = _int(text, what)
    if value < 0:
        raise ArgumentTypeError(f"expected {what}, got {_shown(text)}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, temperatures, standard deviations)."""
    what = "a positive number"
    value = _float(text, what)
    if value <= 0:
        raise ArgumentTypeError(f"expected {what}, got {_shown(text)}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (loss weights, clipping thresholds where 0 disables, ...)."""
    what = "a non-negative number"
    value = _float(text, what)
    if value < 0:
        raise ArgumentTypeError(f"expected {what}, got {_shown(text)}")
    return value


def probability(text: str) -> float:
    """A number in [0, 1] (dropout, label smoothing, probabilities, fractions)."""
    what = "a number in [0, 1]"
    value = _float(text, what)
    if not 0.0 <= value <= 1.0:
        raise ArgumentTypeError(f"expected {what}, got {_shown(text)}")
    return value


# The numeric types above: tests enumerate every option that uses one of them.
NUMERIC_TYPES: tuple[Callable[[str], Any], ...] = (
    positive_int, non_negative_int, positive_float, non_negative_float, probability,
)  # fmt: skip


def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def choice_list(
    choices: Iterable[str],
    *,
    what: str = "names",
    lower: bool = False,
    option: str | None = None,
    example: str | None = None,
) -> Callable[[str], list[str]]:
    """A comma-separated, non-empty list of names from ``choices`` (duplicates dropped, order kept).

    ``what`` names the items in the message (``"comma-separated attention names from [...]"``). With ``option``
    the message names it first (``"expected --attention as comma-separated ..."``) and the parser prints it as is.
    ``example`` is the value the message suggests (default: the first two choices).
    """
    allowed = tuple(choices)
    hint = example or ",".join(allowed[:2])
    if option:
        hint = f"{option} {hint}"

    def parse(text: str) -> list[str]:
        names = [n.lower() if lower else n for n in _split(text)]
        unknown = [n for n in names if n not in allowed]
        if not names or unknown:
            lead = f"{option} as comma-separated {what}" if option else f"comma-separated {what}"
            bad = f"; unknown: {', '.join(unknown)}" if unknown and len(names) > 1 else ""
            raise ArgumentTypeError(f"expected {lead} from {', '.join(allowed)}, got {text!r}{bad}; try {hint}")
        return list(dict.fromkeys(names))

    parse.__name__ = "choice_list"
    return parse


def int_list(*, minimum: int = 1, option: str | None = None, example: str = "4,6,8") -> Callable[[str], list[int]]:
    """A comma-separated, non-empty list of integers >= ``minimum`` (``"16,32,64"``)."""
    kind = "positive integers" if minimum == 1 else f"integers >= {minimum}"

    def parse(text: str) -> list[int]:
        try:
            values = [int(t) for t in _split(text)]
        except ValueError:
            values = []
        if not values or any(v < minimum for v in values):
            lead = f"{option} as comma-separated {kind}" if option else f"comma-separated {kind}"
            hint = f"{option} {example}" if option else example
            raise ArgumentTypeError(f"expected {lead}, got {text!r}; try {hint}")
        return values

    parse.__name__ = "int_list"
    return parse


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


def output_dir(text: str) -> str:
    """A folder to write into: an existing directory, or a path that can be created (no file in the way)."""
    if not str(text).strip():
        raise ArgumentTypeError("expected a folder to write into, got ''")
    path = Path(text).expanduser()
    found = _first_existing(path)
    if found == path and not path.is_dir():
        raise ArgumentTypeError(f"expected a folder to write into (a directory or a new path), got the file {text!r}")
    if not found.is_dir():
        raise ArgumentTypeError(f"expected a folder to write into, got {text!r} under the file {str(found)!r}")
    return str(text)


def output_file(*suffixes: str) -> Callable[[str], str]:
    """A file to write, ending in one of ``suffixes`` (``".png"``), not an existing folder, no file in its path."""

    def parse(text: str) -> str:
        path = Path(text).expanduser()
        if suffixes and path.suffix.lower() not in suffixes:
            raise ArgumentTypeError(
                f"expected a file name ending in {', '.join(suffixes)}, got {text!r}; try {path.stem or 'out'}"
                f"{suffixes[0]}"
            )
        if path.is_dir():
            raise ArgumentTypeError(f"expected a file to write, got the folder {text!r}")
        found = _first_existing(path.parent)
        if not found.is_dir():
            raise ArgumentTypeError(f"expected a file to write, got {text!r} under the file {str(found)!r}")
        return str(text)

    parse.__name__ = "output_file"
    return parse


# ---- the parser --------------------------------------------------------------------------------------------------

_ARGUMENT = re.compile(r"^argument (\S+?): (.*)$", re.DOTALL)


class ArgumentParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose errors are one line on stderr, exit status 2.

    The line is ``"<prog>: error: <option>: <message>"`` (``attnkit translate train: error: --steps: expected a
    positive integer, got 0``); a message that already starts with ``"expected <option>"`` is not prefixed again.
    Subparsers made with :meth:`add_subparsers` are of the same class, so nested commands name themselves.
    Functions given to :meth:`add_check` see the parsed namespace and raise :class:`ArgumentTypeError` (or
    ``ValueError``) for combinations of options that cannot work; they run before the command does anything.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._checks: list[Callable[[argparse.Namespace], None]] = []

    def add_check(self, check: Callable[[argparse.Namespace], None]) -> None:
        """Run ``check(args)`` after parsing; its error becomes this parser's one-line error."""
        self._checks.append(check)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if not hasattr(ns, "_prog"):  # the innermost (sub)command parsed: it names unrecognized arguments
            ns._prog = self.prog
        for check in self._checks:
            try:
                check(ns)
            except (ArgumentTypeError, ValueError) as err:
                self.error(str(err))
        return ns, extras

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            prog = getattr(ns, "_prog", self.prog)
            self.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extras)} (see {prog} --help)\n")
        return ns

    def error(self, message: str) -> NoReturn:
        line = " ".join(str(message).split())  # one line, whatever the message held
        match = _ARGUMENT.match(line)
        if match:
            option, rest = match.group(1).split("/")[-1], match.group(2)
            line = rest if rest.startswith(f"expected {option}") else f"{option}: {rest}"
        elif line.startswith(("the following arguments", "unrecognized arguments", "one of the arguments")):
            line += f" (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {line}\n")


def add_checkpoint_arguments(
    p: argparse.ArgumentParser, *, every: str = "at the end of each model and on a stop signal", resume: str = ""
) -> None:
    """The two options every training command shares, ``--save-every N`` and ``--resume``, with one wording;
    ``every`` says what 0 means, ``resume`` adds a detail."""
    p.add_argument(
        "--save-every", type=non_negative_int, default=0,
        help=f"checkpoint every N steps (default 0: {every})",
    )  # fmt: skip
    p.add_argument(
        "--resume", action="store_true",
        help="continue from the checkpoints under OUT (the same weights as an uninterrupted run" + resume + ")",
    )  # fmt: skip


def exit_code(err: SystemExit) -> int:
    """The status a :class:`SystemExit` from argparse stands for (``--help`` is 0, an error 2)."""
    code = err.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
