"""test.py on a video file: frames predicted in order and written as a video of the same frame rate and size.

Every frame goes through the image pipeline's pre- and post-processing (PIL resize to testsize, the
runtime's `predict`, bilinear back to the frame's size, per-frame min-max) and utils.cutout's save
modes. The output is `<save_root>/<stem>.mp4` (MPEG-4 Part 2, `mp4v`, which OpenCV's own FFmpeg writes
on every platform); `rgba` writes `<save_root>/<stem>/<stem>_000000.png`, ... since the common
containers carry no alpha. The writer is released in a `finally`, so Ctrl-C (or any error) leaves the
frames written so far in a playable file. A cut or corrupt file stops at the last readable frame with a
warning and counts as a failure (exit 1).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipelines.inference import (
    InferenceError,
    InferenceOptions,
    InferenceSummary,
    check_options,
    logits_to_map,
    output_style,
    predict_logits,
)
from utils.atomic import remove_stale_temps
from utils.cutout import OutputStyle, compose
from utils.data import image_tensor
from utils.imageio import write_png

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm"})
OUTPUT_SUFFIX = ".mp4"
OUTPUT_FOURCC = "mp4v"
FALLBACK_FPS = 25.0  # when the container states no frame rate
# Containers that store no frame count get one estimated from duration x fps: allow that much slack
# before calling a short read a cut file.
COUNT_SLACK = 1


@dataclass(frozen=True)
class VideoJob:
    """One video file and where its output goes: a video file, or a folder of PNGs for rgba."""

    source: Path
    target: Path
    png_sequence: bool = False  # rgba: PNG files in the folder `target` (video containers carry no alpha)


def is_video(path: str | os.PathLike) -> bool:
    """Whether `path` names a file with a video extension test.py reads."""
    path = Path(path)
    return path.suffix.lower() in VIDEO_EXTENSIONS and not path.is_dir()


def video_target(source: str | os.PathLike, save_root: str | os.PathLike, mode: str) -> Path:
    """Where the output of `source` in save mode `mode` goes: `<save_root>/<stem>.mp4`, or for rgba the folder
    `<save_root>/<stem>`."""
    stem = Path(source).stem
    return Path(save_root) / (stem if mode == "rgba" else stem + OUTPUT_SUFFIX)


def video_job(source: str | os.PathLike, save_root: str | os.PathLike, mode: str) -> VideoJob:
    """The job for one video file; refused (before any model is loaded) when it is missing, cannot be opened,
    or the output would overwrite it."""
    source = Path(source)
    if not source.is_file():
        raise InferenceError(f"{source}: video file not found; check --input")
    target = video_target(source, save_root, mode)
    if target.resolve() == source.resolve():
        raise InferenceError(f"{target}: the output would overwrite the input video; choose another --save_root")
    capture = open_video(source)[0]
    try:
        if not capture.read()[0]:
            raise InferenceError(f"{source}: no frame can be decoded (cut or corrupt, or a codec this OpenCV build "
                                 "cannot read); check the file")
    finally:
        capture.release()
    return VideoJob(source, target, png_sequence=mode == "rgba")


def open_video(path: Path) -> tuple[cv2.VideoCapture, float, int]:
    """(capture, frame rate, frame count) as the container states them (0 if it does not); refused if unreadable."""
    # FFmpeg's own log lines (a cut file's "overread", "File ended prematurely") would bypass our one
    # warning; read when OpenCV's FFmpeg backend starts, so set before the first capture.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not capture.isOpened():
        raise InferenceError(f"{path}: cannot open the video (not a video, or an mp4/mov cut before its index "
                             "was written); check the file")
    fps, count = (capture.get(p) for p in (cv2.CAP_PROP_FPS, cv2.CAP_PROP_FRAME_COUNT))
    return capture, _positive(fps), int(_positive(count))


def _positive(value: float) -> float:
    """`value` when it is a finite positive number, else 0 (OpenCV's answer for a property it does not know)."""
    return value if math.isfinite(value) and value > 0 else 0.0


class FrameSink:
    """Writes output frames in order: a video file (opened at the first frame) or a folder of PNGs."""

    def __init__(self, job: VideoJob, fps: float) -> None:
        """Frames of `job` at `fps`; nothing is created before the first frame."""
        self.job = job
        self.fps = fps
        self.writer: cv2.VideoWriter | None = None
        self.written = 0

    def write(self, frame: np.ndarray) -> None:
        """Append one H x W (map), H x W x 3 (RGB) or H x W x 4 (RGBA, PNG sequence) uint8 frame."""
        if self.job.png_sequence:
            write_png(frame, self.job.target / f"{self.job.source.stem}_{self.written:06d}.png")
        else:
            if self.writer is None:
                self.writer = self._open(frame.shape[1], frame.shape[0])
            code = cv2.COLOR_GRAY2BGR if frame.ndim == 2 else cv2.COLOR_RGB2BGR
            self.writer.write(cv2.cvtColor(frame, code))
        self.written += 1

    def _open(self, width: int, height: int) -> cv2.VideoWriter:
        """The video writer for frames of `width` x `height`."""
        self.job.target.parent.mkdir(parents=True, exist_ok=True)
        writer = cv2.VideoWriter(str(self.job.target), cv2.VideoWriter_fourcc(*OUTPUT_FOURCC), self.fps,
                                 (width, height))
        if not writer.isOpened():
            raise InferenceError(f"{self.job.target}: OpenCV cannot write an {OUTPUT_FOURCC} video here; "
                                 "check --save_root, or use --save_mode rgba for PNG frames")
        return writer

    def close(self) -> None:
        """Finish the file (an mp4 is playable only once its index is written) and release it."""
        if self.writer is not None:
            self.writer.release()
            self.writer = None


def _read_frames(capture: cv2.VideoCapture, count: int) -> list[np.ndarray]:
    """Up to `count` next frames as H x W x 3 uint8 RGB (fewer at the end of the file)."""
    frames = []
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    return frames


def _predict_frames(model: torch.nn.Module, frames: list[np.ndarray], options: InferenceOptions,
                    style: OutputStyle, sink: FrameSink) -> None:
    """Predict one batch of frames and write what `style` makes of each."""
    images = torch.stack([image_tensor(Image.fromarray(f), options.testsize) for f in frames])
    logits = predict_logits(model, images, options)
    with torch.inference_mode():
        for frame, frame_logits in zip(frames, logits):
            sink.write(compose(logits_to_map(frame_logits, frame.shape[:2]), frame, style))


def predict_video(model: torch.nn.Module, job: VideoJob, options: InferenceOptions,
                  summary: InferenceSummary | None = None, style: OutputStyle | None = None) -> InferenceSummary:
    """Write the output of every frame of `job` in order; `summary.written` counts frames as they are written.

    A file that ends before the frame count its container states is named in `summary.failed`.
    `style`: what is written per frame (default: from `options`).
    """
    check_options(options)
    style = output_style(options) if style is None else style
    summary = InferenceSummary() if summary is None else summary
    start = time.perf_counter()
    capture, fps, count = open_video(job.source)
    if not fps:
        log.warning("%s: the container states no frame rate; writing %g frames/s", job.source, FALLBACK_FPS)
        fps = FALLBACK_FPS
    model.eval()
    if job.png_sequence:
        job.target.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(job.target, (".png",))
    sink = FrameSink(job, fps)
    try:
        with tqdm(total=count or None, desc=job.source.name, unit="frame", dynamic_ncols=True) as bar:
            while frames := _read_frames(capture, options.batch_size):
                _predict_frames(model, frames, options, style, sink)
                summary.written += len(frames)
                bar.update(len(frames))
    finally:
        sink.close()
        capture.release()
        summary.seconds += time.perf_counter() - start
    _check_complete(job, summary, count)
    return summary


def _check_complete(job: VideoJob, summary: InferenceSummary, count: int) -> None:
    """Warn and record a failure when fewer frames were readable than the container states."""
    if summary.written < max(1, count - COUNT_SLACK):
        reason = (f"{job.source}: stopped at frame {summary.written} of {count}: the rest cannot be decoded "
                  f"(cut or corrupt file); the {summary.written} frames before it are in {job.target}")
        log.warning("%s", reason)
        summary.failed.append((job.source, reason))
