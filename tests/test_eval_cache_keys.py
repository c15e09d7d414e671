"""eval's caches are keyed by the bytes, code and libraries that compute them; hits keep notes; a comparison
prepares each GT once under one progress bar for the whole run."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_eval import STEMS, make_layout

from pipelines.evaluation import evaluate, evaluate_methods, parse_methods
from utils import cache_keys, gt_cache
from utils.metrics import HumanCorrectionEffort


@pytest.fixture(autouse=True)
def fresh_key_memos():
    """Each test sees keys computed from the code and libraries as it patches them."""
    cache_keys.code_digest.cache_clear()
    cache_keys.process_fields.cache_clear()
    yield
    cache_keys.code_digest.cache_clear()
    cache_keys.process_fields.cache_clear()


def entries(cache: Path) -> dict[str, int]:
    """How many entries of each kind the eval cache holds."""
    return {"skeleton": len(list(cache.glob("*.png"))), "gt": len(list((cache / "gt").glob("*.npz"))),
            "results": len(list((cache / "results").rglob("*.json")))}


def test_a_changed_metric_source_with_a_warm_cache_gives_the_new_number(tmp_path: Path, reference_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """HCE patched to 999: served from the cache while the source is the same, recomputed once it changes."""
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": STEMS[:2]})
    cache = tmp_path / "cache"
    first = evaluate(pred_root, gt_root, ["case"], cache_dir=cache, progress=False)["case"].metrics
    assert first["HCE"] != 999
    monkeypatch.setattr(HumanCorrectionEffort, "cal_hce_binary", lambda self, pred, gt, skeleton: 999)
    assert evaluate(pred_root, gt_root, ["case"], cache_dir=cache, progress=False)["case"].metrics == first

    # The same edit made in the source the code digest reads (a copy of the repo's packages).
    copy = tmp_path / "repo"
    for package in ("utils", "lib"):
        shutil.copytree(cache_keys.REPO_ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    metrics_py = copy / "utils" / "metrics.py"
    metrics_py.write_text(metrics_py.read_text() + "\n# HCE fixed\n")
    monkeypatch.setattr(cache_keys.repo_sources, "__defaults__", (copy,))
    cache_keys.code_digest.cache_clear()
    cache_keys.process_fields.cache_clear()
    assert evaluate(pred_root, gt_root, ["case"], cache_dir=cache, progress=False)["case"].metrics["HCE"] == 999


def test_an_edit_to_the_thinning_code_changes_the_gt_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The skeleton is computed by utils/thinning.py: editing it renames the skeleton entry."""
    before = gt_cache.entry_key(b"gt bytes", "skeleton")
    copy = tmp_path / "repo"
    shutil.copytree(cache_keys.REPO_ROOT / "utils", copy / "utils", ignore=shutil.ignore_patterns("__pycache__"))
    thinning = copy / "utils" / "thinning.py"
    thinning.write_text(thinning.read_text() + "\n# changed\n")
    monkeypatch.setattr(cache_keys.repo_sources, "__defaults__", (copy,))
    cache_keys.code_digest.cache_clear()
    cache_keys.process_fields.cache_clear()
    assert gt_cache.entry_key(b"gt bytes", "skeleton") != before


def test_a_library_upgrade_misses_every_eval_cache(tmp_path: Path, reference_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A new Pillow (it decodes every map) makes new GT and results entries; the numbers stay."""
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": STEMS[:2]})
    cache = tmp_path / "cache"
    first = evaluate(pred_root, gt_root, ["case"], cache_dir=cache, progress=False)["case"].metrics
    assert entries(cache) == {"skeleton": 2, "gt": 4, "results": 2}
    real = cache_keys.library_versions
    monkeypatch.setattr(cache_keys, "library_versions",
                        lambda names: {n: ("99.0" if n == "pillow" else v) for n, v in real(names).items()})
    cache_keys.process_fields.cache_clear()
    again = evaluate(pred_root, gt_root, ["case"], cache_dir=cache, progress=False)["case"].metrics
    assert again == first
    assert entries(cache) == {"skeleton": 4, "gt": 8, "results": 4}


def test_a_cache_hit_keeps_the_first_passes_notes(tmp_path: Path, reference_dir: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """An RGB prediction is noted as converted on the first run and on the run served from the cache."""
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": STEMS[:2]})
    path = pred_root / "case" / f"{STEMS[1]}.png"
    Image.open(path).convert("RGB").save(path)
    cache = tmp_path / "cache"
    notes = []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipelines.evaluation"):
            metrics = evaluate(pred_root, gt_root, ["case"], cache_dir=cache, progress=False)["case"].metrics
        notes.append([r.getMessage() for r in caplog.records if "converted to gray" in r.getMessage()])
    assert entries(cache)["results"] == 2
    assert len(notes[0]) == 1 and f"{STEMS[1]}.png (RGB)" in notes[0][0]
    assert notes[1] == notes[0]
    assert metrics == evaluate(pred_root, gt_root, ["case"], cache_dir=None, progress=False)["case"].metrics


def test_five_methods_compute_each_gt_side_once(tmp_path: Path, reference_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Without any cache, a 5-method comparison skeletonises and transforms each GT once, same numbers."""
    stems = STEMS[:3]
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": stems})
    roots = [pred_root]
    for i in range(1, 5):
        roots.append(tmp_path / f"m{i}")
        shutil.copytree(pred_root, roots[-1])
    calls = {"skeleton": 0, "wf": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(gt_cache, "gt_skeleton", counted("skeleton", gt_cache.gt_skeleton))
    monkeypatch.setattr(gt_cache, "wf_ground", counted("wf", gt_cache.wf_ground))
    results, _ = evaluate_methods(parse_methods([str(r) for r in roots]), gt_root, ["case"], workers=1,
                                  cache_dir=None, progress=False)
    assert calls == {"skeleton": len(stems), "wf": len(stems)}
    single = evaluate(pred_root, gt_root, ["case"], cache_dir=None, progress=False)["case"].metrics
    assert all(per["case"].metrics == single for per in results.values())


def test_keys_are_computed_once_per_process_not_per_image(tmp_path: Path, reference_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The code digest walks the sources once per module set, however many images are evaluated."""
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": STEMS[:4]})
    walks = []
    real = cache_keys.repo_sources
    monkeypatch.setattr(cache_keys, "repo_sources", lambda modules, *a: walks.append(modules) or real(modules, *a))
    evaluate(pred_root, gt_root, ["case"], cache_dir=tmp_path / "cache", progress=False)
    assert sorted(map(tuple, walks)) == [("utils.gt_cache",), ("utils.pair_eval",)]


def test_one_progress_bar_counts_every_pair_of_the_run(tmp_path: Path, reference_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two methods on two datasets: one bar whose total is every pair, so its rate and time left cover the run."""
    from pipelines import evaluation

    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"a": STEMS[:2], "b": STEMS[2:5]})
    other = tmp_path / "other"
    shutil.copytree(pred_root, other)
    bars = []

    class Recorder:
        def __init__(self, total, **kwargs):
            bars.append({"total": total, "done": 0})

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            bars[-1]["done"] += n

    monkeypatch.setattr(evaluation, "tqdm", Recorder)
    evaluate_methods(parse_methods([str(pred_root), f"Other={other}"]), gt_root, ["a", "b"], workers=1,
                     cache_dir=None, progress=True)
    assert bars == [{"total": 10, "done": 10}]


def test_a_killed_runs_half_written_cache_entries_are_removed(tmp_path: Path, reference_dir: Path) -> None:
    """Temp files of a writer that is gone (results and GT folders) are deleted by the next run."""
    import subprocess
    import sys

    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": STEMS[:1]})
    cache = tmp_path / "cache"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    orphans = [cache / "results" / "ab" / f".x.json.{dead}.abcdefgh.tmp",
               cache / "gt" / f".y.wf.npz.{dead}.abcdefgh.tmp", cache / f".z.png.{dead}.abcdefgh.tmp"]
    for orphan in orphans:
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_text("half")
    evaluate(pred_root, gt_root, ["case"], cache_dir=cache, progress=False)
    assert not any(orphan.exists() for orphan in orphans)


def test_cache_entries_a_power_cut_left_empty_are_recomputed(tmp_path: Path, reference_dir: Path) -> None:
    """Cache entries are not flushed to disk before their rename (a flush per entry costs time for nothing): an
    entry a power cut left empty is read as unusable, recomputed and rewritten, with the same numbers."""
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": STEMS[:2]})
    cache = tmp_path / "cache"
    first = evaluate(pred_root, gt_root, ["case"], cache_dir=cache, progress=False, boundary=True)["case"].metrics
    files = [path for path in cache.rglob("*") if path.is_file()]
    assert entries(cache) == {"skeleton": 2, "gt": 6, "results": 2}
    for path in files:
        path.write_bytes(b"")
    again = evaluate(pred_root, gt_root, ["case"], cache_dir=cache, progress=False, boundary=True)["case"].metrics
    assert again == first
    assert all(path.stat().st_size > 0 for path in files)
