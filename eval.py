"""Evaluate saved prediction maps on DIS5K and print the field's table (maxF, wF, MAE, Sm, meanEm, HCE).

Example: python eval.py --pred_root results/FSANet --gt_root data/DIS5K --save_json results/FSANet/metrics.json
Comparison: python eval.py --pred_root results/FSANet results/IS-Net Ours=results/run7 --plot_dir results/curves
"""
from __future__ import annotations

from pipelines.cli import quiet_interrupts_while_starting

quiet_interrupts_while_starting(__name__)  # before the imports below: they take seconds to load

import argparse
import logging
import sys
from pathlib import Path

from pipelines.cli import exit_process, int_at_least, run_cli
from pipelines.evaluation import EvalConfig, default_cache_dir, default_workers, run_evaluation
from utils.dis5k import EVAL_SPLITS
from utils.errors import EXIT_FAILED, EXIT_OK
from utils.imageio import DEFAULT_MAX_PIXELS, set_max_pixels
from utils.metrics import ALL_METRICS, BOUNDARY_METRICS, FIELD_METRICS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred_root", nargs="+", default=["results/FSANet"], metavar="[NAME=]DIR",
                   help="folder with one sub-folder of <stem>.png prediction maps per dataset; several folders "
                        "compare several methods, each named by its folder name or NAME")
    p.add_argument("--gt_root", type=Path, default=Path("data/DIS5K"),
                   help="DIS5K root: <gt_root>/<dataset>/gt/<stem>.png (or GT/)")
    p.add_argument("--datasets", nargs="+", default=list(EVAL_SPLITS),
                   help="datasets to evaluate; the 'DIS-TE (1-4)' row (mean of the four subsets) is added "
                        "when DIS-TE1..4 are all among them")
    p.add_argument("--workers", "--num_workers", dest="workers", type=int_at_least(1), default=default_workers(),
                   help="worker processes evaluating images in parallel (default: all cores)")
    p.add_argument("--cache_dir", type=Path, default=None,
                   help=f"folder caching what depends on a GT alone (HCE skeleton, weighted-F and S-measure GT parts, "
                        f"boundary bands) and each image's results; every entry is keyed by the files' content, the "
                        f"repo code that computes it and the libraries' versions (default: {default_cache_dir()})")
    p.add_argument("--no_cache", action="store_true", help="recompute everything, read and write no cache")
    p.add_argument("--metrics", nargs="+", choices=ALL_METRICS + BOUNDARY_METRICS, default=list(FIELD_METRICS),
                   metavar="METRIC",
                   help=f"table columns, any of {' '.join(ALL_METRICS)}, and BiRefNet's boundary metrics "
                        f"{' '.join(BOUNDARY_METRICS)} (computed only when asked for) (default: the field's "
                        f"{' '.join(FIELD_METRICS)}); JSON and CSV always hold all computed metrics")
    p.add_argument("--digits", type=int_at_least(0), default=3,
                   help="decimals in the printed and LaTeX tables (HCE: none)")
    p.add_argument("--save_json", type=Path, help="write {dataset: {metric: value, ..., 'n': images}} here "
                                                   "({method: {dataset: ...}} for several methods)")
    p.add_argument("--save_csv", type=Path, help="write one CSV line per dataset (and method) with every metric here")
    p.add_argument("--save_latex", type=Path, help="write the table as a LaTeX (booktabs) tabular here; several "
                                                    "methods: best \\textbf, second \\underline")
    p.add_argument("--per_image_csv", type=Path, help="write every image's metrics (MAE, HCE, ...) here")
    p.add_argument("--plot_dir", type=Path, help="write <dataset>_pr.png and <dataset>_fmeasure.png curves here "
                                                  "(every method's curve in one figure)")
    p.add_argument("--max_pixels", type=int_at_least(1), default=DEFAULT_MAX_PIXELS,
                   help="refuse maps and masks whose header says more pixels than this, before decoding "
                        "(decompression bombs; default: PIL's own limit, which every DIS5K image fits)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; a problem ends in one `error:` line and the exit code of utils.errors."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    set_max_pixels(args.max_pixels)
    config = EvalConfig(
        pred_root=args.pred_root, gt_root=args.gt_root, datasets=args.datasets, workers=args.workers,
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
        metrics=list(dict.fromkeys(args.metrics)),  # a metric named twice is one column
        digits=args.digits, save_json=args.save_json, save_csv=args.save_csv, save_latex=args.save_latex,
        per_image_csv=args.per_image_csv, plot_dir=args.plot_dir,
    )
    return run_cli(lambda: print_table(config), interrupted=lambda: "no table printed and no output written")


def print_table(config: EvalConfig) -> int:
    """Evaluate and print the table, then one `error:` line per output file that could not be written (exit 1)."""
    table, failed = run_evaluation(config)
    print(table, flush=True)
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    exit_process(main())
