"""utils.data: split layouts, pairing by stem with bad files reported by name, the release's preprocessing."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from utils import data
from utils.data import (
    BadSample,
    DataError,
    EvalDataset,
    Pair,
    TrainDataset,
    UndecodableFileError,
    eval_collate,
    find_split_dirs,
    pair_samples,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pair(root: Path, stem: str, size: tuple[int, int], seed: int = 0, layout: tuple[str, str] = ("im", "gt"),
          image_ext: str = ".jpg", gt_size: tuple[int, int] | None = None) -> tuple[Path, Path]:
    """Write an asymmetric noisy image and a soft mask (a gradient-edged blob) of the given (w, h)."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[:, : width // 3] //= 3  # left third darker: the image is not mirror-symmetric
    gw, gh = gt_size or size
    yy, xx = np.mgrid[0:gh, 0:gw]
    mask = np.clip((xx - gw * 0.3) * 255 / max(gw * 0.2, 1), 0, 255) * (yy < gh * 0.7)
    for sub in layout:
        (root / sub).mkdir(parents=True, exist_ok=True)
    image_path = root / layout[0] / f"{stem}{image_ext}"
    gt_path = root / layout[1] / f"{stem}.png"
    Image.fromarray(image).save(image_path, **({"quality": 95} if image_ext.lower() == ".jpg" else {}))
    Image.fromarray(mask.astype(np.uint8)).save(gt_path)
    return image_path, gt_path


def _release_tensors(image: Path, gt: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's train.py transforms applied to its own PIL loading."""
    img_tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                 transforms.Normalize(MEAN, STD)])
    gt_tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    with open(image, "rb") as f:
        img = Image.open(f).convert("RGB")
    with open(gt, "rb") as f:
        mask = Image.open(f).convert("L")
    return img_tf(img), gt_tf(mask)


@pytest.mark.parametrize("layout", [("im", "gt"), ("Imgs", "GT")])
def test_find_split_dirs_both_layouts(tmp_path: Path, layout: tuple[str, str]) -> None:
    _pair(tmp_path, "a", (20, 10), layout=layout)
    assert find_split_dirs(tmp_path) == (tmp_path / layout[0], tmp_path / layout[1])
    assert [s.stem for s in pair_samples(tmp_path, on_bad="error")] == ["a"]


def test_find_split_dirs_explains_expected_layouts(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"im/ \+ gt/ or Imgs/ \+ GT/") as err:
        find_split_dirs(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(DataError, match="not found"):
        find_split_dirs(tmp_path / "nope")


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "im").mkdir()
    (tmp_path / "gt").mkdir()
    with pytest.raises(DataError, match="no images"):
        pair_samples(tmp_path)


def test_pairs_by_stem_not_sorted_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Each pair has its own size, so a wrong pairing would also be a size mismatch.
    _pair(tmp_path, "b", (24, 12), image_ext=".JPG")
    _pair(tmp_path, "c", (28, 14))
    _pair(tmp_path, "a", (20, 10))
    (tmp_path / "gt" / "a.png").unlink()  # sorted zip would now pair a.jpg with b.png
    _pair(tmp_path, "d", (32, 16))
    (tmp_path / "im" / "d.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        samples = pair_samples(tmp_path, on_bad="skip")
    assert samples == [Pair("b", tmp_path / "im" / "b.JPG", tmp_path / "gt" / "b.png"),
                       Pair("c", tmp_path / "im" / "c.jpg", tmp_path / "gt" / "c.png")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("a.jpg" in w and "without a mask" in w for w in warnings)
    assert any("d.png" in w and "without an image" in w for w in warnings)
    assert any("skipped 2 unusable file(s) among 6" in w for w in warnings)


def _bad_split(root: Path) -> None:
    """A split with one good pair, a size mismatch, an unreadable image and mask, a duplicate stem."""
    _pair(root, "good", (20, 10))
    _pair(root, "mismatch", (20, 10), gt_size=(22, 10))
    _pair(root, "broken", (20, 10))
    (root / "im" / "broken.jpg").write_bytes(b"garbage")
    _pair(root, "badmask", (20, 10))
    (root / "gt" / "badmask.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _pair(root, "twin", (20, 10))
    _pair(root, "twin", (20, 10), image_ext=".png")


def test_bad_files_skipped_and_reported_by_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _bad_split(tmp_path)
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        samples = pair_samples(tmp_path)
    assert [s.stem for s in samples] == ["good"]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "mismatch.jpg: size 20x10 differs" in text and "mismatch.png" in text
    assert "broken.jpg" in text and "badmask.png" in text
    assert "twin.jpg" in text and "twin.png" in text
    assert "skipped 5 unusable file(s) among 11" in text


def test_bad_files_raise_with_every_name(tmp_path: Path) -> None:
    _bad_split(tmp_path)
    with pytest.raises(DataError) as err:
        pair_samples(tmp_path, on_bad="error")
    message = str(err.value)
    for name in ("mismatch.jpg", "broken.jpg", "badmask.png", "twin.jpg", "twin.png"):
        assert name in message
    assert "good" not in message
    with pytest.raises(ValueError):
        pair_samples(tmp_path, on_bad="ignore")


def test_train_dataset_exact_path_matches_release_transforms(tmp_path: Path) -> None:
    image, gt = _pair(tmp_path, "x", (90, 60))
    dataset = TrainDataset(tmp_path, trainsize=32, fast_decode=False)
    got_image, got_gt = dataset[0]
    want_image, want_gt = _release_tensors(image, gt, 32)
    assert got_image.shape == (3, 32, 32) and got_gt.shape == (1, 32, 32)
    assert got_image.dtype == torch.float32 and got_gt.dtype == torch.float32
    assert torch.equal(got_image, want_image) and torch.equal(got_gt, want_gt)
    assert got_gt.min() >= 0.0 and got_gt.max() <= 1.0
    assert ((got_gt > 0.05) & (got_gt < 0.95)).any()  # soft mask, not binarised
    assert got_image.min() < -1.0 < 1.0 < got_image.max()  # ImageNet-normalised, not [0, 1]


@pytest.mark.parametrize("size", [(400, 300), (401, 299)])
def test_fast_decode_close_to_exact_on_large_jpeg(tmp_path: Path, size: tuple[int, int]) -> None:
    _pair(tmp_path, "big", size)
    fast_image, fast_gt = TrainDataset(tmp_path, trainsize=64, fast_decode=True)[0]
    exact_image, exact_gt = TrainDataset(tmp_path, trainsize=64, fast_decode=False)[0]
    assert fast_image.shape == exact_image.shape and fast_gt.shape == exact_gt.shape
    assert (fast_image - exact_image).abs().mean() < 0.1
    assert (fast_gt - exact_gt).abs().mean() < 0.02


def test_hflip_flips_image_and_mask_together(tmp_path: Path) -> None:
    _pair(tmp_path, "x", (40, 30))
    base_image, base_gt = TrainDataset(tmp_path, trainsize=16, fast_decode=False)[0]
    flipping = TrainDataset(tmp_path, trainsize=16, fast_decode=False, hflip=True)
    torch.manual_seed(0)
    outcomes = set()
    for _ in range(16):
        image, gt = flipping[0]
        if torch.equal(image, base_image):
            assert torch.equal(gt, base_gt)
            outcomes.add("kept")
        else:
            assert torch.equal(image, base_image.flip(-1)) and torch.equal(gt, base_gt.flip(-1))
            outcomes.add("flipped")
    assert outcomes == {"kept", "flipped"}


def test_cache_matches_uncached_and_is_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split, cache = tmp_path / "split", tmp_path / "cache"
    image, _ = _pair(split, "x", (90, 60), seed=0)
    uncached = TrainDataset(split, trainsize=24)[0]
    first = TrainDataset(split, trainsize=24, cache_dir=cache)[0]
    assert all(torch.equal(a, b) for a, b in zip(first, uncached))
    assert len(list(cache.glob("*.npy"))) == 1

    def no_decoding(*args: object, **kwargs: object) -> None:
        """Stand-in reader proving that a cache hit decodes nothing."""
        raise AssertionError("decoded although cached")

    with monkeypatch.context() as m:
        m.setattr(data, "read_rgb", no_decoding)
        again = TrainDataset(split, trainsize=24, cache_dir=cache)[0]
    assert all(torch.equal(a, b) for a, b in zip(again, uncached))

    _pair(split, "x", (90, 60), seed=1)  # new content, same size
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = TrainDataset(split, trainsize=24, cache_dir=cache)[0]
    fresh = TrainDataset(split, trainsize=24)[0]
    assert torch.equal(changed[0], fresh[0]) and not torch.equal(changed[0], uncached[0])
    assert len(list(cache.glob("*.npy"))) == 2


def _cached_sample(split: Path, cache: Path, **options: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample 0 of the split through a cached TrainDataset at trainsize 24."""
    return TrainDataset(split, trainsize=24, cache_dir=cache, **options)[0]


def test_cache_key_follows_the_bytes_not_mtime_and_size(tmp_path: Path) -> None:
    """`cp -p`-style rewrite: new pixels, same byte size (BMP), mtime put back: the cache must miss."""
    split, cache = tmp_path / "split", tmp_path / "cache"
    files = _pair(split, "x", (40, 30), seed=0, image_ext=".bmp")
    first = _cached_sample(split, cache)
    stats = [f.stat() for f in files]
    _pair(split, "x", (40, 30), seed=1, image_ext=".bmp")  # new image pixels; the mask rewritten as it was
    for f, st in zip(files, stats):
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    again = _cached_sample(split, cache)
    fresh = TrainDataset(split, trainsize=24)[0]
    assert all(torch.equal(a, b) for a, b in zip(again, fresh)) and not torch.equal(again[0], first[0])
    assert len(list(cache.glob("*.npy"))) == 2


@pytest.mark.parametrize("change", ["pillow", "torch", "numpy", "code"])
def test_cache_misses_after_a_library_upgrade_or_a_code_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               change: str) -> None:
    """An upgraded decoding/resizing library (monkeypatched version) or edited repo code gets a new entry."""
    from utils import cache_keys

    split, cache = tmp_path / "split", tmp_path / "cache"
    _pair(split, "x", (40, 30))
    _cached_sample(split, cache, fast_decode=True)
    if change == "code":
        monkeypatch.setattr(cache_keys, "code_digest", lambda *modules: "patched")
    else:
        real = cache_keys.library_versions
        monkeypatch.setattr(cache_keys, "library_versions",
                            lambda names: {n: ("99.0" if n == change else v) for n, v in real(names).items()})
    decoded = []
    read_rgb = data.read_rgb
    monkeypatch.setattr(data, "read_rgb", lambda *a, **k: decoded.append(1) or read_rgb(*a, **k))
    _cached_sample(split, cache, fast_decode=True)
    assert decoded and len(list(cache.glob("*.npy"))) == 2


def test_cache_hit_equals_decoding_and_orphaned_temps_are_removed(tmp_path: Path, dead_pid: int) -> None:
    """A hit gives the decoded tensors bit for bit (both decode modes); a killed run's temp entry is removed."""
    split, cache = tmp_path / "split", tmp_path / "cache"
    _pair(split, "x", (90, 60), seed=3)
    for fast in (False, True):
        decoded = TrainDataset(split, trainsize=24, fast_decode=fast)[0]
        for _ in range(2):  # the miss that writes the entry, then the hit
            assert all(torch.equal(a, b) for a, b in zip(_cached_sample(split, cache, fast_decode=fast), decoded))
    orphan = cache / f".x-0123.npy.{dead_pid}.abcdefgh.tmp"
    orphan.write_bytes(b"half an entry")
    TrainDataset(split, trainsize=24, cache_dir=cache)
    assert not orphan.exists() and len(list(cache.glob("*.npy"))) == 2


def test_file_unreadable_at_load_time_names_it(tmp_path: Path) -> None:
    image, _ = _pair(tmp_path, "x", (20, 10))
    datasets = [TrainDataset(tmp_path, trainsize=16), EvalDataset(tmp_path, testsize=16)]
    strict = [TrainDataset(tmp_path, trainsize=16, on_bad="error"), EvalDataset(tmp_path, testsize=16, on_bad="error")]
    image.write_bytes(b"broken")
    for dataset in datasets:  # on_bad='skip': a named BadSample, which the collate functions drop
        assert isinstance(dataset[0], BadSample) and "x.jpg" in dataset[0].reason
    for dataset in strict:
        with pytest.raises(UndecodableFileError, match="x.jpg.*--on_bad skip") as err:
            dataset[0]
        assert err.value.exit_code == 1 and "changed after" not in str(err.value)
    image.unlink()
    assert "x.jpg: file not found" in datasets[0][0].reason


def test_eval_dataset_full_size_gt_and_collate(tmp_path: Path) -> None:
    image_a, gt_a = _pair(tmp_path, "a", (40, 30))
    _pair(tmp_path, "b", (50, 20), seed=2)
    dataset = EvalDataset(tmp_path, testsize=32)
    image, gt, stem = dataset[0]
    want_image, _ = _release_tensors(image_a, gt_a, 32)
    assert stem == "a" and torch.equal(image, want_image)
    assert gt.dtype == np.uint8 and np.array_equal(gt, np.asarray(Image.open(gt_a)))
    images, gts, stems, bad = eval_collate([dataset[0], dataset[1], BadSample("c.jpg: broken")])
    assert images.shape == (2, 3, 32, 32) and [g.shape for g in gts] == [(30, 40), (20, 50)]
    assert stems == ["a", "b"] and bad == ["c.jpg: broken"]


def test_fast_decode_in_forked_dataloader_workers(tmp_path: Path) -> None:
    for i in range(4):
        _pair(tmp_path, f"x{i}", (300, 200), seed=i)
    dataset = TrainDataset(tmp_path, trainsize=64, fast_decode=True)
    first = dataset[0]  # the parent runs the resize kernels before the workers fork
    loader = DataLoader(dataset, batch_size=2, num_workers=2, timeout=120)  # a hung worker raises
    batches = list(loader)
    assert [tuple(b[0].shape) for b in batches] == [(2, 3, 64, 64)] * 2
    assert torch.equal(batches[0][0][0], first[0]) and torch.equal(batches[0][1][0], first[1])
