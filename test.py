"""Write FSANet prediction maps for the DIS5K splits, or for every image in a folder (--input).

    python test.py --pth_path checkpoints/FSANet/FSANet-100.pth
    python test.py --pth_path checkpoints/FSANet/FSANet-100.pth --input photos/ --save_root results/photos
"""
from __future__ import annotations

from pipelines.cli import quiet_interrupts_while_starting

quiet_interrupts_while_starting(__name__)  # before the imports below: they take seconds to load

import argparse
import logging
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from lib import FREQ_ENCODER_NAMES
from pipelines.cli import exit_process, run_cli
from pipelines.inference import (
    InferenceError,
    InferenceOptions,
    InferenceSummary,
    check_options,
    dis5k_jobs,
    folder_job,
    load_predictor,
    output_style,
    predict_jobs,
)
from pipelines.video import is_video, predict_video, video_job, video_target
from utils.atomic import check_writable_dir
from utils.cutout import IMAGE_BACKGROUND, SAVE_MODES
from utils.device import AMP_CHOICES, resolve_device
from utils.dis5k import EVAL_SPLITS
from utils.errors import EXIT_FAILED, EXIT_OK
from utils.imageio import DEFAULT_MAX_PIXELS, set_max_pixels
from utils.runtimes import RUNTIMES, HFlipTTA

log = logging.getLogger("test")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The release's test.py flags plus folder mode, device, batching, precision and resume options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pth_path", required=True,
                   help="checkpoint: the release's FSANet-100.pth, one of ours, or a bare state dict")
    p.add_argument("--testsize", type=int, default=992,
                   help="square size the images are resized to for the model (multiple of 32; release: 992)")
    p.add_argument("--data_root", default="data/DIS5K",
                   help="DIS5K folder holding the --datasets splits, each with im/ (or Imgs/)")
    p.add_argument("--datasets", nargs="+", default=list(EVAL_SPLITS),
                   help="splits under --data_root to predict; maps go to <save_root>/<name>/<stem>.png")
    p.add_argument("--input", metavar="DIR|VIDEO",
                   help="predict every image in DIR instead of DIS5K (no masks needed; maps go to "
                        "<save_root>/<stem>.png), or every frame of a video file (mp4, m4v, mov, avi, mkv, webm; "
                        "written to <save_root>/<stem>.mp4 at the same frame rate and size, rgba: PNG frames "
                        "in <save_root>/<stem>/)")
    p.add_argument("--save_root", default="results/FSANet", help="folder the maps are written to")
    p.add_argument("--freq_encoder", choices=FREQ_ENCODER_NAMES, default="resnet50",
                   help="frequency encoder the checkpoint was trained with (release: resnet50)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--batch_size", "--batchsize", dest="batch_size", type=int, default=1,
                   help="images per forward pass (release: 1)")
    p.add_argument("--num_workers", type=int, default=0,
                   help="DataLoader processes that read and resize images in the background (0: main process)")
    p.add_argument("--amp", choices=AMP_CHOICES, default="none",
                   help="mixed-precision forward in bf16 or fp16 (faster; maps differ slightly from fp32)")
    p.add_argument("--fast_decode", action="store_true",
                   help="decode JPEGs at reduced resolution (still >= --testsize) and resize with torch's uint8 "
                        "kernel: much faster on large photos, but changes the maps' pixels slightly vs the release")
    p.add_argument("--skip_existing", action="store_true",
                   help="skip images whose map already exists and is a readable PNG (resume an interrupted run)")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse (skip, named) images whose header says more pixels than this, before decoding: "
                        "decompression bombs (default: PIL's own limit, which every DIS5K image fits)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="auto: OpenVINO on the CPU (exported to ONNX once per checkpoint and size, then cached), "
                        "PyTorch on CUDA; torch, openvino or onnxruntime to choose")
    p.add_argument("--cache_dir", default=None,
                   help="folder of the ONNX export and OpenVINO compile caches "
                        "(default: $XDG_CACHE_HOME/fsanet or ~/.cache/fsanet)")
    p.add_argument("--save_mode", choices=SAVE_MODES, default=None,
                   help="map: the 8-bit map (release, the default); rgba: the image with the map as alpha; "
                        "overlay: the map tinted over the image (a visual check); green, blur, white: the object "
                        "over a green screen, the photo blurred, or white (composited in sRGB)")
    p.add_argument("--background", metavar="IMAGE", default=None,
                   help="write the object over IMAGE (resized to each photo's size, composited in sRGB) "
                        "instead of the map; replaces --save_mode")
    p.add_argument("--no_refine_foreground", dest="refine_foreground", action="store_false",
                   help="rgba, green, blur, white and --background: keep the photo's own RGB where the map is "
                        "fractional instead of estimating the foreground colour (blur fusion, Forte & Pitie "
                        "2021), which removes the old background's fringe; opaque pixels are the photo's either way")
    p.add_argument("--tta", choices=("none", "hflip"), default="none",
                   help="hflip: average the logits of each image and its mirror image "
                        "(test-time augmentation; not part of the release's protocol)")
    return p.parse_args(argv)


def predict(args: argparse.Namespace, summary: InferenceSummary) -> InferenceSummary:
    """Find the images, check the output folder, load the model and write the maps (counted in `summary`)."""
    options = InferenceOptions(testsize=args.testsize, device=resolve_device(args.device),
                               batch_size=args.batch_size, num_workers=args.num_workers, amp=args.amp,
                               fast_decode=args.fast_decode, skip_existing=args.skip_existing,
                               save_mode=save_mode(args), refine_foreground=args.refine_foreground,
                               background=None if args.background is None else Path(args.background))
    check_options(options)
    if args.max_pixels < 1:
        raise InferenceError(f"--max_pixels {args.max_pixels}: must be positive")
    set_max_pixels(args.max_pixels)
    video = args.input is not None and is_video(args.input)
    if video:
        job = video_job(args.input, args.save_root, options.save_mode)
        if args.skip_existing:
            log.warning("--skip_existing: a video is predicted again from its first frame")
    elif args.input is not None:
        # A photo folder is shown by viewers in its EXIF orientation; the map follows it.
        jobs = [folder_job(args.input, args.save_root, exif=True)]
    else:
        jobs = dis5k_jobs(args.data_root, args.datasets, args.save_root)
    check_writable_dir(args.save_root, "--save_root")
    style = output_style(options)
    model = load_predictor(args.pth_path, args.freq_encoder, options, args.runtime, args.cache_dir)
    if args.tta == "hflip":
        model = HFlipTTA(model)
    with logging_redirect_tqdm():
        if video:
            return predict_video(model, job, options, summary, style)
        return predict_jobs(model, jobs, options, summary, style)


def save_mode(args: argparse.Namespace) -> str:
    """The output mode: --save_mode, or the image background of --background (the two do not combine)."""
    if args.background is None:
        return args.save_mode or "map"
    if args.save_mode is not None:
        raise InferenceError(f"--background {args.background} with --save_mode {args.save_mode}: --background "
                             "writes the object over the image itself; drop --save_mode")
    return IMAGE_BACKGROUND


def report(summary: InferenceSummary, args: argparse.Namespace) -> None:
    """Print what the run wrote, skipped and could not read."""
    rate = summary.written / summary.seconds if summary.seconds else 0.0
    if is_video(args.input or ""):
        print(f"{summary.written} frames written to {output_of(args)} ({rate:.2f} frames/s)"
              f"{', stopped early' if summary.failed else ''}")
    else:
        print(f"{summary.written} maps written to {args.save_root} ({rate:.2f} images/s), "
              f"{summary.skipped} skipped (map exists), {len(summary.failed)} failed")
    for _, reason in summary.failed:
        print(f"  failed: {reason}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run test.py; exit 0 when every map was written, 1 when some images failed, 2 on a setup error."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    summary = InferenceSummary()
    return run_cli(lambda: predict_and_report(args, summary), interrupted=lambda: progress(summary, args))


def output_of(args: argparse.Namespace) -> Path:
    """The video file (or rgba's PNG folder) a video --input is written to."""
    return video_target(args.input, args.save_root, save_mode(args))


def progress(summary: InferenceSummary, args: argparse.Namespace) -> str:
    """What an interrupted run did, and how to finish it."""
    if is_video(args.input or ""):
        kept = "" if save_mode(args) == "rgba" else " (playable)"
        return f"{summary.written} frames written to {output_of(args)}{kept}; rerun to predict the whole video"
    return (f"{summary.written} maps written to {args.save_root}, {summary.skipped} skipped (map exists), "
            f"{len(summary.failed)} failed; rerun with --skip_existing to finish")


def predict_and_report(args: argparse.Namespace, summary: InferenceSummary) -> int:
    """Write the maps and print the summary; exit 1 when some images failed."""
    predict(args, summary)
    report(summary, args)
    return EXIT_FAILED if summary.failed else EXIT_OK


if __name__ == "__main__":
    exit_process(main())
