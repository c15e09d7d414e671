"""The release's structure loss and its deep-supervision sum over P1..P4."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

RELEASE_WEIGHTS: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1)


def edge_weight(mask: torch.Tensor) -> torch.Tensor:
    """Per-pixel weight 1 + 5 * |avgpool31(mask) - mask|: pixels near boundaries count up to 6x."""
    return 1 + 5 * torch.abs(F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask)


def structure_loss(pred: torch.Tensor, mask: torch.Tensor, weighted_bce: bool = False) -> torch.Tensor:
    """Weighted BCE + weighted IoU of logits `pred` against a soft `mask` (both B x 1 x H x W).

    With weighted_bce=False (the release) the BCE term is a plain mean over all pixels: the release
    passes the legacy `reduce='none'`, which PyTorch reads as a mean. weighted_bce=True applies the
    boundary weighting to the BCE term as the release intended.
    """
    weit = edge_weight(mask)
    if weighted_bce:
        bce = F.binary_cross_entropy_with_logits(pred, mask, reduction="none")
        wbce = (weit * bce).sum(dim=(2, 3)) / weit.sum(dim=(2, 3))
    else:
        wbce = F.binary_cross_entropy_with_logits(pred, mask, reduction="mean")
    prob = torch.sigmoid(pred)
    inter = (prob * mask * weit).sum(dim=(2, 3))
    union = ((prob + mask) * weit).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


def deep_supervision_loss(
    preds: Sequence[torch.Tensor],
    mask: torch.Tensor,
    weights: Sequence[float] = RELEASE_WEIGHTS,
    weighted_bce: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Return (total, per-output terms) for sum_i weights[i] * structure_loss(preds[i], mask)."""
    if len(preds) < len(weights):
        raise ValueError(f"expected at least {len(weights)} predictions, got {len(preds)}")
    # The loss runs in float32 even under autocast: BCE and the IoU ratio lose too much in half precision.
    terms = [structure_loss(p.float(), mask.float(), weighted_bce) for p in preds[: len(weights)]]
    total = sum(w * t for w, t in zip(weights, terms))
    return total, terms
