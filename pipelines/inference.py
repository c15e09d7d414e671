"""Prediction maps as the authors' test.py writes them, for DIS5K splits and for any folder of images.

The default pipeline is the release's: PIL RGB, torchvision `Resize((s, s))` on the PIL image
(antialiased bilinear), ImageNet normalisation, model, P1 only, bilinear back to the image's own
size (align_corners=False), sigmoid, per-image min-max, `x * 255` rounded to uint8, 8-bit PNG named
`<image stem>.png`.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lib.checkpoint import checkpoint_radius
from lib.frequency import MIN_KEPT_FRACTION, narrow_band_sizes, scaled_radius
from utils.atomic import remove_stale_temps
from utils.cutout import IMAGE_BACKGROUND, SAVE_MODES, OutputStyle, load_background, write_output
from utils.data import image_tensor
from utils.device import AMP_CHOICES, amp_dtype, autocast
from utils.dis5k import expected_folders, split_folders
from utils.errors import FSANetError, listing
from utils.export_cache import ExportSpec, RuntimeUnavailable
from utils.imageio import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    image_size,
    is_readable_png,
    list_images,
    read_rgb,
)
from utils.runtimes import choose_runtime, load_runner

log = logging.getLogger(__name__)

MIN_MAX_EPS = 1e-8  # the release's `(x - min) / (max - min + 1e-8)`


class InferenceError(FSANetError):
    """A problem with the inference inputs or options; the message names the cause and the fix."""


@dataclass(frozen=True)
class InferenceOptions:
    """How images are read, run through the model and written."""

    testsize: int = 992
    device: torch.device = torch.device("cpu")
    batch_size: int = 1
    num_workers: int = 0
    amp: str = "none"
    fast_decode: bool = False
    skip_existing: bool = False
    save_mode: str = "map"  # utils.cutout.SAVE_MODES, or IMAGE_BACKGROUND for --background
    refine_foreground: bool = True  # estimate foreground colours for rgba and the new backgrounds
    background: Path | None = None  # --background IMAGE (save_mode IMAGE_BACKGROUND)


@dataclass(frozen=True)
class Job:
    """One folder of images and the folder its maps go to."""

    name: str
    images: tuple[Path, ...]
    save_dir: Path
    exif: bool = False  # apply EXIF orientation (--input mode); DIS5K mode reads pixels as the release


@dataclass
class InferenceSummary:
    """What a run did: maps written, maps skipped because they existed, images that failed."""

    written: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class LoadedImage:
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
    failures: list[LoadedImage]

    def __len__(self) -> int:
        return len(self.indices) + len(self.failures)

    def pin_memory(self) -> Batch:
        """This batch with its images in pinned memory; the DataLoader calls it when pin_memory=True.

        Without it torch's pin_memory returns the dataclass unchanged and the non_blocking copy to the
        GPU is synchronous.
        """
        return replace(self, images=None if self.images is None else self.images.pin_memory())


def check_options(options: InferenceOptions) -> None:
    """Reject option values the model or the loader cannot run with."""
    if options.testsize <= 0 or options.testsize % 32:
        raise InferenceError(f"--testsize {options.testsize}: must be a positive multiple of 32 (release: 992)")
    if options.batch_size < 1:
        raise InferenceError(f"--batch_size {options.batch_size}: must be at least 1")
    if options.num_workers < 0:
        raise InferenceError(f"--num_workers {options.num_workers}: must be 0 or more")
    if options.save_mode not in (*SAVE_MODES, IMAGE_BACKGROUND):
        raise InferenceError(f"--save_mode {options.save_mode}: choose one of {', '.join(SAVE_MODES)}")
    if (options.save_mode == IMAGE_BACKGROUND) != (options.background is not None):
        raise InferenceError("--background IMAGE sets the output itself; pass it without --save_mode")
    if options.amp not in AMP_CHOICES:
        raise InferenceError(f"--amp {options.amp}: choose one of {', '.join(AMP_CHOICES)}")
    if options.amp == "fp16" and options.device.type == "cpu":
        # CPU fp16 convolutions run many times slower than fp32 (benchmark.py), bf16 ones faster.
        raise InferenceError("--amp fp16: the CPU has no fast fp16 kernels (many times slower than fp32); "
                             "use --amp bf16 on CPU")


def folder_job(input_dir: str | os.PathLike, save_dir: str | os.PathLike, name: str | None = None,
               exif: bool = False) -> Job:
    """Every image directly in `input_dir`, mapped to `<save_dir>/<stem>.png`; `exif`: apply EXIF orientation."""
    input_dir, save_dir = Path(input_dir), Path(save_dir)
    if input_dir.is_file():
        raise InferenceError(f"--input {input_dir}: is a file, not a folder; --input takes a folder of images "
                             "or a video file (mp4, m4v, mov, avi, mkv, webm)")
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
    _note_ignored_files(input_dir, images)
    return Job(name or input_dir.name, tuple(images), save_dir, exif)


def _note_ignored_files(input_dir: Path, images: Sequence[Path]) -> None:
    """Say which files of the folder are not predicted (a .gif, a .heic), so none is skipped silently."""
    kept = set(images)
    ignored = sorted(p.name for p in input_dir.iterdir()
                     if p not in kept and not p.name.startswith(".") and p.is_file())
    if ignored:
        log.warning("%s: ignoring %d file(s) that are not a supported image type (%s): %s", input_dir,
                    len(ignored), " ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS)), listing(ignored))


def split_image_dir(split: Path) -> Path:
    """The image folder of a DIS5K split (`im/`, or the release's `Imgs/`); masks are not needed here."""
    if not split.is_dir():
        raise InferenceError(f"{split}: split folder not found; check --data_root and --datasets")
    found = split_folders(split, masks=False)
    if found is None:
        raise InferenceError(f"{split}: no image folder {expected_folders(masks=False)} inside it; "
                             "use --input DIR for a plain folder")
    return found[0]


def dis5k_jobs(data_root: str | os.PathLike, datasets: Sequence[str], save_root: str | os.PathLike) -> list[Job]:
    """One job per DIS5K split: `<data_root>/<name>/im` (or `Imgs`) into `<save_root>/<name>/`."""
    if not datasets:
        raise InferenceError("--datasets: name at least one split, e.g. DIS-VD")
    data_root, save_root = Path(data_root), Path(save_root)
    if not data_root.is_dir():
        raise InferenceError(f"{data_root}: DIS5K folder not found; pass --data_root or --input DIR")
    return [folder_job(split_image_dir(data_root / name), save_root / name, name=name) for name in datasets]


def load_model(pth_path: str | os.PathLike, freq_encoder: str, device: torch.device,
               amp: str = "none") -> nn.Module:
    """FSANet with the checkpoint's weights, on `device`, prepared for inference (for `amp` too)."""
    # Imported here: the model pulls in timm and torchvision, which the exported runtimes never need.
    from lib import fsanet_from_checkpoint
    from lib.fast import optimize_for_inference

    model = fsanet_from_checkpoint(pth_path, freq_encoder)
    return optimize_for_inference(model.to(device), autocast_dtype=amp_dtype(amp))


def load_predictor(pth_path: str | os.PathLike, freq_encoder: str, options: InferenceOptions, runtime: str = "torch",
                   cache_dir: str | os.PathLike | None = None) -> object:
    """The model under `runtime` (auto, torch, openvino, onnxruntime): an exported runner or the PyTorch model.

    `auto` falls back to PyTorch with a warning when the exported runtime is unavailable; an explicit
    runtime that fails is an InferenceError (exit 2).
    """
    chosen = choose_runtime(runtime, options.device)
    if chosen != "torch":
        warn_narrow_band(checkpoint_radius(pth_path), options.testsize)
        if options.device.type != "cpu":
            raise InferenceError(f"--runtime {chosen} runs on the CPU here; pass --device cpu or --runtime torch")
        try:
            return load_runner(chosen, ExportSpec(pth_path, options.testsize, freq_encoder), options.amp, cache_dir)
        except RuntimeUnavailable as e:
            if runtime != "auto":
                raise InferenceError(str(e)) from None
            log.warning("%s; falling back to --runtime torch", e)
    model = load_model(pth_path, freq_encoder, options.device, options.amp)
    if chosen == "torch":
        warn_narrow_band(float(model.frequency.radius), options.testsize)
    return model


class ImageListDataset(Dataset):
    """Reads, resizes and normalises images; an unreadable file becomes a LoadedImage with an error."""

    def __init__(self, paths: Sequence[Path], testsize: int, fast_decode: bool = False, exif: bool = False) -> None:
        """Images `paths`, resized to `testsize` square; `fast_decode` allows reduced JPEG decoding; `exif`
        applies the EXIF orientation (the map then has the displayed orientation)."""
        self.paths = list(paths)
        self.testsize = testsize
        self.fast_decode = fast_decode
        self.exif = exif

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> LoadedImage:
        """The model input and file size of image `index`, or why it cannot be read."""
        path = self.paths[index]
        try:
            image = read_rgb(path, min_side=self.testsize if self.fast_decode else None, exif=self.exif)
            # Reduced JPEG decoding shrinks the decoded image; the map keeps the file's own size.
            width, height = image_size(path, exif=self.exif) if self.fast_decode else image.size
        except ImageReadError as e:
            return LoadedImage(index, None, (0, 0), str(e))
        return LoadedImage(index, image_tensor(image, self.testsize, exact=not self.fast_decode), (height, width))


def collate_samples(samples: list[LoadedImage]) -> Batch:
    """Stack the readable samples (all testsize square) and keep the failures apart."""
    ok = [s for s in samples if s.error is None]
    return Batch(
        indices=[s.index for s in ok],
        images=torch.stack([s.image for s in ok]) if ok else None,
        sizes=[s.size for s in ok],
        failures=[s for s in samples if s.error is not None],
    )


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


def output_style(options: InferenceOptions) -> OutputStyle:
    """What the pipeline writes per image, with the --background image read once (exit 2 if unreadable)."""
    background = load_background(options.background) if options.background is not None else None
    return OutputStyle(options.save_mode, options.refine_foreground, background)


def predict_job(model: nn.Module, job: Job, options: InferenceOptions,
                summary: InferenceSummary | None = None, style: OutputStyle | None = None) -> InferenceSummary:
    """Write the map of every image of `job`; unreadable images are logged and counted, not fatal.

    `summary` is updated as maps are written, so a caller interrupted midway knows what was done.
    `style`: what is written (default: from `options`).
    """
    start = time.perf_counter()
    style = output_style(options) if style is None else style
    summary = InferenceSummary() if summary is None else summary
    remove_stale_temps(job.save_dir, (".png",))
    todo = list(job.images)
    if options.skip_existing:
        # An empty or cut map (written by another tool; ours are atomic) counts as missing.
        todo = [p for p in todo if not is_readable_png(map_path(job.save_dir, p))]
        summary.skipped += len(job.images) - len(todo)
    if not todo:
        log.info("%s: all %d maps exist, nothing to do", job.name, len(job.images))
        return summary
    try:
        job.save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InferenceError(f"{job.save_dir}: cannot create the output folder ({e.strerror}); "
                             "choose another --save_root") from None
    loader = DataLoader(
        ImageListDataset(todo, options.testsize, options.fast_decode, job.exif),
        batch_size=options.batch_size, shuffle=False, num_workers=options.num_workers,
        collate_fn=collate_samples, pin_memory=options.device.type == "cuda",
    )
    with tqdm(total=len(todo), desc=job.name, unit="img", dynamic_ncols=True) as bar:
        for batch in loader:
            _record_failures(batch, todo, summary)
            if batch.images is not None:
                _predict_batch(model, batch, todo, job, options, style, summary)
            bar.update(len(batch))
    summary.seconds += time.perf_counter() - start
    return summary


def _record_failures(batch: Batch, paths: Sequence[Path], summary: InferenceSummary) -> None:
    """Log and count the images of `batch` that could not be read."""
    for sample in batch.failures:
        log.warning("skipped %s", sample.error)
        summary.failed.append((paths[sample.index], sample.error))


def predict_logits(model: nn.Module, images: torch.Tensor, options: InferenceOptions) -> torch.Tensor:
    """P1 logits of a B x 3 x S x S batch on `options.device` under `options.amp` (any runtime's predictor)."""
    images = images.to(options.device, non_blocking=True)
    with torch.inference_mode(), autocast(options.device, options.amp):
        return model.predict(images)


def _predict_batch(model: nn.Module, batch: Batch, paths: Sequence[Path], job: Job, options: InferenceOptions,
                   style: OutputStyle, summary: InferenceSummary) -> None:
    """Run the model on one batch and write one output per image at that image's own size."""
    p1 = predict_logits(model, batch.images, options)
    with torch.inference_mode():
        for logits, index, size in zip(p1, batch.indices, batch.sizes):
            target = map_path(job.save_dir, paths[index])
            try:
                write_output(logits_to_map(logits, size), paths[index], target, style, job.exif)
            except (OSError, ImageReadError) as e:  # rgba/overlay read the image again
                log.warning("could not write %s: %s", target, e)
                summary.failed.append((paths[index], f"{target}: cannot write map ({e})"))
                continue
            summary.written += 1


def warn_narrow_band(radius: float | None, testsize: int) -> None:
    """Warn when the checkpoint's radius leaves (almost) no high-pass band at --testsize."""
    if radius is None:
        return
    narrow = narrow_band_sizes({"--testsize": testsize}, radius)
    if not narrow:
        return
    # A disc of radius r removes pi r^2 of the S^2 bins (less once it overflows the square), so S >= r *
    # sqrt(pi / (1 - MIN_KEPT_FRACTION)) keeps enough.
    enough = int(np.ceil(radius * np.sqrt(np.pi / (1 - MIN_KEPT_FRACTION)) / 32) * 32)
    log.warning("the checkpoint's frequency.radius %g leaves the high-pass band empty or nearly so at %s: the "
                "frequency encoder sees an (almost) constant image. Use --testsize %d or more, or a checkpoint "
                "trained with train.py --radius %g (100 * testsize / 992, the release's share of the spectrum)",
                radius, narrow[0], enough, scaled_radius(testsize))


def predict_jobs(model: nn.Module, jobs: Sequence[Job], options: InferenceOptions,
                 total: InferenceSummary | None = None, style: OutputStyle | None = None) -> InferenceSummary:
    """Run every job with one model; the summary (`total`, updated live when given) covers all of them.

    `style`: what is written per image (default: from `options`; pass it to read --background only once).
    """
    check_options(options)
    style = output_style(options) if style is None else style
    model.eval()
    total = InferenceSummary() if total is None else total
    saved = torch.backends.cudnn.benchmark
    # Every batch has the same testsize x testsize shape, so cuDNN's autotuning pays off; restored afterwards
    # because the flag is global and an in-process caller (a training run, a test) may rely on its own setting.
    torch.backends.cudnn.benchmark = saved or options.device.type == "cuda"
    try:
        for job in jobs:
            predict_job(model, job, options, total, style)
    finally:
        torch.backends.cudnn.benchmark = saved
    return total
