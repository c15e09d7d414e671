"""The scripts' one exit point: an FSANetError becomes one `error:` line and its exit code, Ctrl-C one line and 130.

Kept out of `utils/` because writing to the terminal is the scripts' job; the leaves only raise.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from utils.errors import EXIT_INTERRUPTED, FSANetError, one_line


def run_cli(body: Callable[[], int], interrupted: Callable[[], str] | None = None) -> int:
    """Run a script's body: FSANetError -> `error: <message>` and its exit code; Ctrl-C -> one line, 130."""
    try:
        return body()
    except FSANetError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        done = interrupted() if interrupted is not None else ""
        print(f"interrupted{': ' + done if done else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
