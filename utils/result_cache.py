"""Per-image metric results cached on disk, keyed by (GT content, prediction content, metric set).

Rerunning a comparison with one new method then evaluates that method's images only. An entry is the
one-image `DISMetrics.state()` as JSON (Python floats round-trip exactly), so merging a cached entry
gives the numbers of computing it again. The key includes the versions of the libraries whose
arithmetic the numbers come from; an unreadable or malformed entry is recomputed and rewritten.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import scipy
import skimage

from utils.atomic import atomic_path

# v2: cutouts scored by their alpha, S-measure of 1 x N masks, mBA of GTs with no boundary.
_TAG = (f"fsanet per-image eval v2; numpy {np.__version__}; scipy {scipy.__version__}; "
        f"skimage {skimage.__version__}; opencv {cv2.__version__}; "
        f"pysodmetrics {metadata.version('pysodmetrics')}").encode()


def result_key(gt_bytes: bytes, pred_bytes: bytes, metric_set: Sequence[str]) -> str:
    """The cache key of one pair's results under one set of metrics."""
    h = hashlib.sha256(_TAG)
    for part in (hashlib.sha256(gt_bytes).digest(), hashlib.sha256(pred_bytes).digest(), ",".join(metric_set).encode()):
        h.update(b"\0" + part)
    return h.hexdigest()


def result_path(cache_dir: Path, key: str) -> Path:
    """Where the entry of `key` lives."""
    return cache_dir / "results" / key[:2] / f"{key}.json"


def _plain(value: Any) -> Any:
    """Numpy values as JSON-able Python values (floats keep every bit)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def load_result(cache_dir: Path, key: str, names: Sequence[str]) -> dict[str, Any] | None:
    """The cached {"state": ..., "pred_size": ...} of `key`, or None when absent or malformed."""
    path = result_path(cache_dir, key)
    try:
        entry = json.loads(path.read_text())
        state = entry["state"]
        if sorted(state) != sorted(names) or any(not isinstance(v, list) or len(v) != 1 for v in state.values()):
            return None
        size = entry["pred_size"]
        return {"state": state, "pred_size": None if size is None else (int(size[0]), int(size[1]))}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def store_result(cache_dir: Path, key: str, state: dict[str, list], pred_size: tuple[int, int] | None) -> None:
    """Write one pair's state (OSError when the cache cannot be written)."""
    entry = {"state": {name: [_plain(v) for v in values] for name, values in state.items()},
             "pred_size": None if pred_size is None else list(pred_size)}
    with atomic_path(result_path(cache_dir, key)) as tmp:
        tmp.write_text(json.dumps(entry))
