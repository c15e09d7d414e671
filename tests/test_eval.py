"""eval.py and utils/metrics.py + pipelines/evaluation.py against the authors' eval_case fixture."""
from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_script_main
from py_sod_metrics import HumanCorrectionEffortMeasure
from skimage import morphology

import eval as eval_script
from pipelines.evaluation import DatasetResult, evaluate, summary_rows
from utils.dis5k import TE_MEAN_ROW, TE_SUBSETS
from utils.gt_cache import cached_skeleton, skeleton_cache_path
from utils.metrics import ALL_METRICS, DISMetrics, HumanCorrectionEffort, gt_skeleton

STEMS = [f"case_{i:03d}" for i in range(8)]


@pytest.fixture(scope="module")
def expected(reference_dir: Path) -> dict:
    """The eval_case metrics computed with PySODMetrics 1.6.2 and the authors' HCE script."""
    return json.loads((reference_dir / "eval_case" / "expected.json").read_text())


def read_pair(reference_dir: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, GT) of one eval_case image as raw 8-bit arrays."""
    case = reference_dir / "eval_case"
    return (cv2.imread(str(case / "pred" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE),
            cv2.imread(str(case / "gt" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE))


def make_layout(tmp_path: Path, reference_dir: Path, split: dict[str, list[str]]) -> tuple[Path, Path]:
    """Copy eval_case images into the DIS layout: <gt_root>/<name>/gt/ and <pred_root>/<name>/."""
    gt_root, pred_root = tmp_path / "DIS5K", tmp_path / "results"
    for name, stems in split.items():
        (gt_root / name / "gt").mkdir(parents=True)
        (pred_root / name).mkdir(parents=True)
        for stem in stems:
            shutil.copyfile(reference_dir / "eval_case" / "gt" / f"{stem}.png", gt_root / name / "gt" / f"{stem}.png")
            shutil.copyfile(reference_dir / "eval_case" / "pred" / f"{stem}.png", pred_root / name / f"{stem}.png")
    return gt_root, pred_root


def run_eval(capsys: pytest.CaptureFixture, gt_root: Path, pred_root: Path, *args: str) -> subprocess.CompletedProcess:
    """eval.py's main() in this process, logging to stderr as its own process does (saves the interpreter
    start-up): its exit status, stdout and stderr."""
    return run_script_main(capsys, eval_script.main, ["--gt_root", str(gt_root), "--pred_root", str(pred_root), *args])


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Non-zero exit, no traceback, and a final `error:` line containing every needle."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in last, last


def assert_matches_expected(got: dict, expected: dict) -> None:
    """Every metric within 1e-6, HCE and n exactly."""
    assert got["n"] == expected["n"]
    assert got["HCE"] == expected["HCE"]
    for name in ALL_METRICS:
        assert got[name] == pytest.approx(expected[name], abs=1e-6), name


# ---------------------------------------------------------------- metric classes

def test_hce_is_the_authors_definition(reference_dir: Path, expected: dict) -> None:
    """Our HCE averages to the authors' 483.25; PySODMetrics' default binarisation does not."""
    ours, library = HumanCorrectionEffort(), HumanCorrectionEffortMeasure()
    for stem in STEMS:
        pred, gt = read_pair(reference_dir, stem)
        ours.step(pred, gt)
        library.step(pred, gt)
    assert ours.get_results()["hce"] == expected["HCE"]
    assert library.get_results()["hce"] != expected["HCE"]


def test_hce_counting_equals_library_on_binary_inputs(reference_dir: Path) -> None:
    """The restated relaxation gives the library's count once both see the same binary maps."""
    hce = HumanCorrectionEffort()
    for stem in STEMS:
        pred, gt = read_pair(reference_dir, stem)
        pred_bin, gt_bin = pred > 128, gt > 128
        ours = hce.cal_hce_binary(pred_bin, gt_bin, morphology.skeletonize(gt_bin))
        assert ours == hce.cal_hce(pred_bin.astype(np.float64), gt_bin), stem


def test_gt_skeleton_equals_skimage_on_the_full_image(reference_dir: Path) -> None:
    """The bounding-box shortcut changes nothing, also for objects touching the border and empty GTs."""
    rng = np.random.default_rng(0)
    masks = [read_pair(reference_dir, stem)[1] > 128 for stem in STEMS]
    blobs = cv2.GaussianBlur(rng.random((120, 90)), (0, 0), 4)
    masks += [blobs > np.quantile(blobs, 0.6), np.zeros((20, 30), bool), np.ones((15, 25), bool)]
    inner = np.zeros((60, 70), bool)
    inner[20:41, 30:55] = True
    masks.append(inner)
    for mask in masks:
        np.testing.assert_array_equal(gt_skeleton(mask), morphology.skeletonize(mask))


def test_merged_per_image_states_equal_one_sequential_loop(reference_dir: Path, expected: dict) -> None:
    """Per-image states computed separately and merged in order give the sequential numbers bit for bit."""
    sequential, merged = DISMetrics(), DISMetrics()
    for stem in STEMS:
        pred, gt = read_pair(reference_dir, stem)
        sequential.step(pred, gt)
        one = DISMetrics()
        one.step(pred, gt)
        merged.merge(one.state())
    assert merged.get_results() == sequential.get_results()
    assert_matches_expected(sequential.get_results(), expected)


def test_te_row_needs_all_four_subsets() -> None:
    """DIS-TE (1-4) is the plain mean of the subsets' values and only appears with all four."""
    values = {name: {m: float(i + 1) * (j + 1) for j, m in enumerate(ALL_METRICS)} | {"n": 10 * (i + 1)}
              for i, name in enumerate(TE_SUBSETS)}
    results = {name: DatasetResult(name, row, {}) for name, row in values.items()}
    rows = summary_rows(results)
    assert rows[TE_MEAN_ROW]["MAE"] == pytest.approx(np.mean([values[s]["MAE"] for s in TE_SUBSETS]))
    assert rows[TE_MEAN_ROW]["n"] == 100
    del results["DIS-TE3"]
    assert TE_MEAN_ROW not in summary_rows(results)


def test_skeleton_cache_reads_rewrites_and_survives_errors(tmp_path: Path, reference_dir: Path) -> None:
    """A stored skeleton is served, a corrupt one recomputed, and an unwritable cache only reported."""
    gt_path = reference_dir / "eval_case" / "gt" / "case_001.png"
    gt_bytes = gt_path.read_bytes()
    gt_bin = cv2.imread(str(gt_path), cv2.IMREAD_GRAYSCALE) > 128
    truth = morphology.skeletonize(gt_bin)
    cache = tmp_path / "cache"

    skeleton, error = cached_skeleton(gt_bytes, gt_bin, cache)
    entry = skeleton_cache_path(gt_bytes, cache)
    assert error is None and entry.is_file()
    np.testing.assert_array_equal(skeleton, truth)

    planted = np.zeros_like(gt_bin)
    planted[5, 5] = True
    cv2.imwrite(str(entry), planted.astype(np.uint8) * 255)
    np.testing.assert_array_equal(cached_skeleton(gt_bytes, gt_bin, cache)[0], planted)

    entry.write_bytes(b"not a png")
    np.testing.assert_array_equal(cached_skeleton(gt_bytes, gt_bin, cache)[0], truth)
    np.testing.assert_array_equal(cv2.imread(str(entry), cv2.IMREAD_GRAYSCALE) > 128, truth)

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    skeleton, error = cached_skeleton(gt_bytes, gt_bin, blocker / "cache")
    np.testing.assert_array_equal(skeleton, truth)
    assert error is not None


# ---------------------------------------------------------------- eval.py

@pytest.mark.slow
def test_eval_case_through_the_command_line(tmp_path: Path, reference_dir: Path, expected: dict,
                                            capsys: pytest.CaptureFixture) -> None:
    """Two workers, JSON equal to expected.json; table, CSV, LaTeX, per-image CSV and plots agree with it."""
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": STEMS})
    out = tmp_path / "out"
    proc = run_eval(capsys, gt_root, pred_root, "--datasets", "case", "--workers", "2",
                    "--cache_dir", str(tmp_path / "c"),
                    "--metrics", "maxF", "wF", "MAE", "Sm", "meanEm", "HCE", "adpEm",
                    "--save_json", str(out / "m.json"), "--save_csv", str(out / "m.csv"),
                    "--save_latex", str(out / "m.tex"), "--per_image_csv", str(out / "img.csv"),
                    "--plot_dir", str(out / "plots"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads((out / "m.json").read_text())
    assert list(got) == ["case"] and list(got["case"]) == list(expected)
    assert_matches_expected(got["case"], expected)

    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "| Dataset | maxF | wF | MAE | Sm | meanEm | HCE | adpEm |"
    assert lines[2] == "| case | 0.697 | 0.477 | 0.090 | 0.744 | 0.763 | 483 | 0.801 |"
    assert "case & 0.697 & 0.477 & 0.090 & 0.744 & 0.763 & 483 & 0.801" in (out / "m.tex").read_text()
    with open(out / "m.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert {m: float(row[m]) for m in ALL_METRICS} == {m: got["case"][m] for m in ALL_METRICS}

    with open(out / "img.csv", newline="") as f:
        images = list(csv.DictReader(f))
    assert [im["image"] for im in images] == STEMS
    assert np.mean([float(im["HCE"]) for im in images]) == expected["HCE"]
    assert np.mean([float(im["MAE"]) for im in images]) == pytest.approx(expected["MAE"], abs=1e-12)
    for plot in ("case_pr.png", "case_fmeasure.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_te_row_through_the_command_line(tmp_path: Path, reference_dir: Path, expected: dict,
                                         capsys: pytest.CaptureFixture) -> None:
    """Subsets of 1, 2, 2 and 3 images: the DIS-TE (1-4) row is their mean, not the pooled value."""
    split = dict(zip(TE_SUBSETS, [STEMS[:1], STEMS[1:3], STEMS[3:5], STEMS[5:]]))
    gt_root, pred_root = make_layout(tmp_path, reference_dir, split)
    proc = run_eval(capsys, gt_root, pred_root, "--datasets", *TE_SUBSETS, "--workers", "1", "--no_cache",
                    "--save_json", str(tmp_path / "m.json"), "--plot_dir", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "plots").glob("*.png"))) == 2 * len(TE_SUBSETS)  # no curves for the mean row
    got = json.loads((tmp_path / "m.json").read_text())
    assert list(got) == [*TE_SUBSETS, TE_MEAN_ROW]
    for name in ALL_METRICS:
        assert got[TE_MEAN_ROW][name] == pytest.approx(np.mean([got[s][name] for s in TE_SUBSETS]), abs=1e-12)
    assert got[TE_MEAN_ROW]["n"] == 8
    assert abs(got[TE_MEAN_ROW]["MAE"] - expected["MAE"]) > 1e-4
    assert abs(got[TE_MEAN_ROW]["HCE"] - expected["HCE"]) > 1
    assert proc.stdout.strip().splitlines()[-1].startswith(f"| {TE_MEAN_ROW} | ")


@pytest.mark.slow
def test_missing_predictions_are_listed(tmp_path: Path, reference_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """Missing maps stop the evaluation with one line naming each of them."""
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": STEMS[:4]})
    (pred_root / "case" / "case_001.png").unlink()
    (pred_root / "case" / "case_003.png").unlink()
    proc = run_eval(capsys, gt_root, pred_root, "--datasets", "case", "--no_cache")
    assert_user_error(proc, "2 of 4 predictions missing", "case_001.png", "case_003.png")


@pytest.mark.slow
def test_resized_and_extra_predictions(tmp_path: Path, reference_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A map of another size is resized bilinearly and warned about; a map without GT is only noted."""
    stems = STEMS[:3]
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": stems})
    small_path = pred_root / "case" / "case_001.png"
    small = cv2.resize(cv2.imread(str(small_path), cv2.IMREAD_GRAYSCALE), (200, 150), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(small_path), small)
    shutil.copyfile(small_path, pred_root / "case" / "not_in_gt.png")
    proc = run_eval(capsys, gt_root, pred_root, "--datasets", "case", "--no_cache",
                    "--save_json", str(tmp_path / "m.json"), "--per_image_csv", str(tmp_path / "img.csv"))
    assert proc.returncode == 0, proc.stderr
    assert "1 prediction(s) differ in size" in proc.stderr and "case_001.png (200x150)" in proc.stderr
    assert "ignoring 1 file(s)" in proc.stderr and "not_in_gt.png" in proc.stderr

    reference = DISMetrics()
    for stem in stems:
        pred, gt = read_pair(reference_dir, stem)
        if stem == "case_001":
            pred = cv2.resize(small, (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_LINEAR)
        reference.step(pred, gt)
    got = json.loads((tmp_path / "m.json").read_text())["case"]
    assert_matches_expected(got, reference.get_results())
    with open(tmp_path / "img.csv", newline="") as f:
        assert [im["resized_from"] for im in csv.DictReader(f)] == ["", "200x150", ""]


@pytest.mark.slow
def test_unreadable_files_are_named(tmp_path: Path, reference_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A prediction that is not an image fails the run with a line naming it."""
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": STEMS[:2]})
    bad = pred_root / "case" / "case_000.png"
    bad.write_bytes(b"this is not a png")
    proc = run_eval(capsys, gt_root, pred_root, "--datasets", "case", "--no_cache")
    assert_user_error(proc, "1 unreadable image(s)", str(bad))


@pytest.mark.slow
def test_missing_dataset_folder_is_one_error_line(tmp_path: Path, reference_dir: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """A dataset that is not under --gt_root is reported before anything is evaluated."""
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": STEMS[:1]})
    proc = run_eval(capsys, gt_root, pred_root, "--datasets", "case", "DIS-TE9", "--no_cache")
    assert_user_error(proc, "dataset folder not found", str(gt_root / "DIS-TE9"))


@pytest.mark.slow
def test_changed_gt_gets_a_new_skeleton(tmp_path: Path, reference_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """The cache is keyed by GT content: an edited GT is re-skeletonised, never served the old skeleton."""
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": ["case_001", "case_004"]})
    cache = tmp_path / "cache"
    args = ["--datasets", "case", "--workers", "1", "--cache_dir", str(cache), "--save_json"]
    first = run_eval(capsys, gt_root, pred_root, *args, str(tmp_path / "a.json"))
    assert first.returncode == 0, first.stderr
    assert len(list(cache.glob("*.png"))) == 2

    gt_path = gt_root / "case" / "gt" / "case_001.png"
    gt = cv2.imread(str(gt_path), cv2.IMREAD_GRAYSCALE)
    gt[:, : gt.shape[1] // 2] = 0
    cv2.imwrite(str(gt_path), gt)
    second = run_eval(capsys, gt_root, pred_root, *args, str(tmp_path / "b.json"))
    assert second.returncode == 0, second.stderr
    assert len(list(cache.glob("*.png"))) == 3

    fresh = HumanCorrectionEffort()
    for stem in ("case_001", "case_004"):
        fresh.step(cv2.imread(str(pred_root / "case" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE),
                   cv2.imread(str(gt_root / "case" / "gt" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE))
    before, after = (json.loads((tmp_path / f"{n}.json").read_text())["case"]["HCE"] for n in "ab")
    assert after == fresh.get_results()["hce"] != before


def test_unwritable_cache_does_not_stop_evaluation(tmp_path: Path, reference_dir: Path, expected: dict,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A cache folder that cannot be created gives a warning and the same numbers."""
    gt_root, pred_root = make_layout(tmp_path, reference_dir, {"case": STEMS})
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="pipelines.evaluation"):
        results = evaluate(pred_root, gt_root, ["case"], workers=1, cache_dir=blocker / "cache", progress=False)
    assert "could not write the HCE skeleton cache" in caplog.text
    assert_matches_expected(results["case"].metrics, expected)
