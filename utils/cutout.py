"""What test.py writes from a prediction map: the map, an RGBA cutout, an overlay, or a new background.

Cutouts and new backgrounds use the estimated foreground colours (utils.foreground) unless
`refine_foreground` is off: where the map is fractional the photo's RGB still holds the old background.
Compositing is done in sRGB, on the code values the photo stores (`a F + (1 - a) B` with a = map / 255),
the space the foreground estimate is made in and the one image editors blend layers in by default.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.foreground import estimate_foreground
from utils.imageio import ImageReadError, read_rgb, write_png

SAVE_MODES = ("map", "rgba", "overlay", "green", "blur", "white")
IMAGE_BACKGROUND = "background"  # the mode of `--background IMAGE`: not a --save_mode choice, the flag sets it
BACKGROUND_COLOURS = {"green": (0, 255, 0), "white": (255, 255, 255)}
OVERLAY_COLOUR = (255, 0, 64)  # a saturated red-magenta stands out on most photos
OVERLAY_STRENGTH = 0.6  # at map 255 the pixel is 60% tint, 40% image: the image stays readable
BLUR_SIGMA = 0.02  # --save_mode blur: Gaussian sigma as a share of the photo's longer side (20 px at 1000 px)


@dataclass(frozen=True)
class OutputStyle:
    """How a map becomes the written file: the save mode, foreground refinement, the replacement image."""

    mode: str = "map"
    refine_foreground: bool = True
    background: np.ndarray | None = None  # H x W x 3 uint8 of --background, resized to each photo

    @property
    def needs_image(self) -> bool:
        """Whether the photo's pixels are needed (every mode but the plain map)."""
        return self.mode != "map"


def load_background(path: str | os.PathLike) -> np.ndarray:
    """The --background image as H x W x 3 uint8 RGB in its displayed (EXIF) orientation."""
    try:
        return np.asarray(read_rgb(path, exif=True))
    except ImageReadError as e:
        raise ImageReadError(f"--background {e}; pass a readable image") from None


def rgba_cutout(rgb: np.ndarray, prediction: np.ndarray, refine: bool = False) -> np.ndarray:
    """H x W x 4 uint8: the image's RGB (the estimated foreground where `refine`) with the 8-bit map as alpha."""
    _check_sizes(rgb, prediction)
    return np.dstack([estimate_foreground(rgb, prediction) if refine else rgb, prediction])


def overlay(rgb: np.ndarray, prediction: np.ndarray, colour: tuple[int, int, int] = OVERLAY_COLOUR,
            strength: float = OVERLAY_STRENGTH) -> np.ndarray:
    """H x W x 3 uint8: the image with `colour` blended in proportion to the map."""
    _check_sizes(rgb, prediction)
    weight = prediction.astype(np.float32)[..., None] * (strength / 255.0)
    tinted = rgb.astype(np.float32) * (1.0 - weight) + np.asarray(colour, np.float32) * weight
    return np.clip(np.rint(tinted), 0, 255).astype(np.uint8)


def backdrop(rgb: np.ndarray, style: OutputStyle) -> np.ndarray:
    """The new background of a photo for a replacing mode: a colour, the photo blurred, or the --background image."""
    height, width = rgb.shape[:2]
    if style.mode in BACKGROUND_COLOURS:
        return np.broadcast_to(np.asarray(BACKGROUND_COLOURS[style.mode], np.uint8), rgb.shape)
    if style.mode == "blur":
        return cv2.GaussianBlur(rgb, (0, 0), max(1.0, BLUR_SIGMA * max(height, width)))
    if style.mode == IMAGE_BACKGROUND and style.background is not None:
        shrink = style.background.shape[0] * style.background.shape[1] > height * width
        return cv2.resize(style.background, (width, height),
                          interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    raise ValueError(f"{style.mode!r} does not replace the background")


def replace_background(rgb: np.ndarray, prediction: np.ndarray, style: OutputStyle) -> np.ndarray:
    """H x W x 3 uint8: the (estimated) foreground over `backdrop(rgb, style)`, blended by the map in sRGB."""
    _check_sizes(rgb, prediction)
    foreground = estimate_foreground(rgb, prediction) if style.refine_foreground else rgb
    alpha = prediction.astype(np.float32)[..., None] / 255.0
    out = foreground * alpha + backdrop(rgb, style).astype(np.float32) * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _check_sizes(rgb: np.ndarray, prediction: np.ndarray) -> None:
    """Refuse a map that is not the image's size (the pipeline writes maps at the image's own size)."""
    if rgb.shape[:2] != prediction.shape[:2]:
        raise ValueError(f"map of size {prediction.shape[:2]} does not fit an image of size {rgb.shape[:2]}")


def compose(prediction: np.ndarray, rgb: np.ndarray | None, style: OutputStyle) -> np.ndarray:
    """What `style` writes for the map of the photo `rgb` (H x W x 3 uint8; None for the plain map)."""
    if style.mode == "map":
        return prediction
    if style.mode == "rgba":
        return rgba_cutout(rgb, prediction, style.refine_foreground)
    if style.mode == "overlay":
        return overlay(rgb, prediction)
    return replace_background(rgb, prediction, style)


def write_output(prediction: np.ndarray, image_path: str | os.PathLike, target: str | os.PathLike,
                 style: OutputStyle = OutputStyle(), exif: bool = False) -> Path:
    """Write what `style` makes of one image's map atomically; `exif`: the map has the displayed orientation."""
    # The release's convert('RGB'): alpha dropped, palettes expanded; oriented as the map was predicted.
    rgb = np.asarray(read_rgb(image_path, exif=exif)) if style.needs_image else None
    return write_png(compose(prediction, rgb, style), target)
