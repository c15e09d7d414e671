"""What a cache key is, in one place: the bytes read, the repo code that computes, the libraries on the path.

A cache is a promise that its answer equals recomputing. Every on-disk cache of the repo (ONNX exports,
OpenVINO compiled models, eval's GT and per-image results, the training data cache) builds its key
from `computation_fields` and `content` digests made here, so the next cache cannot forget a part:

- content: the SHA-256 of the bytes the computation uses, taken from the same read (`read_hashed`),
  never from a second open of the path;
- code: `code_digest(modules)`, the SHA-256 of the repo's source files those modules import, followed
  transitively through the repo (a `git pull` that changes any of them changes the key), computed once
  per process;
- libraries: `library_versions(names)`, the installed versions of every library whose arithmetic or
  decoding reaches the result.

`remove_orphaned_temps` deletes what a killed run of ours left in a cache folder; `scratch_dir` is a
run's temporary folder (for a cache that cannot be written), removed when released or at exit, and by
the next run when this one was killed. `stamped_sha256` / `read_hashed_stamped` add to a digest the
stamp a memo of digests may key it by.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from utils.atomic import pid_alive, remove_stale_temps

# A file changed this soon before it was hashed may change again within the clock's coarse step while
# keeping its stamp (git's "racy" case): its stamp is not given out.
RACY_SECONDS = 2.0
# The folder holding the packages actually imported (lib/, utils/, pipelines/): this file's package's parent.
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_cache_dir() -> Path:
    """fsanet's cache root: `$XDG_CACHE_HOME/fsanet`, else `~/.cache/fsanet`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fsanet"


def read_hashed(path: str | os.PathLike) -> tuple[bytes, str]:
    """A file's bytes and the SHA-256 of exactly those bytes (one read: the digest names what is used)."""
    data, digest, _ = read_hashed_stamped(path)
    return data, digest


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content (for files this run wrote itself, such as a fresh export)."""
    return stamped_sha256(path)[0]


def library_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed version of each distribution in `names` (read without importing it); "none" if absent."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "none"
    return versions


def _module_file(name: str, root: Path) -> Path | None:
    """The source file of repo module `name` under `root` (package `__init__.py` or module `.py`), else None."""
    base = root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted module name an import statement anywhere in `tree` may refer to (lazy imports included)."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            parts = base.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return names


def repo_sources(modules: Sequence[str], root: Path = REPO_ROOT) -> dict[str, Path]:
    """The repo modules that `modules` import, transitively (themselves included), with their source files."""
    found: dict[str, Path] = {}
    pending = list(modules)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        path = _module_file(name, root)
        if path is None:
            continue  # not the repo's: a library, whose version goes into the key instead
        found[name] = path
        tree = ast.parse(path.read_bytes(), filename=str(path))
        pending.extend(_imported_names(tree, name, path.name == "__init__.py") - found.keys())
    missing = [m for m in modules if m not in found]
    if missing:
        raise ValueError(f"not modules of this repo: {', '.join(missing)}")
    return found


@functools.cache
def code_digest(*modules: str) -> str:
    """SHA-256 over the source of `modules` and every repo module they import (once per process)."""
    digest = hashlib.sha256()
    for name, path in sorted(repo_sources(modules).items()):
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def computation_fields(modules: Sequence[str], libraries: Iterable[str], **parts: object) -> dict[str, object]:
    """The key fields of one computation: its code digest, its libraries' versions, and `parts` (options, content)."""
    fields: dict[str, object] = {"code_sha256": code_digest(*modules)}
    fields.update({f"version:{name}": version for name, version in library_versions(libraries).items()})
    fields.update(parts)
    return fields


def fields_digest(fields: dict[str, object]) -> str:
    """SHA-256 of key fields (canonical JSON): the name an entry with these fields is stored under."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def remove_orphaned_temps(folder: str | os.PathLike, suffixes: tuple[str, ...], recursive: bool = False) -> list[Path]:
    """Delete the temp files that runs of ours no longer alive left in a cache folder (and its subfolders)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    folders = [folder, *(p for p in folder.rglob("*") if p.is_dir())] if recursive else [folder]
    return [path for sub in folders for path in remove_stale_temps(sub, suffixes)]


FileStamp = tuple[int, int, int, int, int]


def file_stamp(st: os.stat_result) -> FileStamp:
    """What an in-place rewrite cannot keep: device, inode, size, mtime and ctime (no tool sets ctime back)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _steady_stamp(before: os.stat_result, after: os.stat_result) -> FileStamp | None:
    """The stamp of a file read between two fstats, or None if it changed meanwhile or changed too recently."""
    stamp = file_stamp(before)
    if stamp != file_stamp(after) or time.time() - max(stamp[3], stamp[4]) / 1e9 <= RACY_SECONDS:
        return None
    return stamp


def stamped_sha256(path: str | os.PathLike) -> tuple[str, FileStamp | None]:
    """SHA-256 of a file and the stamp it had while hashed (fstat of the open file before and after), or None
    as the stamp when the file changed meanwhile or too recently to trust a stamp."""
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return digest, _steady_stamp(before, os.fstat(f.fileno()))


def read_hashed_stamped(path: str | os.PathLike) -> tuple[bytes, str, FileStamp | None]:
    """`read_hashed` plus the stamp the file had while read (None as in `stamped_sha256`)."""
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        data = f.read()
        return data, hashlib.sha256(data).hexdigest(), _steady_stamp(before, os.fstat(f.fileno()))


def _scratch_pattern(prefix: str) -> re.Pattern[str]:
    """Names `scratch_dir` makes (`<prefix><pid>-<8 characters>`) and older pid-less ones (`<prefix><8>`)."""
    return re.compile(rf"^{re.escape(prefix)}(?:(?P<pid>\d+)-)?[a-z0-9_]{{8}}$")


def remove_orphaned_scratch(prefix: str) -> list[Path]:
    """Delete the scratch folders (`scratch_dir(prefix)`) that runs no longer alive left in the temp folder."""
    pattern, removed = _scratch_pattern(prefix), []
    try:
        candidates = list(Path(tempfile.gettempdir()).glob(f"{prefix}*"))
    except OSError:
        return []
    for folder in candidates:
        match = pattern.match(folder.name)
        if match and folder.is_dir() and not (match.group("pid") and pid_alive(int(match.group("pid")))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder for this run (its pid in the name), removed by `cleanup()`, when released, or at exit;
    a killed run's is removed by the next call (`remove_orphaned_scratch`)."""
    remove_orphaned_scratch(prefix)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-", ignore_cleanup_errors=True)


@functools.cache
def process_fields(modules: tuple[str, ...], libraries: tuple[str, ...]) -> dict[str, object]:
    """`computation_fields` of code and libraries alone, once per process: per-item caches add their content.

    A process does not change its code or libraries while it runs; a test that simulates either clears this
    memo (`process_fields.cache_clear()`) with `code_digest`'s. Callers copy the dict before adding to it.
    """
    return computation_fields(modules, libraries)
