"""Zhang-Suen thinning equal to `skimage.morphology.skeletonize` (2D), visiting only pixels that can change.

skimage's `_fast_skeletonize` sweeps the whole image twice per iteration until nothing is removed, so
a GT with a 400-pixel-thick body costs about 800 full sweeps of a 2500 x 3400 image (seconds). Each
sub-pass decides every pixel from its 3x3 neighbourhood in the state before the sub-pass, so a pixel
whose neighbourhood has not changed since the last sub-pass of the same kind gets the same answer
(kept) again. Re-checking only the neighbours of removed pixels therefore removes exactly the same
pixels in the same sub-passes, and the skeleton is identical; the tests compare it with skimage's.
"""
from __future__ import annotations

import itertools

import cv2
import numpy as np

# skimage's look-up table (`_skeletonize_various_cy.pyx`): for each 8-neighbourhood code, 1 = remove
# in the first sub-pass, 2 = in the second, 3 = in both, 0 = keep.
_LUT = np.array([
    0, 0, 0, 1, 0, 0, 1, 3, 0, 0, 3, 1, 1, 0, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2, 0, 3, 0, 3, 3,
    0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 3, 0, 2, 2,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    2, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 3, 0, 2, 0,
    0, 0, 3, 1, 0, 0, 1, 3, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    2, 3, 1, 3, 0, 0, 1, 3, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    2, 3, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 0, 1, 0, 0, 0, 0, 2, 2, 0, 0, 2, 0, 0, 0,
], dtype=np.uint8)
# Whether a neighbourhood code is removed by the first (index 0) or the second (index 1) kind of sub-pass.
_REMOVED = ((_LUT == 1) | (_LUT == 3), (_LUT == 2) | (_LUT == 3))
# (row, column) offsets of the 8 neighbours, in the bit order of skimage's neighbourhood code.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _codes(flat: np.ndarray, pixels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The 8-neighbourhood code (0..255) of each pixel index in the flat, padded image."""
    code = np.zeros(pixels.size, dtype=np.uint8)
    for bit, offset in enumerate(offsets):
        code |= flat[pixels + offset] << np.uint8(bit)
    return code


def _unique(indices: np.ndarray, stamp: np.ndarray) -> np.ndarray:
    """`indices` without repeats (in no particular order), in linear time through a scratch image."""
    order = np.arange(indices.size, dtype=stamp.dtype)
    stamp[indices] = order  # a repeated index keeps the stamp of its last occurrence
    return indices[stamp[indices] == order]


def skeletonize(mask: np.ndarray) -> np.ndarray:
    """The Zhang-Suen skeleton of a 2D boolean mask, pixel for pixel `skimage.morphology.skeletonize`."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.uint8)  # background border, as skimage pads
    padded[1:-1, 1:-1] = mask
    flat = padded.reshape(-1)
    stride = w + 2
    offsets = np.array([dr * stride + dc for dr, dc in _NEIGHBOURS], dtype=np.intp)
    # 4-byte stamps (half the memory traffic of 8-byte ones in the scattered reads and writes); negative values
    # mark each sub-pass's new neighbours.
    stamp = np.zeros(flat.size, dtype=np.int32 if flat.size < 2**31 else np.int64)
    # A sub-pass re-checks the foreground pixels around those removed by the two sub-passes before it: any
    # other pixel was checked by the last sub-pass of its kind with the neighbourhood it still has. A pixel
    # whose 8 neighbours are all foreground (code 255) is kept by both kinds, so the first two sub-passes
    # start from the foreground's border pixels instead of every foreground pixel. The neighbours of each
    # sub-pass's removals are listed once and serve the two sub-passes after it.
    candidates = np.flatnonzero(padded > cv2.erode(padded, np.ones((3, 3), np.uint8)))
    before = candidates  # the first second-kind sub-pass also checks every border pixel still there
    for step in itertools.count():
        removed = candidates[_REMOVED[step % 2][_codes(flat, candidates, offsets)]]
        flat[removed] = 0  # all decisions above were taken on the state before this sub-pass
        near = (removed[:, None] + offsets).reshape(-1)
        near = _unique(near[flat[near] != 0], stamp)
        # `before` and `near` hold no repeats each: mark this sub-pass's `near` and keep the rest of `before`.
        mark = -1 - step
        stamp[near] = mark
        candidates = np.concatenate([before[(flat[before] != 0) & (stamp[before] != mark)], near])
        before = near
        if candidates.size == 0:
            break
    return padded[1:-1, 1:-1].astype(bool)


def gt_skeleton(gt: np.ndarray) -> np.ndarray:
    """skimage.morphology.skeletonize(gt) for a boolean GT, computed faster on the foreground's bounding box."""
    skeleton = np.zeros(gt.shape, dtype=bool)
    rows = np.flatnonzero(gt.any(axis=1))
    if rows.size == 0:
        return skeleton
    cols = np.flatnonzero(gt.any(axis=0))
    # Zhang-Suen thinning decides each pixel from its 3x3 neighbourhood and skimage pads the image with
    # background, which is what surrounds the bounding box anyway: the skeleton is identical.
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    skeleton[box] = skeletonize(gt[box])
    return skeleton
