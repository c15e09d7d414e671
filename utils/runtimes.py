"""FSANet's P1 logits under OpenVINO or onnxruntime, from an ONNX export cached on disk.

A runner has the interface test.py's pipeline uses of the PyTorch model: `eval()` and
`predict(images) -> logits` (B x 3 x S x S normalised float32 in, B x 1 x S x S float32 torch
tensor out), so pre- and post-processing stay the release's. The export is cached under
`<cache>/onnx/<key>.onnx`, keyed by the checkpoint's content, the test size, the frequency encoder,
the model code and the exporting libraries' versions; a `<key>.json` beside it records those fields
and the file's SHA-256, and an entry that does not match is exported again, never used.
OpenVINO's own compile cache goes to `<cache>/openvino/`.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.atomic import atomic_path
from utils.errors import FSANetError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
CACHE_FORMAT = 2  # bump when the cache's layout or the export's meaning changes (2: opset 17)
EXPORT_LIBRARIES = ("torch", "onnx", "onnxscript")
# The code that defines the exported graph: an edit to any of it invalidates every entry.
GRAPH_SOURCES = ("lib", "utils/onnx_export.py")
ROOT = Path(__file__).resolve().parents[1]
# OpenVINO's CPU plugin defaults to bf16 where the CPU has AMX/AVX512-BF16; fp32 must be asked for.
OPENVINO_PRECISION = {None: "f32", "none": "f32", "bf16": "bf16"}


class RuntimeUnavailable(FSANetError):
    """A runtime that is not installed, cannot export or compile, or cannot run these options."""


@dataclass(frozen=True)
class ExportSpec:
    """What an exported graph depends on besides the code: the weights, the input size, the encoder."""

    checkpoint: Path
    testsize: int
    freq_encoder: str = "resnet50"


def choose_runtime(requested: str, device: torch.device) -> str:
    """The runtime `auto` means on `device` (OpenVINO on a CPU, PyTorch on CUDA); others as given."""
    if requested == "auto":
        return "openvino" if device.type == "cpu" else "torch"
    return requested


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/fsanet`, else `~/.cache/fsanet`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fsanet"


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


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


def cache_fields(spec: ExportSpec) -> dict[str, object]:
    """Everything an export depends on; entries whose recorded fields differ are never used."""
    if not Path(spec.checkpoint).is_file():
        from lib.checkpoint import CheckpointError
        raise CheckpointError(f"checkpoint not found: {spec.checkpoint}")
    fields: dict[str, object] = {"format": CACHE_FORMAT, "checkpoint_sha256": file_sha256(spec.checkpoint),
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

    def get(self, spec: ExportSpec) -> Path:
        """The verified ONNX file of `spec`, exporting it first when there is no sound entry."""
        fields = cache_fields(spec)
        model_path, record_path = self.paths(fields)
        problem = self.check(fields, model_path, record_path)
        self.last_export_seconds = None
        if problem is None:
            log.debug("ONNX cache hit: %s", model_path)
            return model_path
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
    def check(fields: dict[str, object], model_path: Path, record_path: Path) -> str | None:
        """None when the entry is sound for `fields`, else why it is not."""
        try:
            record = json.loads(record_path.read_text())
        except FileNotFoundError:
            return "no cache entry"
        except (OSError, ValueError) as e:
            return f"unreadable cache record {record_path.name} ({e})"
        if not isinstance(record, dict) or any(record.get(k) != v for k, v in fields.items()):
            return f"cache record {record_path.name} is for another checkpoint, size or version"
        try:
            size_differs = model_path.stat().st_size != record.get("onnx_bytes")
            if size_differs or file_sha256(model_path) != record.get("onnx_sha256"):
                return f"cache entry {model_path.name} is corrupt (size or checksum differs)"
        except OSError:
            return f"cache entry {model_path.name} is missing"
        return None


class OpenVINORunner:
    """An ONNX export compiled by OpenVINO for the CPU; `predict` returns P1 logits as a torch tensor."""

    name = "openvino"

    def __init__(self, onnx_path: Path, testsize: int, precision: str = "f32",
                 compile_cache: Path | None = None) -> None:
        """Compile `onnx_path` with `precision` ("f32" or "bf16") using OpenVINO's cache in `compile_cache`."""
        import openvino as ov

        core = ov.Core()
        if compile_cache is not None:
            core.set_property({"CACHE_DIR": str(compile_cache)})
        start = time.perf_counter()
        try:
            self.compiled = core.compile_model(str(onnx_path), "CPU", {
                "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})
        except RuntimeError as e:
            raise RuntimeUnavailable(f"OpenVINO could not compile {onnx_path}: {_first_line(e)}") from None
        self.compile_seconds = time.perf_counter() - start
        shape = self.compiled.input(0).get_partial_shape()
        self.batch = shape[0].get_length() if shape[0].is_static else None
        _check_input_size(onnx_path, [d.get_length() if d.is_static else -1 for d in shape][2:], testsize)
        self.request = self.compiled.create_infer_request()

    def eval(self) -> OpenVINORunner:
        """No-op (the pipeline calls it on PyTorch models)."""
        return self

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S float32 -> B x 1 x S x S P1 logits (one image per request for a batch-1 export)."""
        chunks = images.split(self.batch) if self.batch else (images,)
        out = []
        for chunk in chunks:
            result = self.request.infer({0: np.ascontiguousarray(chunk.detach().float().cpu().numpy())})
            # The request reuses its output buffer on the next call: copy.
            out.append(torch.from_numpy(np.array(result[0], dtype=np.float32, copy=True)))
        return torch.cat(out)


class OnnxRuntimeRunner:
    """An ONNX export under onnxruntime's CPU provider; `predict` returns P1 logits as a torch tensor."""

    name = "onnxruntime"

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

    def eval(self) -> OnnxRuntimeRunner:
        """No-op (the pipeline calls it on PyTorch models)."""
        return self

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S float32 -> B x 1 x S x S P1 logits."""
        chunks = images.split(self.batch) if self.batch else (images,)
        out = [self.session.run(None, {self.input_name: np.ascontiguousarray(c.detach().float().cpu().numpy())})[0]
               for c in chunks]
        return torch.from_numpy(np.concatenate(out))


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
                cache_dir: str | os.PathLike | None = None) -> OpenVINORunner | OnnxRuntimeRunner:
    """The cached export of `spec`, compiled for `runtime` ("openvino" or "onnxruntime")."""
    if runtime not in ("openvino", "onnxruntime"):
        raise ValueError(f"no exported runner for runtime {runtime!r}")
    if runtime == "onnxruntime" and amp not in (None, "none"):
        raise RuntimeUnavailable(f"--amp {amp} with --runtime onnxruntime: its CPU provider runs float32 only; "
                                 "use --runtime openvino (bf16) or drop --amp")
    if amp not in OPENVINO_PRECISION:
        raise RuntimeUnavailable(f"--amp {amp} with --runtime {runtime}: only bf16 is supported on the CPU")
    _require(runtime, runtime)
    root = usable_cache_dir(cache_dir)
    model_path = ExportCache(root).get(spec)
    if runtime == "openvino":
        return OpenVINORunner(model_path, spec.testsize, OPENVINO_PRECISION[amp], root / "openvino")
    return OnnxRuntimeRunner(model_path, spec.testsize)


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
