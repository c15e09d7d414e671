"""Image and mask I/O shared by training, inference and evaluation.

Decoding follows the authors' release (`Image.open(...).convert('RGB')` for images, `.convert('L')`
for masks: an alpha channel is dropped, not composited; EXIF orientation is not applied) with two
corrections that change nothing for 8-bit files: 16-bit images are scaled to 8 bits (`>> 8`) instead
of being clipped at 255 by PIL, and every failure surfaces as one `ImageReadError` naming the file.

Decompression bombs: every read checks the pixel count in the file's header against a budget before
decoding (`max_pixels()`, default PIL's own error limit, 2 x `Image.MAX_IMAGE_PIXELS`, which the
release ran under and every DIS5K image fits; `set_max_pixels` raises it) and refuses the file with
an `ImageReadError` naming it. PIL's own guard is lifted while this module opens a file so that its
warning and error do not fire twice: `Image.MAX_IMAGE_PIXELS` is set to None for the duration of our
own calls and restored afterwards.

`exif=True` (test.py's --input mode) applies the EXIF orientation, as image viewers show a photo; the
release, and DIS5K mode, read the stored pixels as they are.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.atomic import atomic_path
from utils.errors import FSANetError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

# What PIL raises on corrupt, truncated or foreign files (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# PIL raises DecompressionBombError above twice its MAX_IMAGE_PIXELS (it only warns between 1x and 2x).
DEFAULT_MAX_PIXELS: int = 2 * int(Image.MAX_IMAGE_PIXELS or 89_478_485)
_max_pixels = DEFAULT_MAX_PIXELS
# EXIF orientations 5-8 rotate by 90 or 270 degrees: width and height swap.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112

_bomb_lock = threading.Lock()
_bomb_depth = 0
_bomb_saved: int | None = None


class ImageReadError(FSANetError):
    """An image or mask file that cannot be read; the message names the file and the reason."""


def max_pixels() -> int:
    """The pixel budget: files whose header says more pixels are refused before decoding."""
    return _max_pixels


def set_max_pixels(limit: int | None) -> None:
    """Set the pixel budget of this process (None: the default, PIL's own limit); workers forked later inherit it."""
    global _max_pixels
    if limit is not None and limit < 1:
        raise ValueError(f"the pixel budget must be positive, not {limit}")
    _max_pixels = DEFAULT_MAX_PIXELS if limit is None else int(limit)


def _check_budget(path: Path, size: tuple[int, int]) -> None:
    """ImageReadError when the header's width x height exceeds the pixel budget (nothing decoded yet)."""
    pixels = size[0] * size[1]
    if pixels > _max_pixels:
        raise ImageReadError(f"{path}: header says {size[0]}x{size[1]} = {pixels:,} pixels, over the budget of "
                             f"{_max_pixels:,} (a decompression bomb?); not decoded. If the image is genuine, "
                             "raise the budget with --max_pixels")


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag of an opened image (1 when absent or unreadable)."""
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not stop a read; it is then ignored
        return 1


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Sorted image files directly in `folder` (extensions matched case-insensitively, dotfiles skipped).

    Raises FileNotFoundError when `folder` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found")
    # A link that leads nowhere is listed, so that reading it names it instead of skipping it silently.
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
                  and (p.is_file() or broken_link(p) is not None))


def broken_link(path: str | os.PathLike) -> str | None:
    """What is wrong with `path` when it is a symbolic link that leads to no file (dangling or looping), else None."""
    path = Path(path)
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except FileNotFoundError:
        return f"a broken symbolic link (its target {os.readlink(path)} does not exist)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link that loops (it leads back to itself)"
        raise
    return None


@contextlib.contextmanager
def _bomb_guard_lifted() -> Iterator[None]:
    """Disable PIL's pixel-count limit while at least one read of this module is running."""
    global _bomb_depth, _bomb_saved
    with _bomb_lock:
        if _bomb_depth == 0:
            _bomb_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _bomb_depth += 1
    try:
        yield
    finally:
        with _bomb_lock:
            _bomb_depth -= 1
            if _bomb_depth == 0:
                Image.MAX_IMAGE_PIXELS = _bomb_saved


def _check_link(path: Path, data: bytes | None = None) -> None:
    """ImageReadError naming `path` when it is a symbolic link to no file (unless its bytes are already read)."""
    problem = broken_link(path) if data is None else None
    if problem is not None:
        raise ImageReadError(f"{path}: cannot read it: {problem}")


def _reason(error: Exception) -> str:
    """Short reason for a PIL failure (PIL's unidentified-image message repeats the path)."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image, or a format PIL cannot read"
    return f"{type(error).__name__}: {error}"


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale a 16-bit (or 32-bit integer holding 16-bit data) grayscale image to mode L by >> 8."""
    if im.mode not in _SIXTEEN_BIT_MODES:
        return im
    arr = np.asarray(im).astype(np.int64)
    return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")


def _reduce_factor(size: tuple[int, int], min_side: int | None) -> int:
    """Largest of 8, 4, 2, 1 that keeps both sides >= min_side after a box reduction (PIL draft's rule)."""
    if min_side is None:
        return 1
    scale = min(size[0] // int(min_side), size[1] // int(min_side))
    return next((f for f in (8, 4, 2) if scale >= f), 1)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _plain_gray_png(data: bytes | None, im: Image.Image) -> Image.Image | None:
    """An 8-bit grayscale PNG without transparency (IHDR bit depth 8, colour type 0, no tRNS chunk) decoded by
    OpenCV's libpng, a third faster than PIL with the same pixels; None for anything else or any failure
    (PIL then decodes it and names what is wrong). Its size already passed the pixel budget."""
    if (data is None or im.format != "PNG" or im.mode != "L" or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR"
            or data[24] != 8 or data[25] != 0 or b"tRNS" in data[:data.find(b"IDAT")]):
        return None
    import cv2  # here: most readers of this module never take this path

    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # EXIF orientation ignored
    except cv2.error:
        return None
    if array is None or array.dtype != np.uint8 or array.shape != (im.height, im.width):
        return None
    return Image.fromarray(array)


def _decode(path: str | os.PathLike, mode: str, min_side: int | None, data: bytes | None = None,
            exif: bool = False) -> Image.Image:
    """Open, fully decode and convert `path` (or its bytes `data`) to `mode`; any failure is an ImageReadError.

    The result's `info["source_mode"]` is the file's own mode (e.g. RGB for a color mask).
    """
    path = Path(path)
    if min_side is not None and min_side < 1:
        raise ValueError(f"min_side must be a positive int or None, not {min_side}")
    _check_link(path, data)
    try:
        with _bomb_guard_lifted(), Image.open(path if data is None else io.BytesIO(data)) as im:
            _check_budget(path, im.size)
            source_mode = im.mode
            fast = _plain_gray_png(data, im) if mode == "L" and min_side is None and not exif else None
            if fast is not None:
                fast.info["source_mode"] = source_mode
                return fast
            if min_side is not None and im.format == "JPEG":
                # Reduced-resolution DCT decoding: PIL picks the largest 1/2/4/8 scale that keeps
                # both sides >= min_side, so a later resize to min_side never upsamples.
                im.draft(mode, (int(min_side), int(min_side)))
            im.load()
            out = ImageOps.exif_transpose(im) if exif and _orientation(im) != 1 else im
            out = _to_8bit(out)
            out = out if out.mode == mode else out.convert(mode)
            out.info["source_mode"] = source_mode
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except MemoryError:
        raise ImageReadError(f"{path}: not enough memory to decode it; free memory or skip this file") from None
    except _DECODE_ERRORS as e:
        raise ImageReadError(f"{path}: cannot decode image ({_reason(e)})") from e
    factor = _reduce_factor(out.size, min_side)
    return out.reduce(factor) if factor > 1 else out


def read_rgb(path: str | os.PathLike, min_side: int | None = None, exif: bool = False,
             data: bytes | None = None) -> Image.Image:
    """Read an image as mode RGB; `min_side` allows a cheaper reduced decode keeping both sides >= it.

    With `min_side`, JPEGs use reduced-scale DCT decoding (PIL `draft`) and other formats are
    box-reduced (`Image.reduce`) by the same 1/2/4/8 rule, so the result has both sides >= min_side
    and a resize to min_side never upsamples; pixel values differ slightly from the full decode.
    None (default) is the exact full decode. `exif=True` applies the EXIF orientation (the release does not).
    `data`: the file's bytes when the caller has read them already (`path` then only names it in errors).
    """
    return _decode(path, "RGB", min_side, data, exif=exif)


def read_mask(path: str | os.PathLike, min_side: int | None = None, data: bytes | None = None) -> Image.Image:
    """Read a mask as mode L (16-bit scaled to 8-bit); `min_side` as in read_rgb.

    `data`: the file's bytes when the caller has read them already (`path` then only names it in errors).
    """
    return _decode(path, "L", min_side, data)


# PIL modes with an alpha channel: test.py --save_mode rgba writes the map as the alpha of the photo.
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def read_map(path: str | os.PathLike, data: bytes | None = None) -> Image.Image:
    """Read a prediction map as mode L; for an image with an alpha channel that varies (a cutout of test.py
    --save_mode rgba) the alpha is the map, and `info["alpha_map"]` says so. Otherwise read_mask's gray levels."""
    image = read_mask(path, data=data)
    if image.info["source_mode"] not in ALPHA_MODES:
        return image
    alpha = _decode(path, "RGBA", None, data).getchannel("A")
    low, high = alpha.getextrema()
    if low == high:  # a constant alpha holds no map: the gray levels are the prediction
        return image
    alpha.info.update(source_mode=image.info["source_mode"], alpha_map=True)
    return alpha


def image_size(path: str | os.PathLike, exif: bool = False) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding pixels (refused over the budget).

    `exif=True`: the size as displayed, after the EXIF orientation (read_rgb's size with exif=True).
    """
    path = Path(path)
    _check_link(path)
    try:
        with _bomb_guard_lifted(), Image.open(path) as im:
            _check_budget(path, im.size)
            width, height = im.size
            return (height, width) if exif and _orientation(im) in _SWAPPING_ORIENTATIONS else (width, height)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except _DECODE_ERRORS as e:
        raise ImageReadError(f"{path}: cannot read image header ({_reason(e)})") from e


def is_readable_png(path: str | os.PathLike) -> bool:
    """True when `path` is a complete image file (header and chunk checksums verified, pixels not decoded)."""
    try:
        with _bomb_guard_lifted(), Image.open(path) as im:
            im.verify()
    except (*_DECODE_ERRORS, MemoryError):
        return False
    return True


def write_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an HxW or HxWx3/4 uint8 array as an 8-bit PNG atomically, creating parent folders."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"write_png needs a uint8 array, got {array.dtype} for {path}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"write_png needs HxW, HxWx3 or HxWx4, got shape {array.shape} for {path}")
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
    return path
