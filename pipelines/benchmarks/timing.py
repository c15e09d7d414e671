"""Timing and memory primitives of the benchmarks: interleaved medians, peak memory, the report table.

Each timing is the median of several runs after a warm-up, with CUDA synchronised; variants are timed
in turn, round by round, and each speed-up is the median of the per-round ratios.
"""
from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


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
    """Peak memory during a block: CUDA's allocator peak, or the process's peak RSS on CPU.

    On Linux the kernel's own high-water mark (VmHWM) is reset on entry through /proc/self/clear_refs
    and read on exit, so nothing runs beside the timed code. Elsewhere a thread samples the RSS every
    2 ms, which slows a 2-core machine's kernels by 10-20%, so time and measure memory separately there.
    """

    def __init__(self, device: torch.device) -> None:
        """Measure on `device` (CUDA allocator) or the CPU process."""
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int:
        """Resident set size of this process in bytes."""
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def _reset_high_water_mark() -> bool:
        """Reset the kernel's peak-RSS counter of this process; False where that is not possible."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _high_water_mark() -> int:
        """The kernel's peak RSS of this process since the last reset, in bytes."""
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def _sample(self) -> None:
        """Keep the largest RSS seen until stopped."""
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> PeakMemory:
        """Start measuring."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not self._reset_high_water_mark():
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop measuring; `peak` holds the result."""
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is None:
            self.peak = self._high_water_mark()
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


@dataclass
class Timing:
    """Seconds of each timed call, the last call's result, and the largest peak memory of a call."""

    seconds: list[float]
    result: Any
    peak_gib: float

    @property
    def median(self) -> float:
        """Median seconds."""
        return statistics.median(self.seconds)


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, runs: int,
                     warmup: int = 1) -> dict[str, Timing]:
    """Time each of `fns` `runs` times after `warmup` calls, in turn round by round.

    Interleaving makes slow drift of a shared machine's speed hit every variant alike, so ratios of
    the variants are fair even when absolute times wander.
    """
    results: dict[str, Any] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            results[name] = fn()
    _sync(device)
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    peaks = dict.fromkeys(fns, 0.0)
    for _ in range(runs):
        for name, fn in fns.items():
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                results[name] = fn()
                _sync(device)
                seconds[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], memory.gib)
    return {name: Timing(seconds[name], results.get(name), peaks[name]) for name in fns}


def time_call(fn: Callable[[], Any], device: torch.device, runs: int, warmup: int = 1) -> tuple[float, Any, float]:
    """(median seconds, last result, peak GiB) of `fn` over `runs` calls after `warmup` calls."""
    timing = time_interleaved({"call": fn}, device, runs, warmup)["call"]
    return timing.median, timing.result, timing.peak_gib


def ratio(timings: dict[str, Timing], name: str, baseline: str) -> float:
    """Median over rounds of `name`'s time divided by `baseline`'s time in the same round."""
    return statistics.median(a / b for a, b in zip(timings[name].seconds, timings[baseline].seconds))


def rows_table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| measurement | value | device | dtype | notes |", "|---|---|---|---|---|"]
    lines += [f"| {r.what} | {r.value} | {r.device} | {r.dtype} | {r.note} |" for r in rows]
    return "\n".join(lines)


