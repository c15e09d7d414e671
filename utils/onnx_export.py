"""Export FSANet.predict (P1 logits) to ONNX, and check the file under onnxruntime against PyTorch.

The graph takes a B x 3 x S x S ImageNet-normalised float32 batch and returns B x 1 x S x S P1
logits; the FFT high-pass filter is part of it, its mask a constant of the export's size. BatchNorm is
folded first (the same arithmetic the PyTorch fast path runs), and the model is traced by torch.export
in non-strict mode (its strict mode, through TorchDynamo, takes four times as long to trace).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.errors import RunError

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
MAX_BATCH = 1024  # upper bound of the dynamic batch dimension (torch.export needs one)
# torch's exporter translates at opset 18 at least; asked for less, it tries to convert down, and FSANet's
# graph does not convert (the file stays at 18), so 18 is the lowest opset an export can have.
MIN_OPSET = 18
# Opset 20 moved DFT's axis to an input, which OpenVINO 2026.4's ONNX frontend ignores (every FFT
# then runs along the default axis: logits off by ~1); at 18 and 19 the axis is an attribute both read.
DEFAULT_OPSET = 18
OPENVINO_DFT_BREAKS = 20
# torch 2.4.1 and 2.5.1 fail to translate torch.fft.fft2 (the exporter cannot parse its schema); 2.6.0 exports.
MIN_EXPORT_TORCH = (2, 6)
# Loggers of the exporter and its graph passes: INFO chatter, and tracebacks of fallbacks they recover from.
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")


class ExportError(RunError):
    """The model could not be exported or checked; the message names the cause and the fix."""


def export_supported(version: str = torch.__version__) -> bool:
    """Whether this torch version can export FSANet to ONNX."""
    return tuple(int(n) for n in re.findall(r"\d+", version)[:2]) >= MIN_EXPORT_TORCH


class PredictGraph(nn.Module):
    """FSANet.predict as a module's forward, the one function torch.export traces."""

    def __init__(self, model: nn.Module) -> None:
        """Wrap `model` (an FSANet in eval mode)."""
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S normalised images -> B x 1 x S x S P1 logits."""
        return self.model.predict(x)


def prepare_for_export(model: nn.Module) -> nn.Module:
    """Eval mode, float32, BatchNorm folded, default memory layout (exported graphs pick their own)."""
    from lib.fast import fold_batchnorm  # here: the cached-runtime path of test.py never needs it

    model = model.float().eval().to(memory_format=torch.contiguous_format)
    if hasattr(model, "memory_format"):
        model.memory_format = torch.contiguous_format
    return fold_batchnorm(model)


@contextlib.contextmanager
def _fixed_filter_masks(model: nn.Module, size: int) -> Iterator[None]:
    """Within: the high-pass filters multiply by their S x S masks as constants of the graph."""
    from lib.frequency import FrequencyFilter

    with contextlib.ExitStack() as stack:
        for module in model.modules():
            if isinstance(module, FrequencyFilter):
                stack.enter_context(module.fixed_mask(size, size))
        yield


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's own INFO lines and the tracebacks it logs for fallbacks it recovers from."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(model: nn.Module, path: str | os.PathLike, testsize: int, opset: int | None = DEFAULT_OPSET,
                dynamic_batch: bool = False, external_data: bool = False) -> float:
    """Write `model.predict` at `testsize` to `path` as ONNX; returns the seconds it took.

    With `external_data` the weights go to `<path>.data` beside it; without, one self-contained file
    (FSANet's 437 MB of weights fit under protobuf's 2 GB limit).
    """
    if not export_supported():
        # Said before tracing: torch.export would spend a minute before the translator fails.
        raise ExportError(f"ONNX export needs torch >= {'.'.join(map(str, MIN_EXPORT_TORCH))} "
                          f"(this is {torch.__version__}); upgrade torch")
    start = time.perf_counter()
    graph = PredictGraph(prepare_for_export(model)).eval()
    batch = 2 if dynamic_batch else 1  # torch.export specialises a dimension traced at size 1
    example = (torch.randn(batch, 3, testsize, testsize),)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},) if dynamic_batch else None
    try:
        with torch.no_grad(), _quiet_exporter(), _fixed_filter_masks(graph, testsize):
            program = torch.export.export(graph, example, dynamic_shapes=dynamic, strict=False)
            # optimize=False: onnxscript's graph rewrites took a third of the export, and onnxruntime and OpenVINO
            # optimise the graph themselves (measured: the same run time and compile time either way).
            onnx_program = torch.onnx.export(program, example, dynamo=True, opset_version=opset, optimize=False,
                                             input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False)
    except Exception as e:  # torch.export and the ONNX translator raise many unrelated types
        raise ExportError(f"ONNX export failed at --testsize {testsize}: {str(e).splitlines()[0][:300]}") from None
    onnx_program.save(str(path), external_data=external_data)
    return time.perf_counter() - start


def max_opset() -> int:
    """The highest opset the installed onnx package knows (the exporter cannot convert beyond it)."""
    import onnx.defs

    return onnx.defs.onnx_opset_version()


def written_opset(path: str | os.PathLike) -> int:
    """The default-domain opset an ONNX file declares (its `opset_import`), read without its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def torch_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """P1 logits of `model` for `x` in float32, as a numpy array."""
    with torch.inference_mode():
        return model.predict(x).float().numpy()


def onnxruntime_logits(path: str | os.PathLike, x: np.ndarray) -> np.ndarray:
    """P1 logits of the ONNX file at `path` for `x` under onnxruntime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def check_against_torch(model: nn.Module, path: str | os.PathLike, testsize: int, batch: int = 1,
                        seed: int = 0) -> float:
    """Max |logit difference| between the ONNX file (onnxruntime) and `model` on a random input."""
    x = torch.randn(batch, 3, testsize, testsize, generator=torch.Generator().manual_seed(seed))
    expected = torch_logits(model, x)
    got = onnxruntime_logits(path, x.numpy())
    if got.shape != expected.shape:
        raise ExportError(f"{path}: onnxruntime output shape {got.shape}, PyTorch {expected.shape}")
    return float(np.abs(got - expected).max())


def describe_external_data(path: str | os.PathLike) -> str:
    """Where the weights of the ONNX file at `path` live, for the user."""
    data = Path(f"{path}.data")
    if data.is_file():
        return f"weights in {data} beside it (keep the two files together)"
    return "weights inside the file"
