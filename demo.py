"""`make demo`: FSANet end to end on a built-in synthetic DIS-like dataset (see utils/demo.py)."""
from __future__ import annotations

import logging
import sys

from utils.demo import parse_args, run_demo


def main() -> int:
    """Parse the demo's options, run it and print the comparison table."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(run_demo(parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
