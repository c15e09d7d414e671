"""ONNX export, the OpenVINO / onnxruntime runners and their cache, cutouts, overlays and TTA.

One real export (the fixtures' seed-0 release checkpoint at 256, the size of infer_case; conftest's
release_export, made once per session) is shared by the module; the cache's bookkeeping is tested with
a stand-in exporter that writes bytes.
"""
from __future__ import annotations

import filecmp
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from pipelines import inference
from pipelines.cli import load_script
from utils import cutout, export_cache, onnx_export, runtimes

SIZE = 256  # infer_case's size: the one export serves the runner tests and the map comparison


def read_png(path: Path) -> np.ndarray:
    """A PNG as an array."""
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def exported(release_export) -> Path:
    """The session's real ONNX export of the release checkpoint at SIZE (conftest's release_export)."""
    return release_export(SIZE)


@pytest.fixture(scope="module")
def ort_runner(exported: Path) -> runtimes.OnnxRuntimeRunner:
    """An onnxruntime session of `exported`, made once for the module's tests that only run it."""
    return runtimes.OnnxRuntimeRunner(exported, SIZE)


@pytest.fixture(scope="module")
def ov_runner(exported: Path, onnx_cache: Path) -> runtimes.OpenVINORunner:
    """`exported` compiled by OpenVINO in f32 (test.py's compile cache), once for the module's tests that run it."""
    return runtimes.OpenVINORunner(exported, SIZE, "f32", onnx_cache / "openvino")


def test_export_on_a_torch_that_cannot_is_refused_before_tracing(release_checkpoint: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert onnx_export.export_supported("2.6.0") and onnx_export.export_supported("2.14.1+cu130")
    assert not onnx_export.export_supported("2.5.1+cu124") and not onnx_export.export_supported("2.4.1")
    monkeypatch.setattr(onnx_export, "export_supported", lambda: False)
    spec = export_cache.ExportSpec(release_checkpoint, SIZE)
    with pytest.raises(export_cache.RuntimeUnavailable, match=r"needs torch >= 2\.6 \(this is .*use --runtime torch"):
        export_cache.export_checkpoint(spec, release_checkpoint.read_bytes(), tmp_path / "never.onnx")
    assert not (tmp_path / "never.onnx").exists()


@pytest.mark.slow
def test_export_matches_torch_under_onnxruntime_and_openvino(exported: Path, release_model: torch.nn.Module,
                                                             onnx_cache: Path, ort_runner: runtimes.OnnxRuntimeRunner,
                                                             ov_runner: runtimes.OpenVINORunner) -> None:
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = release_model.predict(x)
    for runner in (ort_runner, ov_runner):
        got = runner.predict(x)
        assert got.shape == expected.shape == (2, 1, SIZE, SIZE) and got.dtype == torch.float32
        assert (got - expected).abs().max().item() < 1e-3, runner.name
    # bf16 really runs in bf16 (a different answer) and stays close.
    bf16 = runtimes.OpenVINORunner(exported, SIZE, "bf16", onnx_cache / "openvino").predict(x[:1])
    assert 0 < (bf16 - expected[:1]).abs().max().item() < 0.5


@pytest.mark.slow
def test_runner_refuses_an_export_for_another_size(exported: Path) -> None:
    with pytest.raises(runtimes.RuntimeUnavailable, match="export it again"):
        runtimes.OpenVINORunner(exported, SIZE // 2)
    with pytest.raises(runtimes.RuntimeUnavailable, match="export it again"):
        runtimes.OnnxRuntimeRunner(exported, SIZE * 2)


@pytest.mark.slow
@pytest.mark.usefixtures("reuse_release_model")
def test_openvino_maps_equal_torch_maps_on_infer_case(reference_dir: Path, release_checkpoint: Path, exported: Path,
                                                      onnx_cache: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    from tests.test_inference import run_test_py

    images = reference_dir / "infer_case" / "im"
    common = ("--pth_path", release_checkpoint, "--input", images, "--testsize", str(SIZE), "--device", "cpu")
    torch_run = run_test_py(capsys, *common, "--save_root", tmp_path / "torch", "--runtime", "torch")
    ov_run = run_test_py(capsys, *common, "--save_root", tmp_path / "openvino", "--runtime", "openvino",
                         "--cache_dir", onnx_cache)
    assert torch_run.returncode == 0, torch_run.stderr
    assert ov_run.returncode == 0, ov_run.stderr
    assert "exporting" not in ov_run.stderr  # the module's export was found in the cache
    expected = sorted((reference_dir / "infer_case" / "expected_256").glob("*.png"))
    for ref in expected:
        ours = read_png(tmp_path / "openvino" / ref.name).astype(int)
        assert np.abs(ours - read_png(tmp_path / "torch" / ref.name)).max() <= 1, ref.name
        release = np.abs(ours - read_png(ref))
        assert release.mean() <= 0.5 and release.max() <= 4, ref.name


@pytest.mark.slow
def test_cache_entry_is_reused_and_verified(exported: Path, release_checkpoint: Path, onnx_cache: Path,
                                            tmp_path: Path) -> None:
    spec = export_cache.ExportSpec(release_checkpoint, SIZE)
    root = tmp_path / "cache"
    shutil.copytree(onnx_cache / "onnx", root / "onnx")

    def must_not_export(spec: export_cache.ExportSpec, weights: bytes, path: Path) -> float:
        raise AssertionError("a sound cache entry was exported again")

    cache = export_cache.ExportCache(root, exporter=must_not_export)
    assert cache.get(spec) == root / "onnx" / exported.name
    record = json.loads(exported.with_suffix(".json").read_text())
    assert record["testsize"] == SIZE and record["freq_encoder"] == "resnet50"
    assert record["onnx_sha256"] == export_cache.file_sha256(exported)


def fake_exporter(calls: list[Path]):
    """An exporter that writes a small stand-in file and records where it was asked to write."""
    def export(spec: export_cache.ExportSpec, path: Path) -> float:
        # Written under a temporary name and renamed when complete: a concurrent reader never sees it half-written.
        assert path.suffix == ".tmp"
        calls.append(path)
        path.write_bytes(f"{spec.testsize} {spec.freq_encoder}".encode() * 100)
        return 0.0
    return export


@pytest.fixture
def small_ckpt(tmp_path: Path) -> Path:
    """A stand-in checkpoint file (the cache hashes it; the fake exporter never reads it)."""
    path = tmp_path / "weights.pth"
    path.write_bytes(b"weights v1")
    return path








@pytest.mark.slow
def test_corrupt_entry_compiled_beside_its_check_is_exported_again(exported: Path, release_checkpoint: Path,
                                                                    onnx_cache: Path, tmp_path: Path,
                                                                    ort_runner: runtimes.OnnxRuntimeRunner,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    shutil.copytree(onnx_cache / "onnx", root / "onnx")
    entry = root / "onnx" / exported.name
    with open(entry, "r+b") as f:  # a weight, same size: the file still loads, only its checksum tells
        f.seek(-1000, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-1000, os.SEEK_END)
        f.write(bytes([byte ^ 0x40]))
    exports: list[Path] = []

    def re_export(spec: export_cache.ExportSpec, weights: bytes, path: Path) -> float:
        exports.append(path)
        shutil.copyfile(exported, path)
        return 0.0

    monkeypatch.setattr(runtimes, "ExportCache", lambda root: export_cache.ExportCache(root, exporter=re_export))
    runner = runtimes.load_runner("onnxruntime", export_cache.ExportSpec(release_checkpoint, SIZE), None, root)
    assert len(exports) == 1 and filecmp.cmp(entry, exported, shallow=False)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    sound = ort_runner.predict(x)
    assert torch.equal(runner.predict(x), sound)


@pytest.mark.slow
def test_runtime_fault_after_compiling_is_one_line_and_exit_1(exported: Path, ov_runner: runtimes.OpenVINORunner,
                                                              ort_runner: runtimes.OnnxRuntimeRunner) -> None:
    from utils.errors import EXIT_FAILED

    wrong = torch.zeros(1, 3, SIZE // 2, SIZE // 2)  # not the compiled size: the runtime fails while running
    for runner in (ov_runner, ort_runner):
        with pytest.raises(runtimes.RuntimeFault) as fault:
            runner.predict(wrong)
        message = str(fault.value)
        assert fault.value.exit_code == EXIT_FAILED and "\n" not in message
        assert message.startswith(f"{runner.name} failed while running {exported}") and "--runtime torch" in message




def test_explicit_runtime_refusals_and_auto_fallback(release_checkpoint: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spec = export_cache.ExportSpec(release_checkpoint, 64)
    with pytest.raises(runtimes.RuntimeUnavailable, match="--amp bf16 with --runtime onnxruntime"):
        runtimes.load_runner("onnxruntime", spec, "bf16", tmp_path)
    monkeypatch.setattr(runtimes.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(runtimes.RuntimeUnavailable, match="openvino package is not installed"):
        runtimes.load_runner("openvino", spec, None, tmp_path)
    assert runtimes.choose_runtime("auto", torch.device("cpu")) == "openvino"
    assert runtimes.choose_runtime("auto", torch.device("cuda")) == "torch"


@pytest.mark.usefixtures("reuse_release_model")
def test_test_py_auto_falls_back_and_explicit_exits_2(release_checkpoint: Path, tmp_path: Path, one_photo: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture,
                                                      caplog: pytest.LogCaptureFixture) -> None:

    script = load_script("test.py")

    def unavailable(*args, **kwargs):
        raise runtimes.RuntimeUnavailable("--runtime openvino: the openvino package is not installed")

    monkeypatch.setattr(inference, "load_runner", unavailable)
    base = ["--pth_path", str(release_checkpoint), "--input", str(one_photo), "--testsize", "64", "--device", "cpu"]
    assert script.main([*base, "--save_root", str(tmp_path / "a"), "--runtime", "openvino"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --runtime openvino") and "not installed" in err[0]
    with caplog.at_level(logging.WARNING):
        assert script.main([*base, "--save_root", str(tmp_path / "b")]) == 0
    assert "falling back to --runtime torch" in caplog.text
    assert (tmp_path / "b" / "x.png").is_file()


def test_rgba_and_overlay_outputs(release_model: torch.nn.Module, tmp_path: Path) -> None:
    from tests.test_inference import scene

    photos = tmp_path / "photos"
    photos.mkdir()
    rgb = scene(72, 56)
    Image.fromarray(rgb).save(photos / "a.png")
    alpha = np.full(rgb.shape[:2], 9, np.uint8)  # input alpha is dropped, as the release's convert('RGB')
    Image.fromarray(np.dstack([scene(40, 90, seed=1), alpha[:1].repeat(90, 0)[:, :40]])).save(photos / "b.png")
    outputs = {}
    for mode in cutout.SAVE_MODES:
        options = inference.InferenceOptions(testsize=64, batch_size=2, save_mode=mode)
        summary = inference.predict_jobs(release_model, [inference.folder_job(photos, tmp_path / mode)], options)
        assert summary.written == 2 and not summary.failed
        outputs[mode] = {name: read_png(tmp_path / mode / name) for name in ("a.png", "b.png")}
    for name, (width, height) in {"a.png": (72, 56), "b.png": (40, 90)}.items():
        prediction, rgba, tinted = (outputs[m][name] for m in ("map", "rgba", "overlay"))
        source = read_png(photos / name)[..., :3]
        assert prediction.shape == (height, width)
        assert rgba.shape == (height, width, 4) and np.array_equal(rgba[..., 3], prediction)
        # The foreground colours are estimated where the map is fractional; opaque pixels are the photo's.
        opaque = prediction == 255
        assert np.array_equal(rgba[..., :3][opaque], source[opaque])
        assert not np.array_equal(rgba[..., :3][~opaque], source[~opaque])
        for mode in ("green", "blur", "white"):
            assert outputs[mode][name].shape == (height, width, 3)
            assert np.array_equal(outputs[mode][name][opaque], source[opaque])
        assert tinted.shape == (height, width, 3)
        # Where the map is 0 the overlay is the image; where it is 255 it is tinted.
        assert np.array_equal(tinted[prediction == 0], source[prediction == 0])
        assert not np.array_equal(tinted[prediction == 255], source[prediction == 255])


def test_cutout_refuses_a_map_of_another_size() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        cutout.rgba_cutout(np.zeros((4, 5, 3), np.uint8), np.zeros((5, 4), np.uint8))


def test_hflip_tta_averages_the_image_and_its_mirror(release_model: torch.nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    tta = runtimes.HFlipTTA(release_model).eval()
    with torch.inference_mode():
        plain, mirrored = release_model.predict(x), release_model.predict(x.flip(-1)).flip(-1)
        got = tta.predict(x)
        assert torch.allclose(got, (plain + mirrored) / 2, atol=1e-6)
        assert not torch.allclose(got, plain, atol=1e-4)
        # The average is the same for the mirror image, mirrored back.
        assert torch.allclose(tta.predict(x.flip(-1)).flip(-1), got, atol=1e-5)


@pytest.mark.slow
def test_export_script_checks_with_onnxruntime(exported: Path, release_checkpoint: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("fsanet_export_script", ROOT / "export.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # The real export is the module's (export_onnx, tested above); here the script's check and exit codes.
    real_export = onnx_export.export_onnx

    def copy_export(model, path, testsize, *args, **kwargs) -> float:
        onnx_export.prepare_for_export(model)
        shutil.copyfile(exported, path)
        return 0.0

    monkeypatch.setattr(onnx_export, "export_onnx", copy_export)
    out = tmp_path / "fsanet.onnx"
    base = ["--pth_path", str(release_checkpoint), "--testsize", str(SIZE), "--output", str(out)]
    # One real check (model load, onnxruntime session, PyTorch forward); --tolerance 1e-12 makes it fail.
    assert script.main([*base, "--tolerance", "1e-12"]) == 1
    captured = capsys.readouterr()
    diff = float(captured.out.split("max |logit difference| ")[1])
    assert 0 < diff < 1e-3 and out.is_file()
    assert "onnxruntime differs from PyTorch" in captured.err
    assert script.main([*base[:-1], str(tmp_path / "model.bin")]) == 2
    assert script.main([*base[:2], "--testsize", "100", "--output", str(out)]) == 2
    assert real_export is not copy_export


@pytest.mark.slow
def test_video_runs_under_every_runtime(exported: Path, release_checkpoint: Path, onnx_cache: Path,
                                        release_model: torch.nn.Module, tmp_path: Path) -> None:
    """A video goes through the same runtime abstraction as images: OpenVINO and onnxruntime give torch's maps."""
    from pipelines import video
    from tests.test_video import read_clip, write_clip

    source = tmp_path / "clip.avi"
    write_clip(source, 3)
    options = inference.InferenceOptions(testsize=SIZE, save_mode="map")
    decoded = {}
    for runtime in ("torch", "openvino", "onnxruntime"):
        model = release_model if runtime == "torch" else inference.load_predictor(
            release_checkpoint, "resnet50", options, runtime, onnx_cache)
        job = video.video_job(source, tmp_path / runtime, "map")
        assert video.predict_video(model, job, options).written == 3
        decoded[runtime], fps = read_clip(job.target)
        assert len(decoded[runtime]) == 3 and fps == 12.0
    for runtime in ("openvino", "onnxruntime"):
        for ours, theirs in zip(decoded[runtime], decoded["torch"]):
            assert np.abs(ours.astype(int) - theirs).mean() < 2, runtime
