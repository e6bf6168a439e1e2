"""``python -m attnkit.bench SUITE [--quick]`` / ``attnkit bench SUITE``."""

from __future__ import annotations

import argparse
import importlib
import sys

from attnkit._argtypes import ArgumentParser, output_dir
from attnkit._errors import fail

HELP = "run a benchmark suite and print times as ratios to baselines measured in the same run"

SUITES = {
    "dense": "attnkit.bench.dense",
    "modules": "attnkit.bench.modules",
    "vision": "attnkit.bench.vision",
    "long": "attnkit.bench.long",
    "load": "attnkit.bench.load",
    "hf": "attnkit.bench.hf",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=sorted(SUITES), help="which benchmark to run")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (for CI and the tour)")
    parser.add_argument("--out", type=output_dir, default=None, help="folder for the table (markdown/JSON) and plots")
    parser.add_argument(
        "--model", choices=("smollm2", "gemma3"), default=None, help="hf only: which LLM to run (default smollm2)"
    )


def run(args: argparse.Namespace) -> int:
    model = getattr(args, "model", None)
    if model is not None and args.suite != "hf":
        raise fail("--model only with the hf suite", f"{args.suite} --model {model}", "attnkit bench hf --model gemma3")
    module = importlib.import_module(SUITES[args.suite])
    extra = {"model": model} if model is not None else {}
    return int(module.main(quick=args.quick, out=args.out, **extra) or 0)


if __name__ == "__main__":
    from attnkit._runtime import available_cores, configure_process

    p = ArgumentParser(prog="python -m attnkit.bench", description=HELP)
    add_arguments(p)
    parsed = p.parse_args()
    configure_process(available_cores())  # a fixed thread count: no measurement spans a change of threads
    sys.exit(run(parsed))
