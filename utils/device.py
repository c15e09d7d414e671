"""Device and mixed-precision selection shared by training, inference and benchmarks."""
from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

from utils.errors import FSANetError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("none", *AMP_DTYPES)


class DeviceError(FSANetError):
    """A requested device that this machine does not have; the message says which flag to change."""


def resolve_device(requested: str = "auto", local_rank: int = 0, distributed: bool = False) -> torch.device:
    """Turn --device (auto, cpu, cuda, cuda:N) into a torch.device; DDP ranks take cuda:LOCAL_RANK."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DeviceError(f"--device {requested}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {requested}: no CUDA GPU is visible; use --device cpu")
        if distributed:
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    return device


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of --amp (bf16, fp16), or None for None / "none"."""
    return None if amp is None or amp == "none" else AMP_DTYPES[amp]


def autocast(device: torch.device, amp: str | None) -> AbstractContextManager:
    """Mixed precision when `amp` names a dtype (bf16, fp16), else (None or "none") a no-op."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
