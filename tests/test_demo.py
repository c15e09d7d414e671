"""`make demo`, reduced: the whole pipeline runs end to end through the real scripts."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import demo


@pytest.mark.slow
def test_reduced_demo_runs_end_to_end(tmp_path, capfd):
    data, out = tmp_path / "data", tmp_path / "run"
    # demo.py's own process is not the subject: its main runs here, and runs test.py's, train.py's and eval.py's
    # mains as always (capfd reads their output too). One batch per epoch; 2 epochs (epoch 1 of 1 is lr 0).
    rc = demo.main(["--data", str(data), "--out", str(out), "--size", "64", "--n_train", "2", "--n_test", "2",
                    "--epoch", "2", "--trainsize", "64", "--testsize", "64", "--batchsize", "2", "--device", "cpu"])
    stdout, stderr = capfd.readouterr()
    assert rc == 0, stderr[-3000:]
    # The demo scales the radius to its size (6.5 at 64) and passes train.py the one its weights hold.
    assert "high-pass band empty" not in stderr and "is not used" not in stderr
    table = stdout.split("untrained → trained:", 1)[1]
    for name in ("DIS-VD", "DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4", "DIS-TE (1-4)"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert row.count("→") == 6
    assert (out / "last.pth").is_file() and (out / "untrained.pth").is_file()
    assert any((out / "tb").iterdir())
    for maps in ("maps_untrained", "maps_trained"):
        assert len(list((out / maps / "DIS-TE4").glob("*.png"))) == 2
    picture = np.asarray(Image.open(out / "predictions.png"))
    assert picture.shape[0] > picture.shape[1] > 200
