"""Per-image metric results cached on disk, keyed by everything that computes them.

Rerunning a comparison with one new method then evaluates that method's images only. An entry is the
one-image `DISMetrics.state()` as JSON (Python floats round-trip exactly), so merging a cached entry
gives the numbers of computing it again, plus the notes the first pass made (the prediction's color
mode when it was converted to gray, its size when resized), which a hit replays. The key
(`utils.cache_keys`) covers the GT's and the prediction's bytes, the metric set, the code digest of
the per-pair evaluation and every repo module it imports (`utils.pair_eval`: metrics, thinning,
weighted F, boundary metrics, decoding) and the versions of the libraries whose arithmetic or decoding
the numbers come from; an unreadable or malformed entry is recomputed and rewritten.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils import cache_keys
from utils.atomic import atomic_path

# The repo code that computes an entry (imported transitively) and the libraries on its path.
RESULT_MODULES = ("utils.pair_eval",)
RESULT_LIBRARIES = ("numpy", "scipy", "scikit-image", "opencv-python-headless", "pillow", "pysodmetrics")


def result_key(gt_bytes: bytes, pred_bytes: bytes, metric_set: Sequence[str]) -> str:
    """The cache key of one pair's results under one set of metrics, this code and these libraries:
    `<GT digest>-<digest of the rest>`, so the entries of one GT (every method, every code version) sit together."""
    fields = dict(cache_keys.process_fields(RESULT_MODULES, RESULT_LIBRARIES))
    fields.update(pred_sha256=hashlib.sha256(pred_bytes).hexdigest(), metrics=",".join(metric_set))
    return f"{hashlib.sha256(gt_bytes).hexdigest()}-{cache_keys.fields_digest(fields)}"


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
    """The cached {"state", "pred_size", "pred_mode", "alpha_map"} of `key`, or None when absent or malformed."""
    path = result_path(cache_dir, key)
    try:
        entry = json.loads(path.read_text())
        state = entry["state"]
        if sorted(state) != sorted(names) or any(not isinstance(v, list) or len(v) != 1 for v in state.values()):
            return None
        size, mode, alpha = entry["pred_size"], entry["pred_mode"], entry["alpha_map"]
        if (mode is not None and not isinstance(mode, str)) or not isinstance(alpha, bool):
            return None
        return {"state": state, "pred_size": None if size is None else (int(size[0]), int(size[1])), "pred_mode": mode,
                "alpha_map": alpha}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def store_result(cache_dir: Path, key: str, state: dict[str, list], pred_size: tuple[int, int] | None,
                 pred_mode: str | None = None, alpha_map: bool = False) -> None:
    """Write one pair's state and notes (OSError when the cache cannot be written)."""
    entry = {"state": {name: [_plain(v) for v in values] for name, values in state.items()},
             "pred_size": None if pred_size is None else list(pred_size), "pred_mode": pred_mode,
             "alpha_map": alpha_map}
    with atomic_path(result_path(cache_dir, key), durable=False) as tmp:
        tmp.write_text(json.dumps(entry))
