"""`make demo`, reduced: the whole pipeline runs end to end through the real scripts."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image


@pytest.mark.slow
def test_reduced_demo_runs_end_to_end(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    cmd = [sys.executable, "demo.py", "--data", str(data), "--out", str(out), "--size", "64",
           "--n_train", "4", "--n_test", "2", "--epoch", "2", "--trainsize", "64", "--testsize", "64",
           "--batchsize", "2", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # The demo scales the radius to its size (6.5 at 64) and passes train.py the one its weights hold.
    assert "high-pass band empty" not in done.stderr and "is not used" not in done.stderr
    table = done.stdout.split("untrained → trained:", 1)[1]
    for name in ("DIS-VD", "DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4", "DIS-TE (1-4)"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert row.count("→") == 6
    assert (out / "last.pth").is_file() and (out / "untrained.pth").is_file()
    assert any((out / "tb").iterdir())
    for maps in ("maps_untrained", "maps_trained"):
        assert len(list((out / maps / "DIS-TE4").glob("*.png"))) == 2
    picture = np.asarray(Image.open(out / "predictions.png"))
    assert picture.shape[0] > picture.shape[1] > 200
