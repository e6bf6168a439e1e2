"""The ``attnkit`` command. It only parses arguments and calls :mod:`attnkit.tasks`.

Each task module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Its options use
the types of :mod:`attnkit._argtypes`, so every value is checked while parsing, before the task does anything: a
bad one exits with status 2 and one line on stderr (``attnkit classify: error: --batch-size: expected a positive
integer, got 0``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from attnkit._argtypes import ArgumentParser, exit_code

# command -> module; a dict, so adding a task is one line.
TASKS: dict[str, str] = {
    "tour": "attnkit.tasks.tour",
    "translate": "attnkit.tasks.translate",
    "classify": "attnkit.tasks.classify",
    "caption": "attnkit.tasks.caption",
    "glimpse": "attnkit.tasks.glimpse",
    "explain": "attnkit.tasks.explain",
    "bench": "attnkit.bench.__main__",
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="attnkit", description="Attention mechanisms for PyTorch: tasks and tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in TASKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _configure_threads(args: argparse.Namespace) -> None:
    """Intra-op threads from the cores this process may use, following the cores other processes leave free
    (docs/performance.md); ``--threads N`` fixes the count, and benchmarks always run with a fixed one."""
    from attnkit._runtime import available_cores, configure_process

    threads = getattr(args, "threads", None) or None  # --threads 0: the default
    if args.command == "bench" and threads is None:
        threads = available_cores()
    configure_process(threads)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Bad input exits with status 2 and one line on stderr, never a traceback."""
    from attnkit.data import DataNotFoundError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as err:  # a bad option (2, after its one-line message) or --help (0)
        return exit_code(err)
    _configure_threads(args)
    try:
        return int(args._run(args) or 0)
    except (ValueError, DataNotFoundError) as err:
        print(f"attnkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
