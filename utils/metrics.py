"""DIS5K metrics: PySODMetrics 1.6.2's classes plus HCE as the DIS authors compute it.

`DISMetrics` steps the library's own classes on the raw 8-bit maps, so maxF, meanF, adpF (beta^2 = 0.3),
wF, MAE, Sm, meanEm, maxEm and adpEm are PySODMetrics' numbers. The classes accumulate one entry per
image; `DISMetrics.state()` / `merge()` move those entries between processes, so images stepped in
worker processes and merged in order give the same numbers as one sequential loop.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from py_sod_metrics import (
    MAE,
    Emeasure,
    FmeasureHandler,
    FmeasureV2,
    HumanCorrectionEffortMeasure,
    PrecisionHandler,
    RecallHandler,
    WeightedFmeasure,
)
from py_sod_metrics import Smeasure as LibrarySmeasure
from py_sod_metrics.utils import validate_and_normalize_input

from utils.boundary_metrics import BoundaryAccuracy, BoundaryGround, BoundaryIoU
from utils.level_metrics import (
    adaptive_threshold,
    level_counts,
    level_values,
    normalised_levels,
    step_emeasure,
    step_fmeasure,
)
from utils.structure_measure import SMGround, s_measure, sm_ground
from utils.thinning import gt_skeleton
from utils.wf_ground import WFGround, weighted_fmeasure_of_error, wf_ground

# Every metric reported, in the order of the reference expected.json.
ALL_METRICS: tuple[str, ...] = ("maxF", "meanF", "adpF", "wF", "MAE", "Sm", "meanEm", "maxEm", "adpEm", "HCE")
# BiRefNet's boundary metrics (utils.boundary_metrics), computed only when asked for.
BOUNDARY_METRICS: tuple[str, ...] = ("mBA", "maxBIoU", "meanBIoU")
# The columns of the field's DIS5K tables, in the field's order.
FIELD_METRICS: tuple[str, ...] = ("maxF", "wF", "MAE", "Sm", "meanEm", "HCE")
# The DIS authors' binarisation threshold on raw 8-bit values (`> 128`), also PySODMetrics' GT threshold.
BINARY_THRESHOLD = 128
# The field's F-measure weight beta^2.
F_BETA2 = 0.3


class Smeasure(LibrarySmeasure):
    """PySODMetrics' S-measure, where a quadrant without pixels adds 0 instead of NaN.

    The region score weighs four quadrants around the GT's centroid by their areas; in a 1 x N or N x 1 mask
    two of them are empty, and the library's 0 (weight) x NaN (SSIM of nothing) made the whole score NaN.
    Every other image keeps the library's value.
    """

    def ssim(self, pred: np.ndarray, gt: np.ndarray) -> float:
        """The library's SSIM of one quadrant; 0 for an empty one (its weight is 0)."""
        return 0.0 if pred.size == 0 else super().ssim(pred, gt)


class HumanCorrectionEffort(HumanCorrectionEffortMeasure):
    """Human Correction Effort as the DIS authors' `hce_metric_main.py` computes it.

    ```
    @inproceedings{HCE,
        title={Highly Accurate Dichotomous Image Segmentation},
        author={Qin, Xuebin and Dai, Hang and Hu, Xiaobin and Fan, Deng-Ping and Shao, Ling and Van Gool, Luc},
        booktitle=ECCV,
        year={2022}
    }
    ```

    The authors binarise the raw 8-bit prediction and GT at `> 128` (no min-max normalisation) and take
    the GT skeleton from `skeletonize(gt > 128)`, relax 5, epsilon 2.0. PySODMetrics' class min-max
    normalises the prediction and thresholds it at 0.5, which changes the counts of some images. Contour
    filtering and polygon counting are the library's; the relaxation is restated here only because the
    library computes the skeleton inside `cal_hce`, where a cached one cannot be passed in.
    """

    def step(self, pred: np.ndarray, gt: np.ndarray, skeleton: np.ndarray | None = None) -> None:
        """Add the HCE of one raw 8-bit prediction/GT pair; `skeleton` is the GT's, when already known."""
        gt_bin = gt > BINARY_THRESHOLD
        if skeleton is None:
            skeleton = gt_skeleton(gt_bin)
        self.hces.append(self.cal_hce_binary(pred > BINARY_THRESHOLD, gt_bin, skeleton))

    def cal_hce_binary(self, pred: np.ndarray, gt: np.ndarray, skeleton: np.ndarray) -> int:
        """HCE of a binary prediction against a binary GT and the GT's skeleton."""
        # The library's steps on the same masks; OpenCV reads boolean masks as 0/1 bytes through a view
        # instead of a converted copy, and the complements are taken once.
        gt, pred = np.ascontiguousarray(gt), np.ascontiguousarray(pred)
        not_gt, not_pred = ~gt, ~pred
        tp = np.logical_and(gt, pred)
        fp = np.logical_xor(pred, tp)
        fn = np.logical_xor(gt, tp)
        eroded_union = cv2.erode(np.logical_or(gt, pred).view(np.uint8), self.morphology_kernel,
                                 iterations=self.relax)

        # Keep FP/FN pixels within `relax` steps of errors lying deeper than `relax` inside the union
        # (not crossing into the GT for FP, the prediction for FN): thin boundary errors cost nothing.
        fp_relaxed = np.logical_and(fp, eroded_union)
        for _ in range(self.relax):
            fp_relaxed = np.logical_and(cv2.dilate(fp_relaxed.view(np.uint8), self.morphology_kernel), not_gt)
        fp_relaxed = np.logical_and(fp, fp_relaxed)
        fn_relaxed = np.logical_and(fn, eroded_union)
        for _ in range(self.relax):
            fn_relaxed = np.logical_and(cv2.dilate(fn_relaxed.view(np.uint8), self.morphology_kernel), not_pred)
        fn_relaxed = np.logical_and(fn, fn_relaxed)
        # Missed skeleton pixels are structural errors however thin they are.
        fn_relaxed = np.logical_or(fn_relaxed, np.logical_xor(skeleton, np.logical_and(tp, skeleton)))

        contours_fp, tree_fp = cv2.findContours(fp_relaxed.view(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
        bdies_fp, indep_fp = self.filter_conditional_boundary(contours_fp, fp_relaxed, np.logical_or(tp, fn_relaxed),
                                                              tree_fp)
        contours_fn, tree_fn = cv2.findContours(fn_relaxed.view(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
        # The library's `1 - (tp | fp_relaxed | fn_relaxed)`, which it only dilates as 8-bit: the same 0/1 bytes.
        condition_fn = ~np.logical_or(np.logical_or(tp, fp_relaxed), fn_relaxed)
        bdies_fn, indep_fn = self.filter_conditional_boundary(contours_fn, fn_relaxed, condition_fn.view(np.uint8),
                                                              tree_fn)
        points = self.count_polygon_control_points(bdies_fp, self.epsilon)
        points += self.count_polygon_control_points(bdies_fn, self.epsilon)
        return int(points + indep_fp + indep_fn)


    def filter_conditional_boundary(self, contours: Sequence[np.ndarray], mask: np.ndarray,
                                    condition: np.ndarray,
                                    hierarchy: np.ndarray | None = None) -> tuple[list[np.ndarray], int]:
        """The library's `filter_conditional_boundary` over all contour points at once: the same boundaries
        (runs of contour points next to `condition`, each pixel taken once) and the same count of regions
        of `mask` with no such point. `hierarchy`: findContours' RETR_TREE hierarchy of `contours`, when
        known (the regions are then read from it instead of labelling the whole mask again)."""
        condition = condition.view(np.uint8) if condition.dtype == bool else condition.astype(np.uint8)
        condition = cv2.dilate(condition, self.morphology_kernel)
        if hierarchy is None or not contours:
            regions, labels = cv2.connectedComponents(np.ascontiguousarray(mask).view(np.uint8), connectivity=8)
            if not contours:
                return [], regions - 1
        points = np.concatenate([c.reshape(-1, 2) for c in contours])
        rows, cols = points[:, 1], points[:, 0]
        # A point is taken when it touches the condition and no earlier point took its pixel.
        candidates = np.flatnonzero(condition[rows, cols] != 0)
        _, first = np.unique(rows[candidates].astype(np.intp) * mask.shape[1] + cols[candidates], return_index=True)
        taken = np.zeros(len(points), dtype=bool)
        taken[candidates[first]] = True
        # Runs of taken points, never across two contours; a contour with several runs whose last run
        # ends next to where its first one starts gets them joined, as the library does.
        owner = np.repeat(np.arange(len(contours)), [len(c) for c in contours])
        same = owner[1:] == owner[:-1]
        after_taken = np.concatenate([[False], taken[:-1] & same])  # the previous point is taken, same contour
        before_taken = np.concatenate([taken[1:] & same, [False]])
        starts = np.flatnonzero(taken & ~after_taken)
        stops = np.flatnonzero(taken & ~before_taken) + 1
        boundaries: list[np.ndarray] = []
        run_owner = owner[starts].tolist()
        i = 0
        while i < len(starts):
            j = i + 1
            while j < len(starts) and run_owner[j] == run_owner[i]:
                j += 1
            runs = [points[a:b].reshape(-1, 1, 2) for a, b in zip(starts[i:j], stops[i:j])]
            if len(runs) > 1:
                (first_x, first_y), (last_x, last_y) = runs[0][0, 0], runs[-1][-1, 0]
                dx, dy = abs(int(first_x) - int(last_x)), abs(int(first_y) - int(last_y))
                if (dx, dy) in ((1, 0), (0, 1), (1, 1)):
                    runs[-1] = np.concatenate([runs[-1], runs[0][::-1]])
                    del runs[0]
            boundaries.extend(runs)
            i = j
        if hierarchy is None:
            touched = np.unique(labels[rows[taken], cols[taken]])
            return boundaries, regions - 1 - touched.size
        region, count = contour_regions(hierarchy)
        return boundaries, count - np.unique(region[owner[taken]]).size


def contour_regions(hierarchy: np.ndarray) -> tuple[np.ndarray, int]:
    """For each contour of a RETR_TREE hierarchy, the region it bounds (the index of that 8-connected region's
    outer border: itself, or a hole's parent), and the number of regions (outer borders: even depth).
    Suzuki-Abe border following gives each 8-connected region one outer border, as connectedComponents counts."""
    parent = hierarchy.reshape(-1, 4)[:, 3]
    depth, above = np.zeros(parent.size, dtype=np.intp), parent.copy()
    while (above >= 0).any():
        depth += above >= 0
        above = np.where(above >= 0, parent[above], -1)
    outer = depth % 2 == 0
    return np.where(outer, np.arange(parent.size), parent), int(outer.sum())


class DISMetrics:
    """All DIS5K metrics of one dataset; per-image entries can be computed elsewhere and merged."""

    def __init__(self, boundary: bool = False) -> None:
        """Create the library's metric objects (F beta^2 = 0.3, S-measure alpha = 0.5); mBA/BIoU if `boundary`."""
        self._fm = FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=F_BETA2)
        self._precision = PrecisionHandler(with_dynamic=True, with_adaptive=False)
        self._recall = RecallHandler(with_dynamic=True, with_adaptive=False)
        self.fmeasure = FmeasureV2({"fm": self._fm, "precision": self._precision, "recall": self._recall})
        self.emeasure = Emeasure()
        self.smeasure = Smeasure(alpha=0.5)
        self.wfmeasure = WeightedFmeasure()
        self.mae = MAE()
        self.hce = HumanCorrectionEffort(relax=5, epsilon=2.0)
        self.boundary = boundary
        self.mba, self.biou = BoundaryAccuracy(), BoundaryIoU()

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics get_results() reports."""
        return ALL_METRICS + (BOUNDARY_METRICS if self.boundary else ())

    def _records(self) -> dict[str, list]:
        """Every per-image list the metric objects accumulate, by name."""
        return {
            "fm_curve": self._fm.dynamic_results, "adpF": self._fm.adaptive_results,
            "precision": self._precision.dynamic_results, "recall": self._recall.dynamic_results,
            "em_curve": self.emeasure.changeable_ems, "adpEm": self.emeasure.adaptive_ems,
            "Sm": self.smeasure.sms, "wF": self.wfmeasure.weighted_fms, "MAE": self.mae.maes,
            "HCE": self.hce.hces,
            **({"BA": self.mba.bas, "biou_curve": self.biou.curves} if self.boundary else {}),
        }

    def __len__(self) -> int:
        return len(self.mae.maes)

    def step(self, pred: np.ndarray, gt: np.ndarray, skeleton: np.ndarray | None = None,
             wf: WFGround | None = None, bands: BoundaryGround | None = None, sm: SMGround | None = None) -> None:
        """Add one raw 8-bit prediction/GT pair of the same size; skeleton, wf, bands, sm: the GT's parts, if known.

        Every value is the library's: the normalised prediction is looked up per gray level
        (`utils.level_metrics`), the threshold metrics come from per-level counts, the weighted F from the
        GT side computed once (`utils.wf_ground`), the S-measure from its GT side (`utils.structure_measure`);
        MAE runs the library's expression on the same array.
        """
        if pred.shape != gt.shape:
            raise ValueError(f"Shape mismatch between prediction ({pred.shape}) and ground truth ({gt.shape})")
        gt_bin = gt > BINARY_THRESHOLD
        levels = normalised_levels(pred)
        pred_norm = level_values(levels, pred)
        inside, outside = level_counts(pred, gt_bin)
        threshold = adaptive_threshold(pred_norm)
        step_fmeasure(self.fmeasure, levels, inside, outside, threshold)
        step_emeasure(self.emeasure, levels, inside, outside, threshold, gt_bin.shape)
        # Each metric's foreground and background values, taken from the 8-bit map (row-major, as the
        # library's boolean indexing of its float arrays orders them) and looked up per level.
        fg_levels, bg_levels = pred[gt_bin], pred[~gt_bin]
        bg_values = level_values(levels, bg_levels)  # also E = |pred - 0| there
        self.smeasure.sms.append(s_measure(self.smeasure, pred_norm, gt_bin, sm or sm_ground(gt_bin),
                                           levels=(levels, fg_levels, bg_levels)))
        # The library's |pred - gt|, computed in the normalised map's own memory (it is not used again).
        error = np.abs(np.subtract(pred_norm, gt_bin, out=pred_norm), out=pred_norm)
        del pred_norm
        self.mae.maes.append(np.mean(error))
        if wf is None:
            wf = wf_ground(gt_bin)
        fg_error = level_values(np.abs(levels - 1.0), fg_levels)  # the library's |pred - gt| where gt is True
        self.wfmeasure.weighted_fms.append(
            weighted_fmeasure_of_error(error, gt_bin, wf, self.wfmeasure.beta, fg_error, bg_values))
        del error, bg_values
        self.hce.step(pred, gt, skeleton)
        if self.boundary:
            self.mba.step(pred, gt, bands)
            self.biou.step(pred, gt, bands)

    def state(self) -> dict[str, list]:
        """Copies of the per-image entries, for merge() into another DISMetrics."""
        return {name: list(entries) for name, entries in self._records().items()}

    def merge(self, state: dict[str, list]) -> None:
        """Append per-image entries produced by state() of another DISMetrics."""
        for name, entries in self._records().items():
            entries.extend(state[name])

    def get_results(self) -> dict[str, Any]:
        """The dataset's metrics (ALL_METRICS as floats) and `n`, the number of images."""
        if len(self) == 0:
            raise ValueError("no images were evaluated")
        fm = self.fmeasure.get_results()["fm"]
        em = self.emeasure.get_results()["em"]
        results = {
            "maxF": fm["dynamic"].max(), "meanF": fm["dynamic"].mean(), "adpF": fm["adaptive"],
            "wF": self.wfmeasure.get_results()["wfm"], "MAE": self.mae.get_results()["mae"],
            "Sm": self.smeasure.get_results()["sm"],
            "meanEm": em["curve"].mean(), "maxEm": em["curve"].max(), "adpEm": em["adp"],
            "HCE": self.hce.get_results()["hce"],
        }
        if self.boundary:
            biou = self.biou.get_results()["biou"]["curve"]
            results.update(mBA=self.mba.get_results()["mba"], maxBIoU=biou.max(), meanBIoU=biou.mean())
        return {**{name: float(results[name]) for name in self.metric_names}, "n": len(self)}

    def curves(self) -> dict[str, np.ndarray]:
        """Mean precision, recall and F-measure over images at thresholds 0..255 (ascending)."""
        results = self.fmeasure.get_results()
        # The library orders its curves from threshold 255 down to 0.
        return {"threshold": np.arange(256), "precision": results["precision"]["dynamic"][::-1],
                "recall": results["recall"]["dynamic"][::-1], "fmeasure": results["fm"]["dynamic"][::-1]}


class ValidationMetrics:
    """maxF and MAE alone, with DISMetrics' PySODMetrics set-up: training's quick validation."""

    def __init__(self) -> None:
        """Create the library's F-measure (beta^2 = 0.3, thresholds 0..255) and MAE objects."""
        self._fm = FmeasureHandler(with_dynamic=True, with_adaptive=False, beta=F_BETA2)
        self.fmeasure = FmeasureV2({"fm": self._fm})
        self.mae = MAE()

    def step(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one raw 8-bit prediction/GT pair of the same size."""
        pred_norm, gt_bin = validate_and_normalize_input(pred, gt, normalize=True)
        self.fmeasure.step(pred_norm, gt_bin, normalize=False)
        self.mae.step(pred_norm, gt_bin, normalize=False)

    def get_results(self) -> dict[str, float]:
        """{"maxF": ..., "MAE": ...} over the images stepped."""
        return {"maxF": float(self.fmeasure.get_results()["fm"]["dynamic"].max()),
                "MAE": float(self.mae.get_results()["mae"])}


def image_summary(state: dict[str, list]) -> dict[str, float]:
    """Per-image values (ALL_METRICS, boundary metrics if present; curves of that image alone) of a one-image state."""
    fm_curve, em_curve = np.asarray(state["fm_curve"][0]), np.asarray(state["em_curve"][0])
    summary = {
        "maxF": fm_curve.max(), "meanF": fm_curve.mean(), "adpF": state["adpF"][0], "wF": state["wF"][0],
        "MAE": state["MAE"][0], "Sm": state["Sm"][0], "meanEm": em_curve.mean(), "maxEm": em_curve.max(),
        "adpEm": state["adpEm"][0], "HCE": state["HCE"][0],
    }
    if "BA" in state:
        biou = np.asarray(state["biou_curve"][0])
        summary.update(mBA=state["BA"][0], maxBIoU=biou.max(), meanBIoU=biou.mean())
    return {name: float(value) for name, value in summary.items()}
