"""Shared test fixtures: the authors' reference fixtures live in ../shared/reference (read-only).

Expensive set-up is made once per session and shared, never repeated per module:
- `release_checkpoint`: a real checkpoint file in the release's layout (440 MB), for any test that needs
  FSANet weights on disk and only reads them; `release_model`: it loaded as test.py loads it, to predict with;
  `release_weights_model()`: a fresh, changeable FSANet with those weights (a copy, not a rebuild);
- `onnx_cache` and `release_export(size)`: test.py's default export cache and the release checkpoint's ONNX
  export at a size, made at most once per size (about 15 s each) by export.py's own run (`export_script_run`,
  which export.py's tests read), reused by test.py subprocesses;
- `session_dir`: the one folder those live in; it is removed when the session ends.
Tests that are not about the runtimes run test.py with `--runtime torch` (no export).
Mark `slow` every test that runs a script as a subprocess, exports to ONNX or trains (`make test-fast`).
"""
from __future__ import annotations

import contextlib
import copy
import errno
import gc
import importlib.util
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# child_env: the environment for the tests' child processes, as gpu-check builds it for its stages.
from pipelines.gpu_check import child_env, reference_fixtures  # noqa: E402, F401  (needs ROOT on sys.path)

REFERENCE = reference_fixtures()

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The suite writes and reads training checkpoints of 1.3 GB some forty times; on a disk, write-back makes each
# save seconds slower than in memory. Where /dev/shm (RAM) has room for the largest set alive at once (a few
# GB) with a margin, pytest's temporary folders go there; --basetemp or PYTEST_DEBUG_TEMPROOT choose otherwise.
MEMORY_TEMP_ROOT, MEMORY_TEMP_MIN_FREE = Path("/dev/shm"), 12 * 2**30


def memory_temp_root(root: Path = MEMORY_TEMP_ROOT, min_free: int = MEMORY_TEMP_MIN_FREE) -> Path | None:
    """`root` when it is a writable folder with at least `min_free` bytes free, else None."""
    try:
        stats = os.statvfs(root)
    except OSError:
        return None
    return root if os.access(root, os.W_OK) and stats.f_bavail * stats.f_frsize >= min_free else None


if "PYTEST_DEBUG_TEMPROOT" not in os.environ and (_memory := memory_temp_root()) is not None:
    os.environ["PYTEST_DEBUG_TEMPROOT"] = str(_memory)


def freeze_what_lives_on() -> None:
    """Collect, then freeze what is left for the rest of the session: every later full garbage collection of the
    run, run_cli's after an interrupt among them, would trace those objects again."""
    gc.collect()
    gc.freeze()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what importing the tests' libraries created (torch, timm, onnx, OpenVINO: ~10^6 objects)."""
    freeze_what_lives_on()


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's folder of shared artefacts (checkpoint, exports, caches): removed when the session ends.

    Use it for set-up that several modules share; a test's own files belong in its tmp_path.
    """
    folder = tmp_path_factory.mktemp("session")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(session_dir: Path) -> Iterator[Path]:
    """Point XDG_CACHE_HOME (test.py's and eval.py's default caches) at the session folder: never ~/.cache."""
    home = session_dir / "xdg_cache"
    home.mkdir()
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session")
def dead_pid() -> int:
    """A pid no process holds: Linux's pid_max is one past the largest pid it hands out (no child is spawned, as a
    fork after OpenVINO's and DataLoader's threads is what the temp-file tests must not depend on)."""
    return int(Path("/proc/sys/kernel/pid_max").read_text())


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The read-only folder of fixtures computed with the authors' code."""
    if not REFERENCE.is_dir():
        pytest.fail(f"reference fixtures not found at {REFERENCE}; set FSANET_REFERENCE")
    return REFERENCE


@pytest.fixture(scope="session")
def official_weights(reference_dir: Path) -> ModuleType:
    """The fixtures' weights.py: official_state_dict() and save_official_checkpoint()."""
    spec = importlib.util.spec_from_file_location("fsanet_reference_weights", reference_dir / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def release_checkpoint(session_dir: Path, official_weights: ModuleType) -> Path:
    """FSANet-100.pth as the release lays it out, with the fixtures' seed-0 weights and radius 60: written once.

    For tests that need a real checkpoint file and only read it (copy it to tmp_path to change it).
    """
    path = session_dir / "release" / "FSANet-100.pth"
    path.parent.mkdir()
    official_weights.save_official_checkpoint(path, seed=0, radius=60.0)
    return path


@pytest.fixture(scope="session")
def release_weights_model(official_weights: ModuleType) -> Callable[[], torch.nn.Module]:
    """`release_weights_model()`: a new FSANet in eval mode holding the fixtures' seed-0 weights (radius 60),
    without the inference fast paths; each call is an independent copy, free to optimise, cast or train.

    Building FSANet and generating its weights costs seconds; a copy of the one built per session does not.
    """
    from lib import FSANet
    from lib.checkpoint import convert_release_state_dict

    model = FSANet().eval()
    model.load_state_dict(convert_release_state_dict(official_weights.official_state_dict(seed=0, radius=60.0)))
    return lambda: copy.deepcopy(model)


@pytest.fixture(scope="session")
def release_model(release_checkpoint: Path) -> torch.nn.Module:
    """`release_checkpoint` loaded as test.py's PyTorch runtime loads it (CPU, eval mode, fast paths, fp32), once.

    Shared by every test that predicts with it: run it (predict, predict_jobs, autocast), never train, cast or
    change it; load your own copy for that.
    """
    from pipelines import inference

    return inference.load_model(release_checkpoint, "resnet50", torch.device("cpu"))


@pytest.fixture(scope="session")
def onnx_cache(private_cache_home: Path) -> Path:
    """The session's export cache: test.py's default folder ($XDG_CACHE_HOME/fsanet), so child processes of
    test.py with the default runtime find the exports made here. Read it; copy it to tmp_path to damage it."""
    return private_cache_home / "fsanet"


@pytest.fixture(scope="session")
def release_export(release_checkpoint: Path, onnx_cache: Path,
                   export_script_run: Callable[[int], ExportRun]) -> Callable[[int], Path]:
    """`release_export(size)`: the verified ONNX export of `release_checkpoint` at `size`, made once per size.

    The session's one export per size is export.py's own run (`export_script_run`); the cache entry holds that
    file's graph and weights in one file, as the cache's exporter writes it. Skips the test where this torch
    cannot export. Mark tests that use it `slow`.
    """
    import onnx

    from utils import export_cache

    def export(size: int) -> Path:
        run = export_script_run(size)
        assert run.code == 0, run.err

        def from_script(spec: export_cache.ExportSpec, weights: bytes, path: Path) -> float:
            onnx.save(onnx.load(str(run.path)), str(path))  # the external weights loaded back into the file
            return 0.0
        cache = export_cache.ExportCache(onnx_cache, exporter=from_script)
        return cache.get(export_cache.ExportSpec(release_checkpoint, size))
    return export


# ---- branch inffast: one export.py run per size serves export.py's tests and the session's export cache ----

@dataclass(frozen=True)
class ExportRun:
    """What export.py's main did: exit status, stdout, stderr and the ONNX file it was asked to write."""

    code: int
    out: str
    err: str
    path: Path


@pytest.fixture(scope="session")
def export_script_run(release_checkpoint: Path, session_dir: Path) -> Callable[[int], ExportRun]:
    """`export_script_run(size)`: export.py (its main, in this process) on `release_checkpoint` at `size` with
    the default flags, run once per size (about 15 s: the trace, the translation and the onnxruntime check).

    Skips the test where this torch cannot export. Mark tests that use it `slow`.
    """
    import export as export_script
    from utils import onnx_export

    runs: dict[int, ExportRun] = {}

    def run(size: int) -> ExportRun:
        if not onnx_export.export_supported():
            pytest.skip(f"ONNX export needs torch >= {onnx_export.MIN_EXPORT_TORCH}, this is {torch.__version__}")
        if size not in runs:
            path = session_dir / f"export_py_{size}" / "fsanet.onnx"
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = export_script.main(["--pth_path", str(release_checkpoint), "--testsize", str(size),
                                           "--output", str(path)])
            runs[size] = ExportRun(code, out.getvalue(), err.getvalue(), path)
            freeze_what_lives_on()  # the exporter's registries and caches (~480,000 objects)
        return runs[size]
    return run


@contextlib.contextmanager
def script_logging() -> Iterator[None]:
    """Run a script's main() in this process with its logging as in its own process: pytest's handlers on the
    root logger make the script's logging.basicConfig a no-op, so they are set aside (and put back after) and its
    log lines reach sys.stderr (capsys's) as a user sees them."""
    root = logging.getLogger()
    kept, level = root.handlers[:], root.level
    for handler in kept:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in kept:
            root.addHandler(handler)
        root.setLevel(level)


def run_script_main(capsys: pytest.CaptureFixture, main: Callable[[list[str]], int],
                    argv: list[str]) -> subprocess.CompletedProcess:
    """A script's main(argv) in this process, logging to stderr as its own process does (saves the interpreter
    start-up where the process itself is not the subject): its exit status, stdout and stderr."""
    capsys.readouterr()
    with script_logging():
        code = main(argv)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


@pytest.fixture
def one_photo(tmp_path: Path) -> Path:
    """A folder `photos` with one small image, `x.jpg` (test_inference's scene)."""
    from PIL import Image

    from tests.test_inference import scene

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(scene(40, 32)).save(folder / "x.jpg")
    return folder


@pytest.fixture
def reuse_release_model(monkeypatch: pytest.MonkeyPatch, release_checkpoint: Path,
                        release_model: torch.nn.Module) -> torch.nn.Module:
    """test.py's model loading in this test hands back the session's `release_model` for the one call it is the
    result of (load_model of `release_checkpoint`, resnet50, CPU, fp32), and loads every other call as before:
    for tests of what test.py does with a model rather than how it loads one (saves seconds a run)."""
    from pipelines import inference

    real_load = inference.load_model

    def load_model(pth_path: str | os.PathLike, freq_encoder: str, device: torch.device,
                   amp: str = "none") -> torch.nn.Module:
        if (Path(pth_path).resolve(), freq_encoder, torch.device(device), amp) == (
                release_checkpoint.resolve(), "resnet50", torch.device("cpu"), "none"):
            return release_model
        return real_load(pth_path, freq_encoder, device, amp)

    monkeypatch.setattr(inference, "load_model", load_model)
    return release_model


def read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make new files and folders under `root` fail as on a read-only mount (EROFS); reads still work.

    Simulated: the tests run as root, which ignores permission bits.
    """
    root = root.resolve()

    def guard(where: str | os.PathLike | None) -> None:
        if where is not None and Path(where).resolve().is_relative_to(root):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(where))

    real_mkstemp, real_temporary, real_mkdir = tempfile.mkstemp, tempfile.TemporaryFile, os.mkdir
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, dir=None, **k: guard(dir) or real_mkstemp(*a, dir=dir, **k))
    monkeypatch.setattr(tempfile, "TemporaryFile",
                        lambda *a, dir=None, **k: guard(dir) or real_temporary(*a, dir=dir, **k))
    monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: guard(path) or real_mkdir(path, *a, **k))
