"""Deployment benchmark: the ONNX export under OpenVINO (fp32, bf16) and onnxruntime against the release's compute."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lib import FSANet
from lib.fast import use_release_compute
from pipelines.benchmarks.model import _prepared, count_macs
from pipelines.benchmarks.timing import Row, device_name, ratio, time_interleaved
from utils.onnx_export import export_onnx
from utils.runtimes import OnnxRuntimeRunner, OpenVINORunner


def runtime_rows(size: int, runs: int, seed: int = 0) -> list[Row]:
    """Release compute vs PyTorch fast path vs the ONNX export under OpenVINO (fp32, bf16) and onnxruntime (CPU)."""
    cpu = torch.device("cpu")
    name = device_name(cpu)
    torch.manual_seed(seed)
    base = FSANet().eval()
    state = base.state_dict()
    release, fast = use_release_compute(base), _prepared(state, cpu)
    with tempfile.TemporaryDirectory(prefix="fsanet_bench_onnx_") as tmp:
        onnx_path, ov_cache = Path(tmp) / "fsanet.onnx", Path(tmp) / "openvino"
        to_export = FSANet().eval()
        to_export.load_state_dict(state)
        export_s = export_onnx(to_export, onnx_path, size)
        cold = OpenVINORunner(onnx_path, size, "f32", ov_cache).compile_seconds
        runners = {"openvino fp32": OpenVINORunner(onnx_path, size, "f32", ov_cache),
                   "openvino bf16": OpenVINORunner(onnx_path, size, "bf16", ov_cache),
                   "onnxruntime fp32": OnnxRuntimeRunner(onnx_path, size)}
        x = torch.randn(1, 3, size, size)
        variants = {"release": lambda: release(x)[0], "torch fp32": lambda: fast.predict(x)}
        variants.update({k: (lambda r=r: r.predict(x)) for k, r in runners.items()})
        with torch.inference_mode():
            timings = time_interleaved(variants, cpu, runs)
    ref = timings["release"].result.float()
    rows = [Row(f"forward {size}x{size}, batch 1, release compute", f"{timings['release'].median:.3f} s", name,
                "fp32", "baseline of the runtime rows", {"seconds": timings["release"].median})]
    for key in list(variants)[1:]:
        runtime, dtype = key.split()
        diff = (timings[key].result.float() - ref).abs().max().item()
        note = f"{ratio(timings, key, 'release'):.3f}x the release; max logit diff {diff:.1e}"
        if key in runners:
            note += f"; load/compile {runners[key].compile_seconds:.2f} s"
        rows.append(Row(f"forward {size}x{size}, batch 1, runtime {runtime}", f"{timings[key].median:.3f} s", name,
                        dtype, note, {"seconds": timings[key].median, "ratio": ratio(timings, key, "release"),
                                      "max_logit_diff": diff}))
    rows.append(_floor_row(size, fast, timings["release"].median, name))
    rows.append(Row(f"ONNX export at {size}x{size}, OpenVINO compile", f"{export_s:.1f} s", name, "fp32",
                    f"OpenVINO compile {cold:.2f} s cold, "
                    f"{runners['openvino fp32'].compile_seconds:.2f} s from its cache",
                    {"export_seconds": export_s, "compile_cold_seconds": cold}))
    return rows


def matmul_gflops(n: int = 4096, runs: int = 5) -> float:
    """This CPU's best fp32 matrix-multiply rate (GFLOP/s) on two n x n matrices, a rate few layers reach."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = min(time_interleaved({"matmul": lambda: a @ b}, torch.device("cpu"), runs, warmup=2)["matmul"].seconds)
    return 2 * n**3 / seconds / 1e9


def _floor_row(size: int, fast: torch.nn.Module, release_seconds: float, name: str) -> Row:
    """The P1 forward's FLOPs at this CPU's best fp32 matmul rate: about as fast as any fp32 runtime can run it."""
    gflop = 2 * count_macs(fast.predict, torch.randn(1, 3, size, size))
    peak = matmul_gflops()
    floor = gflop / peak
    note = (f"{gflop:.0f} GFLOP at {peak:.0f} GFLOP/s (best 4096x4096 torch matmul): "
            f"{floor / release_seconds:.2f}x the release, about the floor of any fp32 runtime here")
    return Row(f"forward {size}x{size} P1 at the fp32 matmul rate", f"{floor:.2f} s", name, "fp32", note,
               {"gflop": gflop, "peak_gflops": peak, "floor_seconds": floor})
