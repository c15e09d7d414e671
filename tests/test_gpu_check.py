"""`make gpu-check` without a GPU (says so, runs nothing, exits 0), its report parsing, and the cuda marker."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, child_env

from pipelines.gpu_check import (
    COMPILED_TEST,
    CUDA_TEST_FILES,
    REFERENCE_ENV,
    STAGE_MODULES,
    Budget,
    Stage,
    all_passed,
    check_ready,
    memory_table,
    missing_packages,
    pytest_results,
    run_stage,
    summary,
)
from utils.errors import FSANetError

NO_GPU = child_env(CUDA_VISIBLE_DEVICES="")


def fake_venv(folder: Path) -> Path:
    """A VENV folder for the Makefile whose python is this interpreter and whose install stamp is current."""
    (folder / "bin").mkdir(parents=True)
    python = folder / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (folder / ".installed").touch()  # newer than requirements.txt: make installs nothing
    return folder


@pytest.mark.slow
def test_make_gpu_check_without_a_gpu_runs_nothing_and_exits_0(tmp_path):
    venv = fake_venv(tmp_path / "venv")
    proc = subprocess.run(["make", "-s", "gpu-check", f"VENV={venv}"], cwd=ROOT, env=NO_GPU, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU found") and "nothing was run" in lines[0]


@pytest.mark.slow
def test_make_gpu_check_with_a_given_python_builds_no_venv(tmp_path):
    venv = tmp_path / "never"
    proc = subprocess.run(["make", "-s", "gpu-check", f"VENV={venv}", f"PY={sys.executable}"], cwd=ROOT, env=NO_GPU,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("gpu-check: no CUDA GPU found") and not venv.exists()


def test_the_packages_checked_before_the_stages_are_requirements():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    required = {re.match(r"[\w.-]*", line).group().lower() for line in lines}
    assert set(STAGE_MODULES.values()) <= required
    assert missing_packages(STAGE_MODULES) == []
    assert missing_packages({"json": "json", "fsanet_no_such_module": "no-such-package"}) == ["no-such-package"]


def test_children_get_the_repo_first_and_keep_a_pythonpath_that_provides_packages(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/unpacked/wheels")
    env = child_env(CUDA_VISIBLE_DEVICES="")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/unpacked/wheels"] and env["CUDA_VISIBLE_DEVICES"] == ""


def test_check_ready_names_missing_fixtures_and_the_variable(tmp_path, monkeypatch, reference_dir):
    monkeypatch.setenv(REFERENCE_ENV, str(reference_dir))
    check_ready()
    monkeypatch.setenv(REFERENCE_ENV, str(tmp_path))
    with pytest.raises(FSANetError, match=f"not in {tmp_path}; set {REFERENCE_ENV}"):
        check_ready()


@pytest.mark.slow
def test_cuda_tests_are_skipped_cleanly_without_a_gpu():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           "tests/test_cuda.py"], cwd=ROOT, env=NO_GPU, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "skipped" in proc.stdout and "failed" not in proc.stdout and "error" not in proc.stdout.lower()


def test_pytest_results_read_a_log_cut_off_midway():
    log = """collected 40 items / 25 deselected / 15 selected
tests/test_cuda.py::test_cuda_forward_matches_the_release_fixture PASSED   [  6%]
tests/test_cuda.py::test_short_cuda_run_with_each_option[amp_fp16] FAILED  [ 13%]
tests/test_cuda.py::test_data_parallel_replicas_run_under_bf16_autocast SKIPPED (one GPU) [ 20%]
"""
    results, selected = pytest_results(log)
    assert selected == 15
    assert results == [
        ("tests/test_cuda.py::test_cuda_forward_matches_the_release_fixture", "PASSED", ""),
        ("tests/test_cuda.py::test_short_cuda_run_with_each_option[amp_fp16]", "FAILED", ""),
        ("tests/test_cuda.py::test_data_parallel_replicas_run_under_bf16_autocast", "SKIPPED", "(one GPU)"),
    ]


def test_memory_table_takes_the_largest_gpu_and_judges_24_gb():
    rows = [{"what": "training batch at 736, batch 4", "data": {
        "peak_allocated_gib_per_gpu": [17.5, 16.0], "peak_reserved_gib_per_gpu": [19.0, 17.0], "images_per_s": 3.2}},
            {"what": "cpu row", "data": {"peak_gib": 3.0}},
            {"what": "training batch at 736, batch 8", "data": {
                "peak_allocated_gib_per_gpu": [30.0], "peak_reserved_gib_per_gpu": [31.5], "images_per_s": 4.0}}]
    table = memory_table(rows, "NVIDIA H100")
    assert len(table) == 4  # header, rule, the two GPU rows
    assert "| 17.50 GiB | 19.00 GiB | 3.20 | yes |" in table[2]
    assert table[3].endswith("| 30.00 GiB | 31.50 GiB | 4.00 | no |")


def test_summary_names_the_gpu_and_every_outcome(tmp_path):
    report = tmp_path / "bench_train.md"
    report.with_suffix(".json").write_text(json.dumps([{
        "what": "training batch at 736, batch 4", "value": "0.50 s", "device": "GPU X", "dtype": "fp32",
        "note": "8.00 images/s", "data": {"peak_allocated_gib_per_gpu": [12.0], "peak_reserved_gib_per_gpu": [13.0],
                                          "images_per_s": 8.0}}]))
    bench = Stage("bench_train_one_gpu", ["python", "benchmark.py", "--report", str(report)], 10, rc=0)
    tests = Stage("pytest_cuda", ["pytest"], 10, rc=-9, timed_out=True, seconds=10.0, output=(
        "collected 3 items\ntests/test_cuda.py::test_a PASSED [ 33%]\ntests/test_cuda.py::test_b FAILED [ 66%]\n"))
    compiled = run_stage(Stage("pytest_cuda_compile", ["false"], 10), Budget(5), tmp_path, dict(os.environ))
    figures = {"tests/test_cuda.py::test_a": ["max diff 1e-05"]}
    lines = summary([bench, tests, compiled], figures, "GPU X", ["cuda:0: GPU X"], Budget(100))
    text = "\n".join(lines)
    assert lines[0] == "# gpu-check on GPU X"
    assert "| test_a | PASSED | max diff 1e-05 |" in text and "| test_b | FAILED |" in text
    assert "| 1 more cuda test(s) | NOT RUN (time budget) |" in text and "| pytest_cuda | TIMED OUT |" in text
    assert "| benchmark bench_train_one_gpu | passed | 1 rows;" in text
    assert "| training batch at 736, batch 4 | 12.00 GiB | 13.00 GiB | 8.00 | yes |" in text
    assert "| pytest_cuda_compile | NOT RUN (time budget) |" in text
    assert not all_passed([bench, tests]) and not all_passed([bench, compiled]) and all_passed([bench])


def test_the_cuda_stages_cover_every_cuda_test_file():
    # Read, not collected: a --collect-only run of the whole suite costs 10 s. This file names the marker too.
    marked = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
              if p.name != Path(__file__).name and "pytest.mark.cuda" in p.read_text()}
    assert set(CUDA_TEST_FILES) == marked
    file, name = COMPILED_TEST.split("::")
    assert f"\ndef {name}(" in (ROOT / file).read_text()
