"""Measurements behind benchmark.py: parameters, MACs, latency and memory, training, data and eval speed.

Each timing is the median of several runs after a warm-up, with CUDA synchronised; the release's
way of computing (eager float32, explicit attention, the filter mask rebuilt per call, BatchNorm
unfolded, all four heads) is timed in the same run as the fast path, so speed-ups are ratios.
"""
from __future__ import annotations

import logging
import os
import platform
import statistics
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from lib import FSANet
from lib.fast import optimize_for_inference, use_release_compute
from utils.inference import logits_to_map

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One line of the benchmark table."""

    what: str
    value: str
    device: str
    dtype: str = ""
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


class PeakMemory:
    """Peak memory during a block: CUDA's allocator peak, or the process RSS sampled every 2 ms on CPU."""

    def __init__(self, device: torch.device) -> None:
        """Measure on `device` (CUDA allocator) or the CPU process."""
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        """Resident set size of this process in bytes."""
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        """Keep the largest RSS seen until stopped."""
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> "PeakMemory":
        """Start measuring."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop measuring; `peak` holds the result."""
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    @property
    def gib(self) -> float:
        """Peak in GiB (CUDA: allocated tensors; CPU: whole-process resident memory)."""
        return self.peak / 2**30


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work so timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, runs: int, warmup: int = 1) -> tuple[float, Any, float]:
    """(median seconds, last result, peak GiB) of `fn` over `runs` calls after `warmup` calls."""
    result = None
    for _ in range(warmup):
        result = fn()
    _sync(device)
    seconds = []
    with PeakMemory(device) as memory:
        for _ in range(runs):
            start = time.perf_counter()
            result = fn()
            _sync(device)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result, memory.gib


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates of one forward pass (convolutions and matrix products), in G."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def _maps(p1: torch.Tensor) -> np.ndarray:
    """8-bit maps exactly as test.py writes them (at the input size)."""
    return np.stack([logits_to_map(logits, tuple(p1.shape[-2:])) for logits in p1])


def inference_rows(size: int, batch: int, runs: int, device: torch.device, compile_model: bool = False,
                   seed: int = 0) -> list[Row]:
    """Release-compute vs fast fp32 vs bf16 (and optionally compiled) inference at `size` x `size`."""
    name = device_name(device)
    torch.manual_seed(seed)
    base = FSANet().eval().to(device)
    state = base.state_dict()
    release = use_release_compute(base)
    fast = FSANet().to(device)
    fast.load_state_dict(state)
    fast = optimize_for_inference(fast)
    x = torch.randn(1, 3, size, size, device=device)
    rows = [Row("parameters", f"{sum(p.numel() for p in base.parameters()):,}", name)]
    rows.append(Row(f"MACs at {size}x{size}", f"{count_macs(release, x):.1f} G", name, "fp32",
                    "convolutions and matrix products (attention included) of the full forward"))
    with torch.inference_mode():
        t_rel, p_rel, m_rel = time_call(lambda: release(x)[0], device, runs)
        t_fast, p_fast, m_fast = time_call(lambda: fast.predict(x), device, runs)
        t_bf, p_bf, m_bf = _time_autocast(state, x, torch.bfloat16, runs)
        fp16_ok = device.type == "cuda"
        if fp16_ok:
            t_h, p_h, m_h = _time_autocast(state, x, torch.float16, runs)
    ref_maps = _maps(p_rel.float())
    logit_diff = (p_fast.float() - p_rel.float()).abs().max().item()
    rows.append(Row(f"forward {size}x{size}, batch 1, release compute", f"{t_rel:.3f} s", name, "fp32",
                    f"peak {m_rel:.2f} GiB", {"seconds": t_rel}))
    rows.append(Row(f"forward {size}x{size}, batch 1, fast paths", f"{t_fast:.3f} s", name, "fp32",
                    f"{t_fast / t_rel:.2f}x the release; max logit diff {logit_diff:.1e}; peak {m_fast:.2f} GiB",
                    {"seconds": t_fast, "ratio": t_fast / t_rel}))
    rows.append(_amp_row(size, "bf16", t_bf, t_rel, m_bf, _maps(p_bf.float()), ref_maps, name))
    if fp16_ok:
        rows.append(_amp_row(size, "fp16", t_h, t_rel, m_h, _maps(p_h.float()), ref_maps, name))
    if batch > 1:
        xb = torch.randn(batch, 3, size, size, device=device)
        with torch.inference_mode():
            t_b, _, m_b = time_call(lambda: fast.predict(xb), device, max(1, runs - 1))
        rows.append(Row(f"forward {size}x{size}, batch {batch}, fast paths", f"{t_b:.3f} s", name, "fp32",
                        f"{batch / t_b:.2f} images/s; peak {m_b:.2f} GiB", {"seconds": t_b}))
    if compile_model:
        compiled = torch.compile(fast.predict)
        with torch.inference_mode():
            t_c, p_c, _ = time_call(lambda: compiled(x), device, runs, warmup=2)
        rows.append(Row(f"forward {size}x{size}, batch 1, torch.compile", f"{t_c:.3f} s", name, "fp32",
                        f"{t_c / t_rel:.2f}x the release; max logit diff {(p_c - p_rel).abs().max().item():.1e}"))
    return rows


def _time_autocast(state: dict, x: torch.Tensor, dtype: torch.dtype,
                   runs: int) -> tuple[float, torch.Tensor, float]:
    """Latency of the fast model prepared for autocast in `dtype` (weights cast once), as test.py --amp runs it."""
    model = FSANet().to(x.device)
    model.load_state_dict(state)
    model = optimize_for_inference(model, autocast_dtype=dtype)
    with torch.autocast(device_type=x.device.type, dtype=dtype):
        return time_call(lambda: model.predict(x), x.device, runs)


def _amp_row(size: int, dtype: str, seconds: float, release_seconds: float, memory: float, maps: np.ndarray,
             ref_maps: np.ndarray, name: str) -> Row:
    """A mixed-precision latency row with its maps' difference from the fp32 maps, in gray levels."""
    diff = np.abs(maps.astype(np.int16) - ref_maps.astype(np.int16))
    return Row(f"forward {size}x{size}, batch 1, fast paths + autocast", f"{seconds:.3f} s", name, dtype,
               f"{seconds / release_seconds:.2f}x the release fp32; 8-bit map diff from fp32 mean {diff.mean():.3f}, "
               f"max {diff.max()}; peak {memory:.2f} GiB", {"seconds": seconds, "ratio": seconds / release_seconds})


def markdown_table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| measurement | value | device | dtype | notes |", "|---|---|---|---|---|"]
    lines += [f"| {r.what} | {r.value} | {r.device} | {r.dtype} | {r.note} |" for r in rows]
    return "\n".join(lines)


def train_rows(trainsize: int, batch: int, runs: int, device: str, amp: str = "none") -> list[Row]:
    """One multi-scale training batch (three forward/backward/AdaXW steps, as released) at `trainsize`."""
    import tempfile

    from utils.synthetic import generate_split
    from utils.trainer import TrainConfig, Trainer

    with tempfile.TemporaryDirectory(prefix="fsanet_bench_train_") as tmp:
        generate_split(tmp, "DIS-TR", 2 * batch, seed=0, size=trainsize)
        cfg = TrainConfig(train_path=f"{tmp}/DIS-TR", save_root=tmp, no_pretrained=True, batchsize=batch,
                          trainsize=trainsize, num_workers=0, device=device, amp=amp, epoch=2)
        trainer = Trainer(cfg)
        trainer.sampler.set_epoch(1)
        images, gts = next(iter(trainer.loader))
        dev = trainer.device
        # No separate warm-up: at the release's size one batch is minutes on a CPU.
        try:
            seconds, _, memory = time_call(lambda: trainer.train_batch(images, gts, epoch=1), dev, runs, warmup=0)
        finally:
            trainer.close_writer()
    dtype = "fp32" if amp == "none" else amp
    return [Row(f"training batch at {trainsize} (rates 0.75/1/1.25, 3 optimiser steps), batch {batch}",
                f"{seconds:.2f} s", device_name(dev), dtype, f"{batch / seconds:.2f} images/s; peak {memory:.2f} GiB",
                {"seconds": seconds})]


def data_rows(n: int, trainsize: int) -> list[Row]:
    """Training-sample loading on DIS-sized (2500 x 3400) JPEGs: the release's path vs reduced decoding."""
    from utils.data import benchmark_loading

    r = benchmark_loading(n, trainsize=trainsize)
    name = device_name(torch.device("cpu")).replace(f"({torch.get_num_threads()} threads)", "(1 thread)")
    return [
        Row(f"training sample load, {r['width']}x{r['height']} JPEG -> {trainsize}, release path",
            f"{r['release_samples_per_s']:.2f} samples/s", name, "uint8", "full decode + PIL resize"),
        Row(f"training sample load, {r['width']}x{r['height']} JPEG -> {trainsize}, --fast_decode",
            f"{r['fast_samples_per_s']:.2f} samples/s", name, "uint8",
            f"{r['speedup']:.2f}x the release; --cache_dir hits: {r['cached_samples_per_s']:.1f} samples/s"),
    ]


def eval_rows(n: int, workers: int | None) -> list[Row]:
    """eval.py throughput on GT-sized maps against a plain PySODMetrics + authors' HCE loop."""
    from utils.evaluation import benchmark_eval

    r = benchmark_eval(n, workers=workers)
    name = device_name(torch.device("cpu")).replace(f"({torch.get_num_threads()} threads)", f"({r['workers']} workers)")
    base = r["baseline_images_per_s"]
    return [
        Row("eval, plain PySODMetrics + authors' HCE loop", f"{base:.3f} images/s", name, "uint8", f"{n} maps 2500x3400"),
        Row("eval.py, cold skeleton cache", f"{r['cold_images_per_s']:.3f} images/s", name, "uint8",
            f"{r['cold_images_per_s'] / base:.2f}x the plain loop"),
        Row("eval.py, warm skeleton cache", f"{r['warm_images_per_s']:.3f} images/s", name, "uint8",
            f"{r['warm_images_per_s'] / base:.2f}x the plain loop; identical numbers: {r['identical']}"),
    ]
