"""Device and mixed-precision selection shared by training, inference and benchmarks."""
from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

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
            device = torch.device("cuda", rank_gpu(local_rank, torch.cuda.device_count()))
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    return device


def rank_gpu(local_rank: int, visible: int) -> int:
    """The GPU index of DDP process `local_rank` when `visible` GPUs are visible to it.

    Launchers that give each process its own GPU (SLURM, a per-rank CUDA_VISIBLE_DEVICES) leave one
    device visible, index 0, whatever LOCAL_RANK is; otherwise each local rank takes its own GPU.
    """
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise DeviceError(f"LOCAL_RANK {local_rank} but this process sees {visible} CUDA device(s): start at "
                          f"most {visible} processes per node (torchrun --nproc_per_node {visible}), or give "
                          "each process one GPU (CUDA_VISIBLE_DEVICES)")
    return local_rank


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of --amp (bf16, fp16), or None for None / "none"."""
    return None if amp is None or amp == "none" else AMP_DTYPES[amp]


def autocast(device: torch.device, amp: str | None) -> AbstractContextManager:
    """Mixed precision when `amp` names a dtype (bf16, fp16), else (None or "none") a no-op."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class AutocastForward(nn.Module):
    """Runs `module` under autocast(dtype) in whatever thread calls it; nn.DataParallel wraps this.

    DataParallel's replica threads (torch's parallel_apply) re-enter autocast with `enabled=` and no
    dtype, and the autocast dtype is thread-local: an autocast(bfloat16) entered around the
    DataParallel call would run the replicas in the device's default dtype (fp16 on CUDA).
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The module's forward with this wrapper's autocast dtype."""
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)
