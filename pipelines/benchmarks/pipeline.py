"""End-to-end benchmark: `python test.py` on a folder of photos against the release's test.py, both timed whole.

Each run is a fresh process, so start-up (imports, model or compiled-model loading) counts as it does
for a user. The release's test.py is reproduced by `release_test` (run as
`python -m pipelines.benchmarks.pipeline`): it imports the model code (timm, torchvision), builds
FSANet in the release's way of computing (every head, the filter mask rebuilt per call, BatchNorm
unfolded), loads the checkpoint and writes the maps with the release's pre- and post-processing.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.benchmarks.timing import Row, Timing, device_name, ratio, time_interleaved
from pipelines.inference import InferenceOptions, InferenceSummary, folder_job, predict_jobs
from utils.errors import RunError
from utils.synthetic import shapes_pair, write_jpeg

ROOT = Path(__file__).resolve().parents[2]
PHOTO_SIZE = (3392, 2544)  # width, height: DIS5K's typical photo is about 2,500 x 3,400 px


class ReleaseForward:
    """An FSANet in release compute seen through the pipeline's `predict`: the full forward, P1 kept."""

    def __init__(self, model: torch.nn.Module) -> None:
        """Wrap `model` (lib.fast.use_release_compute applied)."""
        self.model = model

    def eval(self) -> ReleaseForward:
        """Eval mode, as the release's test.py sets it."""
        self.model.eval()
        return self

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Every head is computed, as the release's forward does; its test.py keeps P1."""
        return self.model(images)[0]


def release_test(pth_path: str, input_dir: str, save_root: str, testsize: int) -> InferenceSummary:
    """The release's test.py on every image of `input_dir`: maps to `save_root`, fp32 on the CPU."""
    from lib import FSANet, load_checkpoint
    from lib.fast import use_release_compute

    model = use_release_compute(load_checkpoint(FSANet(), pth_path))
    summary = InferenceSummary()
    options = InferenceOptions(testsize=testsize)
    return predict_jobs(ReleaseForward(model), [folder_job(input_dir, save_root)], options, summary)


def _timed_command(command: list[str]) -> float:
    """Run `command` from the repository root; its wall seconds, or a RunError with its last error line."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()] or ["(no output)"]
        raise RunError(f"benchmark command failed (exit {done.returncode}): {' '.join(command)}: {lines[-1]}")
    return time.perf_counter() - start


def _write_inputs(folder: Path, images: int, seed: int) -> tuple[Path, Path]:
    """A random-weight checkpoint and `images` synthetic photos of DIS5K's typical size under `folder`."""
    from lib import FSANet

    torch.manual_seed(seed)
    checkpoint = folder / "random.pth"
    torch.save(FSANet().state_dict(), checkpoint)
    rng = np.random.default_rng(seed)
    (folder / "im").mkdir()
    for i in range(images):
        write_jpeg(shapes_pair(rng, *PHOTO_SIZE, lines=20)[0], folder / "im" / f"photo{i}.jpg")
    return checkpoint, folder / "im"


def pipeline_rows(size: int, images: int, runs: int, seed: int = 0) -> list[Row]:
    """Wall time of the release's test.py and of ours (OpenVINO fp32 and bf16, warm cache) on `images` photos."""
    name = device_name(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="fsanet_bench_e2e_") as tmp:
        folder = Path(tmp)
        checkpoint, inputs = _write_inputs(folder, images, seed)
        common = ["--pth_path", str(checkpoint), "--input", str(inputs), "--testsize", str(size)]
        ours = [sys.executable, "test.py", *common, "--runtime", "openvino", "--cache_dir", str(folder / "cache")]
        commands = {"release": [sys.executable, "-m", "pipelines.benchmarks.pipeline", *common],
                    "fp32": ours, "bf16": [*ours, "--amp", "bf16"]}
        outputs = {key: folder / f"out_{key}" for key in commands}

        def call(key: str) -> float:
            return _timed_command([*commands[key], "--save_root", str(outputs[key])])

        cold = call("fp32")  # exports to ONNX and compiles: the first run's cost
        call("bf16")  # its own compile-cache entry
        timings = time_interleaved({key: (lambda k=key: call(k)) for key in commands}, torch.device("cpu"),
                                   runs, warmup=0)
    return _rows(size, images, name, timings, cold)


def _rows(size: int, images: int, name: str, timings: dict[str, Timing], cold: float) -> list[Row]:
    """The end-to-end rows: the release's test.py, then ours with their ratios to it."""
    what = f"{images} photos {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} at --testsize {size}, whole process"
    rows = [Row(f"release test.py, {what}", f"{timings['release'].median:.1f} s", name, "fp32",
                "baseline of the end-to-end rows", {"seconds": timings["release"].median})]
    for dtype in ("fp32", "bf16"):
        r = ratio(timings, dtype, "release")
        note = f"{r:.2f}x the release's test.py; warm cache"
        if dtype == "fp32":
            note += f"; first run (ONNX export + compile) {cold:.1f} s"
        rows.append(Row(f"test.py --runtime openvino, {what}", f"{timings[dtype].median:.1f} s", name, dtype,
                        note, {"seconds": timings[dtype].median, "ratio": r}))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line of `release_test` (the baseline process the benchmark times)."""
    p = argparse.ArgumentParser(description=release_test.__doc__)
    p.add_argument("--pth_path", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--save_root", required=True)
    p.add_argument("--testsize", type=int, default=992)
    args = p.parse_args(argv)
    summary = release_test(args.pth_path, args.input, args.save_root, args.testsize)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
