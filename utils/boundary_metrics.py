"""Boundary metrics as BiRefNet's evaluation computes them: mean boundary accuracy (mBA) and boundary IoU.

Restated from github ZhengPeng7/BiRefNet `evaluation/metrics.py` (classes `MBAMeasure`, `BIoUMeasure`)
with the same arithmetic, so the numbers are theirs (the tests compare them with
`eval_case/expected_boundary.json`). What depends on the GT alone (the mBA bands, the GT boundary)
is a `BoundaryGround`, which can be computed once per GT and cached.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# BiRefNet binarises raw 8-bit maps at `> 128` (as the DIS authors' HCE does).
BINARY_THRESHOLD = 128
BA_STEPS = 5
BIOU_DILATION_RATIO = 0.02


@dataclass
class BoundaryGround:
    """What the boundary metrics need from one GT: the mBA bands (one per radius) and the BIoU boundary."""

    bands: list[np.ndarray]
    boundary: np.ndarray


def ba_radii(shape: tuple[int, int]) -> list[int]:
    """The mBA band radii for an image of this (height, width): 1 + int((max_r - 1) / 5 * i), max_r = (h + w) / 300."""
    h, w = shape
    max_radius = (w + h) / 300
    return [1 + int((max_radius - 1) / BA_STEPS * i) for i in range(BA_STEPS)]


def ba_bands(gt_bin: np.ndarray) -> list[np.ndarray]:
    """The GT's morphological gradient bands (elliptic kernels of size 2r + 1), one per mBA radius."""
    gt = gt_bin.astype(np.uint8)
    kernels = [cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)) for r in ba_radii(gt.shape)]
    return [cv2.morphologyEx(gt, cv2.MORPH_GRADIENT, kernel) > 0 for kernel in kernels]


def mask_to_boundary(mask: np.ndarray, ratio: float = BIOU_DILATION_RATIO) -> np.ndarray:
    """An 8-bit map minus its erosion (3x3, round(ratio * diagonal) times, zero border): Cheng et al.'s G_d."""
    h, w = mask.shape
    dilation = max(1, int(round(ratio * np.sqrt(h ** 2 + w ** 2))))
    # Padding with zeros makes an object cut by the image border a boundary there too.
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), dtype=np.uint8), iterations=dilation)[1:h + 1, 1:w + 1]
    return mask - eroded


def boundary_ground(gt: np.ndarray) -> BoundaryGround:
    """The GT-only part of both boundary metrics, from a raw 8-bit GT (binarised at > 128)."""
    gt_bin = gt > BINARY_THRESHOLD
    return BoundaryGround(ba_bands(gt_bin), mask_to_boundary(gt_bin.astype(np.uint8) * 255) > 128)


class BoundaryAccuracy:
    """Mean boundary accuracy (mBA), as BiRefNet's `MBAMeasure` computes it.

    ```
    @inproceedings{CascadePSP,
        title={CascadePSP: Toward Class-Agnostic and Very High-Resolution Segmentation via Global and Local Refinement},
        author={Cheng, Ho Kei and Chung, Jihoon and Tai, Yu-Wing and Tang, Chi-Keung},
        booktitle=CVPR,
        year={2020}
    }
    ```

    Per image: the mean over 5 radii of the fraction of pixels in the GT's morphological gradient band
    where `pred > 128` equals `gt > 128`. A GT without both foreground and background (all 0 or all 255)
    has an empty band: its accuracy is 0 / 0, NaN, as in the reference. mBA is the mean over the images
    where it is defined (the reference's mean would be NaN for the whole dataset); `undefined_mba` names
    the others.
    """

    def __init__(self) -> None:
        """Start with no images."""
        self.bas: list[float] = []

    def step(self, pred: np.ndarray, gt: np.ndarray, ground: BoundaryGround | None = None) -> None:
        """Add one raw 8-bit prediction/GT pair of the same size (`ground`: the GT's, when already known)."""
        bands = (ground or boundary_ground(gt)).bands
        pred_bin, gt_bin = pred > BINARY_THRESHOLD, gt > BINARY_THRESHOLD
        accuracies = []
        with np.errstate(invalid="ignore", divide="ignore"):
            for band in bands:
                agree = np.count_nonzero(gt_bin[band] == pred_bin[band])
                accuracies.append(np.int64(agree) / np.int64(np.count_nonzero(band)))
        self.bas.append(float(sum(accuracies) / BA_STEPS))

    def get_results(self) -> dict[str, float]:
        """{"mba": mean over the images where it is defined (NaN when it is defined for none)}."""
        bas = np.array(self.bas, dtype=np.float64)
        defined = bas[np.isfinite(bas)]
        return {"mba": float(defined.mean()) if defined.size else float("nan")}


def undefined_mba(images: list[dict[str, float | str]]) -> list[str]:
    """The names of per-image summaries whose mBA is undefined (a GT with no boundary)."""
    return [str(im["image"]) for im in images if "mBA" in im and not np.isfinite(float(im["mBA"]))]


class BoundaryIoU:
    """Boundary IoU at 256 thresholds, as BiRefNet's `BIoUMeasure` computes it.

    ```
    @inproceedings{BoundaryIoU,
        title={Boundary IoU: Improving Object-Centric Image Segmentation Evaluation},
        author={Cheng, Bowen and Girshick, Ross and Doll{\'a}r, Piotr and Berg, Alexander C. and Kirillov, Alexander},
        booktitle=CVPR,
        year={2021}
    }
    ```

    The prediction is min-max normalised and scaled back to uint8 (truncating), the GT binarised at
    > 128; both boundaries are the map minus its erosion (`mask_to_boundary`), the prediction's staying
    gray-valued. At threshold t (255 down to 0): IoU = (prediction-boundary pixels >= t inside the GT
    boundary) / (GT boundary pixels + prediction-boundary pixels >= t outside it). The curve is averaged
    over images; maxBIoU and meanBIoU are its max and mean.
    """

    def __init__(self) -> None:
        """Start with no images."""
        self.curves: list[np.ndarray] = []

    @staticmethod
    def normalised(pred: np.ndarray) -> np.ndarray:
        """BiRefNet's `_prepare_data` prediction (x / 255, min-max when not constant) back in uint8."""
        pred = pred / 255
        if pred.max() != pred.min():
            pred = (pred - pred.min()) / (pred.max() - pred.min())
        return (pred * 255).astype(np.uint8)

    def step(self, pred: np.ndarray, gt: np.ndarray, ground: BoundaryGround | None = None) -> None:
        """Add one raw 8-bit prediction/GT pair of the same size (`ground`: the GT's, when already known)."""
        gt_boundary = (ground or boundary_ground(gt)).boundary
        pred_boundary = mask_to_boundary(self.normalised(pred))
        # Integer values 0..255: np.histogram's unit bins of the reference are these counts.
        fg_hist = np.bincount(pred_boundary[gt_boundary], minlength=256).astype(np.int64)
        bg_hist = np.bincount(pred_boundary[~gt_boundary], minlength=256).astype(np.int64)
        true_positives = np.cumsum(np.flip(fg_hist), axis=0)
        false_positives = np.cumsum(np.flip(bg_hist), axis=0)
        gt_pixels = max(np.count_nonzero(gt_boundary), 1)
        self.curves.append(true_positives / (gt_pixels + false_positives))

    def get_results(self) -> dict[str, dict[str, np.ndarray]]:
        """{"biou": {"curve": mean curve over images, thresholds 255 down to 0}}."""
        return {"biou": {"curve": np.mean(np.array(self.curves, dtype=np.float64), axis=0)}}
