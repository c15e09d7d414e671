"""Reproducibility: seeds, every RNG state (saved and restored on resume), the data order, digests.

The data order is a function of (seed, epoch, rank), so a run resumed from any saved epoch or batch
sees the same batches as one that never stopped.
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler

from utils.distributed import DistContext, smallest_replica_batch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process, in types torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states saved by rng_state()."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        set_cuda_rng_states(state.get("cuda") or [])


def set_cuda_rng_states(saved: list[torch.Tensor]) -> None:
    """Restore each GPU's saved state; with another GPU count, warn and restore the states that exist.

    GPUs without a saved state keep the state seed_everything(--seed) gave them.
    """
    count = torch.cuda.device_count()
    if len(saved) != count:
        log.warning("the checkpoint holds CUDA RNG states of %d GPU(s) and this machine has %d: restoring %d; "
                    "random draws on the GPU (drop path) will not match an uninterrupted run",
                    len(saved), count, min(len(saved), count))
    for index, cuda_state in enumerate(saved[:count]):
        torch.cuda.set_rng_state(cuda_state, index)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: derive python and numpy seeds from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the DataLoader generator (worker seeds) for one (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names and bytes of tensors, sorted by name (identical tensors, identical digest)."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda item: item[0]):
        h.update(name.encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes.
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EpochSampler(Sampler[int]):
    """Indices of one epoch for this rank: DistributedSampler's (seed, epoch) shuffle, resumable mid-epoch.

    A final batch that would give some GPU a single sample is dropped: BatchNorm cannot train on
    one sample (the release crashes there; with DIS-TR's 3,000 images and batch 8 or 6 it never has one).
    """

    def __init__(self, dataset: Any, batch_size: int, ctx: DistContext, seed: int, replicas: int = 1) -> None:
        """Shard `dataset` over ctx's ranks in batches of `batch_size` (over `replicas` GPUs), shuffled by `seed`."""
        self.inner = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                        shuffle=True, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.replicas = replicas
        self.indices: list[int] = []

    def _usable(self, n: int) -> int:
        """How many of n indices to keep: without a final batch too small for BatchNorm on every replica."""
        rest = n % self.batch_size
        return n - rest if rest and smallest_replica_batch(rest, self.replicas) < 2 else n

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        """Fix the order of `epoch` and skip the samples already trained in it (counted in samples, not batches,
        so a run resumed with another --batchsize trains exactly the rest of the epoch)."""
        self.inner.set_epoch(epoch)
        rest = list(self.inner)[skip_samples:]
        self.indices = rest[:self._usable(len(rest))]

    def batches_per_epoch(self) -> int:
        """Batches in a full epoch of this rank."""
        return -(-self._usable(self.inner.num_samples) // self.batch_size)

    def batches_left(self) -> int:
        """Batches of the current epoch still to come (after the skipped samples)."""
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[int]:
        """This rank's remaining indices of the current epoch."""
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


