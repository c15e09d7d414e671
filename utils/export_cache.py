"""ONNX exports of checkpoints cached on disk, verified on every use and rebuilt when missing or corrupt.

An export is cached under `<cache>/onnx/<key>.onnx`. Its key (utils.cache_keys) covers everything
that computes it: the SHA-256 of the checkpoint bytes that were exported (read once, hashed, and
loaded from those same bytes), the test size, the frequency encoder, the digest of the repo code the
export runs, and the versions of the libraries that shape the graph. A `<key>.json` beside it
records those fields and the file's SHA-256; an entry that does not match is exported again, never used.

The checkpoint's SHA-256 is remembered in `<cache>/onnx/checkpoint_digests.json` by a stamp an
in-place rewrite cannot keep (device, inode, size, mtime, ctime), so an unchanged checkpoint is
read once, not every run. A cache that cannot be written (read-only, full, a file) is still read;
an export it cannot hold goes to a temporary folder removed when the runtime has loaded it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from utils.atomic import atomic_path, os_reason
from utils.cache_keys import (
    computation_fields,
    default_cache_dir,
    fields_digest,
    file_sha256,
    file_stamp,
    read_hashed_stamped,
    remove_orphaned_scratch,
    remove_orphaned_temps,
    scratch_dir,
    stamped_sha256,
)
from utils.errors import FSANetError

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # the entries' layout (3: keyed by utils.cache_keys.computation_fields)
# The repo code an export runs: the model (lib/__init__ imports its parts by name, so they are listed),
# checkpoint loading, BatchNorm folding (imported by utils.onnx_export) and the export itself.
EXPORT_MODULES = ("lib", "lib.fsanet", "lib.checkpoint", "lib.fast", "utils.onnx_export", "utils.export_cache")
# Every library whose code reaches the graph: the model's blocks (timm's PVT-v2 and its checkpoint filter,
# torchvision's ResNet), the exporter and its graph passes (onnxscript, onnx-ir), the file format.
EXPORT_LIBRARIES = ("torch", "torchvision", "timm", "onnx", "onnxscript", "onnx-ir", "numpy")
# An entry of a checkpoint, size and encoder that another code or library version exported, unused this long, is
# removed when this version exports them: it is never read here, and a second install sharing the cache keeps
# its own entry as long as it runs at least once in this many days.
SUPERSEDED_UNUSED_DAYS = 30
# The fields that name what was exported; the others (code digests, library versions) name who exported it.
EXPORTED = ("checkpoint_sha256", "testsize", "freq_encoder")
SCRATCH_PREFIX = "fsanet-cache-"
MEMO_NAME = "checkpoint_digests.json"


class RuntimeUnavailable(FSANetError):
    """A runtime that is not installed, cannot export or compile, or cannot run these options."""


@dataclass(frozen=True)
class ExportSpec:
    """What an exported graph depends on besides the code: the weights, the input size, the encoder."""

    checkpoint: Path
    testsize: int
    freq_encoder: str = "resnet50"


# exporter(spec, checkpoint bytes, path): writes the ONNX export of exactly those bytes to `path`; seconds taken.
Exporter = Callable[[ExportSpec, bytes, Path], float]


class DigestMemo:
    """Checkpoint digests remembered in a JSON file by a stamp no in-place rewrite keeps (utils.cache_keys)."""

    def __init__(self, file: Path) -> None:
        """Digests live in `file` (a damaged or unwritable one only costs a hash)."""
        self.file = file

    def _entries(self) -> dict:
        """The remembered entries by resolved path ({} when the file is missing or damaged)."""
        try:
            memo = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return {}
        return memo if isinstance(memo, dict) else {}

    def lookup(self, path: Path) -> str | None:
        """The remembered SHA-256 of `path` if the file still has the stamp it had when hashed, else None."""
        try:
            stamp = list(file_stamp(os.stat(path)))
        except OSError:
            return None
        entry = self._entries().get(str(path.resolve()))
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        return None

    def remember(self, path: Path, digest: str, stamp: tuple[int, ...] | None) -> None:
        """Remember `digest` for `path` under `stamp` (None: the file was changing, nothing is remembered)."""
        if stamp is None:
            return
        memo = self._entries()
        memo[str(path.resolve())] = {"stamp": list(stamp), "sha256": digest}
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.file) as tmp:
                tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
        except OSError as e:  # only a speed-up is lost
            log.debug("could not remember the digest of %s in %s: %s", path, self.file, e)

    def sha256(self, path: Path) -> str:
        """SHA-256 of `path`: remembered, or hashed from the open file (and remembered if it held still)."""
        digest = self.lookup(path)
        if digest is None:
            digest, stamp = stamped_sha256(path)
            self.remember(path, digest, stamp)
        return digest

    def read(self, path: Path) -> tuple[bytes, str]:
        """The bytes of `path` and their SHA-256, from one read (remembered if the file held still)."""
        data, digest, stamp = read_hashed_stamped(path)
        self.remember(path, digest, stamp)
        return data, digest


def _mark_used(record_path: Path) -> None:
    """Stamp an entry's record (not its model: OpenVINO's blobs are keyed by the model file's time) with the time
    of this use; remove_superseded spares entries used recently. A read-only cache is left as it is."""
    with contextlib.suppress(OSError):
        os.utime(record_path)


def _checkpoint_error(spec: ExportSpec, error: OSError | None = None) -> FSANetError:
    """The CheckpointError of a checkpoint that is missing or cannot be read."""
    from lib.checkpoint import CheckpointError

    if error is None or isinstance(error, FileNotFoundError):
        return CheckpointError(f"checkpoint not found: {spec.checkpoint}")
    return CheckpointError(f"{spec.checkpoint}: cannot read the checkpoint ({os_reason(error)})")


def cache_fields(spec: ExportSpec, checkpoint_sha256: str) -> dict[str, object]:
    """Everything the export of `spec` (whose checkpoint bytes hash to `checkpoint_sha256`) depends on."""
    return computation_fields(EXPORT_MODULES, EXPORT_LIBRARIES, format=CACHE_FORMAT,
                              checkpoint_sha256=checkpoint_sha256, testsize=spec.testsize,
                              freq_encoder=spec.freq_encoder)


def cache_key(fields: dict[str, object]) -> str:
    """A file name for the entry with these fields."""
    return f"fsanet-{fields['freq_encoder']}-{fields['testsize']}-{fields_digest(fields)[:20]}"


def export_checkpoint(spec: ExportSpec, weights: bytes, path: Path) -> float:
    """Build FSANet from the checkpoint bytes `weights` (weights_only) and write its ONNX export to `path`."""
    from lib import fsanet_from_checkpoint
    from utils.onnx_export import ExportError, export_onnx

    model = fsanet_from_checkpoint(weights, spec.freq_encoder, str(spec.checkpoint))
    try:
        return export_onnx(model, path, spec.testsize)
    except (ExportError, ImportError) as e:
        raise RuntimeUnavailable(f"exporting {spec.checkpoint} to ONNX failed ({e}); use --runtime torch") from None


class ExportCache:
    """ONNX exports of checkpoints on disk: verified on every use, rebuilt when missing or corrupt."""

    def __init__(self, root: str | os.PathLike | None = None, exporter: Exporter | None = None) -> None:
        """Entries live in `root/onnx/` (default root: utils.cache_keys.default_cache_dir());
        `exporter(spec, weights, path)` writes one (default: export_checkpoint; tests may replace it)."""
        self.root = Path(root) if root is not None else default_cache_dir()
        self.folder = self.root / "onnx"
        self.exporter = exporter or export_checkpoint
        self.memo = DigestMemo(self.folder / MEMO_NAME)
        self.last_export_seconds: float | None = None
        self.scratch: tempfile.TemporaryDirectory | None = None
        try:  # what a killed or failed run left: half-written exports and records, temporary exports
            remove_orphaned_temps(self.folder, (".onnx", ".json"))
            remove_orphaned_scratch(SCRATCH_PREFIX)
        except OSError as e:  # an unreadable folder holds no entry either
            log.debug("could not look for temporary files in %s: %s", self.folder, e)

    def paths(self, fields: dict[str, object], folder: Path | None = None) -> tuple[Path, Path]:
        """(model file, record file) of the entry with these fields (in `folder`, default the cache's)."""
        key = cache_key(fields)
        folder = self.folder if folder is None else folder
        return folder / f"{key}.onnx", folder / f"{key}.json"

    def fields(self, spec: ExportSpec) -> dict[str, object]:
        """cache_fields of `spec`, with the checkpoint's digest remembered in this cache."""
        try:
            return cache_fields(spec, self.memo.sha256(Path(spec.checkpoint)))
        except OSError as e:
            raise _checkpoint_error(spec, e) from None

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
            return self.rebuild(spec, problem), None
        log.debug("ONNX cache hit: %s", model_path)
        _mark_used(record_path)
        # hashlib and file reads release the GIL: the check runs beside the caller's compile.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-checksum")
        future = pool.submit(self.check, fields, model_path, record_path)
        pool.shutdown(wait=False)
        return model_path, future

    def rebuild(self, spec: ExportSpec, problem: str) -> Path:
        """Export `spec` again (its entry is missing, foreign or corrupt: `problem` says which).

        The checkpoint is read once: the entry's key names the digest of the very bytes the model is built
        from, even when the file is rewritten meanwhile. A cache that cannot take the file (full,
        read-only) costs no run: the export goes to a temporary folder instead, with one warning.
        """
        try:
            weights, digest = self.memo.read(Path(spec.checkpoint))
        except OSError as e:
            raise _checkpoint_error(spec, e) from None
        fields = cache_fields(spec, digest)
        log.info("exporting %s to ONNX at %d x %d (%s; once per checkpoint and size, about 15 s on 2 cores)",
                 spec.checkpoint, spec.testsize, spec.testsize, problem)
        try:
            path = self._export_into(self.folder, spec, weights, fields)
        except OSError as e:
            cache_error = e
        else:
            self.remove_superseded(fields, path)
            return path
        try:
            path = self._export_into(self.scratch_folder(), spec, weights, fields)
        except OSError as e:
            raise RuntimeUnavailable(f"cannot write the ONNX export of {spec.checkpoint}: {self.folder}: "
                                     f"{os_reason(cache_error)}, and the temporary folder: {os_reason(e)}; "
                                     "free some space, pass a writable --cache_dir, or use --runtime torch") from None
        log.warning("cannot write the ONNX export to the cache %s (%s): exported to a temporary folder for this "
                    "run only; free some space or pass a writable --cache_dir to keep it",
                    self.folder, os_reason(cache_error))
        return path

    def _export_into(self, folder: Path, spec: ExportSpec, weights: bytes, fields: dict[str, object]) -> Path:
        """Export `weights` as the entry `fields` in `folder` (model first, then its record); its model path."""
        model_path, record_path = self.paths(fields, folder)
        with atomic_path(model_path) as tmp:
            seconds = self.exporter(spec, weights, tmp)
            record = dict(fields, onnx_sha256=file_sha256(tmp), onnx_bytes=tmp.stat().st_size,
                          export_seconds=round(seconds, 2))
        # The record goes last: a reader that finds it also finds the complete model it describes.
        with atomic_path(record_path) as tmp:
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        self.last_export_seconds = seconds
        return model_path

    def remove_superseded(self, fields: dict[str, object], keep: Path) -> None:
        """Delete the entries of the export `fields` names (checkpoint, size, encoder) that other code or library
        versions made and nobody used for SUPERSEDED_UNUSED_DAYS; `keep` is the entry just written."""
        cutoff = time.time() - SUPERSEDED_UNUSED_DAYS * 86400
        for record_path in self.folder.glob("fsanet-*.json"):
            model_path = record_path.with_suffix(".onnx")
            try:
                record = json.loads(record_path.read_text())
                if (model_path == keep or not isinstance(record, dict)
                        or any(record.get(k) != fields[k] for k in EXPORTED) or record_path.stat().st_mtime > cutoff):
                    continue
                model_path.unlink(missing_ok=True)  # the model first: a record alone is a miss, never a use
                record_path.unlink()
            except (OSError, ValueError) as e:
                log.debug("left %s in the cache: %s", record_path.name, e)
                continue
            log.info("removed %s from the ONNX cache: the same checkpoint and size exported by other code or library "
                     "versions, unused for %d days", model_path.name, SUPERSEDED_UNUSED_DAYS)

    def scratch_folder(self) -> Path:
        """This run's temporary folder for an export the cache cannot hold (made on first use)."""
        if self.scratch is None:
            self.scratch = scratch_dir(SCRATCH_PREFIX)
        return Path(self.scratch.name)

    def in_cache(self, model_path: Path) -> bool:
        """True for an entry of the cache folder, False for one in this run's temporary folder."""
        return model_path.parent == self.folder

    def release_scratch(self) -> None:
        """Remove this run's temporary folder (once the runtime has loaded what it held)."""
        if self.scratch is not None:
            self.scratch.cleanup()
            self.scratch = None

    def recorded_sha256(self, model_path: Path) -> str | None:
        """The SHA-256 the record of the entry at `model_path` gives its model file, or None."""
        try:
            digest = json.loads(model_path.with_suffix(".json").read_text()).get("onnx_sha256")
        except (OSError, ValueError, AttributeError):
            return None
        return digest if isinstance(digest, str) else None

    def recorded_digests(self) -> set[str]:
        """The model SHA-256 of every entry the cache folder holds (by their records)."""
        try:
            return {d for p in self.folder.glob("*.onnx") if (d := self.recorded_sha256(p)) is not None}
        except OSError:
            return set()

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
