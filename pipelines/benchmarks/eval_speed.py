"""eval.py's speed against the plain loop the field runs: PySODMetrics classes plus the authors' HCE."""
from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from skimage import morphology

from pipelines.benchmarks.timing import Row, device_name
from pipelines.evaluation import ImageTask, default_workers, evaluate, image_mapper, pair_predictions
from utils.imageio import write_png
from utils.metrics import BINARY_THRESHOLD, DISMetrics
from utils.synthetic import degraded_prediction, shapes_pair


def eval_rows(n: int, workers: int | None) -> list[Row]:
    """eval.py throughput on GT-sized maps against a plain PySODMetrics + authors' HCE loop."""
    r = benchmark_eval(n, workers=workers)
    name = device_name(torch.device("cpu")).replace(f"({torch.get_num_threads()} threads)", f"({r['workers']} workers)")
    base = r["baseline_images_per_s"]
    return [
        Row("eval, plain PySODMetrics + authors' HCE loop", f"{base:.3f} images/s", name, "uint8",
            f"{n} maps 2500x3400"),
        Row("eval.py, cold cache", f"{r['cold_images_per_s']:.3f} images/s", name, "uint8",
            f"{r['cold_images_per_s'] / base:.2f}x the plain loop"),
        Row("eval.py, warm GT cache (metrics recomputed)", f"{r['warm_images_per_s']:.3f} images/s", name, "uint8",
            f"{r['warm_images_per_s'] / base:.2f}x the plain loop"),
        Row("eval.py, rerun (results cache hits)", f"{r['rerun_images_per_s']:.1f} images/s", name, "uint8",
            f"{r['rerun_images_per_s'] / base:.0f}x the plain loop; identical numbers: {r['identical']}"),
    ]




def _started(index: int) -> int:
    """A task that only makes a worker process start."""
    return index


def _plain_loop(tasks: Sequence[ImageTask]) -> dict[str, Any]:
    """The reference way: read with OpenCV, step each PySODMetrics class, the authors' HCE with a fresh skeleton."""
    metrics = DISMetrics()
    for task in tasks:
        gt = cv2.imread(str(task.gt), cv2.IMREAD_GRAYSCALE)
        pred = cv2.imread(str(task.pred), cv2.IMREAD_GRAYSCALE)
        for metric in (metrics.fmeasure, metrics.emeasure, metrics.smeasure, metrics.wfmeasure, metrics.mae):
            metric.step(pred, gt)
        metrics.hce.step(pred, gt, morphology.skeletonize(gt > BINARY_THRESHOLD))
    return metrics.get_results()


def benchmark_eval(n_images: int, size: tuple[int, int] = (2500, 3400), workers: int | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Images/s of a plain PySODMetrics + authors' HCE loop and of this evaluator: cold (empty cache), warm
    (GT caches filled, every image's metrics recomputed) and rerun (the results cache answers).

    `size` is (height, width) of the synthetic GT/prediction pairs, written to a temporary folder.
    `identical` says whether all four produced the same numbers.
    """
    workers = workers or default_workers()
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="fsanet_eval_bench_") as tmp:
        root = Path(tmp)
        (root / "gt" / "bench" / "gt").mkdir(parents=True)
        (root / "pred" / "bench").mkdir(parents=True)
        for i in range(n_images):
            _, gt = shapes_pair(rng, size[1], size[0], ellipses=8, lines=40)
            write_png(gt, root / "gt" / "bench" / "gt" / f"{i:04d}.png")
            write_png(degraded_prediction(gt, rng), root / "pred" / "bench" / f"{i:04d}.png")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        baseline = _plain_loop(pair_predictions("bench", root / "gt", root / "pred", None))
        timings["baseline"] = time.perf_counter() - start
        outputs = {}
        # The workers start before the clock: a worker process imports the running script again (Python's
        # spawn rule), which for benchmark.py means torch, seconds that eval.py's own workers never spend.
        with image_mapper(workers) as mapper:
            list(mapper(_started, range(workers)))
            for run_name, read_results in (("cold", True), ("warm", False), ("rerun", True)):
                start = time.perf_counter()
                outputs[run_name] = evaluate(root / "pred", root / "gt", ["bench"], workers, root / "cache",
                                             progress=False, read_results=read_results, mapper=mapper)["bench"].metrics
                timings[run_name] = time.perf_counter() - start
    ips = {name: n_images / seconds for name, seconds in timings.items()}
    return {
        "n_images": n_images, "size": tuple(size), "workers": workers,
        "baseline_images_per_s": ips["baseline"], "cold_images_per_s": ips["cold"], "warm_images_per_s": ips["warm"],
        "rerun_images_per_s": ips["rerun"], "cold_speedup": ips["cold"] / ips["baseline"],
        "warm_speedup": ips["warm"] / ips["baseline"], "rerun_speedup": ips["rerun"] / ips["baseline"],
        "identical": baseline == outputs["cold"] == outputs["warm"] == outputs["rerun"],
    }
