"""DIS5K evaluation of saved prediction maps: pairing, parallel per-image metrics, caches, one or several methods.

Layout: predictions `<pred_root>/<dataset>/<stem>.png`, ground truth `<gt_root>/<dataset>/gt/<stem>.png`
(or `GT/`); several methods are several pred roots. The pairs of one GT (one per method) are evaluated
together in a worker process (`utils.pair_eval`), which reads the GT and computes what depends on it
alone (HCE skeleton, weighted-F ground, boundary bands) once, and the per-image entries are merged in
file order in the parent, which gives the numbers of one sequential PySODMetrics loop. GT parts and
per-image results are cached on disk under keys covering the files' bytes, the code that computes them
and the libraries' versions (`utils.gt_cache`, `utils.result_cache`). Reports: `pipelines.eval_reports`.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import multiprocessing as mp
import os
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from pipelines import eval_reports as reports
from utils.boundary_metrics import undefined_mba
from utils.cache_keys import default_cache_dir as fsanet_cache_dir
from utils.cache_keys import remove_orphaned_temps
from utils.dis5k import EVAL_SPLITS, TE_MEAN_ROW, TE_SUBSETS, expected_folders, split_folders
from utils.errors import FSANetError, RunError, listing
from utils.imageio import list_images, max_pixels, set_max_pixels
from utils.metrics import BOUNDARY_METRICS, FIELD_METRICS, DISMetrics, image_summary
from utils.pair_eval import GTTask, ImageResult, ImageTask, evaluate_gt, evaluate_image

__all__ = ["DatasetResult", "EvalConfig", "EvalError", "EvalFailed", "ImageResult", "ImageTask", "Method",
           "evaluate", "evaluate_image", "evaluate_methods", "pair_predictions", "run_evaluation"]

logger = logging.getLogger(__name__)



class EvalError(FSANetError):
    """A user error found before evaluating (missing folder or prediction, clashing names): exit 2."""


class EvalFailed(RunError):
    """Evaluation ran but could not finish or write what was asked (unreadable image, report): exit 1."""


@dataclass(frozen=True)
class Method:
    """One method of a comparison: its name and its folder of per-dataset prediction folders."""

    name: str
    root: Path


@dataclass
class DatasetResult:
    """The metrics of one dataset, its mean curves and per-image values."""

    name: str
    metrics: dict[str, Any]
    curves: dict[str, np.ndarray]
    images: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EvalConfig:
    """Everything eval.py passes on: where the maps are, how to evaluate, what to write."""

    pred_root: Path | Sequence[str | Path]  # one folder, or several methods (DIR or NAME=DIR each)
    gt_root: Path
    datasets: Sequence[str] = EVAL_SPLITS
    workers: int = 1
    cache_dir: Path | None = None
    metrics: Sequence[str] = FIELD_METRICS
    digits: int = 3
    save_json: Path | None = None
    save_csv: Path | None = None
    save_latex: Path | None = None
    per_image_csv: Path | None = None
    plot_dir: Path | None = None


def default_cache_dir() -> Path:
    """The per-user eval cache folder (GT caches and results): `eval/` in fsanet's cache ($XDG_CACHE_HOME/fsanet)."""
    return fsanet_cache_dir() / "eval"


def default_workers() -> int:
    """All CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def find_gt_dir(dataset_dir: Path) -> Path:
    """The `gt/` (or `GT/`) folder of a dataset; EvalError when there is none."""
    if not dataset_dir.is_dir():
        raise EvalError(f"dataset folder not found: {dataset_dir} (check --gt_root and --datasets)")
    found = split_folders(dataset_dir, images=False)
    if found is None:
        raise EvalError(f"no ground-truth folder in {dataset_dir}: expected {expected_folders(images=False)} inside it")
    return found[1]


def pair_predictions(name: str, gt_root: Path, pred_root: Path, cache_dir: Path | None, boundary: bool = False,
                     read_results: bool = True, method: str | None = None) -> list[ImageTask]:
    """One task per GT of a dataset; a missing prediction `<stem>.png` is an EvalError for a single
    method, and for a `method` of a comparison a warning listing them (it is evaluated on the rest)."""
    gt_dir = find_gt_dir(gt_root / name)
    pred_dir = pred_root / name
    if not pred_dir.is_dir():
        raise EvalError(f"prediction folder not found: {pred_dir} (run test.py for {name} or check --pred_root)")
    gts = list_images(gt_dir)
    if not gts:
        raise EvalError(f"no ground-truth images in {gt_dir}")
    tasks = [ImageTask(gt.stem, gt, pred_dir / f"{gt.stem}.png", cache_dir, boundary, read_results) for gt in gts]
    missing = [task.pred.name for task in tasks if not task.pred.is_file()]
    if missing and method is None:
        raise EvalError(f"{name}: {len(missing)} of {len(tasks)} predictions missing in {pred_dir}: "
                        f"{listing(missing)} (run test.py for {name} or check --pred_root)")
    if missing:
        logger.warning("%s, %s: %d of %d predictions missing in %s, evaluated on the other %d: %s", method, name,
                       len(missing), len(tasks), pred_dir, len(tasks) - len(missing), listing(missing))
        tasks = [task for task in tasks if task.pred.is_file()]
    stems = {task.stem for task in tasks}
    extra = [p.name for p in list_images(pred_dir) if p.stem not in stems or p.suffix != ".png"]
    if extra:
        logger.info("%s: ignoring %d file(s) in %s that match no GT as <stem>.png: %s",
                    name, len(extra), pred_dir, listing(extra))
    return tasks


def _keep_freed_memory() -> None:
    """Under glibc, serve large arrays from the heap and keep freed memory: the metrics' full-image
    temporaries then reuse pages instead of faulting fresh ones in for every image (about 10% of the time).
    Resident memory stays at the largest image's working set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass  # another C library: its defaults


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _init_worker(pixel_budget: int) -> None:
    """Keep OpenCV single-threaded in workers (the pool already uses every core); leave Ctrl-C to the parent,
    which reports it in one line, instead of one traceback per worker; use the parent's pixel budget."""
    cv2.setNumThreads(1)
    _keep_freed_memory()
    set_max_pixels(pixel_budget)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def image_mapper(workers: int) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
    """An ordered map over images: in this process for one worker, else over a process pool."""
    if workers <= 1:
        yield map
        return
    # Forking this process could copy OpenCV's thread-pool locks mid-use and hang the workers; a fork
    # server starts them from a clean process that has only imported this module.
    if "forkserver" in mp.get_all_start_methods():
        context = mp.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    else:
        context = mp.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                               initargs=(max_pixels(),))
    try:
        yield functools.partial(pool.map, chunksize=1)
    finally:
        # On an error or Ctrl-C, do not wait for the rest of a large dataset.
        pool.shutdown(wait=True, cancel_futures=True)


def evaluate_runs(runs: dict[tuple[str, str], Sequence[ImageTask]], mapper: Callable,
                  progress: bool = True) -> dict[tuple[str, str], list[ImageResult]]:
    """Evaluate the pairs of every (method, dataset) run; the pairs of one GT (one per method) go to one
    worker, which computes that GT's side once. One progress bar counts every pair of the whole run."""
    for cache_dir in {task.cache_dir for tasks in runs.values() for task in tasks} - {None}:
        # What an interrupted run of ours left half-written in the cache.
        remove_orphaned_temps(cache_dir, (".png", ".npz", ".json"), recursive=True)
    groups: dict[Path, list[tuple[tuple[str, str], ImageTask]]] = {}
    for run, tasks in runs.items():
        for task in tasks:
            groups.setdefault(task.gt, []).append((run, task))
    ordered = list(groups.values())
    results: dict[tuple[str, str], dict[Path, ImageResult]] = {run: {} for run in runs}
    total = sum(len(tasks) for tasks in runs.values())
    with tqdm(total=total, desc="eval", unit="img", disable=None if progress else True) as bar:
        for members, outcome in zip(ordered, mapper(evaluate_gt, [GTTask(tuple(t for _, t in m)) for m in ordered])):
            for (run, task), result in zip(members, outcome):
                results[run][task.gt] = result
            bar.update(len(members))
    return {run: [results[run][task.gt] for task in tasks] for run, tasks in runs.items()}


def dataset_result(name: str, tasks: Sequence[ImageTask], results: Sequence[ImageResult],
                   label: str | None = None) -> DatasetResult:
    """Merge one dataset's per-image results in file order; EvalFailed naming every unreadable file, warnings
    for resized, converted and uncached images (`label`: the method, in messages)."""
    metrics = DISMetrics(bool(tasks) and tasks[0].boundary)
    name_shown = name if label is None else f"{label}, {name}"
    images: list[dict[str, Any]] = []
    unreadable: list[str] = []
    resized: list[str] = []
    cache_errors: set[str] = set()
    colored: list[str] = []
    cutouts: list[str] = []
    for result in results:
        if result.error is not None:
            unreadable.append(result.error)
            continue
        metrics.merge(result.state)
        size = "" if result.pred_size is None else f"{result.pred_size[1]}x{result.pred_size[0]}"
        images.append({"image": result.stem, **image_summary(result.state), "resized_from": size})
        if result.pred_size is not None:
            resized.append(f"{result.stem}.png ({size})")
        if result.cache_error is not None:
            cache_errors.add(result.cache_error)
        if result.pred_mode is not None:
            colored.append(f"{result.stem}.png ({result.pred_mode})")
        if result.alpha_map:
            cutouts.append(f"{result.stem}.png")
    if unreadable:
        raise EvalFailed(f"{name_shown}: {len(unreadable)} unreadable image(s): {listing(unreadable, sep='; ')}")
    if resized:
        logger.warning("%s: %d prediction(s) differ in size from their GT and were resized to it (bilinear): %s",
                       name_shown, len(resized), listing(resized))
    if colored:
        logger.warning("%s: %d prediction(s) are not grayscale and were converted to gray levels (PIL's L: "
                       "0.299 R + 0.587 G + 0.114 B, alpha dropped): %s", name_shown, len(colored), listing(colored))
    if cutouts:
        logger.warning("%s: %d prediction(s) have an alpha channel that varies (cutouts, as test.py --save_mode "
                       "rgba writes them): their alpha was scored as the map: %s", name_shown, len(cutouts),
                       listing(cutouts))
    no_boundary = undefined_mba(images)
    if no_boundary:
        logger.warning("%s: mBA is undefined for %d image(s) whose GT is all background or all foreground (no "
                       "boundary; BiRefNet's code gives NaN); mBA averages the other images: %s", name_shown,
                       len(no_boundary), listing(no_boundary))
    if cache_errors:
        logger.warning("%s: could not write the HCE skeleton cache or other eval cache entries (%s); "
                       "evaluation went on without it",
                       name_shown, listing(sorted(cache_errors), sep="; "))
    return DatasetResult(name, metrics.get_results(), metrics.curves(), images)


def evaluate(pred_root: Path, gt_root: Path, datasets: Sequence[str] = EVAL_SPLITS, workers: int = 1,
             cache_dir: Path | None = None, progress: bool = True, boundary: bool = False,
             read_results: bool = True, mapper: Callable | None = None) -> dict[str, DatasetResult]:
    """Evaluate every dataset of one method (all pairs are checked before any image is evaluated);
    `mapper`: an `image_mapper` already started, used instead of starting `workers` processes."""
    datasets = list(dict.fromkeys(datasets))
    if not datasets:
        raise EvalError("no datasets to evaluate (pass --datasets)")
    tasks = {name: pair_predictions(name, Path(gt_root), Path(pred_root), cache_dir, boundary, read_results)
             for name in datasets}
    total = sum(len(t) for t in tasks.values())
    runs = {("", name): tasks[name] for name in datasets}
    if mapper is not None:
        results = evaluate_runs(runs, mapper, progress)
    else:
        with image_mapper(min(workers, total)) as started:
            results = evaluate_runs(runs, started, progress)
    return {name: dataset_result(name, tasks[name], results[("", name)]) for name in datasets}


def check_folder(path: Path, flag: str) -> None:
    """EvalError when `path` is a file: the flag takes a folder."""
    if path.exists() and not path.is_dir():
        raise EvalError(f"{flag} {path}: is a file, not a folder; {flag} takes a folder")


def parse_methods(specs: Sequence[str | Path]) -> list[Method]:
    """Methods from `DIR` (named by the folder) or `NAME=DIR`; EvalError when two share a name."""
    methods = []
    for spec in specs:
        name, sep, folder = str(spec).partition("=")
        if sep and not name and not Path(spec).exists():
            raise EvalError(f"--pred_root {spec}: the NAME before '=' is empty; write NAME=DIR, or DIR alone "
                            "to name the method by its folder")
        if not sep or not name or os.sep in name:
            name, folder = Path(spec).resolve().name or str(spec), str(spec)
        check_folder(Path(folder), "--pred_root")
        methods.append(Method(name, Path(folder)))
    seen: dict[str, Method] = {}
    for method in methods:
        if method.name in seen:
            raise EvalError(f"--pred_root: {seen[method.name].root} and {method.root} are both named "
                              f"{method.name!r}; rename one as NAME=DIR")
        seen[method.name] = method
    return methods


def evaluate_methods(methods: Sequence[Method], gt_root: Path, datasets: Sequence[str], workers: int = 1,
                     cache_dir: Path | None = None, progress: bool = True,
                     boundary: bool = False) -> tuple[dict[str, dict[str, DatasetResult]], dict[str, int]]:
    """Evaluate several methods; a method without a dataset's folder is left out of that dataset.

    Returns {method: {dataset: result}} and the number of GT images per dataset.
    """
    datasets = list(dict.fromkeys(datasets))
    if not datasets:
        raise EvalError("no datasets to evaluate (pass --datasets)")
    gt_counts = {name: len(list_images(find_gt_dir(Path(gt_root) / name))) for name in datasets}
    tasks: dict[str, dict[str, list[ImageTask]]] = {m.name: {} for m in methods}
    for method in methods:
        if not method.root.is_dir():
            raise EvalError(f"--pred_root: method {method.name}: folder not found: {method.root}")
        for name in datasets:
            if not (method.root / name).is_dir():
                logger.warning("%s: no %s folder in %s; left out of %s", method.name, name, method.root, name)
                continue
            found = pair_predictions(name, Path(gt_root), method.root, cache_dir, boundary, True, method.name)
            if found:
                tasks[method.name][name] = found
    for name in datasets:
        if not any(name in per for per in tasks.values()):
            raise EvalError(f"{name}: no method has predictions for it (check --pred_root and --datasets)")
    runs = {(method, name): t for method, per in tasks.items() for name, t in per.items()}
    total = len({task.gt for t in runs.values() for task in t})
    with image_mapper(min(workers, total)) as mapper:
        evaluated = evaluate_runs(runs, mapper, progress)
    results = {method: {name: dataset_result(name, t, evaluated[(method, name)], method) for name, t in per.items()}
               for method, per in tasks.items()}
    return results, gt_counts


def summary_rows(results: dict[str, DatasetResult]) -> dict[str, dict[str, Any]]:
    """Metrics per dataset, plus the DIS-TE (1-4) row (mean of the four subsets) when all four were evaluated."""
    rows = {name: dict(result.metrics) for name, result in results.items()}
    if all(subset in rows for subset in TE_SUBSETS):
        te_mean = {m: float(np.mean([rows[s][m] for s in TE_SUBSETS])) for m in rows[TE_SUBSETS[0]] if m != "n"}
        rows[TE_MEAN_ROW] = {**te_mean, "n": sum(rows[s]["n"] for s in TE_SUBSETS)}
    return rows


def write_outputs(config: EvalConfig, results: dict[str, dict[str, DatasetResult]],
                  tables: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Write every file config asks for; returns one line per output that could not be written."""
    return reports.write_reports(results, tables, config.metrics, config.digits, json_path=config.save_json,
                                 csv_path=config.save_csv, latex_path=config.save_latex,
                                 per_image_path=config.per_image_csv, plot_dir=config.plot_dir)


def run_evaluation(config: EvalConfig) -> tuple[str, list[str]]:
    """Evaluate and write the requested files: the Markdown table(s) of config.metrics and the outputs that failed."""
    specs = [config.pred_root] if isinstance(config.pred_root, (str, Path)) else list(config.pred_root)
    check_folder(Path(config.gt_root), "--gt_root")
    methods = parse_methods(specs)
    boundary = any(m in BOUNDARY_METRICS for m in config.metrics)
    if len(methods) == 1:  # today's single-method run: a missing prediction is an error
        results = {methods[0].name: evaluate(methods[0].root, config.gt_root, config.datasets, config.workers,
                                             config.cache_dir, boundary=boundary)}
    else:
        results, gt_counts = evaluate_methods(methods, config.gt_root, config.datasets, config.workers,
                                              config.cache_dir, boundary=boundary)
    tables = {method: summary_rows(per) for method, per in results.items()}
    failed = write_outputs(config, results, tables)
    if len(methods) == 1:
        return reports.markdown_table(tables[methods[0].name], config.metrics, config.digits), failed
    if all(s in gt_counts for s in TE_SUBSETS):
        gt_counts[TE_MEAN_ROW] = sum(gt_counts[s] for s in TE_SUBSETS)
    return reports.comparison_markdown(tables, config.metrics, config.digits, gt_counts), failed
