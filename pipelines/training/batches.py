"""From loader batches to optimiser batches: what a batch shrunk by undecodable files still trains,
--accum_steps groups (a partly filled last group of an epoch is trained, not dropped), and a batch at
each rate's size."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from utils.distributed import DistContext, all_reduce_sum, replica_batch_sizes, trainable_batch

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
# What train_collate gives: the decodable images and masks (None when none) and why the others failed.
LoaderBatch = tuple[torch.Tensor | None, torch.Tensor | None, list[str]]


def resize_pair(images: torch.Tensor, gts: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners=True) resize of images and masks to size x size, as the release."""
    if images.shape[-2:] == (size, size):
        return images, gts
    resize = dict(size=(size, size), mode="bilinear", align_corners=True)
    return F.interpolate(images, **resize), F.interpolate(gts, **resize)


@dataclass
class Group:
    """One optimiser batch: its trained loader batches, and what it consumed of the epoch's order."""

    batches: list[Batch] = field(default_factory=list)
    consumed: int = 0  # loader batches, skipped ones included
    samples: int = 0  # samples of the epoch's order those loader batches held, undecodable and trimmed included


def batch_samples(item: LoaderBatch) -> int:
    """Samples of the epoch's order one loader batch covered: decoded and undecodable."""
    images, _, bad = item
    return len(bad) + (0 if images is None else images.shape[0])


def optimiser_groups(loader: Iterable[LoaderBatch], accum_steps: int,
                     keep: Callable[[LoaderBatch, int], Batch | None], first: int = 1) -> Iterator[Group]:
    """Groups of `accum_steps` kept loader batches; `keep(item, number)` gives what of loader batch `number`
    (counted from `first`) trains, None to skip it. The epoch's last group is yielded even when short (its
    last batches skipped, or the epoch's batch count not a multiple of accum_steps)."""
    group = Group()
    for number, item in enumerate(loader, start=first):
        group.consumed += 1
        group.samples += batch_samples(item)
        batch = keep(item, number)
        if batch is None:
            continue
        group.batches.append(batch)
        if len(group.batches) == accum_steps:
            yield group
            group = Group()
    if group.batches:
        yield group


def trainable_part(item: LoaderBatch, number: int, replicas: int, ctx: DistContext) -> Batch | None:
    """What of loader batch `number` trains: all of it, its first images when DataParallel would give a GPU a
    single one (BatchNorm raises in train mode), or None (skipped) when fewer than 2 would be left on any rank."""
    images, gts, _ = item
    count = 0 if images is None else images.shape[0]
    keep = trainable_batch(count, replicas)
    short = torch.tensor([float(keep == 0)])
    # Every rank must take the same decision, or the next collective would wait forever.
    if ctx.distributed:
        short = all_reduce_sum(short.to(ctx.device), ctx).cpu()
    if short.item():
        log.warning("batch %d skipped: fewer than 2 decodable images left (BatchNorm needs 2)%s", number,
                    f" per GPU ({count} over {replicas} GPUs)" if replicas > 1 and count else "")
        return None
    if keep < count:
        log.warning("batch %d: trained on %d of its %d decodable images: DataParallel splits %d over %d GPUs as "
                    "%s, and BatchNorm cannot train a GPU's single image", number, keep, count, count, replicas,
                    "+".join(map(str, replica_batch_sizes(count, replicas))))
        return images[:keep], gts[:keep]
    return images, gts

