"""`make demo`: FSANet end to end on a built-in synthetic DIS-like dataset (see pipelines/demo.py)."""
from __future__ import annotations

from pipelines.cli import quiet_interrupts_while_starting

quiet_interrupts_while_starting(__name__)  # before the imports below: they take seconds to load

import argparse
import logging

from pipelines.cli import exit_process, run_cli
from pipelines.demo import parse_args, run_demo
from utils.errors import EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Parse the demo's options, run it and print the comparison table."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    return run_cli(lambda: print_demo(args))


def print_demo(args: argparse.Namespace) -> int:
    """Run the demo and print its before/after table."""
    print(run_demo(args))
    return EXIT_OK


if __name__ == "__main__":
    exit_process(main())
