"""The second hostile sweep (issue 26): flags refused at parse time, export.py's checks before exporting, eval.py's
names and tables, rgba cutouts scored by their alpha, GTs with no boundary, 1 x N masks, broken symbolic links."""
from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from test_eval import make_layout, read_pair
from test_reliability import SMALL, one_error_line, read_only_folder

import benchmark
import eval as eval_script
import export
import gpu_check
import train
from pipelines import eval_reports
from pipelines.cli import load_script
from utils.errors import FSANetError
from utils.imageio import ImageReadError, image_size, list_images, read_map, read_rgb
from utils.metrics import DISMetrics, image_summary
from utils.onnx_export import DEFAULT_OPSET, MIN_OPSET


def refused_at_parse(parse, argv: list[str], capsys, *needles: str) -> str:
    """Parsing `argv` exits 2 with one argparse `error:` line naming every needle."""
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def case_layout(tmp_path: Path, reference_dir: Path, stems: list[str]) -> tuple[Path, Path]:
    """Some eval_case images as dataset `case`: (gt_root, pred_root)."""
    return make_layout(tmp_path, reference_dir, {"case": stems})


def eval_json(gt_root: Path, pred_root: Path, out: Path, *extra: str) -> dict:
    """eval.py in this process on dataset `case` (one worker, no cache); its --save_json."""
    code = eval_script.main(["--gt_root", str(gt_root), "--pred_root", str(pred_root), "--datasets", "case",
                             "--workers", "1", "--no_cache", "--save_json", str(out), *extra])
    assert code == 0
    return json.loads(out.read_text())["case"]


# ---------------------------------------------------------------- flags refused at parse time (exit 2)

@pytest.mark.parametrize("argv, needle", [
    (["--seed", "-1"], "argument --seed: must be at least 0"),
    (["--drop_path_rate", "2"], "argument --drop_path_rate: must be a finite number in [0, 1)"),
    (["--drop_path_rate", "nan"], "argument --drop_path_rate"),
])
def test_train_flags_refused_at_parse_time(argv: list[str], needle: str, capsys) -> None:
    refused_at_parse(train.build_parser().parse_args, argv, capsys, needle)


@pytest.mark.parametrize("argv, needle", [
    (["--size", "100"], "argument --size: must be a multiple of 32"),
    (["--size", "0"], "argument --size: must be at least 32"),
    (["--runs", "0"], "argument --runs: must be at least 1"),
    (["--eval_images", "0"], "argument --eval_images: must be at least 1"),
    (["--data_images", "-1"], "argument --data_images: must be at least 1"),
    (["--batch", "0"], "argument --batch: must be at least 1"),
    (["--eval_workers", "-1"], "argument --eval_workers: must be at least 1"),
])
def test_benchmark_flags_refused_at_parse_time(argv: list[str], needle: str, capsys) -> None:
    refused_at_parse(benchmark.parse_args, argv, capsys, needle)


def test_gpu_check_flags_checked_without_a_gpu(tmp_path: Path, capsys) -> None:
    refused_at_parse(gpu_check.parse_args, ["--budget_s", "-5"], capsys, "argument --budget_s")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert gpu_check.main(["--out", str(blocker)]) == 2
    one_error_line(capsys.readouterr().err, "--out", str(blocker), "not a directory")


# ---------------------------------------------------------------- export.py: checked before exporting

@pytest.mark.parametrize("argv, needle", [
    (["--tolerance", "-1"], "argument --tolerance: must be a finite number above 0"),
    (["--tolerance", "nan"], "argument --tolerance"),
    (["--opset", "5"], f"argument --opset: must be at least {MIN_OPSET}"),
    (["--opset", "99"], "argument --opset: must be at most"),
])
def test_export_flags_refused_at_parse_time(argv: list[str], needle: str, capsys) -> None:
    refused_at_parse(export.parse_args, ["--pth_path", "unused.pth", *argv], capsys, needle)


def test_export_checks_the_output_folder_and_warns_for_opset_20(tmp_path: Path, caplog,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """export.py's check_args, which runs before the checkpoint is read and the half-minute export."""
    locked = read_only_folder(tmp_path / "locked", monkeypatch)
    with pytest.raises(FSANetError, match=rf"--output {locked}: cannot write there \(permission denied\)") as err:
        export.check_args(export.parse_args(["--pth_path", "unused.pth", "--output", str(locked / "m.onnx")]))
    assert err.value.exit_code == 2
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING):
        export.check_args(export.parse_args(["--pth_path", "unused.pth", "--output", str(tmp_path / "m.onnx"),
                                             "--opset", "20"]))
    assert "--opset 20" in caplog.text and "OpenVINO" in caplog.text and not list(tmp_path.glob("m.onnx*"))


@pytest.mark.slow
def test_export_writes_the_opset_it_says(export_script_run) -> None:
    """export.py's main with the default flags (the session's one export at 256, which its export cache holds)."""
    run = export_script_run(256)
    assert run.code == 0, run.err
    assert [i.version for i in onnx.load(str(run.path), load_external_data=False).opset_import if i.domain == ""] == [
        DEFAULT_OPSET]
    assert f"(opset {DEFAULT_OPSET})" in run.out


# ---------------------------------------------------------------- eval.py: names, tables, folders

def test_report_tables_escape_names() -> None:
    rows = {"DIS|VD": {"maxF": 0.5, "MAE": 0.1, "n": 1}}
    tables = {"A&B 100% #1 $x$ a_b {c} ~d ^e \\f": rows, "plain|pipe": rows}
    latex = eval_reports.comparison_latex(tables, ["maxF", "MAE"])
    assert r"A\&B 100\% \#1 \$x\$ a\_b \{c\} \textasciitilde{}d \textasciicircum{}e \textbackslash{}f &" in latex
    body = latex.split("\\midrule\n")[1].splitlines()[:2]
    assert [len(re.split(r"(?<!\\)&", row)) for row in body] == [3, 3]  # name, maxF, MAE: no column added
    markdown = eval_reports.comparison_markdown(tables, ["maxF", "MAE"])
    assert "| plain\\|pipe |" in markdown
    single = eval_reports.markdown_table(rows, ["maxF"])
    assert single.splitlines()[2].startswith("| DIS\\|VD |") and single.splitlines()[2].count(" | ") == 1


def test_eval_names_and_metrics(tmp_path: Path, reference_dir: Path, capsys) -> None:
    gt_root, pred_root = case_layout(tmp_path, reference_dir, ["case_000"])
    base = ["--gt_root", str(gt_root), "--datasets", "case", "--workers", "1", "--no_cache"]
    assert eval_script.main([*base, "--pred_root", str(pred_root), "--metrics", "maxF", "MAE", "maxF"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "| Dataset | maxF | MAE |"
    assert eval_script.main([*base, "--pred_root", str(pred_root), f"={pred_root}"]) == 2
    one_error_line(capsys.readouterr().err, f"--pred_root ={pred_root}", "NAME before '=' is empty")
    a_file = tmp_path / "preds.txt"
    a_file.write_text("")
    assert eval_script.main([*base, "--pred_root", str(a_file)]) == 2
    one_error_line(capsys.readouterr().err, f"--pred_root {a_file}", "is a file, not a folder")
    assert eval_script.main(["--gt_root", str(a_file), "--pred_root", str(pred_root), "--datasets", "case"]) == 2
    one_error_line(capsys.readouterr().err, f"--gt_root {a_file}", "is a file, not a folder")
    script = load_script("test.py")
    assert script.main(["--pth_path", str(tmp_path / "unused.pth"), "--input", str(a_file)]) == 2
    one_error_line(capsys.readouterr().err, f"--input {a_file}", "is a file, not a folder")


# ---------------------------------------------------------------- eval.py: what is scored

def test_rgba_cutout_is_scored_by_its_alpha(tmp_path: Path, reference_dir: Path, caplog) -> None:
    """test.py --save_mode rgba's cutout gives the map's numbers, with a note; a constant alpha keeps the gray
    levels (converted, with the 'not grayscale' note)."""
    stems = ["case_000", "case_001"]
    gt_root, pred_root = case_layout(tmp_path, reference_dir, stems)
    maps = eval_json(gt_root, pred_root, tmp_path / "maps.json")
    for stem in stems:
        pred, _ = read_pair(reference_dir, stem)
        photo = np.random.default_rng(0).integers(0, 256, (*pred.shape, 3), dtype=np.uint8)
        Image.fromarray(np.dstack([photo, pred]), "RGBA").save(pred_root / "case" / f"{stem}.png")
    with caplog.at_level(logging.WARNING):
        cutouts = eval_json(gt_root, pred_root, tmp_path / "cutouts.json")
    assert cutouts == maps
    assert "alpha was scored as the map" in caplog.text and "case_000.png" in caplog.text
    caplog.clear()
    pred, _ = read_pair(reference_dir, "case_000")
    opaque = np.dstack([np.repeat(pred[:, :, None], 3, axis=2), np.full_like(pred, 255)])
    Image.fromarray(opaque, "RGBA").save(pred_root / "case" / "case_000.png")
    assert np.array_equal(np.asarray(read_map(pred_root / "case" / "case_000.png")), pred)
    with caplog.at_level(logging.WARNING):
        eval_json(gt_root, pred_root, tmp_path / "opaque.json")
    assert "not grayscale" in caplog.text and "case_000.png (RGBA)" in caplog.text


def test_gt_without_boundary_and_one_row_masks(tmp_path: Path, reference_dir: Path, caplog) -> None:
    """An all-0 and an all-255 GT: mBA averages the images where it is defined and names the others; no raw
    numpy warning. A 1 x N mask has a finite S-measure."""
    stems = ["case_000", "case_001"]
    gt_root, pred_root = case_layout(tmp_path, reference_dir, stems)
    alone = eval_json(gt_root, pred_root, tmp_path / "alone.json", "--metrics", "mBA", "Sm")
    pred, gt = read_pair(reference_dir, "case_002")
    for name, value in (("empty", 0), ("full", 255)):
        Image.fromarray(np.full_like(gt, value)).save(gt_root / "case" / "gt" / f"{name}.png")
        Image.fromarray(pred).save(pred_root / "case" / f"{name}.png")
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")
        both = eval_json(gt_root, pred_root, tmp_path / "both.json", "--metrics", "mBA", "Sm")
    assert both["mBA"] == pytest.approx(alone["mBA"], abs=1e-12) and both["n"] == 4
    assert "mBA is undefined for 2 image(s)" in caplog.text and "empty, full" in caplog.text
    metrics = DISMetrics()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for row in (np.array([[0, 255, 255, 0, 0, 255, 0, 0]], np.uint8),):
            metrics.step(np.array([[10, 200, 250, 5, 0, 240, 3, 9]], np.uint8), row)
            metrics.step(np.array([[10, 200, 250, 5, 0, 240, 3, 9]], np.uint8).T.copy(), row.T.copy())
    sm = [image_summary({k: v[i:i + 1] for k, v in metrics.state().items()})["Sm"] for i in range(2)]
    assert all(np.isfinite(sm)) and 0 < sm[0] == sm[1] <= 1


# ---------------------------------------------------------------- test.py: broken symbolic links

def test_broken_links_are_listed_and_named(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((48, 40, 3), 90, np.uint8)).save(photos / "good.png")
    (photos / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (photos / "loop.png").symlink_to(photos / "loop.png")
    assert [p.name for p in list_images(photos)] == ["dangling.jpg", "good.png", "loop.png"]
    with pytest.raises(ImageReadError, match=r"dangling.jpg: cannot read it: a broken symbolic link"):
        read_rgb(photos / "dangling.jpg")
    with pytest.raises(ImageReadError, match=r"loop.png: cannot read it: a symbolic link that loops"):
        image_size(photos / "loop.png")


@pytest.mark.slow
@pytest.mark.usefixtures("reuse_release_model")
def test_broken_links_make_test_py_exit_1(release_checkpoint: Path, tmp_path: Path, capsys) -> None:
    photos, out = tmp_path / "photos", tmp_path / "maps"
    photos.mkdir()
    Image.fromarray(np.full((48, 40, 3), 90, np.uint8)).save(photos / "good.png")
    (photos / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (photos / "loop.png").symlink_to(photos / "loop.png")
    code = load_script("test.py").main(["--pth_path", str(release_checkpoint), "--input", str(photos),
                                        "--save_root", str(out), "--testsize", SMALL, "--device", "cpu",
                                        "--runtime", "torch"])
    captured = capsys.readouterr()
    assert code == 1
    assert "1 maps written" in captured.out and "2 failed" in captured.out
    assert "dangling.jpg: cannot read it: a broken symbolic link" in captured.err
    assert "loop.png: cannot read it: a symbolic link that loops" in captured.err
    assert [p.name for p in out.iterdir()] == ["good.png"]
