"""MF: spatial-frequency fusion, x_i + SE(conv1x1(y_i)) at each encoder level."""
from __future__ import annotations

import torch
from torch import nn


class SELayer(nn.Module):
    """Squeeze-and-excitation (Hu et al., CVPR 2018): channel gates from global context."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rescale each channel of x by its learned gate."""
        b, c = x.shape[:2]
        gate = self.fc(self.pool(x).view(b, c)).view(b, c, 1, 1)
        return x * gate


class MF(nn.Module):
    """Adds the frequency feature y (projected to x's width and SE-gated) to the RGB feature x."""

    def __init__(self, freq_channels: int, rgb_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(freq_channels, rgb_channels, kernel_size=1)
        self.se = SELayer(rgb_channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Fuse one level: x + se(conv(y))."""
        return x + self.se(self.conv(y))
