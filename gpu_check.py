"""Check every GPU path of FSANet in one command (`make gpu-check`); without CUDA it runs nothing.

    python gpu_check.py                       # tests, benchmarks, summary in checkpoints/gpu_check/
    python gpu_check.py --budget_s 300 --out /tmp/gpu_check

Exit status 0 when every check passed (or no GPU was found), 1 when one failed or ran out of time,
2 when a package the checks import or the reference fixtures ($FSANET_REFERENCE) are missing.
"""
from __future__ import annotations

from pipelines.cli import quiet_interrupts_while_starting

quiet_interrupts_while_starting(__name__)  # before the imports below: they take seconds to load

import argparse
import logging
from pathlib import Path

from pipelines.cli import exit_process, float_in, run_cli
from pipelines.gpu_check import run_gpu_check


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """gpu-check options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("checkpoints/gpu_check"),
                   help="folder for the summary (summary.md), each stage's log and the benchmark tables")
    p.add_argument("--budget_s", type=float_in(0, low_open=True), default=460.0,
                   help="wall-clock budget of the whole check in seconds; a stage that would exceed it is cut "
                        "off and reported (default 460: under 8 minutes with start-up)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile inference (minutes of compiling)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the check and print its summary."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    return run_cli(lambda: run_gpu_check(args.out, args.budget_s, args.compile))


if __name__ == "__main__":
    exit_process(main())
