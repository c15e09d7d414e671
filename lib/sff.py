"""SFF: selective feature fusion of a fine level with the upsampled coarser one, gated by SEA."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _attention_mlp(channels: int, hidden: int) -> list[nn.Module]:
    """1x1 conv -> BN -> ReLU -> 1x1 conv -> BN."""
    return [
        nn.Conv2d(channels, hidden, kernel_size=1),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, kernel_size=1),
        nn.BatchNorm2d(channels),
    ]


class SEA(nn.Module):
    """Local, global and channel attention combined into one fusion weight in (0, 1)."""

    def __init__(self, channels: int = 64, reduction: int = 4) -> None:
        super().__init__()
        hidden = channels // reduction
        self.local_att = nn.Sequential(*_attention_mlp(channels, hidden))
        self.global_att = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_attention_mlp(channels, hidden))
        self.channel_att = nn.Sequential(*_attention_mlp(channels, hidden), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(channel(x) * (local(x) + global(x)))."""
        return torch.sigmoid(self.channel_att(x) * (self.local_att(x) + self.global_att(x)))


class SFF(nn.Module):
    """out = x * w + up(y) * (1 - w), with w from a gated 3x3 fusion of both.

    `bn_out` is declared and never used, as released (it is in the released checkpoint).
    """

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        both = 2 * channels
        self.conv_xy = nn.Conv2d(both, both, kernel_size=3, padding=1, bias=False)
        self.bn_xy = nn.BatchNorm2d(both)
        self.conv_gate = nn.Conv2d(both, both, kernel_size=3, padding=1, bias=False)
        self.bn_gate = nn.BatchNorm2d(both)
        self.conv_out = nn.Conv2d(both, channels, kernel_size=3, padding=1, bias=False)
        self.bn_out = nn.BatchNorm2d(channels)
        self.sea = SEA(channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Fuse fine feature x with coarse feature y (half x's resolution)."""
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        xy = torch.cat((x, y), dim=1)
        fused = F.relu(self.bn_xy(self.conv_xy(xy))) * torch.sigmoid(self.bn_gate(self.conv_gate(xy)))
        weight = self.sea(self.conv_out(fused))
        return x * weight + y * (1 - weight)
