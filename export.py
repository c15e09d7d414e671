"""Export FSANet.predict to ONNX and check the file under onnxruntime against PyTorch.

    python export.py --pth_path checkpoints/FSANet/FSANet-100.pth --testsize 1024 --output fsanet.onnx

Input `image`: B x 3 x S x S ImageNet-normalised float32; output `logits`: P1, B x 1 x S x S (apply
the release's post-processing: bilinear to the image size, sigmoid, min-max). The weights go to
`<output>.data` beside the file (keep the two together). Exit 1 when onnxruntime differs from
PyTorch by more than --tolerance; 2 on a setup problem.
"""
from __future__ import annotations

from pipelines.cli import quiet_interrupts_while_starting

quiet_interrupts_while_starting(__name__)  # before the imports below: they take seconds to load

import argparse
import logging
import sys
from pathlib import Path

from lib import FREQ_ENCODER_NAMES
from pipelines.cli import exit_process, float_in, int_at_least, run_cli
from utils.atomic import check_writable_dir
from utils.errors import EXIT_FAILED, EXIT_OK, FSANetError, RunError
from utils.onnx_export import DEFAULT_OPSET, MIN_OPSET, OPENVINO_DFT_BREAKS, max_opset

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Checkpoint, size, output file and export options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pth_path", required=True, help="checkpoint: the release's FSANet-100.pth, ours, or a state dict")
    p.add_argument("--testsize", type=int, default=992, help="square input size (multiple of 32; release: 992)")
    p.add_argument("--output", type=Path, default=Path("fsanet.onnx"), help="ONNX file to write")
    p.add_argument("--freq_encoder", choices=FREQ_ENCODER_NAMES, default="resnet50",
                   help="frequency encoder the checkpoint was trained with (release: resnet50)")
    p.add_argument("--opset", type=int_at_least(MIN_OPSET, maximum=max_opset()), default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET} (the exporter's lowest) to {max_opset()} (the installed onnx's "
                        f"highest); default {DEFAULT_OPSET}. From {OPENVINO_DFT_BREAKS} on, OpenVINO reads DFT's "
                        "axis wrongly (logits off by ~1): such files are for onnxruntime")
    p.add_argument("--dynamic_batch", action="store_true", help="leave the batch dimension free (default: 1)")
    p.add_argument("--tolerance", type=float_in(0, low_open=True), default=1e-3,
                   help="largest accepted |logit| difference between onnxruntime and PyTorch (a finite number > 0)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """FSANetError (exit 2) when the arguments cannot work."""
    if args.testsize <= 0 or args.testsize % 32:
        raise FSANetError(f"--testsize {args.testsize}: must be a positive multiple of 32 (release: 992)")
    if args.output.suffix != ".onnx":
        raise FSANetError(f"--output {args.output}: name the file *.onnx")
    if args.output.is_dir():
        raise FSANetError(f"--output {args.output} is a folder; name a file")
    # Before the export (half a minute or more), not after it.
    check_writable_dir(args.output.parent, "--output")
    if args.opset >= OPENVINO_DFT_BREAKS:
        log.warning("--opset %d: from opset %d on DFT's axis is an input, which OpenVINO ignores (its logits are "
                    "off by ~1); use this file with onnxruntime, or export with --opset %d for OpenVINO",
                    args.opset, OPENVINO_DFT_BREAKS, DEFAULT_OPSET)


def run(args: argparse.Namespace) -> int:
    """Export, check with onnxruntime, print the result; the exit status."""
    from lib import fsanet_from_checkpoint
    from utils.onnx_export import (
        ExportError,
        check_against_torch,
        describe_external_data,
        export_onnx,
        written_opset,
    )

    check_args(args)
    model = fsanet_from_checkpoint(args.pth_path, args.freq_encoder)
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        seconds = export_onnx(model, args.output, args.testsize, args.opset, args.dynamic_batch, external_data=True)
        opset = written_opset(args.output)
        if opset != args.opset:  # the exporter keeps its own opset when it cannot convert the graph
            raise ExportError(f"{args.output}: --opset {args.opset} asked, but the exporter wrote opset {opset} "
                              f"(it could not convert FSANet's graph); do not use this file, export with "
                              f"--opset {opset}")
        # The check runs the model export_onnx prepared (BatchNorm folded: the same arithmetic).
        diff = check_against_torch(model, args.output, args.testsize, batch=2 if args.dynamic_batch else 1)
    except ImportError as e:
        raise ExportError(str(e)) from None
    except OSError as e:
        raise RunError(f"{args.output}: cannot write ({e.strerror or e}); choose another --output") from None
    print(f"wrote {args.output} (opset {opset}) in {seconds:.1f} s ({describe_external_data(args.output)}); "
          f"onnxruntime vs PyTorch max |logit difference| {diff:.2e}")
    if not diff <= args.tolerance:
        print(f"error: {args.output}: onnxruntime differs from PyTorch by {diff:.2e} > --tolerance "
              f"{args.tolerance:g}; do not use this file", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run export.py: 0 done, 1 export failed or mismatched, 2 refused, 130 interrupted."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    exit_process(main())
