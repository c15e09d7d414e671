"""`make gpu-check`: every CUDA path of the project in one prepared command, at most 8 minutes on one GPU.

Without CUDA it says so and runs nothing. With CUDA it first checks that this Python imports what the
stages need and that the reference fixtures are there (else one line, exit 2), then runs each stage as
a child process under a share of one time budget (a stage that runs out is reported, never waited for):
1. benchmark.py's training rows: images/s and peak memory per GPU at the release's recipe per GPU
   (batch 4, 736, rates 0.75/1/1.25), with --accum_steps 2, with --grad_checkpointing and with both;
2. `pytest -m cuda` on tests/test_cuda.py and tests/test_multi_gpu.py, whose figures (differences,
   scales) the tests write to a file;
3. benchmark.py's inference rows: latency at 1024 and 992, batch 1, fp32/bf16/fp16, throughput at
   batch 8; and the release's DataParallel training setting when two GPUs are visible;
4. the cuda test of `--compile` training, the slowest (compiling), in a pytest run of its own.
The order is one of importance: what a short budget cuts off matters least.
It prints one summary naming the GPU, writes it with every log under --out, and exits 0 when every
check passed, 1 otherwise.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.atomic import check_writable_dir
from utils.errors import EXIT_FAILED, EXIT_OK, FSANetError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
FIGURES_ENV = "FSANET_GPU_FIGURES"
RTX_3090_GIB = 24.0  # the release's cards; the allocator and CUDA context need some of it
REFERENCE_ENV = "FSANET_REFERENCE"
# What the stages import (train.py, test.py, benchmark.py, collecting tests/), by module, with its pip name.
# Export and OpenVINO are left out: no stage needs them, and a GPU image often lacks them.
STAGE_MODULES = {"torchvision": "torchvision", "timm": "timm", "numpy": "numpy", "PIL": "pillow",
                 "cv2": "opencv-python-headless", "py_sod_metrics": "pysodmetrics", "skimage": "scikit-image",
                 "tqdm": "tqdm", "tensorboard": "tensorboard", "pytest": "pytest"}
CUDA_TEST_FILES = ("tests/test_cuda.py", "tests/test_multi_gpu.py")
COMPILED_TEST = "tests/test_cuda.py::test_compiled_cuda_run"
PYTEST_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b(.*)$")


@dataclass
class Stage:
    """One child process of the check: what it ran, how it ended, its log."""

    name: str
    cmd: list[str]
    cap_s: float
    rc: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    log_path: Path | None = None
    output: str = ""

    @property
    def ok(self) -> bool:
        """Finished in time with exit status 0."""
        return self.rc == 0 and not self.timed_out


@dataclass
class Budget:
    """The whole check's wall-clock budget; stages take what is left, up to their cap."""

    total_s: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        """Seconds left of the budget."""
        return self.total_s - (time.monotonic() - self.start)


def no_gpu_message() -> str | None:
    """The one line printed when no CUDA GPU is visible, else None."""
    if torch.cuda.is_available():
        return None
    return (f"gpu-check: no CUDA GPU found (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "nothing was run")


def reference_fixtures() -> Path:
    """The fixtures computed with the authors' code: $FSANET_REFERENCE, else ../shared/reference beside the repo."""
    return Path(os.environ.get(REFERENCE_ENV, ROOT.parent / "shared" / "reference"))


def child_env(**overrides: str) -> dict[str, str]:
    """This environment for a child process run from the repo: ROOT first on PYTHONPATH, a PYTHONPATH already
    set kept (it may provide packages: wheels unpacked on a machine without network), then `overrides`."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **overrides}


def missing_packages(modules: dict[str, str]) -> list[str]:
    """The pip names of the modules (import name -> pip name) this Python cannot import."""
    return [pip for module, pip in modules.items() if importlib.util.find_spec(module) is None]


def check_ready() -> None:
    """Refuse (exit 2) before any stage when a stage's package or the reference fixtures are missing.

    Without this a machine lacking one package spends minutes on stages that all fail on their first import.
    """
    missing = missing_packages(STAGE_MODULES)
    if missing:
        raise FSANetError(f"gpu-check: {sys.executable} cannot import {', '.join(missing)}; install them "
                          f"(pip install -r requirements.txt), or on a machine without network copy their wheels "
                          f"there and pip install --no-index the files")
    fixtures = reference_fixtures()
    if not (fixtures / "official_forward_seed0_256x256.npz").is_file():
        raise FSANetError(f"gpu-check: the reference fixtures are not in {fixtures}; set {REFERENCE_ENV} to the "
                          f"folder that holds official_forward_seed0_256x256.npz (the project's shared/reference)")


def gpu_description() -> list[str]:
    """Name, memory and capability of every visible GPU, and the software versions."""
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
    lines.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                 f"NCCL {nccl_version()}")
    return lines


def nccl_version() -> str:
    """NCCL's version as text ('unavailable' when torch was built without it)."""
    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return "unavailable"
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def run_stage(stage: Stage, budget: Budget, out: Path, env: dict[str, str]) -> Stage:
    """Run one stage with its output in out/<name>.log, killed (whole process group) at its time limit."""
    limit = min(stage.cap_s, budget.left())
    stage.log_path = out / f"{stage.name}.log"
    if limit < 10:
        stage.timed_out, stage.output = True, "not started: the time budget was spent"
        stage.log_path.write_text(stage.output + "\n")
        return stage
    log.info("gpu-check: %s (up to %.0f s): %s", stage.name, limit, " ".join(stage.cmd))
    start = time.monotonic()
    with open(stage.log_path, "w") as sink:
        proc = subprocess.Popen(stage.cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            stage.rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            stage.timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and DataLoader children too
            stage.rc = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: the stage runs in its own session, stop it too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    stage.seconds = time.monotonic() - start
    stage.output = stage.log_path.read_text(errors="replace")
    return stage


def benchmark_stages(out: Path, compile_model: bool) -> list[Stage]:
    """benchmark.py runs: training memory first (the README's table), then inference latency."""
    bench = [sys.executable, str(ROOT / "benchmark.py")]
    train = ["--only", "train", "--trainsize", "736", "--train_runs", "3", "--train_warmup", "1"]
    stages = [Stage("bench_train_one_gpu", [*bench, *train, "--device", "cuda:0", "--train_batch", "4",
                                            "--train_variants", "plain", "accum", "checkpointing",
                                            "accum+checkpointing", "--train_accum_steps", "2",
                                            "--report", str(out / "bench_train_one_gpu.md")], 150)]
    if torch.cuda.device_count() > 1:
        stages.append(Stage("bench_train_data_parallel", [*bench, *train, "--device", "cuda", "--train_batch",
                                                          str(4 * torch.cuda.device_count()),
                                                          "--report", str(out / "bench_train_data_parallel.md")], 60))
    extra = ["--compile"] if compile_model else []
    stages.append(Stage("bench_inference_1024", [*bench, "--only", "inference", "--device", "cuda:0", "--size", "1024",
                                                 "--batch", "8", "--runs", "5", *extra,
                                                 "--report", str(out / "bench_inference_1024.md")], 90))
    stages.append(Stage("bench_inference_992", [*bench, "--only", "inference", "--device", "cuda:0", "--size", "992",
                                                "--batch", "1", "--runs", "5", *extra,
                                                "--report", str(out / "bench_inference_992.md")], 60))
    return stages


def pytest_stages() -> list[Stage]:
    """`pytest -m cuda` on the files that hold cuda tests (collecting the others would only add imports that can
    fail), verbose so that every finished test is in the log even if the stage is cut off; the compiled run,
    the slowest and least telling test, in a stage of its own that runs last."""
    pytest = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider"]
    return [Stage("pytest_cuda", [*pytest, *CUDA_TEST_FILES, "--deselect", COMPILED_TEST], 300),
            Stage("pytest_cuda_compile", [*pytest, COMPILED_TEST], 150)]


def pytest_results(output: str) -> tuple[list[tuple[str, str, str]], int | None]:
    """(test id, outcome, detail) of each finished test, and how many were selected (None: unknown)."""
    results = []
    for line in output.splitlines():
        match = PYTEST_LINE.match(line.strip())
        if match:
            detail = re.sub(r"\s*\[\s*\d+%\]\s*$", "", match.group(3)).strip()
            results.append((match.group(1), match.group(2), detail))
    collected = re.search(r"collected (\d+) items?(?: / (\d+) deselected)?", output)
    selected = int(collected.group(1)) - int(collected.group(2) or 0) if collected else None
    return results, selected


def read_figures(path: Path) -> dict[str, list[str]]:
    """Figures the CUDA tests recorded, as 'name value' strings per test id."""
    figures: dict[str, list[str]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            item = json.loads(line)
            figures.setdefault(item["test"], []).append(f"{item['name']} {item['value']}")
    return figures


def read_bench_rows(stage: Stage) -> list[dict]:
    """The JSON rows a benchmark stage wrote beside its --report (empty if it did not finish)."""
    report = Path(stage.cmd[stage.cmd.index("--report") + 1]).with_suffix(".json")
    return json.loads(report.read_text()) if stage.ok and report.is_file() else []


def memory_table(rows: list[dict], gpu: str) -> list[str]:
    """The README's "GPU memory" table from the training rows (peak allocated / reserved per GPU)."""
    lines = [f"| setting ({gpu}, fp32, 736, rates 0.75/1/1.25) | peak per GPU, allocated | reserved | images/s "
             f"| fits a {RTX_3090_GIB:.0f} GB RTX 3090 |", "|---|--:|--:|--:|---|"]
    for row in rows:
        data = row.get("data", {})
        if "peak_reserved_gib_per_gpu" not in data:
            continue
        allocated, reserved = max(data["peak_allocated_gib_per_gpu"]), max(data["peak_reserved_gib_per_gpu"])
        # A 3090 has 24 GiB, of which the CUDA context takes about 0.5 GiB.
        fits = "yes" if reserved < RTX_3090_GIB - 0.6 else "no"
        lines.append(f"| {row['what']} | {allocated:.2f} GiB | {reserved:.2f} GiB | "
                     f"{data['images_per_s']:.2f} | {fits} |")
    return lines


def summary(stages: list[Stage], figures: dict[str, list[str]], gpu: str, gpu_lines: list[str],
            budget: Budget) -> list[str]:
    """The printed report: every check with pass/fail and figures, the benchmark rows, the memory table."""
    lines = [f"# gpu-check on {gpu}", "", *[f"- {line}" for line in gpu_lines],
             f"- wall time {budget.total_s - budget.left():.0f} s of a {budget.total_s:.0f} s budget", "",
             "| check | result | figures | seconds |", "|---|---|---|--:|"]
    bench_rows: list[dict] = []
    for stage in stages:
        if stage.name.startswith("pytest"):
            results, selected = pytest_results(stage.output)
            for test, outcome, detail in results:
                shown = "; ".join(figures.get(test, [])) or detail
                lines.append(f"| {test.split('::', 1)[1]} | {outcome} | {shown} | |")
            if selected is not None and len(results) < selected:
                lines.append(f"| {selected - len(results)} more cuda test(s) | NOT RUN (time budget) | | |")
            lines.append(f"| {stage.name} | {stage_state(stage)} | log {stage.log_path} | {stage.seconds:.0f} |")
        else:
            rows = read_bench_rows(stage)
            bench_rows += rows
            lines.append(f"| benchmark {stage.name} | {stage_state(stage)} | {len(rows)} rows; log {stage.log_path} "
                         f"| {stage.seconds:.0f} |")
    lines += ["", "## benchmark rows", "", "| measurement | value | device | dtype | notes |", "|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['value']} | {r['device']} | {r['dtype']} | {r['note']} |" for r in bench_rows]
    lines += ["", "## GPU memory (for the README)", "", *memory_table(bench_rows, gpu)]
    return lines


def stage_state(stage: Stage) -> str:
    """How a stage ended, as the summary shows it."""
    if stage.timed_out:
        return "TIMED OUT" if stage.seconds else "NOT RUN (time budget)"
    return "passed" if stage.ok else f"FAILED (rc {stage.rc})"


def all_passed(stages: list[Stage]) -> bool:
    """Every stage finished in time with status 0 and no test failed."""
    return all(s.ok for s in stages)


def run_gpu_check(out: Path, budget_s: float = 460.0, compile_model: bool = False) -> int:
    """The whole check; returns the exit status (0 all passed, 1 otherwise; 0 with no GPU, nothing run).

    Raises FSANetError (exit 2) before any stage when a package or the reference fixtures are missing.
    """
    check_writable_dir(out, "--out")  # a bad --out is refused on every machine, not only on one with a GPU
    message = no_gpu_message()
    if message is not None:
        print(message)
        return EXIT_OK
    check_ready()
    budget = Budget(budget_s)
    out.mkdir(parents=True, exist_ok=True)
    figures_path = out / "figures.jsonl"
    figures_path.unlink(missing_ok=True)
    env = child_env(**{FIGURES_ENV: str(figures_path), REFERENCE_ENV: str(reference_fixtures().resolve()),
                       # cuBLAS needs this before its first call for deterministic matrix products (the resume test).
                       "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")})
    gpu_lines = gpu_description()
    print("\n".join(["gpu-check:", *gpu_lines]), flush=True)
    stages = []
    train_memory, *latency = benchmark_stages(out, compile_model)
    tests, compiled = pytest_stages()
    # Memory first (the README's table), then correctness, then latency, then compiling: what runs out of
    # time matters least.
    for stage in [train_memory, tests, *latency, compiled]:
        stages.append(run_stage(stage, budget, out, env))
        print(f"gpu-check: {stage.name}: {stage_state(stage)} in {stage.seconds:.0f} s", flush=True)
    report = summary(stages, read_figures(figures_path), torch.cuda.get_device_name(0), gpu_lines, budget)
    (out / "summary.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    print(f"\ngpu-check: summary and logs in {out}")
    return EXIT_OK if all_passed(stages) else EXIT_FAILED
