"""Several methods per eval.py run, boundary metrics, the results cache and the GT-only fast paths."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from py_sod_metrics import WeightedFmeasure
from py_sod_metrics.utils import validate_and_normalize_input
from skimage import morphology
from test_eval import STEMS, assert_user_error, make_layout, read_pair, run_eval

from pipelines import eval_reports
from pipelines.evaluation import evaluate
from utils import gt_cache, thinning
from utils.boundary_metrics import BoundaryAccuracy, BoundaryIoU
from utils.metrics import ALL_METRICS, BOUNDARY_METRICS, FIELD_METRICS
from utils.result_cache import result_key, result_path


@pytest.fixture(scope="module")
def expected_boundary(reference_dir: Path) -> dict:
    """BiRefNet's mBA and BIoU on the eval case, totals and per image."""
    return json.loads((reference_dir / "eval_case" / "expected_boundary.json").read_text())


def blurred_method(tmp_path: Path, gt_root: Path, name: str, stems: list[str]) -> Path:
    """A second method: each GT blurred (sigma 4), as <tmp>/<method>/<name>/<stem>.png."""
    root = tmp_path / "blurred"
    (root / name).mkdir(parents=True)
    for stem in stems:
        gt = cv2.imread(str(gt_root / name / "gt" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(root / name / f"{stem}.png"), cv2.GaussianBlur(gt, (0, 0), 4))
    return root


# ---------------------------------------------------------------- metric code

def test_boundary_metrics_equal_birefnet(reference_dir: Path, expected_boundary: dict) -> None:
    """mBA, maxBIoU, meanBIoU and every image's values equal the fixture to 1e-6."""
    ba, biou = BoundaryAccuracy(), BoundaryIoU()
    for stem in STEMS:
        pred, gt = read_pair(reference_dir, stem)
        ba.step(pred, gt)
        biou.step(pred, gt)
        want = expected_boundary["per_image"][f"{stem}.png"]
        assert ba.bas[-1] == pytest.approx(want["mBA"], abs=1e-6)
        assert biou.curves[-1].max() == pytest.approx(want["BIoU_max"], abs=1e-6)
        assert biou.curves[-1].mean() == pytest.approx(want["BIoU_mean"], abs=1e-6)
    curve = biou.get_results()["biou"]["curve"]
    assert ba.get_results()["mba"] == pytest.approx(expected_boundary["mBA"], abs=1e-6)
    assert curve.max() == pytest.approx(expected_boundary["maxBIoU"], abs=1e-6)
    assert curve.mean() == pytest.approx(expected_boundary["meanBIoU"], abs=1e-6)


def random_masks(seed: int, count: int) -> list[np.ndarray]:
    """Small boolean masks: smooth blobs, speckle, empty, full, one pixel."""
    rng = np.random.default_rng(seed)
    masks = [np.zeros((9, 12), bool), np.ones((7, 5), bool), np.pad(np.ones((1, 1), bool), 3)]
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(3, 70, 2))
        blobs = cv2.GaussianBlur(rng.random((h, w)), (0, 0), float(rng.uniform(0.7, 4)))
        masks.append(blobs > np.quantile(blobs, rng.uniform(0.1, 0.9)) if rng.random() < 0.7
                     else rng.random((h, w)) < rng.uniform(0.2, 0.9))
    return masks


def test_thinning_equals_skimage(reference_dir: Path) -> None:
    """The frontier Zhang-Suen gives skimage's skeleton pixel for pixel."""
    masks = random_masks(0, 120) + [read_pair(reference_dir, stem)[1] > 128 for stem in STEMS]
    for mask in masks:
        np.testing.assert_array_equal(thinning.skeletonize(mask), morphology.skeletonize(mask))


def test_weighted_f_from_gt_parts_is_the_library_value(reference_dir: Path, tmp_path: Path) -> None:
    """Precomputed (and cached, and reloaded) GT parts give PySODMetrics' wF bit for bit."""
    rng = np.random.default_rng(1)
    pairs = [read_pair(reference_dir, stem) for stem in STEMS]
    pairs += [(rng.integers(0, 256, m.shape).astype(np.uint8), m.astype(np.uint8) * 255) for m in random_masks(2, 25)]
    for pred, gt in pairs:
        pred_norm, gt_bin = validate_and_normalize_input(pred, gt, normalize=True)
        library = WeightedFmeasure()
        library.step(pred_norm, gt_bin, normalize=False)
        gt_bytes = cv2.imencode(".png", gt)[1].tobytes()
        first, error = gt_cache.cached_wf_ground(gt_bytes, gt_bin, tmp_path)
        again, _ = gt_cache.cached_wf_ground(gt_bytes, gt_bin, tmp_path)
        assert error is None
        for ground in (gt_cache.wf_ground(gt_bin), first, again):
            assert gt_cache.weighted_fmeasure(pred_norm, gt_bin, ground) == library.weighted_fms[0]


def test_corrupt_gt_cache_entries_are_recomputed(reference_dir: Path, tmp_path: Path) -> None:
    """A truncated or foreign .npz is ignored and rewritten."""
    pred, gt = read_pair(reference_dir, "case_002")
    gt_bytes, gt_bin = cv2.imencode(".png", gt)[1].tobytes(), gt > 128
    truth = gt_cache.wf_ground(gt_bin)
    gt_cache.cached_wf_ground(gt_bytes, gt_bin, tmp_path)
    gt_cache.cached_boundary_ground(gt_bytes, gt, tmp_path)
    for entry in (tmp_path / "gt").glob("*.npz"):
        entry.write_bytes(entry.read_bytes()[:100])
    ground, _ = gt_cache.cached_wf_ground(gt_bytes, gt_bin, tmp_path)
    np.testing.assert_array_equal(ground.weight, truth.weight)
    bands, _ = gt_cache.cached_boundary_ground(gt_bytes, gt, tmp_path)
    ba, cached = BoundaryAccuracy(), BoundaryAccuracy()
    ba.step(pred, gt)
    cached.step(pred, gt, gt_cache.cached_boundary_ground(gt_bytes, gt, tmp_path)[0])
    assert ba.bas == cached.bas and len(bands.bands) == 5


# ---------------------------------------------------------------- reports

def test_marks_follow_the_metric_direction() -> None:
    """Best bold and second underlined: highest for maxF, lowest for MAE and HCE; ties share a mark."""
    tables = {"A": {"d": {"maxF": 0.9, "MAE": 0.05, "HCE": 300.0, "n": 2}},
              "B": {"d": {"maxF": 0.8, "MAE": 0.03, "HCE": 120.0, "n": 2}},
              "C": {"d": {"maxF": 0.7, "MAE": 0.04, "HCE": 120.4, "n": 1}}}
    text = eval_reports.comparison_markdown(tables, ["maxF", "MAE", "HCE"], 3, {"d": 2})
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines()
            if line.startswith("| ") and "Method" not in line}
    assert rows["A"] == "| A | **0.900** | 0.050 | 300 |"
    assert rows["B"] == "| B | <u>0.800</u> | **0.030** | **120** |"
    assert rows["C (1/2 images)"] == "| C (1/2 images) | 0.700 | <u>0.040</u> | **120** |"
    latex = eval_reports.comparison_latex(tables, ["maxF", "MAE", "HCE"], 3)
    assert r"B & \underline{0.800} & \textbf{0.030} & \textbf{120} \\" in latex
    assert r"\multicolumn{3}{c}{d}" in latex and r"MAE$\downarrow$" in latex


# ---------------------------------------------------------------- eval.py

@pytest.mark.slow
def test_two_methods_equal_two_single_runs(tmp_path: Path, reference_dir: Path, expected_boundary: dict,
                                           capsys: pytest.CaptureFixture) -> None:
    """Per method the numbers of its own run; one table per dataset, method columns, shared figures."""
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": STEMS, "half": STEMS[:4]})
    blurred = blurred_method(tmp_path, gt_root, "case", STEMS)  # no "half" folder: left out there
    out = tmp_path / "out"
    proc = run_eval(capsys, gt_root, str(pred_root), f"Blur={blurred}", "--datasets", "case", "half", "--workers", "2",
                    "--cache_dir", str(tmp_path / "cache"), "--metrics", "maxF", "MAE", "HCE", *BOUNDARY_METRICS,
                    "--save_json", str(out / "m.json"), "--save_csv", str(out / "m.csv"),
                    "--save_latex", str(out / "m.tex"), "--per_image_csv", str(out / "img.csv"),
                    "--plot_dir", str(out / "plots"))
    assert proc.returncode == 0, proc.stderr
    assert "Blur: no half folder" in proc.stderr
    got = json.loads((out / "m.json").read_text())
    assert list(got) == ["results", "Blur"] and list(got["Blur"]) == ["case"]
    for name, root in (("results", pred_root), ("Blur", blurred)):
        single = evaluate(root, gt_root, list(got[name]), workers=1, progress=False, boundary=True)
        assert got[name] == {d: r.metrics for d, r in single.items()}
    for metric in ("mBA", "maxBIoU", "meanBIoU"):
        assert got["results"]["case"][metric] == pytest.approx(expected_boundary[metric], abs=1e-6)
    assert set(ALL_METRICS) <= set(got["results"]["case"])

    assert "case\n\n| Method | maxF | MAE | HCE | mBA | maxBIoU | meanBIoU |" in proc.stdout
    with open(out / "m.csv", newline="") as f:
        assert [(r["method"], r["dataset"]) for r in csv.DictReader(f)] == [
            ("results", "case"), ("results", "half"), ("Blur", "case")]
    with open(out / "img.csv", newline="") as f:
        images = [r for r in csv.DictReader(f) if r["method"] == "results" and r["dataset"] == "case"]
    assert [float(r["mBA"]) for r in images] == pytest.approx(
        [expected_boundary["per_image"][f"{s}.png"]["mBA"] for s in STEMS], abs=1e-6)
    assert r"\multicolumn{6}{c}{case}" in (out / "m.tex").read_text()
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "case_fmeasure.png", "case_pr.png", "half_fmeasure.png", "half_pr.png"]


def test_results_cache_hits_and_invalidation(tmp_path: Path, reference_dir: Path) -> None:
    """Cached results give identical numbers; a changed prediction or a corrupt entry is recomputed."""
    stems = STEMS[:3]
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": stems})
    cache = tmp_path / "cache"
    fresh = evaluate(pred_root, gt_root, ["case"], cache_dir=None, progress=False)["case"].metrics
    first = evaluate(pred_root, gt_root, ["case"], cache_dir=cache, progress=False)["case"].metrics
    entries = sorted((cache / "results").rglob("*.json"))
    assert len(entries) == 3
    stamps = [e.stat().st_mtime_ns for e in entries]
    assert evaluate(pred_root, gt_root, ["case"], cache_dir=cache, progress=False)["case"].metrics == first == fresh
    assert [e.stat().st_mtime_ns for e in entries] == stamps  # served, not rewritten

    # Corrupt the entry of an image whose prediction stays the same (the keys' order is the hashes').
    kept = result_path(cache, result_key((gt_root / "case" / "gt" / "case_000.png").read_bytes(),
                                         (pred_root / "case" / "case_000.png").read_bytes(), FIELD_METRICS))
    kept.write_text("{not json")
    pred_path = pred_root / "case" / "case_001.png"
    cv2.imwrite(str(pred_path), 255 - cv2.imread(str(pred_path), cv2.IMREAD_GRAYSCALE))
    changed = evaluate(pred_root, gt_root, ["case"], cache_dir=cache, progress=False)["case"].metrics
    assert changed == evaluate(pred_root, gt_root, ["case"], cache_dir=None, progress=False)["case"].metrics
    assert changed != first
    assert len(list((cache / "results").rglob("*.json"))) == 4
    assert json.loads(kept.read_text())["state"]  # the corrupt entry was rewritten


@pytest.mark.slow
def test_comparison_bad_input(tmp_path: Path, reference_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """Same folder name twice: exit 2 naming both; different image sets: each on what it has, missing listed."""
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": STEMS[:3]})
    twin = tmp_path / "other" / pred_root.name
    shutil.copytree(pred_root, twin)
    proc = run_eval(capsys, gt_root, str(pred_root), str(twin), "--datasets", "case", "--no_cache")
    assert proc.returncode == 2
    assert_user_error(proc, str(pred_root), str(twin), "NAME=DIR")

    (twin / "case" / "case_001.png").unlink()
    proc = run_eval(capsys, gt_root, str(pred_root), f"Twin={twin}", "--datasets", "case", "--no_cache",
                    "--save_json", str(tmp_path / "m.json"))
    assert proc.returncode == 0, proc.stderr
    assert "Twin, case: 1 of 3 predictions missing" in proc.stderr and "case_001.png" in proc.stderr
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["results"]["case"]["n"] == 3 and got["Twin"]["case"]["n"] == 2
    assert "| Twin (2/3 images) |" in proc.stdout
