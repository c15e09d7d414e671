"""Measurements behind benchmark.py: parameters, MACs, latency and memory, training, data and eval speed.

Each timing is the median of several runs after a warm-up, with CUDA synchronised; the release's
way of computing (eager float32, explicit attention, the filter mask rebuilt per call, BatchNorm
unfolded, all four heads) is timed in the same run as the fast paths, round by round in turn, and
each speed-up is the median of the per-round ratios.
"""
from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms
from tqdm import tqdm

from lib import FSANet
from lib.fast import optimize_for_inference, use_release_compute
from utils.data import IMAGENET_MEAN, IMAGENET_STD, Sample, TrainDataset, pair_samples
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

    def __enter__(self) -> "PeakMemory":
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


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates of one forward pass (convolutions and matrix products), in G."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def _maps(p1: torch.Tensor) -> np.ndarray:
    """8-bit maps exactly as test.py writes them (at the input size)."""
    return np.stack([logits_to_map(logits, tuple(p1.shape[-2:])) for logits in p1])


def _prepared(state: dict, device: torch.device, autocast_dtype: torch.dtype | None = None) -> FSANet:
    """The fast model with `state` loaded, prepared as test.py runs it (weights cast once under --amp)."""
    model = FSANet().to(device)
    model.load_state_dict(state)
    return optimize_for_inference(model, autocast_dtype=autocast_dtype)


def _under_autocast(model: FSANet, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A call of `model.predict(x)` under torch.autocast in `dtype`."""
    def call() -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            return model.predict(x)
    return call


def inference_rows(size: int, batch: int, runs: int, device: torch.device, compile_model: bool = False,
                   seed: int = 0) -> list[Row]:
    """Release-compute vs fast fp32 vs bf16/fp16 (and optionally compiled) inference at `size` x `size`."""
    name = device_name(device)
    torch.manual_seed(seed)
    base = FSANet().eval().to(device)
    state = base.state_dict()
    release = use_release_compute(base)
    fast = _prepared(state, device)
    x = torch.randn(1, 3, size, size, device=device)
    rows = [Row("parameters", f"{sum(p.numel() for p in base.parameters()):,}", name)]
    rows.append(Row(f"MACs at {size}x{size}", f"{count_macs(release, x):.1f} G", name, "fp32",
                    "convolutions and matrix products (attention included) of the full forward"))
    variants = {"release": lambda: release(x)[0], "fast": lambda: fast.predict(x),
                "bf16": _under_autocast(_prepared(state, device, torch.bfloat16), x, torch.bfloat16)}
    if device.type == "cuda":  # fp16 on a CPU is far slower than fp32 (test.py refuses it there)
        variants["fp16"] = _under_autocast(_prepared(state, device, torch.float16), x, torch.float16)
    with torch.inference_mode():
        timings = time_interleaved(variants, device, runs)
    rel, fst = timings["release"], timings["fast"]
    ref_maps = _maps(rel.result.float())
    logit_diff = (fst.result.float() - rel.result.float()).abs().max().item()
    rows.append(Row(f"forward {size}x{size}, batch 1, release compute", f"{rel.median:.3f} s", name, "fp32",
                    f"peak {rel.peak_gib:.2f} GiB", {"seconds": rel.median}))
    fast_ratio = ratio(timings, "fast", "release")
    rows.append(Row(f"forward {size}x{size}, batch 1, fast paths", f"{fst.median:.3f} s", name, "fp32",
                    f"{fast_ratio:.2f}x the release; max logit diff {logit_diff:.1e}; peak {fst.peak_gib:.2f} GiB",
                    {"seconds": fst.median, "ratio": fast_ratio}))
    for dtype in ("bf16", "fp16"):
        if dtype in timings:
            rows.append(_amp_row(size, dtype, timings[dtype], ratio(timings, dtype, "release"),
                                 _maps(timings[dtype].result.float()), ref_maps, name))
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
                        f"{t_c / rel.median:.2f}x the release's median; max logit diff "
                        f"{(p_c - rel.result).abs().max().item():.1e}"))
    return rows


def _amp_row(size: int, dtype: str, timing: Timing, release_ratio: float, maps: np.ndarray,
             ref_maps: np.ndarray, name: str) -> Row:
    """A mixed-precision latency row with its maps' difference from the fp32 maps, in gray levels."""
    diff = np.abs(maps.astype(np.int16) - ref_maps.astype(np.int16))
    return Row(f"forward {size}x{size}, batch 1, fast paths + autocast", f"{timing.median:.3f} s", name, dtype,
               f"{release_ratio:.2f}x the release fp32; 8-bit map diff from fp32 mean {diff.mean():.3f}, "
               f"max {diff.max()}; peak {timing.peak_gib:.2f} GiB",
               {"seconds": timing.median, "ratio": release_ratio})


def markdown_table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| measurement | value | device | dtype | notes |", "|---|---|---|---|---|"]
    lines += [f"| {r.what} | {r.value} | {r.device} | {r.dtype} | {r.note} |" for r in rows]
    return "\n".join(lines)


def train_rows(trainsize: int, batch: int, runs: int, device: str, amp: str = "none") -> list[Row]:
    """One multi-scale training batch (three forward/backward/AdaXW steps, as released) at `trainsize`."""
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
    """Training-sample loading on DIS-sized (2500 x 3400) JPEG/PNG pairs: the release's loader vs ours."""
    r = benchmark_loading(n, trainsize=trainsize)
    name = device_name(torch.device("cpu")).replace(f"({torch.get_num_threads()} threads)", "(1 thread)")
    what = f"training sample load, {r['width']}x{r['height']} JPEG + PNG -> {trainsize}"
    release = r["release_samples_per_s"]
    return [
        Row(f"{what}, the release's loader", f"{release:.2f} samples/s", name, "uint8",
            "PIL full decode + convert, torchvision transforms"),
        Row(f"{what}, TrainDataset default", f"{r['default_samples_per_s']:.2f} samples/s", name, "uint8",
            f"{r['default_samples_per_s'] / release:.2f}x the release; same tensors"),
        Row(f"{what}, --fast_decode", f"{r['fast_samples_per_s']:.2f} samples/s", name, "uint8",
            f"{r['speedup']:.2f}x the release; max diff image {r['fast_max_diff_image']:.3f} (normalised), "
            f"mask {r['fast_max_diff_mask'] * 255:.0f}/255"),
        Row(f"{what}, --cache_dir hits", f"{r['cached_samples_per_s']:.1f} samples/s", name, "uint8",
            f"{r['cached_samples_per_s'] / release:.1f}x the release"),
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


class ReleaseTrainLoader:
    """The release's training loader, as its dataset code reads: PIL `convert`, torchvision transforms."""

    def __init__(self, samples: Sequence[Sample], size: int) -> None:
        """Load `samples` resized to `size` square."""
        self.samples = list(samples)
        self.image_transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                                   transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.gt_transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])

    def __len__(self) -> int:
        """Number of pairs."""
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, mask) of pair `index`."""
        sample = self.samples[index]
        with open(sample.image, "rb") as f:
            image = Image.open(f).convert("RGB")
        with open(sample.gt, "rb") as f:
            gt = Image.open(f).convert("L")
        return self.image_transform(image), self.gt_transform(gt)


def _write_benchmark_pair(folder: Path, index: int, size: tuple[int, int], rng: np.random.Generator) -> None:
    """One photo-like JPEG (smooth noise, grain, shapes; quality 90) and its PNG mask, DIS5K v1.0 layout."""
    width, height = size
    coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image.astype(np.int16) + rng.integers(-12, 13, image.shape, dtype=np.int16), 0, 255)
    image = image.astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(12):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(width // 40, width // 6)), int(rng.integers(height // 40, height // 6)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
    (folder / "im").mkdir(parents=True, exist_ok=True)
    (folder / "gt").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "im" / f"bench_{index:03d}.jpg", quality=90)
    Image.fromarray(mask).save(folder / "gt" / f"bench_{index:03d}.png")


def _seconds_per_item(datasets: Sequence[Dataset], repeats: int) -> list[float]:
    """Mean over items of each dataset's fastest of `repeats` timings, interleaved so load hits all alike."""
    best = np.full((len(datasets), len(datasets[0])), np.inf)
    for _ in range(repeats):
        for index in range(len(datasets[0])):
            for k, dataset in enumerate(datasets):
                start = time.perf_counter()
                dataset[index]
                best[k, index] = min(best[k, index], time.perf_counter() - start)
    return best.mean(axis=1).tolist()


def benchmark_loading(n: int, size: tuple[int, int] = (2500, 3400), trainsize: int = 736,
                      repeats: int = 3) -> dict[str, Any]:
    """One-thread per-sample loading rates on `n` generated (width, height) JPEG/PNG pairs.

    The release's own loader against TrainDataset's default (release) path, --fast_decode, and
    --cache_dir hits; `fast_max_diff_image` and `fast_max_diff_mask` are the largest differences of
    --fast_decode's tensors from the release's over the pairs (image normalised, mask in [0, 1]).
    """
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="fsanet_bench_") as tmp:
        root = Path(tmp)
        for i in tqdm(range(n), desc="writing benchmark images", leave=False, disable=None):
            _write_benchmark_pair(root, i, size, rng)
        samples = pair_samples(root, on_bad="error")
        release = ReleaseTrainLoader(samples, trainsize)
        fast = TrainDataset(samples, trainsize, fast_decode=True)
        # The cached dataset fills its cache in the first repeat; the fastest repeat is a cache hit.
        datasets = [release, TrainDataset(samples, trainsize), fast,
                    TrainDataset(samples, trainsize, fast_decode=True, cache_dir=root / "cache")]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        try:
            release_s, default_s, fast_s, cached_s = _seconds_per_item(datasets, max(2, repeats))
        finally:
            torch.set_num_threads(threads)
        diffs = [[(a - b).abs().max().item() for a, b in zip(release[i], fast[i])] for i in range(n)]
    return {"n": n, "width": size[0], "height": size[1], "trainsize": trainsize,
            "release_samples_per_s": 1.0 / release_s, "default_samples_per_s": 1.0 / default_s,
            "fast_samples_per_s": 1.0 / fast_s, "speedup": release_s / fast_s,
            "cached_samples_per_s": 1.0 / cached_s,
            "fast_max_diff_image": max(d[0] for d in diffs), "fast_max_diff_mask": max(d[1] for d in diffs)}


def runtime_rows(size: int, runs: int, seed: int = 0) -> list[Row]:
    """Release compute vs PyTorch fast path vs the ONNX export under OpenVINO (fp32, bf16) and onnxruntime (CPU)."""
    from utils.onnx_export import export_onnx
    from utils.runtimes import OnnxRuntimeRunner, OpenVINORunner

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
    rows.append(Row(f"ONNX export at {size}x{size}, OpenVINO compile", f"{export_s:.1f} s", name, "fp32",
                    f"OpenVINO compile {cold:.2f} s cold, {runners['openvino fp32'].compile_seconds:.2f} s from its cache",
                    {"export_seconds": export_s, "compile_cold_seconds": cold}))
    return rows
