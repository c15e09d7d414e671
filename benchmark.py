"""Measure FSANet's cost: parameters, MACs, inference latency and memory, runtimes, whole test.py runs, training,
data loading, eval.

    python benchmark.py                      # everything, at the release's sizes, on the GPU if present
    python benchmark.py --only inference --size 512 --runs 3

Prints one Markdown table (each row names its device and dtype) and can save it with --report.
Speed-ups are ratios to the release's way of computing, timed in the same run.
"""
from __future__ import annotations

from pipelines.cli import quiet_interrupts_while_starting

quiet_interrupts_while_starting(__name__)  # before the imports below: they take seconds to load

import argparse
import json
import logging
from pathlib import Path

import torch

from pipelines.benchmarks.eval_speed import eval_rows
from pipelines.benchmarks.loading import data_rows
from pipelines.benchmarks.model import TRAIN_VARIANTS, inference_rows, train_rows
from pipelines.benchmarks.pipeline import pipeline_rows
from pipelines.benchmarks.runtimes import runtime_rows
from pipelines.benchmarks.timing import Row, rows_table
from pipelines.cli import exit_process, int_at_least, run_cli
from utils.device import AMP_CHOICES, resolve_device
from utils.errors import EXIT_OK

PARTS = ("inference", "runtimes", "pipeline", "train", "data", "eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to measure")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--size", type=int_at_least(32, multiple=32), default=1024,
                   help="inference input side (a multiple of 32, the encoders' coarsest stride)")
    p.add_argument("--batch", type=int_at_least(1), default=4, help="the larger inference batch")
    p.add_argument("--runs", type=int_at_least(1), default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the fast model")
    p.add_argument("--pipeline_images", type=int_at_least(1), default=3,
                   help="generated photos that test.py and the release's test.py each process (pipeline part)")
    p.add_argument("--trainsize", type=int_at_least(32), default=736, help="training size (the release's)")
    p.add_argument("--train_batch", type=int_at_least(2), default=2, help="training batch size")
    p.add_argument("--train_runs", type=int_at_least(1), default=1, help="timed training batches (median reported)")
    p.add_argument("--train_amp", choices=AMP_CHOICES, default="none", help="training mixed precision")
    p.add_argument("--train_variants", nargs="+", choices=TRAIN_VARIANTS, default=["plain"],
                   help="training rows: plain, accum (--accum_steps), checkpointing (--grad_checkpointing), both")
    p.add_argument("--train_accum_steps", type=int_at_least(1), default=2, help="--accum_steps of the accum variants")
    p.add_argument("--train_warmup", type=int_at_least(0), default=0,
                   help="untimed training batches first (0 on a CPU, where one is minutes; 1 on a GPU)")
    p.add_argument("--data_images", type=int_at_least(1), default=8,
                   help="generated 2500x3400 JPEGs for the loading benchmark")
    p.add_argument("--eval_images", type=int_at_least(1), default=8,
                   help="generated 2500x3400 maps for the eval benchmark")
    p.add_argument("--eval_workers", type=int_at_least(1), default=None,
                   help="eval worker processes (default: all cores)")
    p.add_argument("--report", type=Path, default=None,
                   help="also write the table (Markdown) here, and .json beside it")
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> list[Row]:
    """The rows of every part asked for."""
    device = resolve_device(args.device)
    rows: list[Row] = []
    if "inference" in args.only:
        rows += inference_rows(args.size, args.batch, args.runs, device, args.compile)
    if "runtimes" in args.only:  # ONNX export under OpenVINO and onnxruntime: CPU rows
        rows += runtime_rows(args.size, args.runs)
    if "pipeline" in args.only:  # whole test.py processes, ours (OpenVINO) and the release's: CPU rows
        rows += pipeline_rows(args.size, args.pipeline_images, args.runs)
    if "train" in args.only:
        # train.py's --device as given: "auto"/"cuda" mean DataParallel over every visible GPU, as in training.
        rows += train_rows(args.trainsize, args.train_batch, args.train_runs, args.device, args.train_amp,
                           tuple(args.train_variants), args.train_accum_steps, args.train_warmup)
    if "data" in args.only:
        rows += data_rows(args.data_images, args.trainsize)
    if "eval" in args.only:
        rows += eval_rows(args.eval_images, args.eval_workers)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts and print the table; a setup problem is one error line."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    return run_cli(lambda: report(args, measure(args)))


def report(args: argparse.Namespace, rows: list[Row]) -> int:
    """Print the table and write it (and its JSON) to --report."""
    table = rows_table(rows)
    print(f"torch {torch.__version__}\n\n{table}")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(table + "\n")
        args.report.with_suffix(".json").write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))
    return EXIT_OK


if __name__ == "__main__":
    exit_process(main())
