"""eval's faster formulations equal PySODMetrics and scipy on varied cases (not one map): bit for bit."""
from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from py_sod_metrics import (
    MAE,
    Emeasure,
    FmeasureHandler,
    FmeasureV2,
    PrecisionHandler,
    RecallHandler,
    WeightedFmeasure,
)
from scipy import ndimage
from test_eval import STEMS, read_pair

from utils import wf_ground
from utils.metrics import DISMetrics, HumanCorrectionEffort, contour_regions
from utils.metrics import Smeasure as EmptyQuadrantSmeasure
from utils.thinning import gt_skeleton


def varied_masks(seed: int = 0) -> list[np.ndarray]:
    """GTs that stress each shortcut: empty, full, one pixel, ties, thin lines, far background, odd sizes."""
    rng = np.random.default_rng(seed)
    masks = [np.zeros((9, 12), bool), np.ones((7, 5), bool), np.pad(np.ones((1, 1), bool), 3)]
    ties = np.zeros((31, 29), bool)
    ties[::6, ::6] = True  # a lattice: many background pixels equidistant from 2 or 4 foreground pixels
    masks.append(ties)
    pair = np.zeros((15, 17), bool)
    pair[3, 8] = pair[11, 8] = pair[7, 4] = pair[7, 12] = True  # the centre is equidistant from all four
    masks.append(pair)
    lines = np.zeros((67, 45), np.uint8)
    cv2.line(lines, (0, 0), (44, 66), 1, 1)
    cv2.line(lines, (3, 60), (40, 2), 1, 1)
    cv2.line(lines, (0, 30), (44, 30), 1, 1)
    masks.append(lines.astype(bool))
    far = np.zeros((420, 23), bool)
    far[2, 3] = True  # background up to ~420 pixels away: past the weight table's far end
    masks.append(far)
    edge = np.zeros((20, 20), bool)
    edge[:, :2] = True  # foreground on the border
    masks.append(edge)
    last = np.zeros((12, 9), bool)
    last[3:8, -1] = True  # centroid in the last column: the S-measure's right quadrants are empty
    masks.append(last)
    bottom = np.zeros((10, 14), bool)
    bottom[-1, 2:] = True
    masks.append(bottom)
    holes = np.ones((40, 50), bool)
    holes[10:12, 5:45] = holes[25, 3:47] = False  # thin background inside the foreground
    masks.append(holes)
    for _ in range(14):
        h, w = (int(v) for v in rng.integers(5, 90, 2))
        blobs = cv2.GaussianBlur(rng.random((h, w)), (0, 0), float(rng.uniform(0.7, 4)))
        masks.append(blobs > np.quantile(blobs, rng.uniform(0.1, 0.9)) if rng.random() < 0.7
                     else rng.random((h, w)) < rng.uniform(0.05, 0.9))
    return masks


def varied_predictions(gt: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """8-bit maps of one GT: noise, blurred and noisy, constant (0, 255, mid), binary, two levels."""
    mask = gt.astype(np.uint8) * 255
    soft = np.clip(cv2.GaussianBlur(mask, (0, 0), 1.5).astype(np.float64) + rng.normal(0, 25, gt.shape), 0, 255)
    two = np.where(rng.random(gt.shape) < 0.5, 100, 180).astype(np.uint8)
    return [rng.integers(0, 256, gt.shape, dtype=np.uint8), soft.astype(np.uint8), np.zeros_like(mask),
            np.full_like(mask, 255), np.full_like(mask, 77), np.roll(mask, 2, axis=1), two,
            (soft // 2 + 60).astype(np.uint8)]


def library_step(pred: np.ndarray, gt: np.ndarray) -> dict[str, object]:
    """Each PySODMetrics class stepped on the raw 8-bit pair with its own normalisation (S-measure: the library's
    class with the one documented deviation, an empty quadrant adding 0 rather than NaN: utils.metrics.Smeasure)."""
    fm = FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=0.3)
    precision = PrecisionHandler(with_dynamic=True, with_adaptive=False)
    recall = RecallHandler(with_dynamic=True, with_adaptive=False)
    em, sm, wfm, mae = Emeasure(), EmptyQuadrantSmeasure(alpha=0.5), WeightedFmeasure(), MAE()
    FmeasureV2({"fm": fm, "precision": precision, "recall": recall}).step(pred, gt)
    for metric in (em, sm, wfm, mae):
        metric.step(pred, gt)
    return {"fm_curve": fm.dynamic_results, "adpF": fm.adaptive_results, "precision": precision.dynamic_results,
            "recall": recall.dynamic_results, "em_curve": em.changeable_ems, "adpEm": em.adaptive_ems,
            "Sm": sm.sms, "wF": wfm.weighted_fms, "MAE": mae.maes}


def assert_same_records(ours: dict[str, list], library: dict[str, list], case: str) -> None:
    """Every per-image record equal bit for bit (same values, NaN where the library has NaN)."""
    for name, want in library.items():
        got = ours[name]
        assert len(got) == len(want) == 1, (case, name)
        np.testing.assert_array_equal(np.asarray(got[0], dtype=np.float64), np.asarray(want[0], dtype=np.float64),
                                      err_msg=f"{case}: {name}")


def test_dis_metrics_equal_the_library_classes_on_varied_cases(reference_dir: Path) -> None:
    """Level look-ups, level counts, the weighted-F ground and tiling give every library value bit for bit."""
    rng = np.random.default_rng(3)
    pairs = [(f"mask {i}, map {j}", pred, gt.astype(np.uint8) * 255)
             for i, gt in enumerate(varied_masks()) for j, pred in enumerate(varied_predictions(gt, rng))]
    pairs += [(stem, *read_pair(reference_dir, stem)) for stem in STEMS]
    for case, pred, gt in pairs:
        ours = DISMetrics()
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the library's own, for NaN S-measures
            ours.step(pred, gt)
            library = library_step(pred, gt)
        assert_same_records(ours.state(), library, case)


def test_hce_counting_equals_the_library_on_varied_binary_maps() -> None:
    """The restated relaxation (views, complements once) counts what the library's cal_hce counts."""
    rng = np.random.default_rng(4)
    hce = HumanCorrectionEffort()
    for i, gt in enumerate(varied_masks(2)):
        for j, pred in enumerate(varied_predictions(gt, rng)):
            pred_bin = pred > 128
            ours = hce.cal_hce_binary(pred_bin, gt, gt_skeleton(gt))
            assert ours == hce.cal_hce(pred_bin.astype(np.float64), gt), f"mask {i}, map {j}"


def scipy_transform(gt_bin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy's background distances and flat nearest-foreground indices (what the library calls)."""
    distance, (rows, cols) = ndimage.distance_transform_edt(~gt_bin, return_indices=True)
    return distance, (rows * gt_bin.shape[1] + cols).reshape(-1)


@pytest.mark.parametrize("index", range(len(varied_masks())))
def test_ground_parts_equal_scipy(index: int) -> None:
    """Squared distances from OpenCV, nearest pixels within reach (ties included) and weights equal scipy's."""
    gt_bin = varied_masks()[index]
    if not gt_bin.any():
        pytest.skip("no foreground: the measure is 0 without a transform")
    distance, nearest = scipy_transform(gt_bin)
    background = ~gt_bin
    squared = wf_ground.squared_distances(gt_bin)
    near = squared < wf_ground.FAR_SQUARED
    np.testing.assert_array_equal(np.sqrt(squared[near].astype(np.float64)), distance[background][near])
    assert (distance[background][~near] ** 2 >= wf_ground.FAR_SQUARED - 0.5).all()
    ground = wf_ground.wf_ground(gt_bin)
    np.testing.assert_array_equal(ground.nearest, nearest[ground.ring])
    library_weight = 2 - np.exp(np.log(0.5) / 5 * distance)
    np.testing.assert_array_equal(ground.weight, library_weight[background])
    reach = ndimage.binary_dilation(gt_bin, np.ones((7, 7), bool)) & background
    np.testing.assert_array_equal(ground.ring, np.flatnonzero(reach))


def test_tiled_smoothing_equals_full_convolution() -> None:
    """At every foreground pixel the tiled convolution is scipy's full-image value (odd sizes, border objects)."""
    rng = np.random.default_rng(5)
    for gt_bin in varied_masks(1) + [rng.random((97, 131)) < 0.01]:
        values = rng.random(gt_bin.shape)
        full = ndimage.convolve(values, weights=wf_ground._KERNEL, mode="constant", cval=0)
        tiled = wf_ground._smoothed(values, wf_ground.wf_ground(gt_bin))
        np.testing.assert_array_equal(tiled[gt_bin], full[gt_bin])


def test_gt_parts_from_the_disk_cache_give_the_same_values(tmp_path: Path, reference_dir: Path) -> None:
    """Weighted-F and S-measure GT parts stored and read back give the library's values."""
    from utils import gt_cache

    for stem in STEMS[:3]:
        pred, gt = read_pair(reference_dir, stem)
        gt_bytes, gt_bin = cv2.imencode(".png", gt)[1].tobytes(), gt > 128
        library = library_step(pred, gt)
        for _ in range(2):  # computed and stored, then read back
            wf, wf_error = gt_cache.cached_wf_ground(gt_bytes, gt_bin, tmp_path)
            sm, sm_error = gt_cache.cached_sm_ground(gt_bytes, gt_bin, tmp_path)
            assert wf_error is None and sm_error is None
            ours = DISMetrics()
            ours.step(pred, gt, wf=wf, sm=sm)
            assert ours.state()["wF"] == library["wF"] and ours.state()["Sm"] == library["Sm"]


def test_boundary_filter_equals_the_library_on_varied_masks() -> None:
    """Runs of contour points, joins and the independent-region count equal the library's loop."""
    from py_sod_metrics import HumanCorrectionEffortMeasure

    rng = np.random.default_rng(6)
    ours, library = HumanCorrectionEffort(), HumanCorrectionEffortMeasure()
    for i, mask in enumerate(varied_masks(3)):
        for condition in (rng.random(mask.shape) < 0.3, np.roll(mask, 1, axis=0), np.zeros_like(mask), ~mask):
            contours, tree = cv2.findContours(mask.astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
            want, want_count = library.filter_conditional_boundary(contours, mask, condition.astype(np.int64))
            for hierarchy in (None, tree):  # regions labelled, or read from the contours' hierarchy
                got, got_count = ours.filter_conditional_boundary(contours, mask, condition, hierarchy)
                assert got_count == want_count, f"mask {i}"
                assert len(got) == len(want), f"mask {i}"
                for a, b in zip(got, want):
                    assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all(), f"mask {i}"


def test_contour_hierarchy_gives_the_8_connected_regions() -> None:
    """Each contour's region (outer border, or a hole's parent) is the connectedComponents label of its points,
    and the number of outer borders is the number of regions: nested rings, border-touching and speckle masks."""
    rng = np.random.default_rng(7)
    rings = np.zeros((40, 40), np.uint8)
    for radius in (18, 14, 10, 6, 2):  # regions inside holes inside regions
        cv2.circle(rings, (20, 20), radius, 1, 1)
    masks = [rings, np.ones((5, 6), np.uint8), *(m.astype(np.uint8) for m in varied_masks(4))]
    masks += [(rng.random(tuple(rng.integers(1, 40, 2))) < rng.uniform(0.1, 0.9)).astype(np.uint8) for _ in range(300)]
    for i, mask in enumerate(masks):
        count, labels = cv2.connectedComponents(mask, connectivity=8)
        contours, tree = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
        if not contours:
            assert count == 1, f"mask {i}"
            continue
        region, regions = contour_regions(tree)
        assert regions == count - 1, f"mask {i}"
        label_of = [set(labels[c[:, 0, 1], c[:, 0, 0]].tolist()) for c in contours]
        assert all(len(found) == 1 for found in label_of), f"mask {i}"
        assert [label_of[r] for r in region] == label_of, f"mask {i}"
        assert len({min(label_of[r]) for r in set(region.tolist())}) == regions, f"mask {i}"


def test_both_convolutions_equal_scipy_on_every_tile() -> None:
    """OpenCV's filter2D (used where its check says it sums as scipy does) and the scipy fallback give scipy's
    full-image value on larger, varied maps than the check's sample."""
    rng = np.random.default_rng(8)
    for gt_bin in varied_masks(5) + [rng.random((97, 131)) < 0.01]:
        values = rng.random(gt_bin.shape) * (rng.random(gt_bin.shape) < 0.6)
        full = ndimage.convolve(values, weights=wf_ground._KERNEL, mode="constant", cval=0)
        # OpenCV's only where the check passed (elsewhere eval uses scipy's, which must still match).
        fast = (wf_ground._opencv_convolve,) if wf_ground.opencv_sums_as_scipy() else ()
        for convolve in (*fast, wf_ground._scipy_convolve):
            np.testing.assert_array_equal(convolve(values), full)


def test_centroid_from_counts_equals_the_librarys_argwhere_mean() -> None:
    """The S-measure's split point from row and column counts: the library's rounding, halves included."""
    from utils.structure_measure import _centroid

    rng = np.random.default_rng(9)
    halves = np.zeros((6, 9), bool)
    halves[1, 2] = halves[4, 7] = True  # centroid (2.5, 4.5): round half to even
    masks = [halves, np.ones((5, 4), bool), *varied_masks(6)]
    masks += [rng.random(tuple(rng.integers(1, 80, 2))) < rng.uniform(0.01, 0.99) for _ in range(300)]
    for i, mask in enumerate(masks):
        if mask.any():
            want = np.argwhere(mask).mean(axis=0).round()
            assert _centroid(mask, np.count_nonzero(mask)) == (want[0], want[1]), f"mask {i}"


def test_object_score_from_levels_equals_the_librarys_s_object() -> None:
    """Squared deviations looked up per gray level give the library's mean/std object score bit for bit."""
    from py_sod_metrics import Smeasure

    from utils.level_metrics import normalised_levels
    from utils.structure_measure import s_object_of_levels

    rng = np.random.default_rng(10)
    library = Smeasure()
    codes = [np.array([7], np.uint8), np.full(50, 200, np.uint8), np.array([0, 255] * 40, np.uint8),
             rng.integers(0, 256, 100_003).astype(np.uint8), (rng.random(5000) ** 6 * 255).astype(np.uint8)]
    for i, pixels in enumerate(codes):
        levels = normalised_levels(pixels)
        for table in (levels, 1 - levels):  # foreground values, and the background's 1 - pred
            assert s_object_of_levels(table, pixels) == library.s_object(table[pixels]), f"case {i}"
