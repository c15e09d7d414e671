"""Shared test fixtures: the authors' reference fixtures live in ../shared/reference (read-only)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("FSANET_REFERENCE", ROOT.parent / "shared" / "reference"))

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
