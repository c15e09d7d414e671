"""The scripts' one exit point: an FSANetError becomes one `error:` line and its exit code; Ctrl-C, SIGTERM and
SIGHUP one line and 130, 143 or 129. Also the argparse types the scripts share, so that a bad number is refused
at parse time in one line naming its flag (exit 2).

Kept out of `utils/` because writing to the terminal is the scripts' job; the leaves only raise.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, NoReturn

from utils.errors import EXIT_INTERRUPTED, FSANetError, one_line

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]

# Ctrl-C; schedulers (SLURM, `timeout`, `kill PID`) stop a job with SIGTERM; a closed terminal sends SIGHUP.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
REDELIVER_S = 0.05
# The process whose handlers raise, and the handlers they replaced: a process forked from it (a DataLoader
# worker) inherits ours, and gets the replaced ones back, so it acts as it would without run_cli.
_handler_pid: int | None = None
_replaced: dict[int, Any] = {}
# True while this process forks: an exception raised in another library's fork hook is printed and dropped.
_forking = False
_fork_hooks_registered = False


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so every Ctrl-C path (partial results, atomic writes
    removing their temporary files, worker pools shut down) runs for it too."""

    def __init__(self, signum: int) -> None:
        """Remember which signal stopped the run."""
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _swallowed_there(frame: FrameType | None) -> bool:
    """Whether an exception raised in `frame` would be printed and dropped instead of stopping the run: inside a
    `__del__` (fork hooks, logging's among them, are covered by `_forking`)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _fork_starts() -> None:
    """Before a fork (our hook runs before the other libraries' hooks): defer stop signals until it ends."""
    global _forking
    _forking = True


def _fork_ended_in_parent() -> None:
    """After a fork, in the parent (after the other libraries' hooks): stop signals raise again."""
    global _forking
    _forking = False


def _fork_ended_in_child() -> None:
    """In a process forked inside the block: the handlers the block replaced (Python's Ctrl-C, SIGTERM's default)."""
    _fork_ended_in_parent()
    if _handler_pid is None or os.getpid() == _handler_pid:
        return
    for signum, handler in _replaced.items():
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signum, handler)


def _register_fork_hooks() -> None:
    """Register the fork hooks once, when the first block starts: after the libraries imported so far, so that
    ours run first before a fork and last after it (Python runs `before` hooks in reverse order)."""
    global _fork_hooks_registered
    if not _fork_hooks_registered:
        os.register_at_fork(before=_fork_starts, after_in_parent=_fork_ended_in_parent,
                            after_in_child=_fork_ended_in_child)
        _fork_hooks_registered = True


def _as_replaced(signum: int, frame: FrameType | None) -> None:
    """What the replaced handler does with the signal (default action: end this process by it)."""
    handler = _replaced.get(signum, signal.SIG_DFL)
    if callable(handler):
        handler(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    """Signal handler: stop the run as Ctrl-C would; where the exception would be lost (a `__del__`, a library's
    fork hook while a DataLoader starts its workers), deliver it again shortly.

    In a forked child that got the signal before the fork hook restored its handlers (a DataLoader worker the
    exiting parent terminates while it starts), the replaced handler acts: no traceback of the parent's kind.
    """
    if os.getpid() != _handler_pid:
        _as_replaced(signum, frame)
        return
    if _forking or _swallowed_there(frame):
        timer = threading.Timer(REDELIVER_S, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt, SIGTERM and SIGHUP Interrupted inside the block, each delivered again
    where an exception would be lost (main thread only; previous handlers restored).

    A signal the parent set to be ignored stays ignored (`nohup` ignores SIGHUP on purpose).
    """
    global _handler_pid
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _handler_pid = os.getpid()
    _register_fork_hooks()
    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, _raise_interrupted)
    _replaced.update(previous)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def exit_code_of(interrupt: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 128 + the signal's number for SIGTERM (143) and SIGHUP (129), as shells report them."""
    return 128 + interrupt.signum if isinstance(interrupt, Interrupted) else EXIT_INTERRUPTED


def interrupt_for(code: int) -> KeyboardInterrupt | None:
    """The interrupt a script's exit code says stopped it (exit_code_of's inverse), None for any other code."""
    if code == EXIT_INTERRUPTED:
        return KeyboardInterrupt()
    if code - 128 in (signal.SIGTERM, signal.SIGHUP):
        return Interrupted(code - 128)
    return None


def _interrupted_while_starting(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """sys.excepthook until run_cli answers signals: a Ctrl-C while a script's libraries load is one line."""
    if issubclass(kind, KeyboardInterrupt):
        with contextlib.suppress(OSError):
            print("interrupted (Ctrl-C) while starting: nothing was done", file=sys.stderr, flush=True)
        return  # Python still ends the process by SIGINT: exit status 130
    sys.__excepthook__(kind, value, tb)


def quiet_interrupts_while_starting(module_name: str) -> None:
    """Called by a script (`__name__`) before its imports, which take seconds (torch alone): a Ctrl-C meanwhile
    ends in one line and exit status 130 instead of a traceback through the importers. SIGTERM and SIGHUP
    already end it silently (143, 129). Only a script run as a program is changed, not one loaded by a test."""
    if module_name == "__main__":
        sys.excepthook = _interrupted_while_starting


def run_cli(body: Callable[[], int], interrupted: Callable[[], str] | None = None) -> int:
    """Run a script's body: FSANetError -> `error: <message>` and its exit code; Ctrl-C, SIGTERM, SIGHUP -> one
    line (`interrupted` says what was done) and 130, 143, 129."""
    if sys.excepthook is _interrupted_while_starting:  # from here on, interrupts are answered below
        sys.excepthook = sys.__excepthook__
    try:
        with stop_signals_interrupt():
            return body()
    except FSANetError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as stop:
        # A second signal while the summary is written must not turn it into a traceback.
        with stop_signals_ignored():
            _release_interrupted_objects(stop)
            done = interrupted() if interrupted is not None else ""
            how = f" ({signal.Signals(stop.signum).name})" if isinstance(stop, Interrupted) else ""
            with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
                print(f"interrupted{how}{': ' + done if done else ''}", file=sys.stderr, flush=True)
        return exit_code_of(stop)


def load_script(name: str) -> ModuleType:
    """The project's top-level script `name` (e.g. "test.py") as a new module, loaded from its file without
    running it (`import test` would find Python's own test package)."""
    path = ROOT / name
    spec = importlib.util.spec_from_file_location(f"fsanet_{path.stem}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exit_process(code: int) -> NoReturn:
    """End the script's process with `code`, leaving what is still alive to the OS.

    The interpreter's last garbage collections trace every object torch and timm created: most of a second
    per run, spent after the work is done. Frozen objects are skipped; files are closed by then (the scripts
    write through context managers), and atexit handlers and the final flush of stdout/stderr still run.
    """
    gc.freeze()
    sys.exit(code)


def _release_interrupted_objects(stop: BaseException) -> None:
    """Free what the interrupted frames held now, before the summary line, so that the complaints of objects the
    interrupt left half-built (a DataLoader iterator stopped in its __init__) go to the debug log, not stderr.

    The hook is in place before the traceback is dropped: dropping it is what runs those objects' __del__."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: log.debug("after the interrupt: %s in %r", unraisable.exc_value,
                                                      unraisable.object)
    try:
        stop.__traceback__ = None
        if stop.__context__ is not None:
            stop.__context__.__traceback__ = None
        gc.collect()
    finally:
        sys.unraisablehook = hook


@contextlib.contextmanager
def stop_signals_ignored() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP ignored inside the block (main thread only; previous handlers restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def int_at_least(minimum: int, multiple: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer >= minimum (and <= maximum, a multiple of `multiple`), else one line naming it."""
    def parse(text: str) -> int:
        """The integer in `text`, checked against the bounds."""
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        if value % multiple:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple}, got {value}")
        return value
    return parse


def float_in(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False,
             why: str = "") -> Callable[[str], float]:
    """argparse type: a finite float in [low, high] (an open end excludes it), else one line naming the range."""
    def parse(text: str) -> float:
        """The float in `text`, checked against the range."""
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            span = (f"{'above' if low_open else 'at least'} {low:g}" if high == math.inf else
                    f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
            raise argparse.ArgumentTypeError(f"must be a finite number {span}, got {text}{why}")
        return value
    return parse
