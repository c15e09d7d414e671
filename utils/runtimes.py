"""FSANet's P1 logits under OpenVINO or onnxruntime, from an ONNX export cached on disk.

A runner has the interface test.py's pipeline uses of the PyTorch model: `eval()` and
`predict(images) -> logits` (B x 3 x S x S normalised float32 in, B x 1 x S x S float32 torch
tensor out), so pre- and post-processing stay the release's. The ONNX file comes from
utils.export_cache; OpenVINO's own compile cache goes to `<cache>/openvino/<ONNX SHA-256>-<openvino
version>/`, so a compiled blob is only ever reused for the bytes it was compiled from; the folders of
exports the cache no longer holds are removed, and so is a blob compiled from an entry found corrupt.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from utils.cache_keys import library_versions
from utils.errors import RunError
from utils.export_cache import ExportCache, ExportSpec, RuntimeUnavailable

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
# OpenVINO's CPU plugin defaults to bf16 where the CPU has AMX/AVX512-BF16; fp32 must be asked for.
OPENVINO_PRECISION = {None: "f32", "none": "f32", "bf16": "bf16"}


def choose_runtime(requested: str, device: torch.device) -> str:
    """The runtime `auto` means on `device` (OpenVINO on a CPU, PyTorch on CUDA); others as given."""
    if requested == "auto":
        return "openvino" if device.type == "cpu" else "torch"
    return requested


class ExportedRunner:
    """What the OpenVINO and onnxruntime runners share: eval(), and predict() over batch-sized chunks.

    A subclass sets `name`, `source` (the ONNX file), `batch` (the export's static batch, or None),
    `faults` (the exception types its runtime raises while running) and `_run(array) -> logits array`.
    """

    name = "exported"
    faults: tuple[type[BaseException], ...] = (RuntimeError,)
    source: Path
    batch: int | None

    def eval(self) -> ExportedRunner:
        """No-op (the pipeline calls it on PyTorch models)."""
        return self

    def _run(self, images: np.ndarray) -> np.ndarray:
        """P1 logits of one chunk (a float32 array of at most `batch` images) as a new array."""
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S float32 -> B x 1 x S x S P1 logits; a failure while running is a RuntimeFault (exit 1)."""
        chunks = images.split(self.batch) if self.batch else (images,)
        out = []
        for chunk in chunks:
            try:
                out.append(self._run(np.ascontiguousarray(chunk.detach().float().cpu().numpy())))
            except self.faults as e:
                raise RuntimeFault(self.name, self.source, e) from None
        return torch.from_numpy(np.concatenate(out))


class OpenVINORunner(ExportedRunner):
    """An ONNX export compiled by OpenVINO for the CPU; `predict` returns P1 logits as a torch tensor."""

    name = "openvino"

    def __init__(self, onnx_path: Path, testsize: int, precision: str = "f32",
                 compile_cache: Path | None = None) -> None:
        """Compile `onnx_path` with `precision` ("f32" or "bf16") using OpenVINO's cache in `compile_cache`."""
        start = time.perf_counter()
        self.compiled = _compile_openvino(onnx_path, precision, compile_cache)
        self.compile_seconds = time.perf_counter() - start
        shape = self.compiled.input(0).get_partial_shape()
        self.batch = shape[0].get_length() if shape[0].is_static else None
        _check_input_size(onnx_path, [d.get_length() if d.is_static else -1 for d in shape][2:], testsize)
        with kept_signal_stack():
            self.request = self.compiled.create_infer_request()
        self.source = onnx_path

    def _run(self, images: np.ndarray) -> np.ndarray:
        """One infer request (one image per request for a batch-1 export)."""
        with kept_signal_stack():
            result = self.request.infer({0: images})
        # The request reuses its output buffer on the next call: copy.
        return np.array(result[0], dtype=np.float32, copy=True)


class OnnxRuntimeRunner(ExportedRunner):
    """An ONNX export under onnxruntime's CPU provider; `predict` returns P1 logits as a torch tensor."""

    name = "onnxruntime"
    faults = (Exception,)  # onnxruntime raises its own exception types per failure

    def __init__(self, onnx_path: Path, testsize: int, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        """Load `onnx_path` into an inference session (fp32) on `providers`."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        start = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own exception types per failure
            raise RuntimeUnavailable(f"onnxruntime could not load {onnx_path}: {_first_line(e)}") from None
        self.compile_seconds = time.perf_counter() - start
        shape = self.session.get_inputs()[0].shape
        self.batch = shape[0] if isinstance(shape[0], int) else None
        _check_input_size(onnx_path, [d if isinstance(d, int) else -1 for d in shape][2:], testsize)
        self.input_name = self.session.get_inputs()[0].name
        self.source = onnx_path

    def _run(self, images: np.ndarray) -> np.ndarray:
        """One session run."""
        return self.session.run(None, {self.input_name: images})[0]


class _SignalStack(ctypes.Structure):
    """POSIX stack_t, for sigaltstack(2)."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, loaded once (kept_signal_stack runs around every OpenVINO inference)."""
    return ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def kept_signal_stack() -> Iterator[None]:
    """Restore the calling thread's alternate signal stack after the block.

    OpenVINO's CPU plugin points the calling thread's alternate signal stack at memory of its own and frees that
    memory with the plugin; Python's handlers run on that stack (SA_ONSTACK), so the next SIGCHLD (a DataLoader
    worker or any child process ending) would then kill the process with SIGSEGV.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = _libc()
    saved = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(saved), None)


def _compile_openvino(onnx_path: Path, precision: str, compile_cache: Path | None) -> object:
    """`onnx_path` compiled by OpenVINO for the CPU; without its cache when the cache folder cannot be used."""
    with kept_signal_stack():
        return _compile_openvino_here(onnx_path, precision, compile_cache)


def _compile_openvino_here(onnx_path: Path, precision: str, compile_cache: Path | None) -> object:
    """_compile_openvino's work, on whatever signal stack OpenVINO sets."""
    import openvino as ov

    options = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if compile_cache is not None:
        try:
            core = ov.Core()
            core.set_property({"CACHE_DIR": str(compile_cache)})
            return core.compile_model(str(onnx_path), "CPU", options)
        except RuntimeError as e:  # a full or read-only cache folder: the compile itself may still work
            log.debug("OpenVINO failed with its compile cache in %s (%s); compiling without it",
                      compile_cache, _first_line(e))
    try:
        return ov.Core().compile_model(str(onnx_path), "CPU", options)
    except RuntimeError as e:
        raise RuntimeUnavailable(f"OpenVINO could not compile {onnx_path}: {_first_line(e)}") from None


class RuntimeFault(RunError):
    """An exported runtime failed while running (after compiling): exit 1, the maps already written kept."""

    def __init__(self, runtime: str, source: Path, error: BaseException) -> None:
        """Name the runtime, its model file and the first line of its error."""
        super().__init__(f"{runtime} failed while running {source}: {_first_line(error)}; "
                         "rerun with --runtime torch --skip_existing to finish")


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _check_input_size(onnx_path: Path, spatial: list[int], testsize: int) -> None:
    """Refuse a graph whose input is not testsize x testsize (an export for another size)."""
    if spatial != [testsize, testsize]:
        raise RuntimeUnavailable(f"{onnx_path} takes {spatial} inputs, not {testsize} x {testsize}; "
                                 "export it again for this --testsize")


def _require(package: str, runtime: str) -> None:
    """Raise RuntimeUnavailable naming the package when `runtime`'s package is not installed."""
    if importlib.util.find_spec(package) is None:
        raise RuntimeUnavailable(f"--runtime {runtime}: the {package} package is not installed "
                                 f"(pip install {package}, or use --runtime torch)")


def load_runner(runtime: str, spec: ExportSpec, amp: str | None = None,
                cache_dir: str | os.PathLike | None = None) -> ExportedRunner:
    """The cached export of `spec`, compiled for `runtime` ("openvino" or "onnxruntime")."""
    if runtime not in ("openvino", "onnxruntime"):
        raise ValueError(f"no exported runner for runtime {runtime!r}")
    if runtime == "onnxruntime" and amp not in (None, "none"):
        raise RuntimeUnavailable(f"--amp {amp} with --runtime onnxruntime: its CPU provider runs float32 only; "
                                 "use --runtime openvino (bf16) or drop --amp")
    if amp not in OPENVINO_PRECISION:
        raise RuntimeUnavailable(f"--amp {amp} with --runtime {runtime}: only bf16 is supported on the CPU")
    _require(runtime, runtime)
    cache = ExportCache(cache_dir)
    try:
        return _load_checked(runtime, cache, spec, amp)
    finally:
        cache.release_scratch()  # a temporary export is no longer needed once loaded


def _load_checked(runtime: str, cache: ExportCache, spec: ExportSpec, amp: str | None) -> ExportedRunner:
    """The entry of `spec` compiled while its checksum is checked; exported and compiled again if corrupt."""
    model_path, checksum = cache.get_checking(spec)
    compiles = runtime == "openvino"  # onnxruntime keeps no compile cache
    fresh = cache.last_export_seconds is not None
    compile_dir = compile_cache_dir(cache, model_path, fresh) if compiles else None
    runner, error = None, None
    try:
        runner = _compile(runtime, model_path, spec.testsize, amp, compile_dir)
    except RuntimeUnavailable as e:
        error = e  # a corrupt file may be the cause: the checksum says
    problem = checksum.result() if checksum is not None else None
    if problem is not None:  # what was compiled came from a corrupt entry: its blob goes; export and compile again
        runner = None
        if compile_dir is not None:
            shutil.rmtree(compile_dir, ignore_errors=True)
        model_path = cache.rebuild(spec, problem)
        compile_dir = compile_cache_dir(cache, model_path, fresh=True) if compiles else None
        return _compile(runtime, model_path, spec.testsize, amp, compile_dir)
    if error is not None:
        raise error
    return runner


def compile_folder_name(onnx_sha256: str) -> str:
    """The compile cache folder of an ONNX file: its content digest and the OpenVINO version."""
    return f"{onnx_sha256[:32]}-openvino-{library_versions(['openvino'])['openvino']}"


def compile_cache_dir(cache: ExportCache, model_path: Path, fresh: bool = False) -> Path | None:
    """OpenVINO's compile cache folder for the entry at `model_path` (emptied when the entry is `fresh`ly
    exported); the folders of entries the cache no longer holds go. None for an entry in this run's
    temporary folder, or when the folder cannot be made (OpenVINO then compiles without a cache)."""
    digest = cache.recorded_sha256(model_path)
    if digest is None or not cache.in_cache(model_path):
        return None
    base, name = cache.root / "openvino", compile_folder_name(digest)
    keep = {compile_folder_name(d) for d in cache.recorded_digests()} | {name}
    _remove_all_but(base, keep if not fresh else keep - {name})
    try:
        (base / name).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.debug("no OpenVINO compile cache (%s: %s)", base / name, e)
        return None
    return base / name


def _remove_all_but(folder: Path, keep: set[str]) -> None:
    """Delete what `folder` holds except the entries named in `keep` (errors ignored: a read-only cache)."""
    try:
        entries = [p for p in folder.iterdir() if p.name not in keep]
    except OSError:
        return
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
    if entries:
        log.debug("removed %d stale OpenVINO compile cache entries from %s", len(entries), folder)


def _compile(runtime: str, model_path: Path, testsize: int, amp: str | None,
             compile_dir: Path | None) -> ExportedRunner:
    """The ONNX file at `model_path` loaded into `runtime` (OpenVINO's compile cache in `compile_dir`)."""
    if runtime == "openvino":
        return OpenVINORunner(model_path, testsize, OPENVINO_PRECISION[amp], compile_dir)
    return OnnxRuntimeRunner(model_path, testsize)


class HFlipTTA:
    """Test-time augmentation: the mean of the logits of each image and of its mirror image."""

    def __init__(self, model: object) -> None:
        """Wrap anything with `predict(images)` (a PyTorch FSANet or a runner)."""
        self.model = model

    def eval(self) -> HFlipTTA:
        """Put the wrapped model in eval mode."""
        self.model.eval()
        return self

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(P1(x) + mirror(P1(mirror(x)))) / 2."""
        mirrored = self.model.predict(images.flip(-1)).flip(-1)
        return (self.model.predict(images).float() + mirrored.float()) / 2
