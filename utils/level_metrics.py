"""PySODMetrics' threshold metrics (F-measure curves and adaptive F, E-measure) from per-level pixel counts.

An 8-bit prediction has 256 gray levels, and the library's normalised prediction (`prepare_data`:
x / 255, then min-max) is one float per level, computed elementwise: `normalised_levels` computes that
float for each level with the same operations, so `levels[pred]` is the library's array bit for bit.
Every threshold count the library takes (`(pred * 255).astype(uint8)` histograms for the curves,
`pred >= 2 * mean` for the adaptive values) is a function of the level, so counting each level's pixels
inside and outside the GT once (one pass over uint8 data) gives the same integer counts the library gets
from its float64 passes; from the counts on, the library's own handlers and formulas run on the same
numbers. The tests compare with the library's classes on varied maps.
"""
from __future__ import annotations

import cv2
import numpy as np
from py_sod_metrics import Emeasure, FmeasureV2
from py_sod_metrics.utils import EPS, get_adaptive_threshold

# calcHist counts in float32: exact while a bin cannot reach 2**24 pixels.
_CALCHIST_LIMIT = 1 << 24


def normalised_levels(pred: np.ndarray) -> np.ndarray:
    """The library's normalised value (x / 255, min-max when not constant) of each 8-bit level, float64."""
    levels = np.arange(256, dtype=np.uint8) / 255
    low, high = levels[int(pred.min())], levels[int(pred.max())]
    if high != low:
        levels = (levels - low) / (high - low)
    return levels


def level_values(levels: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """`levels[pred]` (one float64 per 8-bit pixel, any shape) through OpenCV's table look-up: the same values."""
    if pred.size == 0:
        return levels[pred]
    return cv2.LUT(np.ascontiguousarray(pred), levels).reshape(pred.shape)


def level_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of each 8-bit level inside and outside the boolean GT (int64, 256 each)."""
    if pred.size < _CALCHIST_LIMIT:
        mask = np.ascontiguousarray(gt).view(np.uint8)
        inside = cv2.calcHist([pred], [0], mask, [256], [0, 256]).reshape(-1).astype(np.int64)
        total = cv2.calcHist([pred], [0], None, [256], [0, 256]).reshape(-1).astype(np.int64)
    else:
        inside = np.bincount(pred[gt], minlength=256).astype(np.int64)
        total = np.bincount(pred.reshape(-1), minlength=256).astype(np.int64)
    return inside, total - inside


def _quantised(counts: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Counts per value of the library's `(pred * 255).astype(np.uint8)` from counts per input level."""
    return np.bincount((levels * 255).astype(np.uint8), weights=counts, minlength=256).astype(np.int64)


def step_fmeasure(fmeasure: FmeasureV2, levels: np.ndarray, inside: np.ndarray, outside: np.ndarray,
                  threshold: float) -> None:
    """FmeasureV2.step from level counts: each handler's dynamic and adaptive entries, as the library adds them."""
    fg, bg = int(inside.sum()), int(outside.sum())
    tps = np.cumsum(np.flip(_quantised(inside, levels)))  # >= 255, >= 254, ... >= 0
    fps = np.cumsum(np.flip(_quantised(outside, levels)))
    dynamic = {"tp": tps, "fp": fps, "tn": bg - fps, "fn": fg - tps}
    above = levels >= threshold
    tp, fp = int(inside[above].sum()), int(outside[above].sum())
    adaptive = {"tp": tp, "fp": fp, "tn": bg - fp, "fn": fg - tp}
    for handler in fmeasure._metric_handlers.values():
        if handler.dynamic_results is not None:
            handler.dynamic_results.append(handler(**dynamic))
        if handler.adaptive_results is not None:
            handler.adaptive_results.append(handler(**adaptive))
        if handler.binary_results is not None:
            raise ValueError("binary F-measure handlers are not computed from level counts")


def _enhanced_sum(em: Emeasure, fg_fg: np.ndarray | int, fg_bg: np.ndarray | int) -> np.ndarray | float:
    """The library's enhanced-matrix sum for counts of predicted foreground inside/outside the GT."""
    fg_all = fg_fg + fg_bg
    bg_all = em.gt_size - fg_all
    if em.gt_fg_numel == 0:
        return bg_all
    if em.gt_fg_numel == em.gt_size:
        return fg_all
    parts, combinations = em.generate_parts_numel_combinations(fg_fg_numel=fg_fg, fg_bg_numel=fg_bg,
                                                               pred_fg_numel=fg_all, pred_bg_numel=bg_all)
    if np.ndim(fg_fg) == 0:  # cal_em_with_threshold sums a list
        results = []
        for part, combination in zip(parts, combinations):
            align = 2 * (combination[0] * combination[1]) / (combination[0] ** 2 + combination[1] ** 2 + EPS)
            results.append((align + 1) ** 2 / 4 * part)
        return sum(results)
    results = np.empty(shape=(4, 256), dtype=np.float64)  # cal_em_with_cumsumhistogram stacks rows
    for i, (part, combination) in enumerate(zip(parts, combinations)):
        align = 2 * (combination[0] * combination[1]) / (combination[0] ** 2 + combination[1] ** 2 + EPS)
        results[i] = (align + 1) ** 2 / 4 * part
    return results.sum(axis=0)


def step_emeasure(em: Emeasure, levels: np.ndarray, inside: np.ndarray, outside: np.ndarray,
                  threshold: float, shape: tuple[int, int]) -> None:
    """Emeasure.step from level counts: the curve over thresholds 255..0, then the adaptive value."""
    em.gt_fg_numel = int(inside.sum())
    em.gt_size = shape[0] * shape[1]
    fg_fg = np.cumsum(np.flip(_quantised(inside, levels)), axis=0)
    fg_bg = np.cumsum(np.flip(_quantised(outside, levels)), axis=0)
    em.changeable_ems.append(_enhanced_sum(em, fg_fg, fg_bg) / (em.gt_size - 1 + EPS))
    above = levels >= threshold
    tp, fp = int(inside[above].sum()), int(outside[above].sum())
    em.adaptive_ems.append(_enhanced_sum(em, tp, fp) / (em.gt_size - 1 + EPS))


def adaptive_threshold(pred_norm: np.ndarray) -> float:
    """The library's adaptive threshold, min(2 * mean, 1), of the normalised prediction."""
    return get_adaptive_threshold(pred_norm, max_value=1)
