"""benchmark.py runs its real measurements end to end (tiny sizes; no timing is asserted)."""
from __future__ import annotations

import json

import pytest

import benchmark


@pytest.mark.slow
def test_benchmark_reports_every_row(tmp_path, capsys):
    report = tmp_path / "bench.md"
    # benchmark.py's process is not the subject: its main runs here. The smallest sizes its flags take.
    rc = benchmark.main(["--only", "inference", "train", "--device", "cpu", "--size", "32", "--batch", "2",
                         "--runs", "1", "--trainsize", "32", "--train_batch", "2",
                         "--train_variants", "plain", "accum+checkpointing", "--report", str(report)])
    assert rc == 0, capsys.readouterr().err[-3000:]
    rows = json.loads(report.with_suffix(".json").read_text())
    names = [r["what"] for r in rows]
    assert names[0] == "parameters" and rows[0]["value"] == "109,194,130"
    assert any("release compute" in n for n in names) and any("fast paths" in n for n in names)
    assert any(r["dtype"] == "bf16" for r in rows)
    assert any(n.startswith("training batch at 32") for n in names)
    both = next(r for r in rows if "--grad_checkpointing" in r["what"])
    assert "x 2 accumulated" in both["what"] and both["data"]["images_per_s"] > 0
    fast = next(r for r in rows if r["what"] == "forward 32x32, batch 1, fast paths")
    assert float(fast["note"].split("max logit diff ")[1].split(";")[0]) < 1e-3
    assert "| parameters | 109,194,130 |" in report.read_text()


def test_loading_benchmark_compares_the_release_loader_with_ours():
    from pipelines.benchmarks.loading import benchmark_loading

    result = benchmark_loading(2, size=(400, 300), trainsize=64, repeats=2)
    assert result["n"] == 2
    for key in ("release_samples_per_s", "default_samples_per_s", "fast_samples_per_s", "cached_samples_per_s"):
        assert result[key] > 0
    assert result["speedup"] == pytest.approx(result["fast_samples_per_s"] / result["release_samples_per_s"])
    # --fast_decode is close to the release's tensors, not equal to them.
    assert 0 < result["fast_max_diff_mask"] < 0.1 and 0 < result["fast_max_diff_image"] < 1.0


def test_release_test_baseline_writes_the_release_maps(reference_dir, release_checkpoint, tmp_path):
    """The end-to-end benchmark's baseline process reproduces the release's test.py on infer_case."""
    import numpy as np
    from PIL import Image

    from pipelines.benchmarks.pipeline import release_test

    case = reference_dir / "infer_case"
    summary = release_test(str(release_checkpoint), str(case / "im"), str(tmp_path / "maps"), 256)
    expected = sorted((case / "expected_256").glob("*.png"))
    assert summary.written == len(expected) and not summary.failed
    for ref in expected:
        with Image.open(ref) as a, Image.open(tmp_path / "maps" / ref.name) as b:
            diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert diff.mean() <= 0.5 and diff.max() <= 4, ref.name
