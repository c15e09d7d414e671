"""DIS5K evaluation of saved prediction maps: pairing, parallel per-image metrics, HCE skeleton cache, reports.

Layout: predictions `<pred_root>/<dataset>/<stem>.png`, ground truth `<gt_root>/<dataset>/gt/<stem>.png`
(or `GT/`). Each image is evaluated in a worker process (`utils.metrics.DISMetrics` on one image) and
the per-image entries are merged in file order in the parent, which gives the numbers of one
sequential PySODMetrics loop. GT skeletons for HCE, the slowest step, are cached on disk under the
SHA-256 of the GT file's bytes, so an edited GT never gets a stale skeleton.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
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
import skimage
from tqdm import tqdm

from utils.atomic import atomic_path, os_reason
from utils.dis5k import EVAL_SPLITS, TE_MEAN_ROW, TE_SUBSETS, expected_folders, split_folders
from utils.errors import EXIT_FAILED, FSANetError, listing
from utils.imageio import ImageReadError, list_images, max_pixels, read_mask, set_max_pixels, write_png
from utils.metrics import ALL_METRICS, BINARY_THRESHOLD, FIELD_METRICS, DISMetrics, gt_skeleton, image_summary

logger = logging.getLogger(__name__)

LOWER_IS_BETTER = frozenset({"MAE", "HCE"})
# Part of every cache key: a different skeletonisation (or skimage version) never reuses old entries.
_SKELETON_TAG = f"skimage {skimage.__version__} skeletonize(gt > {BINARY_THRESHOLD}) v1".encode()


class EvalError(FSANetError):
    """A user error (missing folder or file, unreadable image); the message is one line naming it."""


class UnreadableMapsError(EvalError):
    """Maps or masks found unreadable while evaluating (a run-time fault: exit 1)."""

    exit_code = EXIT_FAILED


@dataclass(frozen=True)
class ImageTask:
    """One prediction/GT pair to evaluate, with the skeleton cache folder (None: no cache)."""

    stem: str
    gt: Path
    pred: Path
    cache_dir: Path | None


@dataclass
class ImageResult:
    """What a worker sends back: the one-image metric state, or why the pair could not be read."""

    stem: str
    state: dict[str, list] | None = None
    pred_size: tuple[int, int] | None = None  # (height, width) before resizing, when resized
    error: str | None = None
    cache_error: str | None = None
    pred_mode: str | None = None  # the prediction file's mode when it was not grayscale (converted to L)


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

    pred_root: Path
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
    """The per-user folder for cached HCE skeletons: $XDG_CACHE_HOME (or ~/.cache)/fsanet/hce_skeletons."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fsanet" / "hce_skeletons"


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


def pair_predictions(name: str, gt_root: Path, pred_root: Path, cache_dir: Path | None) -> list[ImageTask]:
    """One task per GT of a dataset; EvalError if a prediction `<stem>.png` is missing."""
    gt_dir = find_gt_dir(gt_root / name)
    pred_dir = pred_root / name
    if not pred_dir.is_dir():
        raise EvalError(f"prediction folder not found: {pred_dir} (run test.py for {name} or check --pred_root)")
    gts = list_images(gt_dir)
    if not gts:
        raise EvalError(f"no ground-truth images in {gt_dir}")
    tasks = [ImageTask(gt.stem, gt, pred_dir / f"{gt.stem}.png", cache_dir) for gt in gts]
    missing = [task.pred.name for task in tasks if not task.pred.is_file()]
    if missing:
        raise EvalError(f"{name}: {len(missing)} of {len(tasks)} predictions missing in {pred_dir}: "
                        f"{listing(missing)} (run test.py for {name} or check --pred_root)")
    stems = {task.stem for task in tasks}
    extra = [p.name for p in list_images(pred_dir) if p.stem not in stems or p.suffix != ".png"]
    if extra:
        logger.info("%s: ignoring %d file(s) in %s that match no GT as <stem>.png: %s",
                    name, len(extra), pred_dir, listing(extra))
    return tasks


def skeleton_cache_path(gt_bytes: bytes, cache_dir: Path) -> Path:
    """Where the skeleton of a GT file with these bytes is cached."""
    digest = hashlib.sha256(_SKELETON_TAG + b"\0" + gt_bytes).hexdigest()
    return cache_dir / f"{digest}.png"


def _load_skeleton(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """A cached skeleton of the given shape, or None when absent or unusable (it is then recomputed)."""
    if not path.is_file():
        return None
    try:
        skeleton = np.asarray(read_mask(path)) > BINARY_THRESHOLD
    except ImageReadError:
        return None
    return skeleton if skeleton.shape == shape else None


def cached_skeleton(gt_bytes: bytes, gt_bin: np.ndarray, cache_dir: Path | None) -> tuple[np.ndarray, str | None]:
    """The GT's skeleton from the cache or computed (and stored); second item: why storing failed."""
    if cache_dir is None:
        return gt_skeleton(gt_bin), None
    path = skeleton_cache_path(gt_bytes, cache_dir)
    skeleton = _load_skeleton(path, gt_bin.shape)
    if skeleton is not None:
        return skeleton, None
    skeleton = gt_skeleton(gt_bin)
    try:
        write_png(skeleton.astype(np.uint8) * 255, path)
    except OSError as e:
        return skeleton, f"{type(e).__name__}: {e}"
    return skeleton, None


def evaluate_image(task: ImageTask) -> ImageResult:
    """Metrics of one pair (run in a worker); a prediction of another size is resized to the GT's (bilinear)."""
    try:
        gt_bytes = task.gt.read_bytes()
        gt = np.asarray(read_mask(task.gt, data=gt_bytes))
        pred_image = read_mask(task.pred)
        pred = np.asarray(pred_image)
    except ImageReadError as e:
        return ImageResult(task.stem, error=str(e))
    except OSError as e:
        return ImageResult(task.stem, error=f"{task.gt}: cannot read file ({e.strerror or e})")
    pred_size = None
    if pred.shape != gt.shape:
        pred_size = pred.shape
        pred = cv2.resize(pred, (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_LINEAR)
    skeleton, cache_error = cached_skeleton(gt_bytes, gt > BINARY_THRESHOLD, task.cache_dir)
    metrics = DISMetrics()
    metrics.step(pred, gt, skeleton)
    mode = pred_image.info.get("source_mode")
    return ImageResult(task.stem, metrics.state(), pred_size, None, cache_error,
                       None if mode in _GRAY_MODES else mode)


# Modes read as gray levels unchanged; any other (RGB, palette, with alpha) is converted to L with a note.
_GRAY_MODES = frozenset({None, "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"})


def _init_worker(pixel_budget: int) -> None:
    """Keep OpenCV single-threaded in workers (the pool already uses every core); leave Ctrl-C to the parent,
    which reports it in one line, instead of one traceback per worker; use the parent's pixel budget."""
    cv2.setNumThreads(1)
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


def evaluate_dataset(name: str, tasks: Sequence[ImageTask], mapper: Callable, progress: bool = True) -> DatasetResult:
    """Evaluate one dataset's pairs; EvalError naming every unreadable file."""
    metrics = DISMetrics()
    images: list[dict[str, Any]] = []
    unreadable: list[str] = []
    resized: list[str] = []
    cache_errors: set[str] = set()
    colored: list[str] = []
    results = mapper(evaluate_image, tasks)
    for result in tqdm(results, total=len(tasks), desc=name, unit="img", disable=None if progress else True):
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
    if unreadable:
        raise UnreadableMapsError(f"{name}: {len(unreadable)} unreadable image(s): {listing(unreadable, sep='; ')}")
    if resized:
        logger.warning("%s: %d prediction(s) differ in size from their GT and were resized to it (bilinear): %s",
                       name, len(resized), listing(resized))
    if colored:
        logger.warning("%s: %d prediction(s) are not grayscale and were converted to gray levels (PIL's L: "
                       "0.299 R + 0.587 G + 0.114 B, alpha dropped): %s", name, len(colored), listing(colored))
    if cache_errors:
        logger.warning("%s: could not write the HCE skeleton cache (%s); evaluation went on without it",
                       name, listing(sorted(cache_errors), sep="; "))
    return DatasetResult(name, metrics.get_results(), metrics.curves(), images)


def evaluate(pred_root: Path, gt_root: Path, datasets: Sequence[str] = EVAL_SPLITS, workers: int = 1,
             cache_dir: Path | None = None, progress: bool = True) -> dict[str, DatasetResult]:
    """Evaluate every dataset (all pairs are checked before any image is evaluated)."""
    datasets = list(dict.fromkeys(datasets))
    if not datasets:
        raise EvalError("no datasets to evaluate (pass --datasets)")
    tasks = {name: pair_predictions(name, Path(gt_root), Path(pred_root), cache_dir) for name in datasets}
    total = sum(len(t) for t in tasks.values())
    with image_mapper(min(workers, total)) as mapper:
        return {name: evaluate_dataset(name, tasks[name], mapper, progress) for name in datasets}


def summary_rows(results: dict[str, DatasetResult]) -> dict[str, dict[str, Any]]:
    """Metrics per dataset, plus the DIS-TE (1-4) row (mean of the four subsets) when all four were evaluated."""
    rows = {name: dict(result.metrics) for name, result in results.items()}
    if all(subset in rows for subset in TE_SUBSETS):
        te_mean = {m: float(np.mean([rows[s][m] for s in TE_SUBSETS])) for m in ALL_METRICS}
        rows[TE_MEAN_ROW] = {**te_mean, "n": sum(rows[s]["n"] for s in TE_SUBSETS)}
    return rows


def _format(metric: str, value: float, digits: int) -> str:
    """A table cell: HCE as a whole number (as the field prints it), the others with `digits` decimals."""
    return f"{value:.0f}" if metric == "HCE" else f"{value:.{digits}f}"


def markdown_table(rows: dict[str, dict[str, Any]], metrics: Sequence[str] = FIELD_METRICS, digits: int = 3) -> str:
    """The rows as a Markdown table, one column per metric."""
    lines = ["| Dataset | " + " | ".join(metrics) + " |", "|:--|" + "--:|" * len(metrics)]
    lines += [f"| {name} | " + " | ".join(_format(m, row[m], digits) for m in metrics) + " |"
              for name, row in rows.items()]
    return "\n".join(lines)


def latex_table(rows: dict[str, dict[str, Any]], metrics: Sequence[str] = FIELD_METRICS, digits: int = 3) -> str:
    """The rows as a booktabs LaTeX tabular, with arrows for better direction."""
    header = " & ".join(f"{m}$\\{'downarrow' if m in LOWER_IS_BETTER else 'uparrow'}$" for m in metrics)
    body = [f"{name} & " + " & ".join(_format(m, row[m], digits) for m in metrics) + r" \\"
            for name, row in rows.items()]
    return "\n".join([f"\\begin{{tabular}}{{l{'c' * len(metrics)}}}", r"\toprule", f"Dataset & {header} \\\\",
                      r"\midrule", *body, r"\bottomrule", r"\end{tabular}"]) + "\n"


def write_json(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """{dataset: {metric: value, ..., "n": images}} with every metric at full precision."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(rows, indent=1) + "\n")


def write_csv(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """One line per dataset: dataset, n and every metric at full precision."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "n", *ALL_METRICS])
        writer.writerows([name, row["n"], *(repr(row[m]) for m in ALL_METRICS)] for name, row in rows.items())


def write_per_image_csv(results: dict[str, DatasetResult], path: Path) -> None:
    """One line per image: dataset, file stem, MAE, HCE, the other metrics on that image alone, resized_from."""
    columns = ["MAE", "HCE", *(m for m in ALL_METRICS if m not in ("MAE", "HCE"))]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "image", *columns, "resized_from"])
        for name, result in results.items():
            writer.writerows([name, im["image"], *(repr(im[m]) for m in columns), im["resized_from"]]
                             for im in result.images)


def save_plots(results: dict[str, DatasetResult], plot_dir: Path) -> list[Path]:
    """`<dataset>_pr.png` (precision-recall) and `<dataset>_fmeasure.png` (F-measure vs threshold) per dataset."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for name, result in results.items():
        c = result.curves
        plots = (("pr", c["recall"], c["precision"], "Recall", "Precision", f"{name}: PR curve"),
                 ("fmeasure", c["threshold"], c["fmeasure"], "Threshold", "F-measure (beta^2 = 0.3)",
                  f"{name}: maxF {result.metrics['maxF']:.3f}, meanF {result.metrics['meanF']:.3f}"))
        for suffix, x, y, xlabel, ylabel, title in plots:
            fig = Figure(figsize=(5, 4), dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            ax.plot(x, y)
            ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(x.min(), x.max()), ylim=(0, 1.02))
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = Path(plot_dir) / f"{name}_{suffix}.png"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png")
            written.append(path)
    return written


def write_latex(rows: dict[str, dict[str, Any]], path: Path, metrics: Sequence[str], digits: int) -> None:
    """latex_table() written to `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(latex_table(rows, metrics, digits))


def write_outputs(config: EvalConfig, results: dict[str, DatasetResult], rows: dict[str, dict[str, Any]]) -> list[str]:
    """Write every file config asks for; returns one line per output that could not be written."""
    writers = [(config.save_json, lambda p: write_json(rows, p)), (config.save_csv, lambda p: write_csv(rows, p)),
               (config.save_latex, lambda p: write_latex(rows, p, config.metrics, config.digits)),
               (config.per_image_csv, lambda p: write_per_image_csv(results, p)),
               (config.plot_dir, lambda p: save_plots(results, p))]
    failed = []
    for path, write in writers:
        if path is None:
            continue
        try:
            write(Path(path))
        except OSError as e:
            failed.append(f"cannot write {path} ({os_reason(e)}); the table above is complete, rerun with a "
                          "writable path for this output")
    return failed


def run_evaluation(config: EvalConfig) -> tuple[str, list[str]]:
    """Evaluate, write the requested files; the Markdown table of config.metrics and the outputs that failed."""
    results = evaluate(config.pred_root, config.gt_root, config.datasets, config.workers, config.cache_dir)
    rows = summary_rows(results)
    return markdown_table(rows, config.metrics, config.digits), write_outputs(config, results, rows)
