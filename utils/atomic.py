"""Atomic file writes: a crash or kill mid-write never leaves a truncated file behind."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from utils.errors import FSANetError

log = logging.getLogger(__name__)

# Read once at import: os.umask can only be read by setting it, which is not thread-safe later.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    `durable=False` skips the flush to disk before the rename: for cache entries, which a power cut may leave
    empty and whose readers then recompute them, a flush per entry is time for nothing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid in the name lets a later run tell an orphan from a file another live run is writing.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes owner-only files; give the result the permissions a plain open() would.
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        if durable:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save that leaves either the old file or the complete new one, never a partial one."""
    import torch  # here, not at the top: image and eval tools use this module without needing torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f, _without_zip_crc32():
        # Through a Python file object a full disk raises OSError(ENOSPC); given a path, torch's own
        # writer reports it as "[enforce fail at inline_container.cc] unexpected pos".
        try:
            torch.save(obj, f)
        except RuntimeError as err:
            # Ctrl-C or SIGTERM inside a write the C++ writer called: it reports "unexpected pos" (read as a full
            # disk) with the interrupt as its context; the interrupt is what happened.
            if isinstance(err.__context__, KeyboardInterrupt):
                raise err.__context__ from None
            raise


def _without_zip_crc32() -> contextlib.AbstractContextManager:
    """torch.save without the CRC-32 of each archive entry: 0.7 s of CPU per 1.3 GB training checkpoint.

    torch.load has never read them (PyTorch builds its zip reader without the check); only zip tools do.
    """
    try:
        from torch.utils.serialization import config
    except ImportError:  # older torch (no such setting) always writes them
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": False})


# mkstemp's names for atomic_path: ".<target name>.<writer pid>.<8 random characters>.tmp" (older
# versions wrote no pid).
_TEMP_NAME = re.compile(r"^\.(?P<target>.+?)(?:\.(?P<pid>\d+))?\.[A-Za-z0-9_]{8}\.tmp$")


def is_temp_name(name: str, target_suffixes: tuple[str, ...]) -> bool:
    """True for a temporary file atomic_path makes for a target ending in one of `target_suffixes`."""
    match = _TEMP_NAME.match(name)
    return bool(match) and match.group("target").lower().endswith(target_suffixes)


def _writer_alive(name: str) -> bool:
    """True when the temp file's writer (the pid in its name) is a live process, this one included."""
    match = _TEMP_NAME.match(name)
    return bool(match and match.group("pid")) and pid_alive(int(match.group("pid")))


def pid_alive(pid: int) -> bool:
    """True when process `pid` exists (this one included, another user's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def remove_stale_temps(folder: str | os.PathLike, target_suffixes: tuple[str, ...]) -> list[Path]:
    """Delete temp files a killed run of ours left in `folder` (only names atomic_path makes, and not those
    a live process is still writing); log them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if is_temp_name(path.name, target_suffixes) and path.is_file() and not _writer_alive(path.name):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) an interrupted run left in %s: %s", len(removed), folder,
                 ", ".join(p.name for p in removed[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed


class UnwritableFolderError(FSANetError):
    """An output folder that cannot be created or written to (exit 2: refused before any work)."""


def os_reason(error: OSError) -> str:
    """The OS's reason for a failed file operation, e.g. 'no space left on device'."""
    if error.errno is not None:
        return os.strerror(error.errno).lower() if error.errno != errno.ENOSPC else "no space left on device"
    return str(error) or type(error).__name__


def check_writable_dir(folder: str | os.PathLike, flag: str) -> None:
    """Prove files can be written in `folder` (or, if it does not exist yet, created in its nearest existing
    parent) without leaving anything behind; UnwritableFolderError naming `flag` and the reason if not."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", str(existing))
        fd, probe = tempfile.mkstemp(prefix=".fsanet-write-check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = "" if existing == folder else f"{existing}: "
        raise UnwritableFolderError(f"{flag} {folder}: cannot write there ({where}{os_reason(e)}); "
                                    f"choose a writable folder for {flag}") from None
