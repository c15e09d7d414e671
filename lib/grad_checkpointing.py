"""Activation (gradient) checkpointing of the encoders: PVT-v2 blocks (timm's own) and ResNet stages.

A checkpointed stage keeps only its input during the forward pass and recomputes its activations in
the backward pass, trading compute for memory. The recomputation must not change training:
- dropout / drop path draw the same random numbers (torch.utils.checkpoint restores the RNG state);
- BatchNorm in train mode would update its running statistics a second time during recomputation,
  so the stage's BatchNorm buffers are restored after it (`_KeepBatchNormStats`).
With both, a run with checkpointing gives the same weights and buffers as one without it.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class _KeepBatchNormStats(AbstractContextManager):
    """Snapshot a module's BatchNorm buffers on entry and restore them on exit (around a recomputation)."""

    def __init__(self, module: nn.Module) -> None:
        """Remember the BatchNorm layers of `module`; the snapshot is taken on entry."""
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.saved: list[list[torch.Tensor | None]] = []

    def __enter__(self) -> _KeepBatchNormStats:
        """Copy every running statistic (mean, var, batch count)."""
        self.saved = [[None if b is None else b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
                      for m in self.norms]
        return self

    def __exit__(self, *exc: object) -> None:
        """Put the copies back, undoing the recomputation's second update."""
        with torch.no_grad():
            for m, saved in zip(self.norms, self.saved):
                for buffer, copy in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved):
                    if buffer is not None and copy is not None:
                        buffer.copy_(copy)
        self.saved = []


def checkpoint_stage(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`stage(x)` with its activations recomputed in the backward pass (BatchNorm statistics updated once)."""
    if not torch.is_grad_enabled() or not stage.training:
        return stage(x)

    def contexts() -> tuple[Any, Any]:
        return nullcontext(), _KeepBatchNormStats(stage)

    return checkpoint(stage, x, use_reentrant=False, preserve_rng_state=True, context_fn=contexts)
