"""Process-group plumbing: single process (CPU, one GPU, DataParallel) or DDP under torchrun."""
from __future__ import annotations

import datetime
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from utils.device import AutocastForward, amp_dtype, resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among world_size processes and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """True when running as one process of a DDP group."""
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        """True on the process that logs and saves (rank 0)."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (torch.distributed.run) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "LOCAL_RANK" in os.environ


def init_distributed(requested_device: str, backend: str = "auto", timeout_min: float = 30.0) -> DistContext:
    """Join the torchrun process group if launched by torchrun, else describe the single process."""
    if not launched_by_torchrun():
        return DistContext(rank=0, world_size=1, local_rank=0, device=resolve_device(requested_device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(requested_device, local_rank, distributed=True)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_min),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    log.debug("rank %d/%d on %s (%s)", rank, world, device, backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over all ranks in place and return it (identity in a single process)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Gather one picklable object from every rank, in rank order."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Send a picklable object from rank `src` to all ranks and return it."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def data_parallel_replicas(ctx: DistContext, data_parallel: bool = True) -> int:
    """How many GPUs DataParallel will split each batch over (1: no DataParallel)."""
    if ctx.distributed or not data_parallel or ctx.device.type != "cuda":
        return 1
    return max(1, torch.cuda.device_count())


def replica_batch_sizes(batch: int, replicas: int) -> list[int]:
    """Images each GPU gets when DataParallel scatters `batch` over `replicas` GPUs: torch.chunk along dim 0,
    so chunks of ceil(batch / replicas) and a smaller last one; GPUs past the last chunk get none (not run)."""
    if batch <= 0:
        return []
    chunk = -(-batch // replicas)
    return [min(chunk, batch - start) for start in range(0, batch, chunk)]


def smallest_replica_batch(batch: int, replicas: int) -> int:
    """Images the last replica gets when DataParallel splits `batch` (torch.chunk along dim 0)."""
    chunk = -(-batch // replicas)
    return batch - chunk * (-(-batch // chunk) - 1)


def trainable_batch(batch: int, replicas: int) -> int:
    """The most of `batch` images (the first ones) that train in BatchNorm's train mode: every GPU DataParallel
    runs gets at least 2 (4 GPUs: 7 images split 2, 2, 2, 1, so 6); 0 when no count of 2 or more does."""
    return next((n for n in range(batch, 1, -1) if min(replica_batch_sizes(n, replicas)) >= 2), 0)


def wrap_model(model: nn.Module, ctx: DistContext, data_parallel: bool = True, amp: str | None = None) -> nn.Module:
    """DDP under torchrun; else DataParallel over every visible GPU (as the release) when allowed; else bare.

    Under DataParallel with --amp the model is wrapped in AutocastForward first, so every replica
    computes in the requested dtype (see AutocastForward); unwrap_model removes both.
    """
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # PVT's depthwise convs have weights with a size-1 dim whose stride differs from the grad's;
        # DDP warns about it on every backward although the layouts are equivalent.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        # The parameters that never get a gradient (lib.fsanet.NEVER_USED) are frozen: DDP need not search.
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if data_parallel_replicas(ctx, data_parallel) > 1:
        log.info("DataParallel over %d GPUs", torch.cuda.device_count())
        dtype = amp_dtype(amp)
        return nn.DataParallel(model if dtype is None else AutocastForward(model, ctx.device.type, dtype))
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DataParallel/DDP, AutocastForward and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel, AutocastForward)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
