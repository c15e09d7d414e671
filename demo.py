"""`make demo`: FSANet end to end on a built-in synthetic DIS-like dataset (see utils/demo.py)."""
from __future__ import annotations

import logging
import subprocess
import sys

from utils.demo import parse_args, run_demo


def main() -> int:
    """Parse the demo's options, run it and print the comparison table."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(run_demo(parse_args()))
    except subprocess.CalledProcessError as err:
        print(f"error: the demo stopped: `{' '.join(map(str, err.cmd[1:]))}` exited with status {err.returncode} "
              "(its messages are above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
