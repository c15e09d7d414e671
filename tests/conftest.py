"""Shared test fixtures: the authors' reference fixtures live in ../shared/reference (read-only)."""
from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
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


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point XDG_CACHE_HOME (test.py's default ONNX cache) at a temporary folder: tests never write ~/.cache."""
    home = tmp_path_factory.mktemp("xdg_cache")
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
def release_ckpt_file(tmp_path_factory: pytest.TempPathFactory, official_weights: ModuleType) -> Path:
    """A checkpoint laid out like the release's FSANet-100.pth (the fixtures' seed-0 weights, radius 60), written
    once per session (437 MB, 5 s)."""
    path = tmp_path_factory.mktemp("release_ckpt") / "FSANet-100.pth"
    official_weights.save_official_checkpoint(path, seed=0, radius=60.0)
    return path
