"""The layout the README describes: leaves (lib/, utils/) never import a pipeline; no module outgrows one idea."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

LEAF_PACKAGES = ("lib", "utils")
MAX_LINES = 450


def imported_modules(path: Path) -> set[str]:
    """Every module name an `import` or `from ... import` of `path` names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", LEAF_PACKAGES)
def test_leaves_never_import_pipelines(package):
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "pipelines")
                 for p in sorted((ROOT / package).rglob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_source_module_is_over_the_size_of_one_idea():
    sources = [p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in (".venv", "tests")]
    assert sources
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in sources}
    assert not {k: n for k, n in sizes.items() if n > MAX_LINES}


# What a script's start-up imports, probed in one fresh interpreter: test.py first, then train.py on top.
STARTUP_PROBE = """
import json, sys
import test
after_test = sorted(m for m in ('timm', 'torchvision') if m in sys.modules)
import train
from pipelines.training import loop
after_train = sorted(m for m in ('py_sod_metrics', 'sklearn', 'utils.metrics') if m in sys.modules)
print(json.dumps([after_test, after_train]))
"""


@pytest.fixture(scope="module")
def startup_imports() -> tuple[list[str], list[str]]:
    """(model libraries test.py imported, metrics libraries train.py and its loop imported), from a new process."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", STARTUP_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return tuple(json.loads(done.stdout))


@pytest.mark.slow
def test_test_py_starts_without_the_model_libraries(startup_imports):
    """test.py's OpenVINO path never builds the PyTorch model: importing it must not pull in timm or torchvision."""
    assert startup_imports[0] == []


@pytest.mark.slow
def test_train_py_loads_the_metrics_libraries_only_to_validate(startup_imports):
    """A run without --val_path never computes a metric: train.py's start-up must not import pysodmetrics or
    scikit-learn (most of a second per run and per DDP process)."""
    assert startup_imports[1] == []
