"""utils.imageio: formats, mode conversion as the release does it, errors naming the file, atomic writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils import imageio
from utils.imageio import IMAGE_EXTENSIONS, ImageReadError, image_size, list_images, read_mask, read_rgb, write_png

LOSSLESS = {".png", ".bmp", ".tif", ".tiff"}


def _rgb_array(width: int = 24, height: int = 16, seed: int = 0) -> np.ndarray:
    """A smooth-ish RGB test pattern (lossy codecs keep it close)."""
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], -1)
    return np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)


def _jpeg(path: Path, width: int, height: int) -> Path:
    """Write a noisy RGB JPEG of the given size."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def test_list_images_sorted_case_insensitive_files_only(tmp_path: Path) -> None:
    names = ["b.JPG", "a.png", "c.Tiff", "d.webp", "e.jpeg", "f.bmp", "g.tif", "notes.txt", ".hidden.jpg"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.Tiff", "d.webp", "e.jpeg",
                                                       "f.bmp", "g.tif"]
    assert {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"} == set(IMAGE_EXTENSIONS)
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")


@pytest.mark.parametrize("ext", [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".PNG", ".JPG"])
def test_read_rgb_every_format(tmp_path: Path, ext: str) -> None:
    array = _rgb_array()
    path = tmp_path / f"img{ext}"
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(ext.lower(), ext[1:].upper())
    Image.fromarray(array).save(path, format=fmt)
    image = read_rgb(path)
    assert image.mode == "RGB" and image.size == (24, 16)
    diff = np.abs(np.asarray(image).astype(int) - array.astype(int))
    if ext.lower() in LOSSLESS:
        assert diff.max() == 0
    else:
        assert diff.mean() < 8


def test_grayscale_rgba_and_palette_convert_like_the_release(tmp_path: Path) -> None:
    gray = _rgb_array()[:, :, 0]
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "gray.png")), np.repeat(gray[..., None], 3, 2))

    rgba = np.dstack([_rgb_array(), np.zeros((16, 24), np.uint8)])
    rgba[:8, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    # Alpha dropped, not composited: fully transparent pixels keep their colour.
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "rgba.png")), rgba[:, :, :3])

    palette = Image.fromarray(_rgb_array()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(tmp_path / "pal.png")
    expected = np.asarray(palette.convert("RGB"))
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "pal.png")), expected)
    assert read_mask(tmp_path / "pal.png").mode == "L"


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_sixteen_bit_scaled_to_eight_bit(tmp_path: Path, ext: str) -> None:
    values = (np.arange(32 * 16, dtype=np.uint32).reshape(16, 32) * 128).astype(np.uint16)
    path = tmp_path / f"deep{ext}"
    Image.fromarray(values).save(path)
    expected = (values >> 8).astype(np.uint8)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
        # PIL's own conversion clips at 255, which is what the >> 8 scaling avoids.
        assert not np.array_equal(np.asarray(raw.convert("RGB"))[:, :, 0], expected)
    rgb = np.asarray(read_rgb(path))
    assert np.array_equal(rgb[:, :, 0], expected) and np.array_equal(rgb[:, :, 2], expected)
    mask = read_mask(path)
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), expected)


def test_mode_i_is_treated_as_sixteen_bit() -> None:
    image = Image.fromarray(np.array([[0, 256, 65535, 70000]], dtype=np.int32), "I")
    assert np.asarray(imageio._to_8bit(image)).tolist() == [[0, 1, 255, 255]]


def test_corrupt_truncated_and_missing_files_name_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not an image at all")
    full = _jpeg(tmp_path / "full.jpg", 64, 48)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    for reader in (read_rgb, read_mask):
        for path in (corrupt, truncated, tmp_path / "missing.jpg"):
            with pytest.raises(ImageReadError, match=path.name):
                reader(path)
    with pytest.raises(ImageReadError, match="corrupt.png"):
        image_size(corrupt)
    # The header of the truncated file is intact: its size is known without decoding pixels.
    assert image_size(truncated) == (64, 48)


@pytest.mark.parametrize("ext", [".png", ".tif", ".jpg"])
def test_decompression_bomb_guard_lifted_only_for_our_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            ext: str) -> None:
    path = tmp_path / f"big{ext}"
    Image.new("L", (64, 64), 7).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 pixels > 2 * 100: a "bomb" to PIL
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert read_rgb(path).size == (64, 64)
    assert read_mask(path).getextrema() == (7, 7)
    assert image_size(path) == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == 100


@pytest.mark.parametrize("min_side", [50, 100, 150, 301])
def test_reduced_decoding_keeps_min_side(tmp_path: Path, min_side: int) -> None:
    jpg = _jpeg(tmp_path / "big.jpg", 400, 300)
    png = tmp_path / "big.png"
    Image.open(jpg).save(png)
    for path in (jpg, png):
        full = read_rgb(path)
        reduced = read_rgb(path, min_side=min_side)
        assert min(reduced.size) >= min(min_side, 300)
        if min_side <= 150:
            assert reduced.size[0] < 400  # really reduced: 400x300 -> at most half
        mask = read_mask(path, min_side=min_side)
        assert mask.mode == "L" and mask.size == reduced.size
        # Same content at a lower resolution.
        same_size = np.asarray(full.resize(reduced.size, Image.BILINEAR), dtype=float)
        assert np.abs(same_size - np.asarray(reduced, dtype=float)).mean() < 40
    assert read_rgb(jpg).size == (400, 300)


def test_write_png_round_trip_and_parents(tmp_path: Path) -> None:
    gray = _rgb_array()[:, :, 1]
    target = tmp_path / "a" / "b" / "out.png"
    write_png(gray, target)
    write_png(_rgb_array(), tmp_path / "rgb.png")
    assert np.array_equal(np.asarray(Image.open(target)), gray)
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "rgb.png")), _rgb_array())
    with pytest.raises(TypeError, match="uint8"):
        write_png(gray.astype(np.float32), tmp_path / "float.png")
    assert not (tmp_path / "float.png").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]


def test_write_png_is_atomic_when_encoding_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "keep.png"
    write_png(np.full((4, 4), 9, np.uint8), target)
    before = target.read_bytes()

    def failing_save(self: Image.Image, fp: Path, *args: object, **kwargs: object) -> None:
        """Leave a partial file behind, then fail like a full disk."""
        Path(fp).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_png(np.zeros((4, 4), np.uint8), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_image_size_is_width_height(tmp_path: Path) -> None:
    Image.new("RGB", (37, 11)).save(tmp_path / "wide.bmp")
    assert image_size(tmp_path / "wide.bmp") == (37, 11)


def test_plain_gray_pngs_from_bytes_decode_as_pil_does(tmp_path: Path) -> None:
    """eval reads maps from their bytes: 8-bit gray PNGs go through OpenCV (faster), every other kind through PIL,
    and both give PIL's pixels; a cut or damaged gray PNG is still one error naming the file."""
    rng = np.random.default_rng(0)
    cases = {f"gray{i}": (rng.integers(0, 256, size, dtype=np.uint8), {})
             for i, size in enumerate([(1, 1), (7, 13), (64, 33), (300, 201)])}
    gray = cases["gray2"][0]
    cases["with_trns"] = (gray, {"transparency": 7})
    cases["four_bit"] = (gray // 17, {"bits": 4})
    cases["sixteen_bit"] = (gray.astype(np.uint16) * 257, {})
    for name, (array, options) in cases.items():
        path = tmp_path / f"{name}.png"
        Image.fromarray(array).save(path, **options)
        data = path.read_bytes()
        with Image.open(path) as im:
            want = np.asarray(im.convert("L") if im.mode == "L" else read_mask(path))
            fast = imageio._plain_gray_png(data, im)
        assert (fast is not None) == name.startswith("gray"), name
        got = read_mask(path, data=data)
        assert got.info["source_mode"] == Image.open(path).mode and np.array_equal(np.asarray(got), want), name
    cut = tmp_path / "cut.png"
    data = (tmp_path / "gray3.png").read_bytes()
    for broken in (data[: len(data) // 2], data[:-30] + bytes(30)):
        cut.write_bytes(broken)
        with pytest.raises(ImageReadError, match="cut.png"):
            read_mask(cut, data=broken)
