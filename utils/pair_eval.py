"""One GT and every method's prediction of it, evaluated in one worker: the GT's side is computed once.

A comparison of N methods evaluates each GT N times; grouping the N pairs of a GT into one `GTTask`
reads, decodes and prepares the GT (HCE skeleton, weighted-F ground, boundary bands; from the disk cache
when there is one) once for all of them. Each pair's results are cached by the GT's and the prediction's
bytes (digests of the bytes read, which are the bytes decoded), the metric set, the code digest of this
module and everything it imports, and the libraries' versions (`utils.result_cache`); a cache hit
replays the first pass's notes (a color prediction converted to gray, a resized one).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.boundary_metrics import BoundaryGround
from utils.gt_cache import cached_boundary_ground, cached_skeleton, cached_sm_ground, cached_wf_ground
from utils.imageio import ImageReadError, read_map, read_mask
from utils.metrics import BINARY_THRESHOLD, BOUNDARY_METRICS, FIELD_METRICS, DISMetrics
from utils.result_cache import load_result, result_key, store_result
from utils.structure_measure import SMGround
from utils.wf_ground import WFGround

# Modes read as gray levels unchanged; any other (RGB, palette, with alpha) is converted to L with a note.
_GRAY_MODES = frozenset({None, "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class ImageTask:
    """One prediction/GT pair to evaluate, with the cache folder (None: no cache) and the metric set."""

    stem: str
    gt: Path
    pred: Path
    cache_dir: Path | None
    boundary: bool = False
    read_results: bool = True  # False: recompute even when the results cache has this pair


@dataclass(frozen=True)
class GTTask:
    """Every pair that shares one GT file (one per method), evaluated together in one worker."""

    pairs: tuple[ImageTask, ...]


@dataclass
class ImageResult:
    """What a worker sends back: the one-image metric state, or why the pair could not be read."""

    stem: str
    state: dict[str, list] | None = None
    pred_size: tuple[int, int] | None = None  # (height, width) before resizing, when resized
    error: str | None = None
    cache_error: str | None = None
    cached: bool = False
    pred_mode: str | None = None  # the prediction file's mode when it was not grayscale (converted to L)
    alpha_map: bool = False  # the prediction's varying alpha was scored as the map (a test.py rgba cutout)


@dataclass
class GTSide:
    """One GT, read once: its bytes, and (on first need) its decoded map and the metrics' GT parts."""

    task: ImageTask
    data: bytes
    gt: np.ndarray | None = None
    skeleton: np.ndarray | None = None
    wf: WFGround | None = None
    bands: BoundaryGround | None = None
    sm: SMGround | None = None
    cache_error: str | None = None

    def prepare(self) -> None:
        """Decode the GT and get its parts from the cache or compute them (ImageReadError if undecodable)."""
        if self.gt is not None:
            return
        gt = np.asarray(read_mask(self.task.gt, data=self.data))
        gt_bin = gt > BINARY_THRESHOLD
        cache_dir = self.task.cache_dir
        self.skeleton, skeleton_error = cached_skeleton(self.data, gt_bin, cache_dir)
        self.wf, wf_error = cached_wf_ground(self.data, gt_bin, cache_dir)
        self.sm, sm_error = cached_sm_ground(self.data, gt_bin, cache_dir)
        bands_error = None
        if self.task.boundary:
            self.bands, bands_error = cached_boundary_ground(self.data, gt, cache_dir)
        self.cache_error = skeleton_error or wf_error or sm_error or bands_error
        self.gt = gt


def _read_bytes(path: Path) -> bytes:
    """A file's bytes; ImageReadError naming it when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read file ({e.strerror or e})") from e


def _gray_note(mode: str | None) -> str | None:
    """The file mode worth a note (not a gray one), else None."""
    return None if mode in _GRAY_MODES else mode


def evaluate_pair(task: ImageTask, side: GTSide) -> ImageResult:
    """Metrics of one pair whose GT is `side`; a prediction of another size is resized to the GT's (bilinear)."""
    try:
        pred_bytes = _read_bytes(task.pred)
        metric_set = FIELD_METRICS + (BOUNDARY_METRICS if task.boundary else ())
        key = result_key(side.data, pred_bytes, metric_set) if task.cache_dir is not None else ""
        names = list(DISMetrics(task.boundary).state())
        hit = load_result(task.cache_dir, key, names) if key and task.read_results else None
        if hit is not None:
            return ImageResult(task.stem, hit["state"], hit["pred_size"], cached=True, pred_mode=hit["pred_mode"],
                               alpha_map=hit["alpha_map"])
        side.prepare()
        pred_image = read_map(task.pred, data=pred_bytes)
        pred = np.asarray(pred_image)
    except ImageReadError as e:
        return ImageResult(task.stem, error=str(e))
    gt = side.gt
    pred_size = None
    if pred.shape != gt.shape:
        pred_size = pred.shape
        pred = cv2.resize(pred, (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_LINEAR)
    metrics = DISMetrics(task.boundary)
    metrics.step(pred, gt, side.skeleton, side.wf, side.bands, side.sm)
    state, store_error = metrics.state(), None
    alpha = bool(pred_image.info.get("alpha_map", False))
    mode = None if alpha else _gray_note(pred_image.info.get("source_mode"))
    if key:
        try:
            store_result(task.cache_dir, key, state, pred_size, mode, alpha)
        except OSError as e:
            store_error = f"{type(e).__name__}: {e}"
    return ImageResult(task.stem, state, pred_size, None, side.cache_error or store_error, pred_mode=mode,
                       alpha_map=alpha)


def evaluate_gt(group: GTTask) -> list[ImageResult]:
    """Every pair of one GT, in order (run in a worker): the GT is read once and its side computed once."""
    first = group.pairs[0]
    try:
        side = GTSide(first, _read_bytes(first.gt))
    except ImageReadError as e:
        return [ImageResult(task.stem, error=str(e)) for task in group.pairs]
    return [evaluate_pair(task, side) for task in group.pairs]


def evaluate_image(task: ImageTask) -> ImageResult:
    """Metrics of one pair (its own GT)."""
    return evaluate_gt(GTTask((task,)))[0]
