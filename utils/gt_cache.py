"""What the metrics need from a GT alone, computed once per GT and cached on disk by everything that makes it.

The weighted F-measure (Margolin et al., PySODMetrics' `WeightedFmeasure`) spends most of its time on
the GT: the Euclidean distance transform of the background, the distance weights, and the nearest
foreground pixel of each background pixel. `WFGround` keeps what the measure reads of them (see
`utils.wf_ground`); `weighted_fmeasure` then computes the library's value bit for bit from a prediction.
The S-measure's GT numbers (`utils.structure_measure.SMGround`) and the boundary metrics' bands
(`utils.boundary_metrics.BoundaryGround`) are cached beside it, and the HCE
skeleton as `<cache_dir>/<key>.png`. Entries live under `<cache_dir>/gt/<key>.*.npz`; an unreadable
entry is recomputed.

Every key (`entry_key`) covers the GT file's bytes (the same bytes that are decoded), the code digest of
this module and every repo module it imports (`utils.cache_keys.code_digest`: thinning, weighted-F and
boundary code included) and the versions of the libraries on the path: a `git pull` or a library
upgrade that could change an entry makes a new one.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from utils import cache_keys
from utils.atomic import atomic_path
from utils.boundary_metrics import BINARY_THRESHOLD, BoundaryGround, boundary_ground
from utils.imageio import ImageReadError, read_mask
from utils.structure_measure import SMGround, sm_ground
from utils.thinning import gt_skeleton
from utils.wf_ground import WFGround, reach_codes, weighted_fmeasure, wf_ground

__all__ = ["SMGround", "WFGround", "cached_boundary_ground", "cached_skeleton", "cached_sm_ground",
           "cached_wf_ground", "entry_key",
           "skeleton_cache_path", "weighted_fmeasure", "wf_ground"]

# The repo code and the libraries whose arithmetic or decoding reaches a GT entry.
GT_MODULES = ("utils.gt_cache",)
GT_LIBRARIES = ("numpy", "scipy", "opencv-python-headless", "pillow", "pysodmetrics")


def entry_key(gt_bytes: bytes, kind: str) -> str:
    """The name of the `kind` entry of a GT file with these bytes under this code and these libraries."""
    fields = dict(cache_keys.process_fields(GT_MODULES, GT_LIBRARIES))
    fields.update(kind=kind, gt_sha256=hashlib.sha256(gt_bytes).hexdigest())
    return cache_keys.fields_digest(fields)


def skeleton_cache_path(gt_bytes: bytes, cache_dir: Path) -> Path:
    """Where the skeleton of a GT file with these bytes is cached."""
    return cache_dir / f"{entry_key(gt_bytes, 'skeleton')}.png"


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
        # A 1-bit PNG (a third of the time of an 8-bit one to write and read) at zlib level 1 (half the time).
        with atomic_path(path, durable=False) as tmp:
            Image.fromarray(skeleton).save(tmp, format="PNG", compress_level=1)
    except OSError as e:
        return skeleton, f"{type(e).__name__}: {e}"
    return skeleton, None


def entry_path(gt_bytes: bytes, cache_dir: Path, kind: str) -> Path:
    """Where the `kind` entry of a GT file with these bytes is cached."""
    return cache_dir / "gt" / f"{entry_key(gt_bytes, kind)}.{kind}.npz"


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays to an .npz atomically (a reader never sees half an entry)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_path(path, durable=False) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _load(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz entry, or None when absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile):
        return None


def _load_reach(path: Path, gt_bin: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Stored `reach_codes` when the entry is intact and fits this GT, else None."""
    data = _load(path)
    try:
        steps = np.frombuffer(zlib.decompress(data["ring_steps"].tobytes()), dtype=np.uint32)
        codes = np.frombuffer(zlib.decompress(data["codes"].tobytes()), dtype=np.uint8)
        ring = np.cumsum(steps, dtype=np.intp)
        if (tuple(data["shape"]) != gt_bin.shape or ring.size != codes.size
                or ring.size != int(data["count"]) or (ring.size and ring[-1] >= gt_bin.size)):
            return None
        return ring, codes
    except (TypeError, KeyError, ValueError, zlib.error):
        return None


def cached_wf_ground(gt_bytes: bytes, gt_bin: np.ndarray, cache_dir: Path | None) -> tuple[WFGround, str | None]:
    """WFGround from the cache or computed (and stored); second item: why storing failed.

    What is stored is the nearest-foreground search near the foreground (`reach_codes`, small); the
    distance weights are recomputed from the GT, which OpenCV does faster than reading them back.
    """
    if cache_dir is None:
        return wf_ground(gt_bin), None
    path = entry_path(gt_bytes, cache_dir, "wf")
    reach = _load_reach(path, gt_bin) if path.is_file() else None
    if reach is not None:
        return wf_ground(gt_bin, reach), None
    ring, codes = reach_codes(gt_bin)
    ground = wf_ground(gt_bin, (ring, codes))
    steps = np.diff(ring, prepend=0).astype(np.uint32)
    try:
        _save(path, {"shape": np.array(gt_bin.shape), "count": np.array(ring.size),
                     "ring_steps": np.frombuffer(zlib.compress(steps.tobytes(), 1), dtype=np.uint8),
                     "codes": np.frombuffer(zlib.compress(codes.tobytes(), 1), dtype=np.uint8)})
    except OSError as e:
        return ground, f"{type(e).__name__}: {e}"
    return ground, None


def _load_sm(path: Path) -> SMGround | None:
    """A stored SMGround when the entry is intact, else None."""
    data = _load(path)
    try:
        split, means, variances = data["split"], data["means"], data["variances"]
        if split.shape != (2,) or means.shape != (4,) or variances.shape != (4,):
            return None
        return SMGround(np.float64(data["gt_mean"]), (int(split[0]), int(split[1])),
                        tuple(np.float64(v) for v in means), tuple(np.float64(v) for v in variances))
    except (TypeError, KeyError, ValueError):
        return None


def cached_sm_ground(gt_bytes: bytes, gt_bin: np.ndarray, cache_dir: Path | None) -> tuple[SMGround, str | None]:
    """The S-measure's GT part from the cache or computed (and stored); second item: why storing failed."""
    if cache_dir is None:
        return sm_ground(gt_bin), None
    path = entry_path(gt_bytes, cache_dir, "sm")
    ground = _load_sm(path) if path.is_file() else None
    if ground is not None:
        return ground, None
    ground = sm_ground(gt_bin)
    try:
        _save(path, {"gt_mean": np.float64(ground.gt_mean), "split": np.array(ground.split),
                     "means": np.array(ground.means, dtype=np.float64),
                     "variances": np.array(ground.variances, dtype=np.float64)})
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
    path = entry_path(gt_bytes, cache_dir, "boundary")
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
