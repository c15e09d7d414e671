"""Prediction heads: one shared 3x3 conv pair turns each decoder level into a full-size logit map."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Head(nn.Module):
    """x2 upsample, shared conv_up1 (64->64), shared conv2_1 (64->1), then upsample to input size.

    The release declares `conv_up2..4` too and never uses them; they are kept so the released
    checkpoint loads strictly and the parameter count stays the release's.
    """

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.conv_up1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv_up2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv_up3 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv_up4 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2_1 = nn.Conv2d(channels, 1, kernel_size=3, padding=1)

    def forward(self, feature: torch.Tensor, factor: int) -> torch.Tensor:
        """Logits at `feature`'s resolution x 2 x factor."""
        x = F.interpolate(feature, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.conv2_1(self.conv_up1(x))
        return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
