"""A small built-in DIS-like dataset: thin wires, meshes, branches and bodies over cluttered backgrounds.

Written in the DIS5K v1.0 layout (`DIS-TR`, `DIS-VD`, `DIS-TE1`..`DIS-TE4`, each `im/*.jpg` + `gt/*.png`
of the same stem) so every script runs on it unchanged. Masks are drawn at 4x and area-downsampled, so
they are anti-aliased like DIS5K's. As in DIS5K, the test subsets grow harder from TE1 to TE4: more
and thinner structure, denser meshes, more clutter, lower contrast. Each image has its own generator
seeded from (seed, split, index), so the same arguments always give the same bytes.

    python -m utils.synthetic --out data/demo --seed 0 --size 256 --n_train 48 --n_val 8 --n_test 8
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.atomic import atomic_path
from utils.imageio import list_images, read_mask, read_rgb, write_png

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("DIS-TR", "DIS-VD", "DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4")
# Centre difficulty of each test subset; DIS-TR and DIS-VD draw difficulty uniformly over [0, 1].
TEST_DIFFICULTY: dict[str, float] = {"DIS-TE1": 0.1, "DIS-TE2": 0.4, "DIS-TE3": 0.65, "DIS-TE4": 0.9}
SUPERSAMPLE = 4
_SHIFT = 4  # cv2 drawing with 4 fractional bits: sub-pixel positions on the 4x canvas
_JPEG_QUALITY = 90
_STEM = re.compile(r"^[a-z0-9]+_\d{4}$")


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(width, height) from a single int or a (width, height) pair."""
    if isinstance(size, int):
        return size, size
    width, height = (int(v) for v in size)
    return width, height


def _pts(points: np.ndarray) -> np.ndarray:
    """Float canvas coordinates as cv2's fixed-point int32 polyline points."""
    return np.round(np.asarray(points) * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)


def _line(canvas: np.ndarray, p0: np.ndarray, p1: np.ndarray, thickness: float, value: int | tuple) -> None:
    """Anti-aliased line of `thickness` canvas pixels between two float points."""
    a, b = _pts(np.array([p0, p1]))[:, 0]
    cv2.line(canvas, tuple(int(v) for v in a), tuple(int(v) for v in b), value,
             max(1, int(round(thickness))), cv2.LINE_AA, _SHIFT)


def _curve(rng: np.random.Generator, start: np.ndarray, length: float, n: int = 48) -> np.ndarray:
    """Points of a random cubic Bezier curve of roughly `length` starting at `start`."""
    angle = rng.uniform(0, 2 * math.pi)
    end = start + length * np.array([math.cos(angle), math.sin(angle)])
    c1 = start + (end - start) / 3 + rng.normal(0, length / 3, 2)
    c2 = start + 2 * (end - start) / 3 + rng.normal(0, length / 3, 2)
    t = np.linspace(0, 1, n)[:, None]
    return ((1 - t) ** 3 * start + 3 * (1 - t) ** 2 * t * c1 + 3 * (1 - t) * t ** 2 * c2 + t ** 3 * end)


def _polyline(canvas: np.ndarray, points: np.ndarray, thickness: float, value: int | tuple) -> None:
    """Anti-aliased open polyline through float points."""
    cv2.polylines(canvas, [_pts(points)], False, value, max(1, int(round(thickness))), cv2.LINE_AA, _SHIFT)


def _body(mask: np.ndarray, rng: np.random.Generator, centre: np.ndarray, radius: float) -> None:
    """A solid irregular body (star-shaped polygon), sometimes with a hole punched through it."""
    n = int(rng.integers(5, 12))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = radius * rng.uniform(0.45, 1.0, n)
    poly = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    cv2.fillPoly(mask, [_pts(poly)], 255, cv2.LINE_AA, _SHIFT)
    if rng.random() < 0.4:
        hole = (tuple(centre), tuple(radius * rng.uniform(0.2, 0.5, 2)), rng.uniform(0, 180))
        cv2.ellipse(mask, hole, 0, -1, cv2.LINE_AA)


def _wires(mask: np.ndarray, rng: np.random.Generator, anchor: np.ndarray, count: int, scale: float,
           thin: tuple[float, float]) -> None:
    """`count` thin curved wires of 1-3 output pixels hanging off `anchor` (cables, legs, antennae)."""
    for _ in range(count):
        start = anchor + rng.normal(0, scale * 0.08, 2)
        points = _curve(rng, start, scale * rng.uniform(0.25, 0.6))
        _polyline(mask, points, rng.uniform(*thin), 255)


def _mesh(mask: np.ndarray, rng: np.random.Generator, centre: np.ndarray, radius: float, spacing: float,
          thin: tuple[float, float]) -> None:
    """A rotated grid of thin bars inside a framed ellipse or rectangle: a net or fence with holes."""
    grid = np.zeros_like(mask)
    angle = rng.uniform(0, math.pi)
    thickness = rng.uniform(*thin)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    for axis, across in ((direction, normal), (normal, direction)):
        for offset in np.arange(-radius, radius, spacing * rng.uniform(0.8, 1.2)):
            _line(grid, centre + across * offset - axis * radius, centre + across * offset + axis * radius,
                  thickness, 255)
    region = np.zeros_like(mask)
    axes = (radius * rng.uniform(0.5, 1.0), radius * rng.uniform(0.5, 1.0))
    box = (tuple(centre), (2 * axes[0], 2 * axes[1]), math.degrees(angle) * rng.uniform(0, 1))
    if rng.random() < 0.5:
        cv2.ellipse(region, box, 255, -1, cv2.LINE_AA)
        cv2.ellipse(mask, box, 255, max(1, int(round(thickness * 2))), cv2.LINE_AA)
    else:
        corners = cv2.boxPoints(box)
        cv2.fillPoly(region, [_pts(corners)], 255, cv2.LINE_AA, _SHIFT)
        cv2.polylines(mask, [_pts(corners)], True, 255, max(1, int(round(thickness * 2))), cv2.LINE_AA, _SHIFT)
    np.maximum(mask, np.minimum(grid, region), out=mask)


def _tree(mask: np.ndarray, rng: np.random.Generator, start: np.ndarray, angle: float, length: float,
          thickness: float, depth: int, min_thickness: float) -> None:
    """A recursively branching structure (tree, crack, coral) thinning towards its tips."""
    end = start + length * np.array([math.cos(angle), math.sin(angle)])
    _line(mask, start, end, thickness, 255)
    if depth == 0:
        return
    for _ in range(int(rng.integers(2, 4))):
        _tree(mask, rng, end, angle + rng.uniform(-0.8, 0.8), length * rng.uniform(0.55, 0.8),
              max(min_thickness, thickness * rng.uniform(0.55, 0.8)), depth - 1, min_thickness)


def _object_mask(rng: np.random.Generator, width: int, height: int, difficulty: float) -> np.ndarray:
    """Anti-aliased HxW uint8 mask of one object, its structure thinner and denser with difficulty."""
    s = SUPERSAMPLE
    mask = np.zeros((height * s, width * s), np.uint8)
    scale = min(width, height) * s
    centre = np.array([width * s, height * s]) * rng.uniform(0.35, 0.65, 2)
    # Thin strokes are 1-3 output pixels wide at easy levels and 0.75-1.5 at the hardest.
    thin = (s * (1.0 - 0.25 * difficulty), s * (3.0 - 1.5 * difficulty))
    if rng.random() < 1.0 - 0.5 * difficulty:
        _body(mask, rng, centre, scale * rng.uniform(0.12, 0.25) * (1.0 - 0.4 * difficulty))
    if rng.random() < 0.3 + 0.6 * difficulty:
        spacing = scale * rng.uniform(0.035, 0.07) * (1.0 - 0.5 * difficulty)
        mesh_centre = centre + rng.normal(0, scale * 0.12, 2)
        _mesh(mask, rng, mesh_centre, scale * rng.uniform(0.15, 0.3), spacing, thin)
    if rng.random() < 0.35 + 0.6 * difficulty:
        root = centre + rng.normal(0, scale * 0.1, 2)
        _tree(mask, rng, root, rng.uniform(0, 2 * math.pi), scale * rng.uniform(0.12, 0.2),
              thin[1] * rng.uniform(1.5, 3.0), 2 + int(round(3 * difficulty)), thin[0])
    _wires(mask, rng, centre, int(rng.integers(1, 3) + round(5 * difficulty)), scale, thin)
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_AREA)


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled with bicubic interpolation."""
    coarse = rng.uniform(-1, 1, (cells, cells, channels)).astype(np.float32)
    out = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return out.reshape(height, width, channels)


def _grain(rng: np.random.Generator, width: int, height: int, sigma: float) -> np.ndarray:
    """HxWx1 fine texture of unit standard deviation: white noise blurred by a Gaussian of `sigma` px."""
    noise = cv2.GaussianBlur(rng.standard_normal((height, width), dtype=np.float32), (0, 0), sigma)
    return (noise / max(float(noise.std()), 1e-6))[..., None]


def _stripes(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """HxWx1 oriented sinusoidal stripes in [-1, 1] (fabric, wood, tiles), period 4-16 px."""
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / rng.uniform(4, 16))
    return np.sin(phase)[..., None]


def _far_colour(rng: np.random.Generator, reference: np.ndarray, min_distance: float,
                centre: np.ndarray | None = None, spread: float = 255.0) -> np.ndarray:
    """A random RGB colour (around `centre` when given) at least `min_distance` from `reference`."""
    for _ in range(64):
        colour = rng.uniform(0, 255, 3) if centre is None else np.clip(centre + rng.normal(0, spread, 3), 0, 255)
        if np.linalg.norm(colour - reference) >= min_distance:
            return colour
    return 255.0 - reference


def _distractors(canvas: np.ndarray, rng: np.random.Generator, difficulty: float, avoid: np.ndarray) -> None:
    """Clutter drawn into the background: strokes, rings and blobs in colours unlike the object's."""
    height, width = canvas.shape[:2]
    scale = min(width, height)
    palette_centre = canvas.mean(axis=(0, 1))
    min_distance = 100 - 55 * difficulty
    for _ in range(int(3 + 20 * difficulty)):
        colour = tuple(float(c) for c in _far_colour(rng, avoid, min_distance, palette_centre, 80))
        start = rng.uniform(0, 1, 2) * [width, height]
        kind = rng.random()
        if kind < 0.6:
            _polyline(canvas, _curve(rng, start, scale * rng.uniform(0.15, 0.7)), rng.uniform(1, 3.5), colour)
        elif kind < 0.85:
            box = (tuple(start), tuple(scale * rng.uniform(0.05, 0.3, 2)), rng.uniform(0, 180))
            cv2.ellipse(canvas, box, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            box = (tuple(start), tuple(scale * rng.uniform(0.04, 0.2, 2)), rng.uniform(0, 180))
            cv2.ellipse(canvas, box, colour, -1, cv2.LINE_AA)


def _background(rng: np.random.Generator, width: int, height: int, difficulty: float) -> np.ndarray:
    """HxWx3 float32 background: muted base colour, shading, texture and sometimes stripes."""
    base = rng.uniform(30, 225, 3)
    base = base.mean() + (base - base.mean()) * rng.uniform(0.2, 0.8)
    tint = rng.normal(1, 0.15, 3).astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    image[:] = base
    image += 55 * _smooth_noise(rng, width, height, int(rng.integers(2, 5)), 1) * tint
    image += 18 * _smooth_noise(rng, width, height, int(rng.integers(3, 7)), 3)
    image += rng.uniform(4, 10 + 12 * difficulty) * _grain(rng, width, height, rng.uniform(0.7, 2.5)) * tint
    if rng.random() < 0.25 + 0.5 * difficulty:
        image += rng.uniform(6, 20) * _stripes(rng, width, height) * tint
    return image


def matting_parts(rng: np.random.Generator, width: int, height: int,
                  difficulty: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(foreground, background) HxWx3 float32 (about 0..255, not clipped) and the object's HxW uint8 mask.

    The photo is their composite `background * (1 - a) + foreground * a` with a = mask / 255 (plus sensor
    noise in `_render`): the ground truth a foreground colour estimator or a background replacement is
    checked against.
    """
    mask = _object_mask(rng, width, height, difficulty)
    # The object's colour sits between the background's mean and a far colour: lower contrast when harder.
    background = _background(rng, width, height, difficulty)
    bg_mean = background.mean(axis=(0, 1))
    far = _far_colour(rng, bg_mean, 150)
    fg = (bg_mean + rng.uniform(0.55, 1.0) * (1.0 - 0.4 * difficulty) * (far - bg_mean)).astype(np.float32)
    _distractors(background, rng, difficulty, fg)
    foreground = fg + 20 * _smooth_noise(rng, width, height, int(rng.integers(3, 10)), 3)
    foreground += rng.uniform(3, 10) * _grain(rng, width, height, 1.0)
    return foreground, background, mask


def _render(rng: np.random.Generator, width: int, height: int, difficulty: float) -> tuple[np.ndarray, np.ndarray]:
    """One (image HxWx3 uint8, mask HxW uint8) sample at the given difficulty in [0, 1]."""
    foreground, background, mask = matting_parts(rng, width, height, difficulty)
    alpha = (mask.astype(np.float32) / 255.0)[..., None]
    image = background * (1 - alpha) + foreground * alpha
    image += rng.standard_normal(image.shape, dtype=np.float32) * (2 + 4 * difficulty)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def shapes_pair(rng: np.random.Generator, width: int, height: int, ellipses: int = 12,
                lines: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A large photo-like RGB image (smooth noise, grain) with filled ellipses and straight bars, and its mask.

    Cheaper than `_render` at DIS5K's 2500 x 3400: the benchmarks use it for photos (ellipses only, so
    loading is timed on DIS-sized files) and for GT maps (bars as thin structure plus ellipses as bodies).
    """
    colour = 128 + 100 * _smooth_noise(rng, width, height, 24, 3) + 5 * _grain(rng, width, height, 0.7)
    image = np.clip(colour, 0, 255).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(lines):
        p, q = rng.integers(0, (width, height), size=(2, 2))
        thickness = int(rng.integers(2, 12))
        cv2.line(mask, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), 255, thickness)
        cv2.line(image, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), _random_colour(rng), thickness)
    for _ in range(ellipses):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(width // 40, width // 6)), int(rng.integers(height // 40, height // 6)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(image, centre, axes, angle, 0, 360, _random_colour(rng), -1, cv2.LINE_AA)
        cv2.ellipse(mask, centre, axes, angle, 0, 360, 255, -1, cv2.LINE_AA)
    return image, mask


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random RGB colour for cv2's drawing calls."""
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def degraded_prediction(mask: np.ndarray, rng: np.random.Generator, blur: float = 3.0, noise: float = 20.0,
                        shift: tuple[int, int] = (3, -2)) -> np.ndarray:
    """A plausible imperfect prediction of `mask`: blurred, noisy and shifted by `shift` (x, y) pixels."""
    h, w = mask.shape
    pred = cv2.GaussianBlur(mask, (0, 0), blur).astype(np.float32) + rng.normal(0, noise, (h, w)).astype(np.float32)
    pred = cv2.warpAffine(pred, np.float32([[1, 0, shift[0]], [0, 1, shift[1]]]), (w, h))
    return np.clip(pred, 0, 255).astype(np.uint8)


def _difficulty(rng: np.random.Generator, split: str) -> float:
    """Difficulty of one image: uniform for training/validation, around the subset's level for tests."""
    if split in TEST_DIFFICULTY:
        return float(np.clip(TEST_DIFFICULTY[split] + rng.uniform(-0.1, 0.1), 0.0, 1.0))
    return float(rng.uniform(0.0, 1.0))


def write_jpeg(image: np.ndarray, path: Path) -> None:
    """Write an RGB uint8 array as a JPEG (quality 90) atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=_JPEG_QUALITY)


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Delete earlier generated files (our stem pattern) that this run does not write again."""
    for path in list_images(folder):
        if _STEM.match(path.stem) and path.stem not in keep:
            path.unlink()


def generate_split(out: str | os.PathLike, split: str, count: int, seed: int = 0,
                   size: int | Sequence[int] = 256) -> Path:
    """Write `count` samples of one split (`im/<stem>.jpg`, `gt/<stem>.png`) under out/split."""
    width, height = _size_pair(size)
    root = Path(out) / split
    prefix = split.lower().replace("dis-", "")
    stems = [f"{prefix}_{i:04d}" for i in range(count)]
    for sub in ("im", "gt"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for index, stem in enumerate(tqdm(stems, desc=f"generating {split}", leave=False, disable=None)):
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        image, mask = _render(rng, width, height, _difficulty(rng, split))
        write_jpeg(image, root / "im" / f"{stem}.jpg")
        write_png(mask, root / "gt" / f"{stem}.png")
    for sub in ("im", "gt"):
        _remove_stale(root / sub, set(stems))
    return root


def generate_dataset(out: str | os.PathLike, seed: int = 0, size: int | Sequence[int] = 256,
                     n_train: int = 48, n_val: int = 8, n_test: int = 8) -> Path:
    """Write the whole DIS5K-layout synthetic dataset under `out` and return `out`."""
    counts = {"DIS-TR": n_train, "DIS-VD": n_val, **{s: n_test for s in TEST_DIFFICULTY}}
    for split in SPLITS:
        generate_split(out, split, counts[split], seed=seed, size=size)
    return Path(out)


def save_preview(root: str | os.PathLike, path: str | os.PathLike, per_split: int = 3, tile: int = 160) -> Path:
    """Write a PNG grid with one row per split: image and mask side by side for the first samples."""
    rows = []
    for split in SPLITS:
        images = list_images(Path(root) / split / "im")[:per_split]
        cells = []
        for image_path in images:
            image = np.asarray(read_rgb(image_path).resize((tile, tile), Image.BILINEAR))
            gt = read_mask(Path(root) / split / "gt" / f"{image_path.stem}.png").resize((tile, tile), Image.BILINEAR)
            cells += [image, np.repeat(np.asarray(gt)[..., None], 3, 2), np.full((tile, 4, 3), 255, np.uint8)]
        if cells:
            row = np.concatenate(cells, 1)
            rows.append(row)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return write_png(np.concatenate(rows, 0), path)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options of the generator."""
    parser = argparse.ArgumentParser(description="Write a small DIS-like synthetic dataset in the DIS5K v1.0 layout.")
    parser.add_argument("--out", type=Path, required=True, help="output folder (gets DIS-TR, DIS-VD, DIS-TE1..4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same arguments give the same files")
    parser.add_argument("--size", type=int, nargs="+", default=[256], metavar="N",
                        help="image size: one int for square images or WIDTH HEIGHT")
    parser.add_argument("--n_train", type=int, default=48, help="number of DIS-TR samples")
    parser.add_argument("--n_val", type=int, default=8, help="number of DIS-VD samples")
    parser.add_argument("--n_test", type=int, default=8, help="number of samples in each of DIS-TE1..DIS-TE4")
    parser.add_argument("--preview", type=Path, default=None, help="also write a PNG grid of samples to this path")
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 2):
        parser.error("--size takes one int or WIDTH HEIGHT")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Generate the dataset from command-line options."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parse_args(argv)
    size = args.size[0] if len(args.size) == 1 else tuple(args.size)
    out = generate_dataset(args.out, seed=args.seed, size=size, n_train=args.n_train, n_val=args.n_val,
                           n_test=args.n_test)
    logger.info("wrote the synthetic dataset to %s", out)
    if args.preview is not None:
        logger.info("wrote a preview grid to %s", save_preview(out, args.preview))


if __name__ == "__main__":
    main()
