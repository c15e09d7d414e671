"""benchmark.py runs its real measurements end to end (tiny sizes; no timing is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_reports_every_row(tmp_path):
    report = tmp_path / "bench.md"
    cmd = [sys.executable, "benchmark.py", "--only", "inference", "train", "--device", "cpu", "--size", "64",
           "--batch", "2", "--runs", "1", "--trainsize", "64", "--train_batch", "2", "--report", str(report)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(report.with_suffix(".json").read_text())
    names = [r["what"] for r in rows]
    assert names[0] == "parameters" and rows[0]["value"] == "109,194,130"
    assert any("release compute" in n for n in names) and any("fast paths" in n for n in names)
    assert any(r["dtype"] == "bf16" for r in rows)
    assert any(n.startswith("training batch at 64") for n in names)
    fast = next(r for r in rows if r["what"] == "forward 64x64, batch 1, fast paths")
    assert float(fast["note"].split("max logit diff ")[1].split(";")[0]) < 1e-3
    assert "| parameters | 109,194,130 |" in report.read_text()
