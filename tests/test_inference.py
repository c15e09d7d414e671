"""test.py end to end: the release's maps on infer_case, folder mode on real-world files, DIS5K layouts,
resuming, and the one-line errors. Runs the real FSANet on CPU at small test sizes."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script_main
from PIL import Image, ImageOps

from pipelines import inference
from pipelines.cli import load_script

SMALL = "64"  # test size for everything except the release comparison, which is pinned at 256


def run_test_py(capsys: pytest.CaptureFixture, *args: str | os.PathLike) -> subprocess.CompletedProcess:
    """test.py's main() in this process, logging to stderr as its own process does (saves the interpreter
    start-up; the PyTorch runtime unless `--runtime` is given): its exit status, stdout and stderr."""
    # `auto` would export every test's fresh checkpoint to ONNX first; tests/test_runtimes.py covers that.
    runtime = () if "--runtime" in map(str, args) else ("--runtime", "torch")
    return run_script_main(capsys, load_script("test.py").main, [*map(str, args), *runtime])


def read_map(path: Path) -> np.ndarray:
    """A saved map as a uint8 array, checking it is an 8-bit single-channel PNG."""
    with Image.open(path) as im:
        assert (im.format, im.mode) == ("PNG", "L"), path
        return np.asarray(im)


def scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB test picture: a smooth background with a bright disc, so maps are not flat."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((xx - width * 0.55) ** 2 + (yy - height * 0.45) ** 2) < (0.3 * min(width, height)) ** 2
    base = np.stack([xx / width, yy / height, 0.5 * np.ones_like(xx)], axis=-1) * 120
    noise = rng.integers(0, 20, size=(height, width, 3))
    return np.clip(base + 110 * disc[..., None] + noise, 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_infer_case_matches_release_maps(reference_dir: Path, release_checkpoint: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    case = reference_dir / "infer_case"
    # Batch 2 puts the landscape and the portrait image in one forward: each map is upsampled to its own size.
    result = run_test_py(capsys, "--pth_path", release_checkpoint, "--input", case / "im", "--save_root", tmp_path,
                         "--testsize", "256", "--batch_size", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    expected = sorted((case / "expected_256").glob("*.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in expected]
    for ref in expected:
        ours, theirs = read_map(tmp_path / ref.name).astype(int), read_map(ref).astype(int)
        assert ours.shape == theirs.shape
        diff = np.abs(ours - theirs)
        assert diff.mean() <= 0.5 and diff.max() <= 4, (ref.name, diff.mean(), diff.max())


def write_real_world_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Every kind of input a user may have; returns the readable ones' (width, height) by file name."""
    folder.mkdir()
    rgb = scene(72, 56)
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=92)
    Image.fromarray(scene(40, 90, seed=1)).save(folder / "UPPER.JPEG", quality=92)
    Image.fromarray(rgb).save(folder / "rgb.png")
    # Alpha is dropped, not composited (the release's convert('RGB')): same map as rgb.png.
    alpha = np.random.default_rng(2).integers(0, 256, size=rgb.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(folder / "rgba.png")
    gray = rgb[..., 1]
    Image.fromarray(gray, mode="L").save(folder / "gray.png")
    # 16 bits holding gray * 257: scaled back to 8 bits it is gray.png again.
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "deep16.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png")
    Image.fromarray(scene(33, 47, seed=3)).save(folder / "bitmap.bmp")
    Image.fromarray(scene(50, 30, seed=4)).save(folder / "scan.TIF")
    Image.fromarray(scene(64, 48, seed=5)).save(folder / "web.webp", lossless=True)
    Image.fromarray(scene(400, 300, seed=6)).resize((4000, 3000)).save(folder / "large.jpg", quality=80)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    png = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "notes.txt").write_text("not an image")
    unreadable = {"broken.jpg", "truncated.png", "notes.txt"}
    sizes = {}
    for p in folder.iterdir():
        if p.name not in unreadable:
            with Image.open(p) as im:
                sizes[p.name] = im.size
    return sizes


@pytest.mark.slow
@pytest.mark.usefixtures("reuse_release_model")
def test_input_folder_of_every_kind(release_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sizes = write_real_world_images(tmp_path / "photos")
    out = tmp_path / "maps"
    result = run_test_py(capsys, "--pth_path", release_checkpoint, "--input", tmp_path / "photos", "--save_root", out,
                         "--testsize", SMALL, "--batch_size", "3", "--num_workers", "2")
    assert result.returncode == 1, result.stderr
    for bad in ("broken.jpg", "truncated.png"):
        assert bad in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing else in the folder: no map for the bad files, no temporary file left behind.
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{Path(n).stem}.png" for n in sizes)
    maps = {}
    for name, (width, height) in sizes.items():
        maps[name] = read_map(out / f"{Path(name).stem}.png")
        assert maps[name].shape == (height, width), name
        # Per-image min-max normalisation spans the full range.
        assert maps[name].min() == 0 and maps[name].max() == 255, name
    assert np.abs(maps["rgba.png"].astype(int) - maps["rgb.png"]).max() <= 1
    assert np.abs(maps["deep16.png"].astype(int) - maps["gray.png"]).max() <= 1
    assert f"{len(sizes)} maps written" in result.stdout and "2 failed" in result.stdout


@pytest.mark.slow
@pytest.mark.usefixtures("reuse_release_model")
def test_dis5k_layouts_are_discovered(release_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "DIS5K"
    (root / "DIS-VD" / "im").mkdir(parents=True)
    (root / "DIS-VD" / "gt").mkdir()
    (root / "DIS-TE1" / "Imgs").mkdir(parents=True)
    Image.fromarray(scene(70, 50)).save(root / "DIS-VD" / "im" / "a.jpg")
    Image.fromarray(scene(45, 60, seed=1)).save(root / "DIS-VD" / "im" / "b.jpg")
    Image.fromarray(scene(50, 40, seed=2)).save(root / "DIS-TE1" / "Imgs" / "c.png")
    out = tmp_path / "results"
    result = run_test_py(capsys, "--pth_path", release_checkpoint, "--data_root", root, "--datasets", "DIS-VD",
                         "DIS-TE1", "--save_root", out, "--testsize", SMALL)
    assert result.returncode == 0, result.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "DIS-TE1", "DIS-TE1/c.png", "DIS-VD", "DIS-VD/a.png", "DIS-VD/b.png"]
    assert read_map(out / "DIS-VD" / "b.png").shape == (60, 45)
    assert read_map(out / "DIS-TE1" / "c.png").shape == (40, 50)


@pytest.mark.slow
@pytest.mark.usefixtures("reuse_release_model")
def test_skip_existing_leaves_existing_maps_alone(release_checkpoint: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    photos, out = tmp_path / "photos", tmp_path / "maps"
    photos.mkdir()
    out.mkdir()
    for i, name in enumerate(("done.jpg", "todo.jpg")):
        Image.fromarray(scene(48, 40, seed=i)).save(photos / name)
    done = out / "done.png"
    Image.fromarray(np.full((40, 48), 7, np.uint8)).save(done)
    os.utime(done, ns=(1_000_000_000, 1_000_000_000))
    before = done.read_bytes()
    result = run_test_py(capsys, "--pth_path", release_checkpoint, "--input", photos, "--save_root", out,
                         "--testsize", SMALL, "--skip_existing")
    assert result.returncode == 0, result.stderr
    assert done.read_bytes() == before and done.stat().st_mtime_ns == 1_000_000_000
    assert read_map(out / "todo.png").shape == (40, 48)
    assert "1 skipped" in result.stdout


def assert_one_error_line(returncode: int, stderr: str, *needles: str) -> None:
    """Exit 2 with a single `error: ...` line on stderr naming what is wrong."""
    assert returncode == 2, (returncode, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def run_main(capsys: pytest.CaptureFixture, *args: str | os.PathLike) -> tuple[int, str]:
    """test.py's main() in this process (saves the interpreter start-up): exit status and stderr."""
    code = load_script("test.py").main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_missing_checkpoint_is_one_error_line(one_photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope" / "FSANet-100.pth"
    result = run_test_py(capsys, "--pth_path", missing, "--input", one_photo, "--save_root", tmp_path / "out")
    assert_one_error_line(result.returncode, result.stderr, str(missing))


@pytest.mark.parametrize("kind", ["empty", "missing", "no_image_dir", "same_stem", "save_root_is_input"])
def test_bad_input_folder_is_one_error_line(kind: str, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    folder, out = tmp_path / "photos", tmp_path / "out"
    args: tuple = ("--input", folder)
    needles = [str(folder)]
    if kind == "empty":
        folder.mkdir()
        (folder / "readme.txt").write_text("no images here")
    elif kind == "no_image_dir":
        (folder / "DIS-VD" / "masks").mkdir(parents=True)
        args = ("--data_root", folder, "--datasets", "DIS-VD")
    elif kind == "same_stem":
        folder.mkdir()
        Image.fromarray(scene(20, 20)).save(folder / "a.jpg")
        Image.fromarray(scene(20, 20)).save(folder / "a.png")
        needles += ["a.jpg", "a.png"]
    elif kind == "save_root_is_input":
        folder.mkdir()
        Image.fromarray(scene(20, 20)).save(folder / "a.png")
        out = folder
    # Folders are checked before the checkpoint is read, so this one need not exist.
    code, err = run_main(capsys, "--pth_path", tmp_path / "unused.pth", *args, "--save_root", out)
    assert_one_error_line(code, err, *needles)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def release_state_dict(official_weights) -> dict[str, torch.Tensor]:
    """The fixtures' seed-0 weights under the release's key names."""
    return official_weights.official_state_dict(seed=0, radius=60.0)


@pytest.mark.slow  # test.py's main loads the release checkpoint
@pytest.mark.parametrize("change", ["key_removed", "shape_changed"])
def test_wrong_architecture_checkpoint_is_one_error_line(change: str, release_state_dict, one_photo: Path,
                                                         capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    state = dict(release_state_dict)
    if change == "key_removed":
        del state["conv_up1.weight"]
    else:
        state["conv2_1.weight"] = torch.zeros(2, 64, 3, 3)
    ckpt = tmp_path / "wrong.pth"
    torch.save(state, ckpt)
    code, err = run_main(capsys, "--pth_path", ckpt, "--input", one_photo, "--save_root", tmp_path / "out")
    assert_one_error_line(code, err, str(ckpt), "conv_up1" if change == "key_removed" else "conv2_1")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # test.py's main loads the release checkpoint
def test_checkpoint_of_other_frequency_encoder_is_one_error_line(release_checkpoint: Path, one_photo: Path,
                                                                 capsys: pytest.CaptureFixture,
                                                                 tmp_path: Path) -> None:
    code, err = run_main(capsys, "--pth_path", release_checkpoint, "--freq_encoder", "res2net50", "--input", one_photo,
                         "--save_root", tmp_path / "out")
    assert_one_error_line(code, err, str(release_checkpoint))


def test_bad_options_are_one_error_line(capsys: pytest.CaptureFixture, one_photo: Path, tmp_path: Path) -> None:
    base = ("--pth_path", tmp_path / "unused.pth", "--input", one_photo, "--save_root", tmp_path / "out")
    code, err = run_main(capsys, *base, "--testsize", "100")
    assert_one_error_line(code, err, "--testsize 100", "multiple of 32")
    code, err = run_main(capsys, *base, "--device", "cpu", "--amp", "fp16")
    assert_one_error_line(code, err, "--amp fp16", "bf16")
    if not torch.cuda.is_available():
        code, err = run_main(capsys, *base, "--device", "cuda")
        assert_one_error_line(code, err, "--device cuda", "CUDA")


def predict_maps(model: torch.nn.Module, folder: Path, out: Path, **options) -> dict[str, np.ndarray]:
    """Maps of every image in `folder` through pipelines.inference, by file name."""
    options = inference.InferenceOptions(testsize=int(SMALL), **options)
    summary = inference.predict_jobs(model, [inference.folder_job(folder, out)], options)
    assert not summary.failed
    return {p.name: read_map(out / p.name) for p in sorted(out.iterdir())}


def test_bf16_maps_stay_close_to_fp32(release_model: torch.nn.Module, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(scene(72, 56)).save(photos / "a.png")
    Image.fromarray(scene(40, 90, seed=1)).save(photos / "b.png")
    fp32 = predict_maps(release_model, photos, tmp_path / "fp32")
    bf16 = predict_maps(release_model, photos, tmp_path / "bf16", amp="bf16", batch_size=2)
    assert fp32.keys() == bf16.keys() == {"a.png", "b.png"}
    for name in fp32:
        diff = np.abs(fp32[name].astype(int) - bf16[name])
        # Measured: mean 0.4-0.5, max 2-3; a zero difference would mean autocast never ran.
        assert 0 < diff.max() <= 16 and diff.mean() < 1.5, (name, diff.mean(), diff.max())


def test_fast_decode_keeps_map_size_and_nearly_the_same_map(release_model: torch.nn.Module,
                                                            tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(scene(300, 200, seed=7)).resize((2400, 1600)).save(photos / "big.jpg", quality=90)
    dataset = inference.ImageListDataset([photos / "big.jpg"], int(SMALL), fast_decode=True)
    assert dataset[0].size == (1600, 2400) and dataset[0].image.shape == (3, 64, 64)
    exact = predict_maps(release_model, photos, tmp_path / "exact")["big.png"]
    fast = predict_maps(release_model, photos, tmp_path / "fast", fast_decode=True)["big.png"]
    assert fast.shape == exact.shape == (1600, 2400)
    diff = np.abs(fast.astype(int) - exact)
    # Measured: mean 0.97 (decoded at 1/8 scale); a zero difference would mean the full decode ran.
    assert 0 < diff.mean() < 2.5, diff.mean()



def test_every_save_mode_follows_exif_orientation(release_model: torch.nn.Module, tmp_path: Path) -> None:
    """Rotated photos (EXIF 3, 6, 8) in --input mode: every output has the displayed orientation, pixels and map
    aligned (issue 26: 6 and 8 stopped the run with a size mismatch, 3 gave an alpha rotated 180 degrees).
    green stands for blur, white and --background: every mode but map reads the photo in utils.cutout.write_output."""
    modes = ("map", "rgba", "overlay", "green")
    photos = tmp_path / "photos"
    photos.mkdir()
    displayed = {}
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = photos / f"o{orientation}.jpg"
        Image.fromarray(scene(72, 48, seed=orientation)).save(path, quality=95, exif=exif)
        with Image.open(path) as im:
            displayed[path.stem] = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    outputs = {}
    for mode in modes:
        # test.py's --input mode: folder_job(..., exif=True).
        job = inference.folder_job(photos, tmp_path / mode, exif=True)
        options = inference.InferenceOptions(testsize=int(SMALL), batch_size=3, save_mode=mode)
        summary = inference.predict_jobs(release_model, [job], options)
        assert summary.written == len(displayed) and not summary.failed, (mode, summary.failed)
        outputs[mode] = {stem: np.asarray(Image.open(tmp_path / mode / f"{stem}.png")) for stem in displayed}
    for stem, rgb in displayed.items():
        prediction = outputs["map"][stem]
        assert prediction.shape == rgb.shape[:2], stem  # 6 and 8: 48 wide, 72 high
        for mode in modes:
            assert outputs[mode][stem].shape[:2] == rgb.shape[:2], (mode, stem)
        rgba = outputs["rgba"][stem]
        assert np.array_equal(rgba[..., 3], prediction), stem
        opaque = prediction == 255
        assert opaque.any() and np.array_equal(rgba[..., :3][opaque], rgb[opaque]), stem
        # The overlay leaves the photo untouched where the map is 0: the displayed photo, not the stored one.
        clear = prediction == 0
        assert clear.any() and np.array_equal(outputs["overlay"][stem][clear], rgb[clear]), stem


@pytest.mark.slow
@pytest.mark.usefixtures("reuse_release_model")
def test_background_flag_and_no_refine_foreground(release_checkpoint: Path, one_photo: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """test.py --background IMAGE (any size: resized to the photo's) with --no_refine_foreground: the photo's own
    RGB over the image, blended by the map in sRGB; rgba by default estimates the foreground colours."""
    backdrop = scene(30, 90, seed=9)
    Image.fromarray(backdrop).save(tmp_path / "bg.png")
    common = ("--pth_path", release_checkpoint, "--input", one_photo, "--testsize", SMALL)
    for extra, out in (((), "map"), (("--background", tmp_path / "bg.png", "--no_refine_foreground"), "bg"),
                       (("--save_mode", "rgba"), "rgba")):
        result = run_test_py(capsys, *common, "--save_root", tmp_path / out, *extra)
        assert result.returncode == 0, result.stderr
    photo = np.asarray(Image.open(one_photo / "x.jpg").convert("RGB")).astype(np.float32)
    prediction = read_map(tmp_path / "map" / "x.png")
    a = prediction.astype(np.float32)[..., None] / 255.0
    resized = np.asarray(Image.open(tmp_path / "bg.png").resize((40, 32), Image.BILINEAR)).astype(np.float32)
    composite = np.asarray(Image.open(tmp_path / "bg" / "x.png")).astype(np.float32)
    assert composite.shape == (32, 40, 3)
    assert np.array_equal(composite[prediction == 255], photo[prediction == 255])
    # Bilinear resizes of OpenCV and PIL differ by a few levels; the blend itself is exact.
    assert np.abs(composite - (photo * a + resized * (1 - a))).mean() < 3
    rgba = np.asarray(Image.open(tmp_path / "rgba" / "x.png"))
    fractional = (prediction > 0) & (prediction < 255)
    assert not np.array_equal(rgba[..., :3][fractional], photo[fractional].astype(np.uint8))
