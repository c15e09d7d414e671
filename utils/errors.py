"""The project's one error hierarchy and the exit codes every script uses.

Exit codes: 0 done; 1 finished but some items failed, or a fault at run time; 2 refused before any
work (bad flag, missing or unwritable path, wrong checkpoint); 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

from collections.abc import Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130


class FSANetError(Exception):
    """A problem a user can fix; the message names the file or flag and the fix.

    `exit_code` says what the scripts exit with: refused before any work unless a subclass says otherwise.
    """

    exit_code = EXIT_REFUSED


class RunError(FSANetError):
    """A fault after work started (a save that failed, a diverged run): exit 1, nothing computed is lost."""

    exit_code = EXIT_FAILED


def one_line(err: BaseException) -> str:
    """The message of `err` on one line; for an error re-raised from a DataLoader worker (which wraps it as
    'Caught X in DataLoader worker ... Original Traceback ...'), the original message."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def listing(items: Sequence[str], limit: int = 10, sep: str = ", ") -> str:
    """The first `limit` items joined by `sep`, then '... and N more' when there are more."""
    shown = sep.join(items[:limit])
    return shown + (f"{sep}... and {len(items) - limit} more" if len(items) > limit else "")
