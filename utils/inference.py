"""Prediction maps as the authors' test.py writes them, for DIS5K splits and for any folder of images.

The default pipeline is the release's: PIL RGB, torchvision `Resize((s, s))` on the PIL image
(antialiased bilinear), ImageNet normalisation, model, P1 only, bilinear back to the image's own
size (align_corners=False), sigmoid, per-image min-max, `x * 255` rounded to uint8, 8-bit PNG named
`<image stem>.png`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lib import FSANet, load_checkpoint
from lib.fast import optimize_for_inference
from utils.cutout import SAVE_MODES, write_output
from utils.data import image_tensor
from utils.dis5k import SPLIT_LAYOUTS
from utils.distributed import DeviceError, resolve_device
from utils.imageio import IMAGE_EXTENSIONS, ImageReadError, image_size, list_images, read_rgb

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MIN_MAX_EPS = 1e-8  # the release's `(x - min) / (max - min + 1e-8)`


class InferenceError(Exception):
    """A problem with the inference inputs or options; the message names the cause and the fix."""


@dataclass(frozen=True)
class InferenceOptions:
    """How images are read, run through the model and written."""

    testsize: int = 992
    device: torch.device = torch.device("cpu")
    batch_size: int = 1
    num_workers: int = 0
    amp: str | None = None
    fast_decode: bool = False
    skip_existing: bool = False
    save_mode: str = "map"  # utils.cutout.SAVE_MODES: the map, an RGBA cutout or an overlay


@dataclass(frozen=True)
class Job:
    """One folder of images and the folder its maps go to."""

    name: str
    images: tuple[Path, ...]
    save_dir: Path


@dataclass
class InferenceSummary:
    """What a run did: maps written, maps skipped because they existed, images that failed."""

    written: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    def merge(self, other: InferenceSummary) -> None:
        """Add another run's counts to this one."""
        self.written += other.written
        self.skipped += other.skipped
        self.failed.extend(other.failed)
        self.seconds += other.seconds


@dataclass
class Sample:
    """One decoded, resized and normalised image, or the reason it could not be read."""

    index: int
    image: torch.Tensor | None
    size: tuple[int, int]  # (height, width) of the image file, the size its map gets
    error: str | None = None


@dataclass
class Batch:
    """Readable samples stacked for the model, plus the samples that failed to read."""

    indices: list[int]
    images: torch.Tensor | None
    sizes: list[tuple[int, int]]
    failures: list[Sample]

    def __len__(self) -> int:
        """Number of images in the batch, readable or not."""
        return len(self.indices) + len(self.failures)


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; any other name is checked (utils.distributed.resolve_device)."""
    try:
        return resolve_device(name)
    except DeviceError as e:
        raise InferenceError(str(e)) from None


def check_options(options: InferenceOptions) -> None:
    """Reject option values the model or the loader cannot run with."""
    if options.testsize <= 0 or options.testsize % 32:
        raise InferenceError(f"--testsize {options.testsize}: must be a positive multiple of 32 (release: 992)")
    if options.batch_size < 1:
        raise InferenceError(f"--batch_size {options.batch_size}: must be at least 1")
    if options.num_workers < 0:
        raise InferenceError(f"--num_workers {options.num_workers}: must be 0 or more")
    if options.save_mode not in SAVE_MODES:
        raise InferenceError(f"--save_mode {options.save_mode}: choose one of {', '.join(SAVE_MODES)}")
    if options.amp is not None and options.amp not in AMP_DTYPES:
        raise InferenceError(f"--amp {options.amp}: choose one of {', '.join(AMP_DTYPES)}")
    if options.amp == "fp16" and options.device.type == "cpu":
        # Measured: CPU fp16 convolutions run ~30x slower than fp32, bf16 ones faster.
        raise InferenceError("--amp fp16: CPU has no fast fp16 kernels (about 30x slower than fp32); "
                             "use --amp bf16 on CPU")


def folder_job(input_dir: str | os.PathLike, save_dir: str | os.PathLike, name: str | None = None) -> Job:
    """Every image directly in `input_dir`, mapped to `<save_dir>/<stem>.png`."""
    input_dir, save_dir = Path(input_dir), Path(save_dir)
    try:
        images = list_images(input_dir)
    except FileNotFoundError:
        raise InferenceError(f"{input_dir}: input folder not found; check the path") from None
    if not images:
        raise InferenceError(f"{input_dir}: no images found (looked for "
                             f"{', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}); check the path")
    if save_dir.resolve() == input_dir.resolve():
        raise InferenceError(f"{save_dir}: maps would overwrite the input images; choose another --save_root")
    clashes = sorted(stem for stem, n in Counter(p.stem for p in images).items() if n > 1)
    if clashes:
        names = ", ".join(p.name for p in images if p.stem in clashes[:3])
        raise InferenceError(f"{input_dir}: images share a file stem and would write the same map ({names}); "
                             "rename or move one of each")
    return Job(name or input_dir.name, tuple(images), save_dir)


def split_image_dir(split: Path) -> Path:
    """The image folder of a DIS5K split (`im/`, or the release's `Imgs/`); masks are not needed here."""
    if not split.is_dir():
        raise InferenceError(f"{split}: split folder not found; check --data_root and --datasets")
    for image_name, _ in SPLIT_LAYOUTS:
        if (split / image_name).is_dir():
            return split / image_name
    names = " or ".join(f"{image_name}/" for image_name, _ in SPLIT_LAYOUTS)
    raise InferenceError(f"{split}: no image folder {names} inside it; use --input DIR for a plain folder")


def dis5k_jobs(data_root: str | os.PathLike, datasets: Sequence[str], save_root: str | os.PathLike) -> list[Job]:
    """One job per DIS5K split: `<data_root>/<name>/im` (or `Imgs`) into `<save_root>/<name>/`."""
    if not datasets:
        raise InferenceError("--datasets: name at least one split, e.g. DIS-VD")
    data_root, save_root = Path(data_root), Path(save_root)
    if not data_root.is_dir():
        raise InferenceError(f"{data_root}: DIS5K folder not found; pass --data_root or --input DIR")
    return [folder_job(split_image_dir(data_root / name), save_root / name, name=name) for name in datasets]


def load_model(pth_path: str | os.PathLike, freq_encoder: str, device: torch.device,
               amp: str | None = None) -> nn.Module:
    """FSANet with the checkpoint's weights, on `device`, prepared for inference (for `amp` too)."""
    model = FSANet(freq_encoder=freq_encoder)
    load_checkpoint(model, pth_path)
    return optimize_for_inference(model.to(device), autocast_dtype=AMP_DTYPES[amp] if amp else None)


class ImageListDataset(Dataset):
    """Reads, resizes and normalises images; an unreadable file becomes a Sample with an error."""

    def __init__(self, paths: Sequence[Path], testsize: int, fast_decode: bool = False) -> None:
        """Images `paths`, resized to `testsize` square; `fast_decode` allows reduced JPEG decoding."""
        self.paths = list(paths)
        self.testsize = testsize
        self.fast_decode = fast_decode

    def __len__(self) -> int:
        """Number of images."""
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        """The model input and file size of image `index`, or why it cannot be read."""
        path = self.paths[index]
        try:
            image = read_rgb(path, min_side=self.testsize if self.fast_decode else None)
            # Reduced JPEG decoding shrinks the decoded image; the map keeps the file's own size.
            width, height = image_size(path) if self.fast_decode else image.size
        except ImageReadError as e:
            return Sample(index, None, (0, 0), str(e))
        return Sample(index, image_tensor(image, self.testsize, exact=not self.fast_decode), (height, width))


def collate_samples(samples: list[Sample]) -> Batch:
    """Stack the readable samples (all testsize square) and keep the failures apart."""
    ok = [s for s in samples if s.error is None]
    return Batch(
        indices=[s.index for s in ok],
        images=torch.stack([s.image for s in ok]) if ok else None,
        sizes=[s.size for s in ok],
        failures=[s for s in samples if s.error is not None],
    )


def autocast(device: torch.device, amp: str | None) -> ContextManager:
    """Mixed precision when `amp` names a dtype (bf16, fp16), else (None or "none") a no-op."""
    if amp is None or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def logits_to_map(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One 1 x s x s P1 logit map -> uint8 map of `size` (h, w), exactly as the release post-processes."""
    x = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    # In place: a full-resolution float map of a large photo is hundreds of MB.
    x.sigmoid_()
    lo, hi = x.min(), x.max()
    x.sub_(lo).div_(hi - lo + MIN_MAX_EPS).mul_(255.0).round_()
    return x.to(torch.uint8).cpu().numpy()


def map_path(save_dir: Path, image: Path) -> Path:
    """Where the map of `image` goes."""
    return save_dir / f"{image.stem}.png"


def predict_job(model: nn.Module, job: Job, options: InferenceOptions) -> InferenceSummary:
    """Write the map of every image of `job`; unreadable images are logged and counted, not fatal."""
    start = time.perf_counter()
    summary = InferenceSummary()
    todo = list(job.images)
    if options.skip_existing:
        todo = [p for p in todo if not map_path(job.save_dir, p).is_file()]
        summary.skipped = len(job.images) - len(todo)
    if not todo:
        log.info("%s: all %d maps exist, nothing to do", job.name, summary.skipped)
        return summary
    try:
        job.save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InferenceError(f"{job.save_dir}: cannot create the output folder ({e.strerror}); "
                             "choose another --save_root") from None
    loader = DataLoader(
        ImageListDataset(todo, options.testsize, options.fast_decode),
        batch_size=options.batch_size, shuffle=False, num_workers=options.num_workers,
        collate_fn=collate_samples, pin_memory=options.device.type == "cuda",
    )
    with tqdm(total=len(todo), desc=job.name, unit="img", dynamic_ncols=True) as bar:
        for batch in loader:
            _record_failures(batch, todo, summary)
            if batch.images is not None:
                _predict_batch(model, batch, todo, job.save_dir, options, summary)
            bar.update(len(batch))
    summary.seconds = time.perf_counter() - start
    return summary


def _record_failures(batch: Batch, paths: Sequence[Path], summary: InferenceSummary) -> None:
    """Log and count the images of `batch` that could not be read."""
    for sample in batch.failures:
        log.warning("skipped %s", sample.error)
        summary.failed.append((paths[sample.index], sample.error))


def _predict_batch(model: nn.Module, batch: Batch, paths: Sequence[Path], save_dir: Path,
                   options: InferenceOptions, summary: InferenceSummary) -> None:
    """Run the model on one batch and write one map per image at that image's own size."""
    images = batch.images.to(options.device, non_blocking=True)
    with torch.inference_mode(), autocast(options.device, options.amp):
        p1 = model.predict(images)
    with torch.inference_mode():
        for logits, index, size in zip(p1, batch.indices, batch.sizes):
            target = map_path(save_dir, paths[index])
            try:
                write_output(logits_to_map(logits, size), paths[index], target, options.save_mode)
            except (OSError, ImageReadError) as e:  # rgba/overlay read the image again
                log.warning("could not write %s: %s", target, e)
                summary.failed.append((paths[index], f"{target}: cannot write map ({e})"))
                continue
            summary.written += 1


def predict_jobs(model: nn.Module, jobs: Sequence[Job], options: InferenceOptions) -> InferenceSummary:
    """Run every job with one model; the summary covers all of them."""
    check_options(options)
    model.eval()
    if options.device.type == "cuda":
        # Every batch has the same testsize x testsize shape, so cuDNN's autotuning pays off.
        torch.backends.cudnn.benchmark = True
    total = InferenceSummary()
    for job in jobs:
        total.merge(predict_job(model, job, options))
    return total
