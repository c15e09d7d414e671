"""Write FSANet prediction maps for the DIS5K splits, or for every image in a folder (--input).

    python test.py --pth_path checkpoints/FSANet/FSANet-100.pth
    python test.py --pth_path checkpoints/FSANet/FSANet-100.pth --input photos/ --save_root results/photos
"""
from __future__ import annotations

import argparse
import logging
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from lib.checkpoint import CheckpointError
from lib.encoders import FREQ_ENCODERS
from utils.cutout import SAVE_MODES
from utils.dis5k import EVAL_SPLITS
from utils.inference import (AMP_DTYPES, InferenceError, InferenceOptions, InferenceSummary,
                             check_options, dis5k_jobs, folder_job, load_model, predict_jobs, select_device)
from utils.runtimes import RUNTIMES, ExportSpec, HFlipTTA, RuntimeUnavailable, choose_runtime, load_runner

log = logging.getLogger("test.py")

EXIT_FAILED_IMAGES = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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
    p.add_argument("--input", metavar="DIR",
                   help="predict every image in DIR instead of DIS5K (no masks needed); "
                        "maps go to <save_root>/<stem>.png")
    p.add_argument("--save_root", default="results/FSANet", help="folder the maps are written to")
    p.add_argument("--freq_encoder", choices=tuple(FREQ_ENCODERS), default="resnet50",
                   help="frequency encoder the checkpoint was trained with (release: resnet50)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--batch_size", type=int, default=1, help="images per forward pass (release: 1)")
    p.add_argument("--num_workers", type=int, default=0,
                   help="DataLoader processes that read and resize images in the background (0: main process)")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default=None,
                   help="mixed-precision forward in bf16 or fp16 (faster; maps differ slightly from fp32)")
    p.add_argument("--fast_decode", action="store_true",
                   help="decode JPEGs at reduced resolution (still >= --testsize) and resize with torch's uint8 "
                        "kernel: much faster on large photos, but changes the maps' pixels slightly vs the release")
    p.add_argument("--skip_existing", action="store_true",
                   help="skip images whose map already exists (resume an interrupted run)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="auto: OpenVINO on the CPU (exported to ONNX once per checkpoint and size, then cached), "
                        "PyTorch on CUDA; torch, openvino or onnxruntime to choose")
    p.add_argument("--cache_dir", default=None,
                   help="folder of the ONNX export and OpenVINO compile caches "
                        "(default: $XDG_CACHE_HOME/fsanet or ~/.cache/fsanet)")
    p.add_argument("--save_mode", choices=SAVE_MODES, default="map",
                   help="map: the 8-bit map (release); rgba: the image with the map as alpha; "
                        "overlay: the map tinted over the image (a visual check)")
    p.add_argument("--tta", choices=("none", "hflip"), default="none",
                   help="hflip: average the logits of each image and its mirror image "
                        "(test-time augmentation; not part of the release's protocol)")
    return p.parse_args(argv)


def load_predictor(args: argparse.Namespace, options: InferenceOptions) -> object:
    """The model under the chosen runtime: an exported runner, or the PyTorch model (also the fallback)."""
    runtime = choose_runtime(args.runtime, options.device)
    if runtime != "torch":
        if options.device.type != "cpu":
            raise InferenceError(f"--runtime {runtime} runs on the CPU here; pass --device cpu or --runtime torch")
        try:
            return load_runner(runtime, ExportSpec(args.pth_path, args.testsize, args.freq_encoder),
                               options.amp, args.cache_dir)
        except RuntimeUnavailable as e:
            if args.runtime != "auto":
                raise InferenceError(str(e)) from None
            log.warning("%s; falling back to --runtime torch", e)
    return load_model(args.pth_path, args.freq_encoder, options.device, options.amp)


def run(args: argparse.Namespace) -> InferenceSummary:
    """Find the images, load the model and write the maps."""
    options = InferenceOptions(testsize=args.testsize, device=select_device(args.device),
                               batch_size=args.batch_size, num_workers=args.num_workers, amp=args.amp,
                               fast_decode=args.fast_decode, skip_existing=args.skip_existing,
                               save_mode=args.save_mode)
    check_options(options)
    if args.input is not None:
        jobs = [folder_job(args.input, args.save_root)]
    else:
        jobs = dis5k_jobs(args.data_root, args.datasets, args.save_root)
    model = load_predictor(args, options)
    if args.tta == "hflip":
        model = HFlipTTA(model)
    with logging_redirect_tqdm():
        return predict_jobs(model, jobs, options)


def report(summary: InferenceSummary, save_root: str) -> None:
    """Print what the run wrote, skipped and could not read."""
    rate = summary.written / summary.seconds if summary.seconds else 0.0
    print(f"{summary.written} maps written to {save_root} ({rate:.2f} images/s), "
          f"{summary.skipped} skipped (map exists), {len(summary.failed)} failed")
    for _, reason in summary.failed:
        print(f"  failed: {reason}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run test.py; exit 0 when every map was written, 1 when some images failed, 2 on a setup error."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        summary = run(args)
    except (CheckpointError, InferenceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    report(summary, args.save_root)
    return EXIT_FAILED_IMAGES if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
