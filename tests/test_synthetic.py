"""utils.synthetic: deterministic DIS5K-layout data with thin, anti-aliased structure growing harder TE1 -> TE4."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.morphology import opening, skeletonize

from utils.data import pair_samples
from utils.imageio import image_size, read_mask
from utils.synthetic import SPLITS, generate_dataset, main

SMALL = dict(size=(48, 40), n_train=2, n_val=1, n_test=1)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default 256 px look with few training images and eight images per test subset."""
    return generate_dataset(tmp_path_factory.mktemp("synthetic"), seed=0, n_train=2, n_val=1, n_test=8)


def _masks(root: Path, split: str) -> list[np.ndarray]:
    """The masks of one split as uint8 arrays."""
    return [np.asarray(read_mask(p)) for p in sorted((root / split / "gt").glob("*.png"))]


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = _files(generate_dataset(tmp_path / "a", seed=3, **SMALL))
    b = _files(generate_dataset(tmp_path / "b", seed=3, **SMALL))
    c = _files(generate_dataset(tmp_path / "c", seed=4, **SMALL))
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_layout_and_sizes(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path, seed=0, **SMALL)
    assert sorted(p.name for p in root.iterdir()) == sorted(SPLITS)
    counts = {"DIS-TR": 2, "DIS-VD": 1}
    for split in SPLITS:
        samples = pair_samples(root / split, on_bad="error")
        assert len(samples) == counts.get(split, 1)
        for sample in samples:
            assert sample.image.suffix == ".jpg" and sample.gt.suffix == ".png"
            assert image_size(sample.image) == image_size(sample.gt) == (48, 40)


def test_command_line_and_stale_files_removed(tmp_path: Path) -> None:
    main(["--out", str(tmp_path), "--size", "40", "--n_train", "3", "--n_val", "1", "--n_test", "2"])
    main(["--out", str(tmp_path), "--size", "40", "--n_train", "2", "--n_val", "1", "--n_test", "1",
          "--preview", str(tmp_path / "preview.png")])
    assert len(pair_samples(tmp_path / "DIS-TR", on_bad="error")) == 2
    assert len(pair_samples(tmp_path / "DIS-TE3", on_bad="error")) == 1
    assert Image.open(tmp_path / "preview.png").size[1] > 6 * 40


def test_masks_are_anti_aliased_with_thin_structure(default_set: Path) -> None:
    for split in SPLITS:
        for mask in _masks(default_set, split):
            assert ((mask > 0) & (mask < 255)).sum() > 50  # soft edges from 4x supersampling
            assert (mask == 255).any() and (mask == 0).mean() > 0.5
    # Structures 1-3 px wide vanish under an opening with a 4x4 square.
    thin_fractions = []
    for split in ("DIS-TE1", "DIS-TE4"):
        for mask in _masks(default_set, split):
            solid = mask > 127
            thin_fractions.append(1 - opening(solid, np.ones((4, 4), bool)).sum() / solid.sum())
    assert np.median(thin_fractions) > 0.3


def test_objects_are_visible_in_the_images(default_set: Path) -> None:
    for split in ("DIS-TE1", "DIS-TE4"):
        for image_path in sorted((default_set / split / "im").glob("*.jpg")):
            image = np.asarray(Image.open(image_path), dtype=float)
            mask = np.asarray(read_mask(default_set / split / "gt" / f"{image_path.stem}.png"))
            inside = image[mask == 255].mean(0)
            outside = image[mask == 0].mean(0)
            assert np.linalg.norm(inside - outside) > 30


def test_te4_harder_than_te1(default_set: Path) -> None:
    def skeleton_per_area(split: str) -> float:
        """Mean over a split's masks of skeleton length per foreground pixel."""
        ratios = [skeletonize(m > 127).sum() / (m > 127).sum() for m in _masks(default_set, split)]
        return float(np.mean(ratios))

    te1, te4 = skeleton_per_area("DIS-TE1"), skeleton_per_area("DIS-TE4")
    assert te4 > 1.5 * te1
