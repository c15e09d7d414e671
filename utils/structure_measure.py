"""PySODMetrics' S-measure with what it computes from the GT alone done once per GT (`SMGround`).

`Smeasure.cal_sm` takes the GT's mean, the centroid of its foreground (`np.argwhere(gt).mean(axis=0)`,
a pass over every foreground coordinate) and, in each of the four quadrants around it, the GT's mean and
variance; only the prediction's means, variances and covariances depend on the prediction. `sm_ground`
computes the GT's numbers once (the means and centroid from pixel counts, which equal the library's exact
float sums of 0/1 values and integer coordinates), `s_measure` the rest as the library's `object`, `region`
and `ssim` do, so the value is the library's bit for bit (the tests compare on varied GTs, including empty,
full and border ones).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from py_sod_metrics import Smeasure
from py_sod_metrics.utils import EPS

from utils.level_metrics import level_values


@dataclass
class SMGround:
    """The GT side of the S-measure: its mean, the split point and each quadrant's GT mean and variance."""

    gt_mean: float
    split: tuple[int, int]  # the library's (cy, cx): one past the rounded foreground centroid
    means: tuple[float, float, float, float]  # quadrants: top-left, top-right, bottom-left, bottom-right
    variances: tuple[float, float, float, float]


def _quadrants(array: np.ndarray, split: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """The library's four sub-arrays around (cy, cx), in its order."""
    (h, w), (cy, cx) = array.shape, split
    return array[0:cy, 0:cx], array[0:cy, cx:w], array[cy:h, 0:cx], array[cy:h, cx:w]


def _centroid(gt: np.ndarray, count: int) -> tuple[np.float64, np.float64]:
    """The library's `np.argwhere(gt).mean(axis=0).round()` from per-row and per-column counts: its float64 sums
    of integer coordinates are exact (far below 2**53) in any order, so both are the exact integer sums / count."""
    rows = np.count_nonzero(gt, axis=1).astype(np.int64)
    cols = np.count_nonzero(gt, axis=0).astype(np.int64)
    cy = np.float64(int(np.dot(np.arange(rows.size, dtype=np.int64), rows))) / np.float64(count)
    cx = np.float64(int(np.dot(np.arange(cols.size, dtype=np.int64), cols))) / np.float64(count)
    return np.round(cy), np.round(cx)


def sm_ground(gt: np.ndarray) -> SMGround:
    """SMGround of a boolean GT, with `Smeasure.region`'s and `ssim`'s expressions."""
    h, w = gt.shape
    count = np.count_nonzero(gt)
    if count == 0:
        cy, cx = np.round(h / 2), np.round(w / 2)
    else:
        cy, cx = _centroid(gt, count)
    split = (int(cy) + 1, int(cx) + 1)
    means, variances = [], []
    for part in _quadrants(gt, split):
        n = part.shape[0] * part.shape[1]
        with np.errstate(invalid="ignore", divide="ignore"):
            # The mean of 0/1 values sums exact integers: it is the count / n. `(part - y) ** 2` takes one of
            # two values per pixel, computed here as the library computes them, in one pass.
            y = np.float64(np.count_nonzero(part)) / n if n else np.float64(np.nan)  # empty: the library's NaN
            means.append(y)
            squares = np.where(part, (np.float64(1) - y) ** 2, (np.float64(0) - y) ** 2)
            variances.append(np.sum(squares) / (n - 1 + EPS))
    return SMGround(np.float64(count) / gt.size, split, tuple(means), tuple(variances))


def _ssim(pred: np.ndarray, gt: np.ndarray, y: float, sigma_y: float) -> float:
    """`Smeasure.ssim` with the GT's mean and variance given; 0 for an empty quadrant (utils.metrics.Smeasure)."""
    h, w = pred.shape
    n = h * w
    if n == 0:
        return 0.0  # its weight is 0: adds 0, where the library's 0 x NaN made the whole score NaN
    x = np.mean(pred)
    centred = pred - x
    # The library's `centred * (gt - y)` and `centred ** 2` (x * x), each a new contiguous array summed: the
    # same arrays here, made in two buffers instead of four.
    product = np.subtract(gt, y)
    sigma_xy = np.sum(np.multiply(centred, product, out=product)) / (n - 1 + EPS)
    sigma_x = np.sum(np.multiply(centred, centred, out=centred)) / (n - 1 + EPS)
    alpha = 4 * x * y * sigma_xy
    beta = (x ** 2 + y ** 2) * (sigma_x + sigma_y)
    if alpha != 0:
        return alpha / (beta + EPS)
    if alpha == 0 and beta == 0:
        return 1
    return 0


def s_object_of_levels(table: np.ndarray, codes: np.ndarray) -> float:
    """The library's `Smeasure.s_object(table[codes])` for 8-bit `codes`: np.mean and np.std(ddof=1) as numpy
    computes them, with each pixel's squared deviation looked up among 256 computed once instead of two
    full passes (the same values summed in the same order: the same bits)."""
    values = level_values(table, codes)
    mean = np.mean(values)
    if values.size > 1:
        deviation = table - mean  # numpy's `x - mean`, then `x * x`, per level
        std = np.sqrt(np.sum(level_values(deviation * deviation, codes)) / (values.size - 1))
    else:  # the library's std of one pixel
        std = 0
    return 2 * mean / (np.power(mean, 2) + 1 + std + EPS)


def s_measure(sm: Smeasure, pred: np.ndarray, gt: np.ndarray, ground: SMGround,
              levels: tuple[np.ndarray, np.ndarray, np.ndarray]) -> float:
    """`Smeasure.cal_sm(pred, gt)` (pred in [0, 1], boolean gt) with the GT side precomputed; `levels`: the
    value of each 8-bit level, the 8-bit foreground pixels and the 8-bit background pixels (row-major) of
    the map whose look-up `pred` is."""
    y = ground.gt_mean
    if y == 0:
        return 1 - np.mean(pred)
    if y == 1:
        return np.mean(pred)
    table, fg_codes, bg_codes = levels
    fg_score = s_object_of_levels(table, fg_codes) * y
    bg_score = s_object_of_levels(1 - table, bg_codes) * (1 - y)  # the library's (1 - pred)[~gt]
    object_score = (fg_score + bg_score) * sm.alpha
    h, w = gt.shape
    area = h * w
    cy, cx = ground.split
    w_lt = cx * cy / area
    w_rt = cy * (w - cx) / area
    w_lb = (h - cy) * cx / area
    weights = (w_lt, w_rt, w_lb, 1 - w_lt - w_rt - w_lb)
    scores = [_ssim(p, g, y_q, s_q) * weight for p, g, y_q, s_q, weight in
              zip(_quadrants(pred, ground.split), _quadrants(gt, ground.split), ground.means, ground.variances,
                  weights)]
    region_score = (scores[0] + scores[1] + scores[2] + scores[3]) * (1 - sm.alpha)
    return np.maximum(0, object_score + region_score)
