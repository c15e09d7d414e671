"""ONNX exports of checkpoints cached on disk, verified on every use and rebuilt when missing or corrupt.

An export is cached under `<cache>/onnx/<key>.onnx`, keyed by the checkpoint's content, the test
size, the frequency encoder, the model code and the exporting libraries' versions; a `<key>.json`
beside it records those fields and the file's SHA-256, and an entry that does not match is exported
again, never used. The checkpoint's SHA-256 is remembered in `<cache>/onnx/checkpoint_digests.json`
by path, size, modification time and inode, so an unchanged checkpoint is read once, not every run.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from utils.atomic import atomic_path
from utils.cache_keys import default_cache_dir, file_sha256
from utils.errors import FSANetError

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the cache's layout or the export's meaning changes (2: opset 17)
EXPORT_LIBRARIES = ("torch", "onnx", "onnxscript")
# The code that defines the exported graph: an edit to any of it invalidates every entry.
GRAPH_SOURCES = ("lib", "utils/onnx_export.py")
ROOT = Path(__file__).resolve().parents[1]
# A file changed this soon before it was hashed may change again within the clock's coarse step while
# keeping its size and time stamp (git's "racy" case): its digest is not remembered.
RACY_SECONDS = 2.0


class RuntimeUnavailable(FSANetError):
    """A runtime that is not installed, cannot export or compile, or cannot run these options."""


@dataclass(frozen=True)
class ExportSpec:
    """What an exported graph depends on besides the code: the weights, the input size, the encoder."""

    checkpoint: Path
    testsize: int
    freq_encoder: str = "resnet50"


def usable_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` (or the default) when it can be written, else a fresh temporary folder, with a warning."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
        return root
    except OSError as e:
        fallback = Path(tempfile.mkdtemp(prefix="fsanet-cache-"))
        log.warning("cache folder %s is not writable (%s); using %s for this run (pass --cache_dir)",
                    root, e.strerror or e, fallback)
        return fallback


def remembered_sha256(path: Path, memo_file: Path) -> str:
    """SHA-256 of `path`, read from `memo_file` when the file's size, time stamp and inode are those hashed."""
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    memo = memo if isinstance(memo, dict) else {}
    entry = memo.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = file_sha256(path)
    if time.time() - st.st_mtime_ns / 1e9 > RACY_SECONDS:
        memo[key] = {"stamp": stamp, "sha256": digest}
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(memo_file) as tmp:
                tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
        except OSError as e:  # only a speed-up is lost
            log.debug("could not remember the digest of %s in %s: %s", path, memo_file, e)
    return digest


def package_version(name: str) -> str:
    """Installed version of distribution `name` (without importing it), or "none"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def source_digest(root: Path = ROOT) -> str:
    """SHA-256 over the Python sources that define the exported graph."""
    digest = hashlib.sha256()
    for name in GRAPH_SOURCES:
        path = root / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def cache_fields(spec: ExportSpec, memo_file: Path | None = None) -> dict[str, object]:
    """Everything an export depends on; entries whose recorded fields differ are never used."""
    checkpoint = Path(spec.checkpoint)
    if not checkpoint.is_file():
        from lib.checkpoint import CheckpointError
        raise CheckpointError(f"checkpoint not found: {spec.checkpoint}")
    weights = remembered_sha256(checkpoint, memo_file) if memo_file is not None else file_sha256(checkpoint)
    fields: dict[str, object] = {"format": CACHE_FORMAT, "checkpoint_sha256": weights,
                                 "testsize": spec.testsize, "freq_encoder": spec.freq_encoder,
                                 "code_sha256": source_digest()}
    fields.update({name: package_version(name) for name in EXPORT_LIBRARIES})
    return fields


def cache_key(fields: dict[str, object]) -> str:
    """A file name for the entry with these fields."""
    blob = json.dumps(fields, sort_keys=True).encode()
    return f"fsanet-{fields['freq_encoder']}-{fields['testsize']}-{hashlib.sha256(blob).hexdigest()[:20]}"


def export_checkpoint(spec: ExportSpec, path: Path) -> float:
    """Load the checkpoint (lib.checkpoint, weights_only) and write its ONNX export to `path`; seconds taken."""
    from lib import FSANet, load_checkpoint
    from utils.onnx_export import ExportError, export_onnx

    model = load_checkpoint(FSANet(freq_encoder=spec.freq_encoder), spec.checkpoint)
    try:
        return export_onnx(model, path, spec.testsize)
    except (ExportError, ImportError) as e:
        raise RuntimeUnavailable(f"exporting {spec.checkpoint} to ONNX failed ({e}); use --runtime torch") from None


class ExportCache:
    """ONNX exports of checkpoints on disk: verified on every use, rebuilt when missing or corrupt."""

    def __init__(self, root: Path, exporter: Callable[[ExportSpec, Path], float] = export_checkpoint) -> None:
        """Entries live in `root/onnx/`; `exporter(spec, path)` writes one (tests may replace it)."""
        self.folder = root / "onnx"
        self.exporter = exporter
        self.last_export_seconds: float | None = None

    def paths(self, fields: dict[str, object]) -> tuple[Path, Path]:
        """(model file, record file) of the entry with these fields."""
        key = cache_key(fields)
        return self.folder / f"{key}.onnx", self.folder / f"{key}.json"

    def fields(self, spec: ExportSpec) -> dict[str, object]:
        """cache_fields of `spec`, with the checkpoint's digest remembered in this cache."""
        return cache_fields(spec, self.folder / "checkpoint_digests.json")

    def get(self, spec: ExportSpec) -> Path:
        """The verified ONNX file of `spec`, exporting it first when there is no sound entry."""
        path, checksum = self.get_checking(spec)
        problem = checksum.result() if checksum is not None else None
        return self.rebuild(spec, problem) if problem else path

    def get_checking(self, spec: ExportSpec) -> tuple[Path, Future[str | None] | None]:
        """The entry's file at once and, when it was not just exported, its checksum check running in a thread.

        The future gives None when the file is sound, else why not (then call `rebuild`): the caller
        can compile the file meanwhile and must not use what it compiled unless the check passed.
        """
        self.last_export_seconds = None
        fields = self.fields(spec)
        model_path, record_path = self.paths(fields)
        problem = self.check(fields, model_path, record_path, checksum=False)
        if problem is not None:
            return self.rebuild(spec, problem, fields), None
        log.debug("ONNX cache hit: %s", model_path)
        # hashlib and file reads release the GIL: the check runs beside the caller's compile.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-checksum")
        future = pool.submit(self.check, fields, model_path, record_path)
        pool.shutdown(wait=False)
        return model_path, future

    def rebuild(self, spec: ExportSpec, problem: str, fields: dict[str, object] | None = None) -> Path:
        """Export `spec` again (its entry is missing, foreign or corrupt: `problem` says which)."""
        fields = fields if fields is not None else self.fields(spec)
        model_path, record_path = self.paths(fields)
        log.info("exporting %s to ONNX at %d x %d (%s; once per checkpoint and size, about half a minute)",
                 spec.checkpoint, spec.testsize, spec.testsize, problem)
        with atomic_path(model_path) as tmp:
            seconds = self.exporter(spec, tmp)
            record = dict(fields, onnx_sha256=file_sha256(tmp), onnx_bytes=tmp.stat().st_size,
                          export_seconds=round(seconds, 2))
        # The record goes last: a reader that finds it also finds the complete model it describes.
        with atomic_path(record_path) as tmp:
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        self.last_export_seconds = seconds
        return model_path

    @staticmethod
    def check(fields: dict[str, object], model_path: Path, record_path: Path, checksum: bool = True) -> str | None:
        """None when the entry is sound for `fields` (its SHA-256 compared too with `checksum`), else why not."""
        try:
            record = json.loads(record_path.read_text())
        except FileNotFoundError:
            return "no cache entry"
        except (OSError, ValueError) as e:
            return f"unreadable cache record {record_path.name} ({e})"
        if not isinstance(record, dict) or any(record.get(k) != v for k, v in fields.items()):
            return f"cache record {record_path.name} is for another checkpoint, size or version"
        try:
            if model_path.stat().st_size != record.get("onnx_bytes"):
                return f"cache entry {model_path.name} is corrupt (its size differs)"
            if checksum and file_sha256(model_path) != record.get("onnx_sha256"):
                return f"cache entry {model_path.name} is corrupt (its checksum differs)"
        except OSError:
            return f"cache entry {model_path.name} is missing"
        return None
