"""test.py on video files: every frame predicted in order, written at the same frame rate and size in each
mode; cut files, refusals and Ctrl-C. Clips are written by OpenCV in the tests (96 x 64, 12 frames/s)."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from test_inference import SMALL, assert_one_error_line, run_main
from test_reliability import interruptible

from pipelines import inference, video

WIDTH, HEIGHT, FPS = 96, 64, 12.0


def write_clip(path: Path, frames: int, fourcc: str = "MJPG") -> list[np.ndarray]:
    """A clip of a disc moving over a gradient; returns the RGB frames written."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (WIDTH, HEIGHT))
    assert writer.isOpened(), fourcc
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    written = []
    for i in range(frames):
        rgb = np.stack([xx * 2, yy * 3, np.full_like(xx, 90)], -1).astype(np.uint8)
        cv2.circle(rgb, (16 + 9 * (i % 8), 30), 14, (250, 220, 40), -1)
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        written.append(rgb)
    writer.release()
    return written


def read_clip(path: Path) -> tuple[list[np.ndarray], float]:
    """Every decodable frame of a video (RGB) and its frame rate."""
    capture = cv2.VideoCapture(str(path))
    fps, frames = capture.get(cv2.CAP_PROP_FPS), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames, fps


@pytest.fixture(scope="module")
def model(release_model: torch.nn.Module) -> torch.nn.Module:
    """The PyTorch model test.py runs with --runtime torch (the session's release_model)."""
    return release_model


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """6 frames as an MJPG AVI, and the frames as PNG files for the image pipeline to compare with."""
    folder = tmp_path_factory.mktemp("clip")
    written = write_clip(folder / "clip.avi", 6)
    decoded, _ = read_clip(folder / "clip.avi")
    (folder / "frames").mkdir()
    for i, frame in enumerate(decoded):
        Image.fromarray(frame).save(folder / "frames" / f"f{i}.png")
    assert len(decoded) == len(written) == 6
    return folder / "clip.avi", decoded


@pytest.fixture(scope="module")
def frame_maps(model: torch.nn.Module, clip, tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """The image pipeline's maps of the clip's decoded frames: what each video frame's map must be."""
    source, _ = clip
    out = tmp_path_factory.mktemp("frame_maps")
    options = inference.InferenceOptions(testsize=int(SMALL), batch_size=6)
    inference.predict_jobs(model, [inference.folder_job(source.parent / "frames", out)], options)
    return [np.asarray(Image.open(out / f"f{i}.png")) for i in range(6)]


def run_video(model: torch.nn.Module, source: Path, out: Path, mode: str) -> video.VideoJob:
    """predict_video in `mode` at the tests' size; asserts every frame was written."""
    job = video.video_job(source, out, mode)
    options = inference.InferenceOptions(testsize=int(SMALL), batch_size=6, save_mode=mode)
    summary = video.predict_video(model, job, options)
    assert summary.written == 6 and not summary.failed, mode
    return job


def test_video_maps_are_the_frames_maps_in_order(model: torch.nn.Module, clip, frame_maps, tmp_path: Path) -> None:
    job = run_video(model, clip[0], tmp_path, "map")
    assert job.target == tmp_path / "clip.mp4"
    frames, fps = read_clip(job.target)
    assert len(frames) == 6 and fps == FPS and frames[0].shape == (HEIGHT, WIDTH, 3)
    for frame, reference in zip(frames, frame_maps):  # lossy mp4v: close, not equal
        assert np.abs(frame[..., 0].astype(int) - reference).mean() < 6
    assert np.abs(frames[0][..., 0].astype(int) - frame_maps[5]).mean() > 12  # the frames differ: order is seen


@pytest.mark.slow  # 30 forward passes: the modes differ only in utils.cutout, tested on its own in test_cutout.py
def test_every_mode_writes_every_frame_at_the_clip_rate_and_size(model: torch.nn.Module, clip, frame_maps,
                                                                 tmp_path: Path) -> None:
    for mode in ("overlay", "green", "blur", "white"):
        job = run_video(model, clip[0], tmp_path, mode)
        frames, fps = read_clip(job.target)
        assert len(frames) == 6 and fps == FPS and frames[0].shape == (HEIGHT, WIDTH, 3), mode
    job = run_video(model, clip[0], tmp_path, "rgba")
    assert job.target == tmp_path / "clip"
    pngs = sorted(job.target.iterdir())
    assert [p.name for p in pngs] == [f"clip_{i:06d}.png" for i in range(6)]
    for png, reference, frame in zip(pngs, frame_maps, clip[1]):
        rgba = np.asarray(Image.open(png))
        assert rgba.shape == (HEIGHT, WIDTH, 4) and np.array_equal(rgba[..., 3], reference)
        assert np.array_equal(rgba[..., :3][reference == 255], frame[reference == 255])


@pytest.mark.slow  # test.py's main end to end: predicts the readable frames
@pytest.mark.usefixtures("reuse_release_model")
def test_cut_clip_stops_at_the_last_readable_frame_exit_1(release_checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    whole = tmp_path / "whole.avi"
    write_clip(whole, 12)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    readable = len(read_clip(cut)[0])
    assert 0 < readable < 11
    with caplog.at_level(logging.WARNING):
        code, err = run_main(capsys, "--pth_path", release_checkpoint, "--input", cut, "--save_root", tmp_path / "out",
                             "--testsize", SMALL, "--runtime", "torch", "--save_mode", "green")
    assert code == 1, err
    assert f"stopped at frame {readable} of 12" in caplog.text and "cut or corrupt" in caplog.text
    assert "Traceback" not in err and "overread" not in err
    assert len(read_clip(tmp_path / "out" / "cut.mp4")[0]) == readable


@pytest.mark.parametrize("case", ["mp4_cut_before_index", "output_overwrites_input", "not_a_video_file",
                                  "background_with_save_mode", "unreadable_background"])
def test_bad_video_input_is_one_error_line(case: str, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    source = tmp_path / "clip.mp4"
    write_clip(source, 6, "mp4v")
    out, extra, needles = tmp_path / "out", [], []
    if case == "mp4_cut_before_index":
        source.write_bytes(source.read_bytes()[:-200])
        needles = [str(source), "cut or corrupt"]
    elif case == "output_overwrites_input":
        out = tmp_path
        needles = ["would overwrite the input video"]
    elif case == "not_a_video_file":
        source = tmp_path / "notes.txt"
        source.write_text("hello")
        needles = [str(source), "a file, not a folder"]
    elif case == "background_with_save_mode":
        extra = ["--background", str(source), "--save_mode", "green"]
        needles = ["--background", "drop --save_mode"]
    else:
        extra = ["--background", str(tmp_path / "missing.jpg")]
        needles = ["--background", "missing.jpg: file not found"]
    # Refused before the checkpoint is read, so this one need not exist.
    code, err = run_main(capsys, "--pth_path", tmp_path / "unused.pth", "--input", source, "--save_root", out,
                         "--runtime", "torch", *extra)
    assert_one_error_line(code, err, *needles)


@pytest.mark.slow
def test_ctrl_c_keeps_a_playable_video_of_the_frames_written(release_checkpoint: Path, tmp_path: Path) -> None:
    source, out = tmp_path / "long.avi", tmp_path / "out"
    write_clip(source, 600)
    proc = subprocess.Popen([sys.executable, str(ROOT / "test.py"), "--pth_path", str(release_checkpoint), "--input",
                             str(source), "--save_root", str(out), "--testsize", SMALL, "--runtime", "torch",
                             "--save_mode", "overlay"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    deadline = time.monotonic() + 300
    while not (out / "long.mp4").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # some more frames
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "frames written to" in last and "Traceback" not in stderr, last
    written = int(last.split("interrupted: ")[1].split()[0])
    frames, fps = read_clip(out / "long.mp4")
    assert 0 < written < 600 and len(frames) == written and fps == FPS
