"""What the metrics need from a GT alone, computed once per GT and cached on disk by the GT's content.

The weighted F-measure (Margolin et al., PySODMetrics' `WeightedFmeasure`) spends most of its time on
the GT: the Euclidean distance transform of the background with its nearest-foreground indices, and
the distance weights derived from it. `WFGround` keeps those; `weighted_fmeasure` then computes the
library's value bit for bit from a prediction (the same arrays in the same order reach the same
numpy reductions). The boundary metrics' bands (`utils.boundary_metrics.BoundaryGround`) are cached
beside it, and the HCE skeleton as `<cache_dir>/<sha256>.png`. Entries live under
`<cache_dir>/gt/<sha256>.*.npz`; an unreadable entry is recomputed.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage
from py_sod_metrics import WeightedFmeasure
from py_sod_metrics.utils import EPS
from scipy import ndimage

from utils.atomic import atomic_path
from utils.boundary_metrics import BINARY_THRESHOLD, BoundaryGround, boundary_ground
from utils.imageio import ImageReadError, read_mask, write_png
from utils.thinning import gt_skeleton

# Part of every cache key: a different skeletonisation (or skimage version) never reuses old entries.
_SKELETON_TAG = f"skimage {skimage.__version__} skeletonize(gt > {BINARY_THRESHOLD}) v1".encode()
_WF_TAG = b"weighted-F feature transform (scipy distance_transform_edt) v1"
_BOUNDARY_TAG = b"BiRefNet mBA bands + BIoU GT boundary v1"
_KERNEL = WeightedFmeasure().matlab_style_gauss2D((7, 7), sigma=5)
_MARGIN = _KERNEL.shape[0] // 2


@dataclass
class WFGround:
    """The GT side of the weighted F-measure: background pixels, their nearest foreground pixel, their weight."""

    shape: tuple[int, int]
    background: np.ndarray  # flat indices of GT background pixels, row-major
    nearest: np.ndarray  # flat index of the nearest GT foreground pixel of each background pixel
    weight: np.ndarray  # the library's B = 2 - exp(log(0.5) / 5 * distance) at each background pixel
    offsets: np.ndarray  # (row, column) offsets to the nearest foreground pixel, int16: what is stored


def wf_ground(gt_bin: np.ndarray, offsets: np.ndarray | None = None) -> WFGround:
    """WFGround of a boolean GT, from the stored nearest-foreground offsets or a fresh distance transform."""
    h, w = gt_bin.shape
    background = np.flatnonzero(~gt_bin)
    if offsets is None:
        _, indices = ndimage.distance_transform_edt(~gt_bin, return_indices=True)
        rows, cols = np.divmod(background, w)
        offsets = np.stack([indices[0].reshape(-1)[background] - rows,
                            indices[1].reshape(-1)[background] - cols]).astype(np.int16)
    delta = offsets.astype(np.intp)
    nearest = background + delta[0] * w + delta[1]
    # scipy's distance is sqrt of the summed squared index differences (float64): the same values.
    squared = offsets.astype(np.float64)
    distance = np.sqrt(np.add.reduce(squared * squared, axis=0))
    weight = 2 - np.exp(np.log(0.5) / 5 * distance)
    return WFGround((h, w), background, nearest, weight, offsets)


def weighted_fmeasure(pred: np.ndarray, gt: np.ndarray, ground: WFGround, beta: float = 1.0) -> float:
    """PySODMetrics' `WeightedFmeasure.cal_wfm` (pred in [0, 1], boolean gt) with the GT part precomputed."""
    if not gt.any():
        return 0  # the library's value for an empty GT (an int, as it appends it)
    error = np.abs(pred - gt)
    spread = error.copy()  # background pixels take the error at their nearest foreground pixel
    spread.reshape(-1)[ground.background] = error.reshape(-1)[ground.nearest]
    # Only foreground pixels use the smoothed error: filter the foreground's box plus the kernel's
    # reach. Each output pixel is the same sum of the same products, so the values are identical.
    rows, cols = np.flatnonzero(gt.any(axis=1)), np.flatnonzero(gt.any(axis=0))
    r0, c0 = max(rows[0] - _MARGIN, 0), max(cols[0] - _MARGIN, 0)
    box = np.s_[r0:rows[-1] + 1 + _MARGIN, c0:cols[-1] + 1 + _MARGIN]
    smoothed = ndimage.convolve(spread[box], weights=_KERNEL, mode="constant", cval=0)
    fg = gt[box]
    fg_error, fg_smoothed = error[box][fg], smoothed[fg]
    fg_weighted = np.where(fg_smoothed < fg_error, fg_smoothed, fg_error) * 1.0
    bg_weighted = error.reshape(-1)[ground.background] * ground.weight
    tp = np.sum(gt) - np.sum(fg_weighted)
    fp = np.sum(bg_weighted)
    recall = 1 - np.mean(fg_weighted)
    precision = tp / (tp + fp + EPS)
    return (1 + beta) * recall * precision / (recall + beta * precision + EPS)


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


def entry_path(gt_bytes: bytes, cache_dir: Path, tag: bytes, kind: str) -> Path:
    """Where the `kind` entry of a GT file with these bytes is cached."""
    digest = hashlib.sha256(tag + b"\0" + gt_bytes).hexdigest()
    return cache_dir / "gt" / f"{digest}.{kind}.npz"


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays to an .npz atomically (a reader never sees half an entry)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _load(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz entry, or None when absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile):
        return None


def _load_offsets(path: Path, shape: tuple[int, int], count: int) -> np.ndarray | None:
    """Stored nearest-foreground offsets when the entry is intact and fits this GT, else None."""
    data = _load(path)
    try:
        offsets = np.frombuffer(zlib.decompress(data["offsets"].tobytes()), dtype=np.int16).reshape(2, count)
        return offsets if tuple(data["shape"]) == shape else None
    except (TypeError, KeyError, ValueError, zlib.error):
        return None


def cached_wf_ground(gt_bytes: bytes, gt_bin: np.ndarray, cache_dir: Path | None) -> tuple[WFGround, str | None]:
    """WFGround from the cache or computed (and stored); second item: why storing failed."""
    if cache_dir is None:
        return wf_ground(gt_bin), None
    path = entry_path(gt_bytes, cache_dir, _WF_TAG, "wf")
    count = gt_bin.size - np.count_nonzero(gt_bin)
    offsets = _load_offsets(path, gt_bin.shape, count) if path.is_file() else None
    if offsets is not None:
        return wf_ground(gt_bin, offsets), None
    ground = wf_ground(gt_bin)
    # Offsets vary slowly across the background: fast zlib shrinks them about 8x.
    packed = np.frombuffer(zlib.compress(ground.offsets.tobytes(), 1), dtype=np.uint8)
    try:
        _save(path, {"shape": np.array(gt_bin.shape), "offsets": packed})
    except OSError as e:
        return ground, f"{type(e).__name__}: {e}"
    return ground, None


def _load_boundary(path: Path, shape: tuple[int, int]) -> BoundaryGround | None:
    """A stored BoundaryGround when the entry is intact and fits this GT, else None."""
    data = _load(path)
    try:
        count = shape[0] * shape[1]
        planes = np.unpackbits(data["planes"], count=count * data["n"]).reshape(-1, *shape).astype(bool)
        return BoundaryGround(list(planes[:-1]), planes[-1]) if tuple(data["shape"]) == shape else None
    except (TypeError, KeyError, ValueError):
        return None


def cached_boundary_ground(gt_bytes: bytes, gt: np.ndarray,
                           cache_dir: Path | None) -> tuple[BoundaryGround, str | None]:
    """The boundary metrics' GT part (raw 8-bit GT) from the cache or computed (and stored)."""
    if cache_dir is None:
        return boundary_ground(gt), None
    path = entry_path(gt_bytes, cache_dir, _BOUNDARY_TAG, "boundary")
    ground = _load_boundary(path, gt.shape) if path.is_file() else None
    if ground is not None:
        return ground, None
    ground = boundary_ground(gt)
    planes = np.stack([*ground.bands, ground.boundary])
    try:
        _save(path, {"shape": np.array(gt.shape), "n": np.array(len(planes)), "planes": np.packbits(planes)})
    except OSError as e:
        return ground, f"{type(e).__name__}: {e}"
    return ground, None
