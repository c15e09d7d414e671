"""PySODMetrics' weighted F-measure with its GT side computed once per GT, only where the measure reads it.

The library (`WeightedFmeasure.cal_wfm`, after Margolin et al.'s MATLAB code) takes scipy's Euclidean
distance transform of the background with the index of each background pixel's nearest foreground
pixel (1.2 s at 2500 x 3400), then, per prediction, full-image float64 passes. What it reads:

- the weight B = 2 - exp(log(0.5) / 5 * D) at every background pixel, where D = sqrt(d2) for the integer
  squared distance d2 to the foreground. OpenCV's precise L2 transform gives D in float32 (76 ms), and
  rint(D * D) is d2 exactly while d2 is far below 2**24; beyond FAR_SQUARED, B is 2.0 in float64 whatever
  the distance, so B is a look-up of d2 in a table computed with the library's own expression;
- the nearest foreground pixel of background pixels within the 7 x 7 kernel's reach of the foreground
  only: the smoothed error is read at foreground pixels alone, whose windows see no other background.
  Such a pixel's nearest foreground pixel is at most sqrt(18) away, so it is the first foreground pixel
  met in a scan of the offsets by squared distance, then column, then row: the order in which scipy's
  feature transform (a column pass, then a row pass keeping the earliest of equal distances) breaks ties;
- the smoothed error at foreground pixels only: a convolution on tiles that hold foreground, each with the
  kernel's margin, gives every such pixel the same sum of the same products in the same order. OpenCV's
  float64 `filter2D` adds the products in scipy's order (kernel rows, then columns, from 0.0) three times
  faster; `opencv_sums_as_scipy` checks that on this machine once per process, else scipy's `convolve` runs.

The tests compare every part with scipy and the library on thin structures, empty and full GTs, ties and
odd sizes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np
from py_sod_metrics import WeightedFmeasure
from py_sod_metrics.utils import EPS
from scipy import ndimage

_KERNEL = WeightedFmeasure().matlab_style_gauss2D((7, 7), sigma=5)
_MARGIN = _KERNEL.shape[0] // 2
# Squared distances past which B = 2 - exp(log(0.5) / 5 * D) is exactly 2.0 (exp(-41.6) < 2**-53).
FAR_SQUARED = 90_000
# Side of the tiles the smoothing runs on: small enough to skip empty background, large enough that
# scipy's per-call cost stays small.
_TILE = 32


@dataclass
class WFGround:
    """The GT side of the weighted F-measure: where the smoothing reads and what the background weighs."""

    shape: tuple[int, int]
    ring: np.ndarray  # flat indices of background pixels within the kernel's reach of the foreground
    nearest: np.ndarray  # flat index of each ring pixel's nearest foreground pixel (scipy's tie-breaking)
    weight: np.ndarray  # the library's B at every background pixel, row-major
    tiles: tuple[tuple[int, int, int, int], ...]  # (row0, row1, col0, col1) blocks covering the foreground


@functools.cache
def weight_table() -> np.ndarray:
    """B for every squared distance 0..FAR_SQUARED, with the library's expression on float64 distances."""
    distance = np.sqrt(np.arange(FAR_SQUARED + 1, dtype=np.float64))
    table = 2 - np.exp(np.log(0.5) / 5 * distance)
    if table[-1] != 2.0:
        raise RuntimeError("weighted-F weight table: B is not 2.0 at FAR_SQUARED on this numpy")
    return table


@functools.cache
def _reach_offsets() -> tuple[tuple[int, int], ...]:
    """(row, column) offsets up to squared distance 18, by squared distance, then column, then row."""
    offsets = [(dr, dc) for dr in range(-4, 5) for dc in range(-4, 5) if 0 < dr * dr + dc * dc <= 18]
    return tuple(sorted(offsets, key=lambda o: (o[0] ** 2 + o[1] ** 2, o[1], o[0])))


def squared_distances(gt_bin: np.ndarray) -> np.ndarray:
    """Squared distance (int, capped at FAR_SQUARED) from each background pixel to the foreground, row-major."""
    background = ~gt_bin
    if not gt_bin.any():  # no foreground: every weight is the far one (the measure is 0 anyway)
        return np.full(np.count_nonzero(background), FAR_SQUARED, dtype=np.uint32)
    distance = cv2.distanceTransform(background.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # In float32 in place: below FAR_SQUARED (far under 2**24) the square is within 0.02 of the integer.
    squared = np.multiply(distance, distance, out=distance)
    np.minimum(squared, FAR_SQUARED, out=squared)
    np.rint(squared, out=squared)
    return squared[background].astype(np.uint32)


def reach_codes(gt_bin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the background pixels within the kernel's reach of the foreground, and the index (in
    `_reach_offsets`) of the offset to their nearest foreground pixel, ties broken as scipy's
    `distance_transform_edt(return_indices=True)` breaks them."""
    h, w = gt_bin.shape
    fg = gt_bin.view(np.uint8)
    size = 2 * _MARGIN + 1
    reach = cv2.dilate(fg, np.ones((size, size), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    ring = np.flatnonzero(reach.reshape(-1) > fg.reshape(-1))
    pad = 4
    padded = np.zeros((h + 2 * pad, w + 2 * pad), dtype=bool)
    padded[pad:h + pad, pad:w + pad] = gt_bin
    flat, stride = padded.reshape(-1), w + 2 * pad
    rows, cols = np.divmod(ring, w)
    pending = (rows + pad) * stride + cols + pad
    which = np.arange(ring.size)
    codes = np.empty(ring.size, dtype=np.uint8)
    for code, (dr, dc) in enumerate(_reach_offsets()):
        hit = flat[pending + dr * stride + dc]
        codes[which[hit]] = code
        pending, which = pending[~hit], which[~hit]
        if not pending.size:
            break
    return ring, codes


def nearest_of_codes(ring: np.ndarray, codes: np.ndarray, width: int) -> np.ndarray:
    """Flat indices of the nearest foreground pixels from `reach_codes`' output."""
    steps = np.array([dr * width + dc for dr, dc in _reach_offsets()], dtype=np.intp)
    return ring + steps[codes]


def foreground_tiles(gt_bin: np.ndarray) -> tuple[tuple[int, int, int, int], ...]:
    """Blocks of _TILE rows, runs of _TILE-column tiles that hold foreground: where smoothing is read."""
    h, w = gt_bin.shape
    rows, cols = -(-h // _TILE), -(-w // _TILE)
    padded = np.zeros((rows * _TILE, cols * _TILE), dtype=bool)
    padded[:h, :w] = gt_bin
    needed = padded.reshape(rows, _TILE, cols, _TILE).any(axis=(1, 3))
    tiles = []
    for i, line in enumerate(needed):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], line.view(np.int8), [0]])))
        for start, stop in zip(edges[::2], edges[1::2]):
            tiles.append((i * _TILE, min((i + 1) * _TILE, h), int(start) * _TILE, min(int(stop) * _TILE, w)))
    return tuple(tiles)


def wf_ground(gt_bin: np.ndarray, reach: tuple[np.ndarray, np.ndarray] | None = None) -> WFGround:
    """WFGround of a boolean GT; `reach`: its `reach_codes`, when stored."""
    gt_bin = np.ascontiguousarray(gt_bin, dtype=bool)
    ring, codes = reach_codes(gt_bin) if reach is None else reach
    weight = weight_table()[squared_distances(gt_bin)]
    return WFGround(gt_bin.shape, ring, nearest_of_codes(ring, codes, gt_bin.shape[1]), weight,
                    foreground_tiles(gt_bin))


def _scipy_convolve(block: np.ndarray) -> np.ndarray:
    """The library's smoothing: scipy's `convolve(block, kernel, mode="constant", cval=0)`."""
    return ndimage.convolve(block, weights=_KERNEL, mode="constant", cval=0)


def _opencv_convolve(block: np.ndarray) -> np.ndarray:
    """The same convolution with OpenCV (correlation with the flipped kernel, zeros outside)."""
    return cv2.filter2D(block, cv2.CV_64F, _FLIPPED_KERNEL, borderType=cv2.BORDER_CONSTANT)


_FLIPPED_KERNEL = np.ascontiguousarray(_KERNEL[::-1, ::-1])


@functools.cache
def opencv_sums_as_scipy() -> bool:
    """Whether OpenCV's convolution equals scipy's bit for bit here (no fused multiply-add on this CPU's path)."""
    rng = np.random.default_rng(0)
    sample = rng.random((23, 41)) * (rng.random((23, 41)) < 0.7)  # zeros, borders, every kernel position
    return np.array_equal(_opencv_convolve(sample), _scipy_convolve(sample))


def _smoothed(spread: np.ndarray, ground: WFGround) -> np.ndarray:
    """scipy's `convolve(spread, kernel, mode="constant")`, valid on the ground's tiles (zero elsewhere)."""
    h, w = spread.shape
    convolve = _opencv_convolve if opencv_sums_as_scipy() else _scipy_convolve
    smoothed = np.empty_like(spread)  # only the tiles are read: they hold every foreground pixel
    for r0, r1, c0, c1 in ground.tiles:
        a0, a1, b0, b1 = max(r0 - _MARGIN, 0), min(r1 + _MARGIN, h), max(c0 - _MARGIN, 0), min(c1 + _MARGIN, w)
        block = convolve(spread[a0:a1, b0:b1])
        smoothed[r0:r1, c0:c1] = block[r0 - a0:r1 - a0, c0 - b0:c1 - b0]
    return smoothed


def weighted_fmeasure_of_error(error: np.ndarray, gt: np.ndarray, ground: WFGround, beta: float = 1.0,
                               fg_error: np.ndarray | None = None, bg_error: np.ndarray | None = None) -> float:
    """The library's weighted F from E = |pred - gt| (float64, overwritten here) and the GT side;
    `fg_error`, `bg_error`: E at the foreground / background pixels (row-major), when already known."""
    if not gt.any():
        return 0  # the library's value for an empty GT (an int, as it appends it)
    if bg_error is None:
        bg_error = error[~gt]
    fp = np.sum(bg_error * ground.weight)  # the library's Ew[gt == 0]: E times B, row-major
    if fg_error is None:
        fg_error = error[gt]
    flat = error.reshape(-1)
    # Background pixels the kernel reaches take the error at their nearest foreground pixel.
    flat[ground.ring] = flat[ground.nearest]
    fg_smoothed = _smoothed(error, ground)[gt]
    fg_weighted = np.where(fg_smoothed < fg_error, fg_smoothed, fg_error) * 1.0
    tp = np.sum(gt) - np.sum(fg_weighted)
    recall = 1 - np.mean(fg_weighted)
    precision = tp / (tp + fp + EPS)
    return (1 + beta) * recall * precision / (recall + beta * precision + EPS)


def weighted_fmeasure(pred: np.ndarray, gt: np.ndarray, ground: WFGround, beta: float = 1.0) -> float:
    """PySODMetrics' `WeightedFmeasure.cal_wfm` (pred in [0, 1], boolean gt) with the GT part precomputed."""
    return weighted_fmeasure_of_error(np.abs(pred - gt), gt, ground, beta)
