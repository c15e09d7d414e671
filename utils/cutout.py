"""Cutouts and overlays from a prediction map: the image's RGB with the map as alpha, or the map tinted over it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from utils.imageio import read_rgb, write_png

SAVE_MODES = ("map", "rgba", "overlay")
OVERLAY_COLOUR = (255, 0, 64)  # a saturated red-magenta stands out on most photos
OVERLAY_STRENGTH = 0.6  # at map 255 the pixel is 60% tint, 40% image: the image stays readable


def rgba_cutout(rgb: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """H x W x 4 uint8: the image's RGB with the 8-bit map as its alpha channel."""
    _check_sizes(rgb, prediction)
    return np.dstack([rgb, prediction])


def overlay(rgb: np.ndarray, prediction: np.ndarray, colour: tuple[int, int, int] = OVERLAY_COLOUR,
            strength: float = OVERLAY_STRENGTH) -> np.ndarray:
    """H x W x 3 uint8: the image with `colour` blended in proportion to the map."""
    _check_sizes(rgb, prediction)
    weight = prediction.astype(np.float32)[..., None] * (strength / 255.0)
    tinted = rgb.astype(np.float32) * (1.0 - weight) + np.asarray(colour, np.float32) * weight
    return np.clip(np.rint(tinted), 0, 255).astype(np.uint8)


def _check_sizes(rgb: np.ndarray, prediction: np.ndarray) -> None:
    """Refuse a map that is not the image's size (the pipeline writes maps at the image's own size)."""
    if rgb.shape[:2] != prediction.shape[:2]:
        raise ValueError(f"map of size {prediction.shape[:2]} does not fit an image of size {rgb.shape[:2]}")


def compose(prediction: np.ndarray, image_path: str | os.PathLike, mode: str, exif: bool = False) -> np.ndarray:
    """What `--save_mode mode` writes for the map of the image at `image_path`; `exif` as the map was read."""
    if mode == "map":
        return prediction
    # The release's convert('RGB'): alpha dropped, palettes expanded; oriented as the map was predicted.
    rgb = np.asarray(read_rgb(image_path, exif=exif))
    if mode == "rgba":
        return rgba_cutout(rgb, prediction)
    if mode == "overlay":
        return overlay(rgb, prediction)
    raise ValueError(f"save mode must be one of {SAVE_MODES}, not {mode!r}")


def write_output(prediction: np.ndarray, image_path: str | os.PathLike, target: str | os.PathLike,
                 mode: str = "map", exif: bool = False) -> Path:
    """Write the map (`map`), the cutout (`rgba`) or the overlay (`overlay`) of one image atomically.

    `exif`: the map has the image's displayed (EXIF-oriented) orientation, so the pixels are read so too.
    """
    return write_png(compose(prediction, image_path, mode, exif), target)
