"""The pictures of test.py's save modes in the docs, made from the synthetic scene the tests check them on.

The scene is utils.synthetic's thin-structure object (wires, mesh, branches) over a textured background,
composited with its known alpha, so the true foreground colours and the true composite over any new
background are known. The pictures use that true alpha in place of a prediction: they show what each
mode does with a map, not how good a model is.

    python -m pipelines.save_mode_pictures --out docs/save_modes
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.cutout import IMAGE_BACKGROUND, OutputStyle, compose
from utils.imageio import write_png
from utils.synthetic import matting_parts

SCENE_SIZE = (192, 128)  # (width, height)
SCENE_DIFFICULTY = 0.9  # the hardest synthetic level: 1-2 px strokes, mostly fractional alpha
_CHECKER = 8  # px squares behind the rgba cutout, as image editors show transparency


@dataclass(frozen=True)
class MattingScene:
    """A photo with known parts: photo = alpha * foreground + (1 - alpha) * background, in sRGB."""

    photo: np.ndarray  # H x W x 3 uint8
    alpha: np.ndarray  # H x W uint8
    foreground: np.ndarray  # H x W x 3 float32, 0..255
    background: np.ndarray  # H x W x 3 float32, 0..255

    def composite(self, backdrop: np.ndarray, foreground: np.ndarray | None = None) -> np.ndarray:
        """H x W x 3 float32: `foreground` (default: the true one) over `backdrop` with the true alpha."""
        a = self.alpha.astype(np.float32)[..., None] / 255.0
        fg = self.foreground if foreground is None else foreground.astype(np.float32)
        return fg * a + backdrop.astype(np.float32) * (1.0 - a)


def matting_scene(seed: int = 0, size: tuple[int, int] = SCENE_SIZE,
                  difficulty: float = SCENE_DIFFICULTY) -> MattingScene:
    """The synthetic scene of `seed`: a thin object over a textured background, composited without noise."""
    foreground, background, mask = matting_parts(np.random.default_rng(seed), *size, difficulty)
    foreground, background = np.clip(foreground, 0, 255), np.clip(background, 0, 255)
    a = mask.astype(np.float32)[..., None] / 255.0
    photo = np.rint(foreground * a + background * (1.0 - a)).astype(np.uint8)
    return MattingScene(photo, mask, foreground, background)


def _checkerboard(rgba: np.ndarray) -> np.ndarray:
    """An RGBA cutout over a light gray checkerboard, for a page that shows no transparency."""
    yy, xx = np.mgrid[0:rgba.shape[0], 0:rgba.shape[1]]
    board = np.where(((yy // _CHECKER + xx // _CHECKER) % 2 == 0)[..., None], 204, 255).astype(np.float32)
    a = rgba[..., 3:].astype(np.float32) / 255.0
    return np.rint(rgba[..., :3] * a + board * (1.0 - a)).astype(np.uint8)


def render_pictures(out: str | os.PathLike, seed: int = 0) -> list[Path]:
    """Write photo.png, map.png and one PNG per save mode (plus green without refinement) into `out`."""
    out = Path(out)
    scene = matting_scene(seed)
    new_background = matting_scene(seed + 1).background.astype(np.uint8)
    pictures = {"photo": scene.photo, "map": scene.alpha}
    styles = {"rgba": OutputStyle("rgba"), "overlay": OutputStyle("overlay"), "green": OutputStyle("green"),
              "green_no_refine": OutputStyle("green", refine_foreground=False), "blur": OutputStyle("blur"),
              "white": OutputStyle("white"), "background": OutputStyle(IMAGE_BACKGROUND, background=new_background)}
    for name, style in styles.items():
        pictures[name] = compose(scene.alpha, scene.photo, style)
    pictures["rgba"] = _checkerboard(pictures["rgba"])
    return [write_png(image, out / f"{name}.png") for name, image in pictures.items()]


def main(argv: Sequence[str] | None = None) -> None:
    """Write the pictures into --out."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/save_modes", help="folder the PNGs are written to")
    p.add_argument("--seed", type=int, default=0, help="synthetic scene (the tests use seed 0)")
    args = p.parse_args(argv)
    for path in render_pictures(args.out, args.seed):
        print(path)


if __name__ == "__main__":
    main()
