"""Small sizes: the release's radius empties the frequency image; --radius, the warnings, the demo's radius."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from lib import FSANet
from lib.frequency import kept_fraction, scaled_radius
from pipelines import inference
from pipelines.cli import load_script
from pipelines.demo import demo_radius
from pipelines.demo import parse_args as demo_args
from pipelines.inference import load_model, warn_narrow_band
from pipelines.training import Trainer
from pipelines.training.config import TrainConfig, highpass_warning
from utils.runtimes import RuntimeUnavailable
from utils.synthetic import generate_split

BAND = "leaves the high-pass band empty"


@pytest.fixture(scope="module")
def model() -> FSANet:
    """The released architecture with random weights and the release's radius 100, in eval mode."""
    torch.manual_seed(0)
    return FSANet().eval()


@pytest.fixture(scope="module")
def release_radius_checkpoint(model: FSANet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`model` (the release's radius 100) saved once as a checkpoint for the module's test.py runs (440 MB: removed
    after them)."""
    path = tmp_path_factory.mktemp("radius") / "release_radius.pth"
    torch.save({"model": model.state_dict()}, path)
    yield path
    path.unlink()


def test_kept_share_of_the_spectrum():
    assert kept_fraction(142, 100.0) == 0.0  # the farthest bin, (142 - 1) / sqrt(2) = 99.7, is inside the disc
    assert kept_fraction(143, 100.0) > 0.0
    assert 0.96 < kept_fraction(992, 100.0) < 0.97  # the release's test size: about 3% of the bins removed
    assert scaled_radius(992) == 100.0 and scaled_radius(128) == 12.9


def test_frequency_image_is_zero_at_128_with_radius_100_and_not_with_the_demos(model):
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    defaults = demo_args([])
    radius = demo_radius(defaults)
    assert radius == scaled_radius(defaults.trainsize) == 19.4  # 100 * 192 / 992: the release's share at 192
    assert demo_radius(demo_args(["--trainsize", "128"])) == 12.9
    with torch.no_grad():
        assert torch.count_nonzero(model(x)[4]) == 0
        model.frequency.radius.fill_(radius)
        try:
            freq = model(x)[4]
        finally:
            model.frequency.radius.fill_(100.0)
    assert freq.shape == (1, 1, 128, 128)
    assert (freq > 0).float().mean() > 0.99 and freq.std() > 0.1 * freq.mean()


def test_train_warns_once_and_radius_reaches_the_model(tmp_path, caplog):
    generate_split(tmp_path, "DIS-TR", 2, seed=0, size=(80, 64))
    cfg = TrainConfig(train_path=str(tmp_path / "DIS-TR"), save_root=str(tmp_path / "ck"), trainsize=128,
                      rates=(1.0,), batchsize=2, no_pretrained=True, num_workers=0, device="cpu")
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(cfg)
    trainer.close_writer()
    warned = [r.getMessage() for r in caplog.records if BAND in r.getMessage()]
    assert len(warned) == 1
    assert "radius 100 (--radius)" in warned[0] and "trainsize*1 128 (0.0% of the bins kept)" in warned[0]
    assert "--radius 12.9" in warned[0]
    # The flag sets the parameter the checkpoints save as frequency.radius.
    args = train.build_parser().parse_args(["--radius", "12.9"])
    assert train.config_from_args(args).radius == 12.9
    assert train.build_parser().parse_args([]).radius == 100.0  # the release's


def test_train_warning_covers_every_size_of_the_run():
    release = TrainConfig(val_path="DIS-VD")
    assert highpass_warning(release, 100.0) is None  # 544 / 736 / 928, validation at 992
    small = TrainConfig(trainsize=192, val_path="DIS-VD", val_size=128)
    message = highpass_warning(small, 100.0)
    assert "trainsize*0.75 128" in message and "val_size 128" in message and "trainsize*1 " not in message
    assert "--radius 19.4" in message
    assert highpass_warning(small, scaled_radius(192)) is None
    assert "from --pre_model w.pth" in highpass_warning(TrainConfig(trainsize=128, pre_model="w.pth"), 100.0)


@pytest.mark.slow  # a test.py run
def test_test_py_takes_the_radius_from_the_checkpoint_and_warns(model, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        warn_narrow_band(model.frequency.radius.item(), 992)
        assert not caplog.records
        warn_narrow_band(model.frequency.radius.item(), 128)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "frequency.radius 100" in message and "--testsize 128" in message
    assert "--testsize 192 or more" in message and "--radius 12.9" in message
    state = model.state_dict()
    state["frequency.radius"] = torch.tensor([12.9])
    torch.save({"model": state}, tmp_path / "small.pth")
    del state
    loaded = load_model(tmp_path / "small.pth", "resnet50", torch.device("cpu"))
    assert loaded.frequency.radius.item() == pytest.approx(12.9)
    (tmp_path / "small.pth").unlink()  # 440 MB
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_narrow_band(loaded.frequency.radius.item(), 128)
    assert not caplog.records


@pytest.mark.slow  # a test.py run
@pytest.mark.parametrize("runtime", ["torch", "auto"])
def test_test_py_run_warns_about_a_release_radius_at_128(runtime, release_radius_checkpoint, tmp_path, caplog,
                                                         monkeypatch):
    """Once, whichever runtime runs: torch reads the radius from the loaded model, the exported runtimes from the
    checkpoint file (here `auto` finds no exported runtime and falls back to PyTorch: no ONNX export, no second
    warning; tests/test_runtimes.py runs the real export)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(photos / "a.png")
    script = load_script("test.py")

    def unavailable(*args, **kwargs):
        raise RuntimeUnavailable("--runtime openvino: the openvino package is not installed")
    monkeypatch.setattr(inference, "load_runner", unavailable)
    with caplog.at_level(logging.WARNING):
        code = script.main(["--pth_path", str(release_radius_checkpoint), "--input", str(photos),
                            "--save_root", str(tmp_path / "maps"), "--testsize", "128", "--device", "cpu",
                            "--runtime", runtime])
    assert code == 0 and (tmp_path / "maps" / "a.png").is_file()
    assert sum(BAND in r.getMessage() for r in caplog.records) == 1
    assert ("falling back to --runtime torch" in caplog.text) == (runtime == "auto")

