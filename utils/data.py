"""DIS5K datasets for training and validation.

`TrainDataset` reproduces the release's preprocessing (../shared/design.md, section 2): image and mask resized to
`trainsize` square with PIL bilinear (torchvision `Resize` on a PIL image), `ToTensor`, ImageNet
normalisation for the image, the mask kept soft in [0, 1], no augmentation. Two differences from the
release: images and masks are paired by file stem (the release zips the sorted lists) and pairs that
cannot be used are reported by name (the release drops pairs of different sizes silently).
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from utils.atomic import UnwritableFolderError, atomic_path, check_writable_dir, os_reason
from utils.cache_keys import computation_fields, fields_digest, read_hashed, remove_orphaned_temps
from utils.dis5k import expected_folders, split_folders
from utils.errors import EXIT_FAILED, FSANetError, listing
from utils.imageio import ImageReadError, image_size, list_images, read_mask, read_rgb

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What computes a training cache entry: this module's decoding and resizing (and every repo module it
# imports: utils.imageio's readers), and the libraries that decode (Pillow), resize (Pillow, torch) and store it.
CACHE_CODE = ("utils.data",)
CACHE_LIBRARIES = ("pillow", "torch", "numpy")
_MAX_LISTED = 20
_LIST_SEP = "\n  "


class DataError(FSANetError):
    """A dataset folder or file that cannot be used; the message names it and says what to fix."""


class UndecodableFileError(DataError):
    """A file that passed indexing (headers only) but whose data cannot be decoded, with on_bad='error'."""

    exit_code = EXIT_FAILED


@dataclass(frozen=True)
class BadSample:
    """A pair whose file could not be decoded (on_bad='skip'): the collate functions drop it and pass the reason on."""

    reason: str


def _undecodable(error: ImageReadError, on_bad: str) -> BadSample:
    """The BadSample of a failed decode, or (on_bad='error') the error that stops the run."""
    if on_bad == "error":
        raise UndecodableFileError(f"{error}. Indexing reads headers only, so its damaged data showed when it was "
                                   "decoded; fix or remove the file, or pass --on_bad skip") from None
    return BadSample(str(error))


@dataclass(frozen=True)
class Pair:
    """One image/mask pair of a split, matched by file stem."""

    stem: str
    image: Path
    gt: Path


def find_split_dirs(split_root: str | os.PathLike) -> tuple[Path, Path]:
    """The (image_dir, gt_dir) of a split in the DIS5K v1.0 (`im/`, `gt/`) or release (`Imgs/`, `GT/`) layout."""
    root = Path(split_root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    found = split_folders(root)
    if found is None:
        raise DataError(f"{root}: expected image and mask folders {expected_folders()} inside it")
    return found


def _index_by_stem(files: Iterable[Path], kind: str, bad: list[str]) -> tuple[dict[str, Path], set[str]]:
    """Map stem -> file, and the stems shared by several files (a.jpg and a.png), reported and dropped."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(f.stem, []).append(f)
    duplicated = {stem for stem, group in groups.items() if len(group) > 1}
    for stem in sorted(duplicated):
        for f in groups[stem]:
            others = ", ".join(g.name for g in groups[stem] if g != f)
            bad.append(f"{f}: another {kind} has the same stem ({others}); keep one of them")
    return {stem: group[0] for stem, group in groups.items() if stem not in duplicated}, duplicated


def _check_pair(image: Path, gt: Path) -> str | None:
    """Why the pair cannot be used (unreadable header, different sizes), or None when it can."""
    try:
        image_wh = image_size(image)
        gt_wh = image_size(gt)
    except ImageReadError as e:
        return str(e)
    if image_wh != gt_wh:
        return (f"{image}: size {image_wh[0]}x{image_wh[1]} differs from its mask {gt} "
                f"({gt_wh[0]}x{gt_wh[1]})")
    return None


def _report_bad(root: Path, bad: list[str], total: int, on_bad: str) -> None:
    """Warn about (skip) or raise on (error) the files that cannot be used."""
    if not bad:
        return
    if on_bad == "error":
        raise DataError(f"{root}: {len(bad)} unusable file(s) among {total}; fix or remove them, "
                        f"or skip them with on_bad='skip':\n  {listing(bad, _MAX_LISTED, _LIST_SEP)}")
    for line in bad:
        logger.warning("skipping %s", line)
    logger.warning("%s: skipped %d unusable file(s) among %d; see the warnings above", root, len(bad), total)


def pair_samples(split_root: str | os.PathLike, on_bad: str = "skip") -> list[Pair]:
    """Image/mask pairs of a split matched by stem, in sorted image order; bad files skipped or raised."""
    if on_bad not in ("skip", "error"):
        raise ValueError(f"on_bad must be 'skip' or 'error', not {on_bad!r}")
    root = Path(split_root)
    image_dir, gt_dir = find_split_dirs(root)
    images, gts = list_images(image_dir), list_images(gt_dir)
    if not images and not gts:
        raise DataError(f"{root}: no images in {image_dir} and no masks in {gt_dir}")
    bad: list[str] = []
    image_index, image_duplicates = _index_by_stem(images, "image", bad)
    gt_index, gt_duplicates = _index_by_stem(gts, "mask", bad)
    bad.extend(f"{gt}: mask without an image of the same stem in {image_dir}"
               for stem, gt in gt_index.items() if stem not in image_index and stem not in image_duplicates)
    samples: list[Pair] = []
    for stem, image in tqdm(image_index.items(), desc=f"checking {root.name}", leave=False, disable=None):
        gt = gt_index.get(stem)
        if gt is None and stem in gt_duplicates:
            continue  # already reported with its masks
        problem = f"{image}: image without a mask of the same stem in {gt_dir}" if gt is None \
            else _check_pair(image, gt)
        if problem is None:
            samples.append(Pair(stem, image, gt))
        else:
            bad.append(problem)
    _report_bad(root, bad, len(images) + len(gts), on_bad)
    if not samples:
        raise DataError(f"{root}: no usable image/mask pairs")
    return samples


def _as_samples(source: str | os.PathLike | Sequence[Pair], on_bad: str) -> list[Pair]:
    """A split folder's pairs, or an explicit list of samples as given."""
    if isinstance(source, (str, os.PathLike)):
        return pair_samples(source, on_bad=on_bad)
    return list(source)


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _as_chw(array: np.ndarray) -> torch.Tensor:
    """An HxW or HxWxC uint8 array as a CxHxW tensor view (read-only arrays are only ever read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PIL's arrays are read-only; nothing writes to them
        tensor = torch.from_numpy(array)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def resize_uint8(image: Image.Image, size: int, exact: bool = True) -> torch.Tensor:
    """`image` resized to size x size bilinear, as a CxSxS uint8 tensor.

    exact=True is the release's resize (torchvision `Resize` on a PIL image: PIL's antialiased
    bilinear). exact=False runs torch's antialiased uint8 bilinear kernel, which agrees with PIL to
    within one gray level and is about 3x faster on large images; RGBA costs the same as RGB there.
    """
    if exact:
        return _as_chw(np.asarray(image.resize((size, size), Image.BILINEAR)))
    chw = _as_chw(np.asarray(image))[None]
    return F.interpolate(chw, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def to_unit_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 CxHxW -> float32 in [0, 1], the same numbers as torchvision's ToTensor."""
    return pixels.contiguous().float().div_(255)


def normalize_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise a float 3xHxW tensor in [0, 1] in place, the same numbers as torchvision's Normalize."""
    return rgb.sub_(_MEAN).div_(_STD)


def image_tensor(image: Image.Image, size: int, exact: bool = True) -> torch.Tensor:
    """The model input of a PIL RGB image: resized square (see resize_uint8), ToTensor, ImageNet Normalize."""
    return normalize_rgb(to_unit_float(resize_uint8(image, size, exact)))


def _read_source(path: Path) -> tuple[bytes, str]:
    """A source file's bytes and their SHA-256 (one read); a file gone or unreadable is an ImageReadError naming it."""
    try:
        return read_hashed(path)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read the file ({e.strerror or e})") from None


def _cache_writable(folder: Path) -> bool:
    """Whether pairs can be cached in `folder`. A folder that cannot be written is only read (one warning); a
    path that cannot become a folder (a file in the way) is refused before any work (UnwritableFolderError)."""
    try:
        check_writable_dir(folder, "--cache_dir")
    except UnwritableFolderError as e:
        if not folder.is_dir():
            raise
        logger.warning("%s. Going on: the pairs it holds are read, the others decoded every epoch", e)
        return False
    return True


class TrainDataset(Dataset):
    """The release's training samples: (image 3xSxS normalised, mask 1xSxS in [0, 1]), both float32.

    `fast_decode=True` (off by default: the release decodes in full) passes `min_side=trainsize` to
    the readers: JPEGs decode at a reduced DCT scale and other files (PNG masks) are box-reduced,
    keeping both sides >= trainsize; image and mask are then resized together as one RGBA image by
    torch's uint8 antialiased bilinear kernel. On ~2500x3400 JPEG/PNG pairs at trainsize 736 that
    is about 2x the release's loader per sample (`python benchmark.py --only data`; the PNG mask's
    full decode is the floor); pixel values differ slightly from the release's.
    `hflip=True` flips image and mask together with probability 0.5 (the release has no augmentation).
    `cache_dir` stores each resized pair as an uncompressed .npy (about 4*S*S bytes) so later epochs
    skip decoding. Its key is everything that computes the entry: the SHA-256 of both source files' bytes
    (read once, and decoded from those same bytes), the code digest of this module and the repo modules
    it imports, the versions of Pillow, torch and numpy, trainsize and the decode mode; a change to any
    of them gets a new entry (old ones stay on disk until the folder is deleted). Temp files a killed
    run left there are removed when the dataset is built.
    """

    def __init__(self, source: str | os.PathLike | Sequence[Pair], trainsize: int = 736, *,
                 hflip: bool = False, fast_decode: bool = False, cache_dir: str | os.PathLike | None = None,
                 on_bad: str = "skip") -> None:
        """Pair `source` (a split folder, or a list of Pairs) and set the preprocessing options."""
        self.samples = _as_samples(source, on_bad)
        self.on_bad = on_bad
        self.trainsize = int(trainsize)
        self.hflip = hflip
        self.fast_decode = fast_decode
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_fields: dict[str, object] = {}
        self.cache_writable = False
        if self.cache_dir is not None:
            # Once per dataset (DataLoader workers inherit it): the per-sample part is the sources' digests.
            self.cache_fields = computation_fields(CACHE_CODE, CACHE_LIBRARIES, trainsize=self.trainsize,
                                                   fast_decode=self.fast_decode)
            self.cache_writable = _cache_writable(self.cache_dir)
            remove_orphaned_temps(self.cache_dir, (".npy",))

    def __len__(self) -> int:
        return len(self.samples)

    def _decode_resized(self, sample: Pair, image_bytes: bytes | None = None,
                        gt_bytes: bytes | None = None) -> torch.Tensor:
        """Decode and resize one pair into a 4xSxS uint8 tensor (RGB + mask), from the files' bytes when given."""
        size = self.trainsize
        min_side = size if self.fast_decode else None
        image = read_rgb(sample.image, min_side=min_side, data=image_bytes)
        mask = read_mask(sample.gt, min_side=min_side, data=gt_bytes)
        if self.fast_decode and image.size == mask.size:
            image.putalpha(mask)  # one RGBA resize costs what the RGB one alone would
            return resize_uint8(image, size, exact=False)
        exact = not self.fast_decode
        return torch.cat([resize_uint8(image, size, exact), resize_uint8(mask, size, exact)])

    def _cache_path(self, sample: Pair, image_sha256: str, gt_sha256: str) -> Path:
        """Cache file of a pair: its stem and the digest of the key fields (sources' content, code, libraries)."""
        key = fields_digest({**self.cache_fields, "image_sha256": image_sha256, "gt_sha256": gt_sha256})
        return self.cache_dir / f"{sample.stem}-{key[:32]}.npy"

    def _load_resized(self, sample: Pair) -> torch.Tensor:
        """The resized pair from the cache when present and valid, else decoded (and cached)."""
        if self.cache_dir is None:
            return self._decode_resized(sample)
        image_bytes, image_sha256 = _read_source(sample.image)
        gt_bytes, gt_sha256 = _read_source(sample.gt)
        path = self._cache_path(sample, image_sha256, gt_sha256)
        expected = (4, self.trainsize, self.trainsize)
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
                if cached.shape == expected and cached.dtype == np.uint8:
                    return torch.from_numpy(cached)
            except (OSError, ValueError) as e:
                logger.warning("%s: unreadable cache entry, rebuilding it (%s)", path, e)
        pair = self._decode_resized(sample, image_bytes, gt_bytes)  # the bytes the key names
        if self.cache_writable:
            try:
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    np.save(f, pair.contiguous().numpy(), allow_pickle=False)
            except OSError as e:  # a full disk mid-run: the pair is here, training goes on
                self.cache_writable = False  # in this process (each DataLoader worker says it once)
                logger.warning("--cache_dir %s: could not write %s (%s); training goes on without caching "
                               "new pairs", self.cache_dir, path.name, os_reason(e))
        return pair

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | BadSample:
        """(image 3xSxS, mask 1xSxS) of pair `index`, flipped together when hflip draws it.

        A file that cannot be decoded gives a BadSample (on_bad='skip'; batch with `train_collate`) or
        raises UndecodableFileError (on_bad='error').
        """
        try:
            pair = to_unit_float(self._load_resized(self.samples[index]))
        except ImageReadError as e:
            return _undecodable(e, self.on_bad)
        image, mask = normalize_rgb(pair[:3]), pair[3:]
        if self.hflip and torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)  # the pixels torchvision hflip gives
        return image, mask


class EvalDataset(Dataset):
    """Validation samples: (image 3xSxS normalised, full-size mask HxW uint8, stem).

    The image follows the release's test.py (full decode, Resize((testsize, testsize)), ToTensor,
    Normalize); `fast_decode=True` decodes JPEGs at reduced scale and resizes as TrainDataset does.
    Masks are always decoded in full. Batch with `eval_collate`, since masks differ in size.
    """

    def __init__(self, source: str | os.PathLike | Sequence[Pair], testsize: int = 992, *,
                 fast_decode: bool = False, on_bad: str = "skip") -> None:
        """Pair `source` (a split folder, or a list of Samples) and build the image transform."""
        self.samples = _as_samples(source, on_bad)
        self.on_bad = on_bad
        self.testsize = int(testsize)
        self.fast_decode = fast_decode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, np.ndarray, str] | BadSample:
        """(image 3xSxS, mask HxW uint8 at its file's size, stem) of pair `index` (or a BadSample, as TrainDataset)."""
        sample = self.samples[index]
        try:
            image = read_rgb(sample.image, min_side=self.testsize if self.fast_decode else None)
            mask = read_mask(sample.gt)
        except ImageReadError as e:
            return _undecodable(e, self.on_bad)
        return image_tensor(image, self.testsize, exact=not self.fast_decode), np.asarray(mask), sample.stem


def eval_collate(batch: list[tuple[torch.Tensor, np.ndarray, str] | BadSample],
                 ) -> tuple[torch.Tensor | None, list[np.ndarray], list[str], list[str]]:
    """Stack EvalDataset images; keep the masks (of different sizes), the stems and bad samples' reasons as lists."""
    good = [b for b in batch if not isinstance(b, BadSample)]
    bad = [b.reason for b in batch if isinstance(b, BadSample)]
    if not good:
        return None, [], [], bad
    images, masks, stems = zip(*good)
    return torch.stack(images), list(masks), list(stems), bad


def train_collate(batch: list[tuple[torch.Tensor, torch.Tensor] | BadSample],
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """(images, masks, reasons): the decodable samples stacked (None when there is none) and why others failed."""
    good = [b for b in batch if not isinstance(b, BadSample)]
    bad = [b.reason for b in batch if isinstance(b, BadSample)]
    if not good:
        return None, None, bad
    images, masks = default_collate(good)
    return images, masks, bad
