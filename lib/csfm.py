"""CSFM: collaborative scale fusion, every level re-sampled to every coarser level and concatenated."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Down(nn.Module):
    """log2(factor) chained 3x3 stride-2 convs (bias, no activation between them), then one BN."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:]), start=1):
            self.add_module(f"conv{i}", nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1))
        self.num_convs = len(channels) - 1
        self.bn = nn.BatchNorm2d(channels[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Downsample by 2 ** num_convs."""
        for i in range(1, self.num_convs + 1):
            x = getattr(self, f"conv{i}")(x)
        return self.bn(x)


class Up(nn.Module):
    """1x1 conv (bias) + BN, then bilinear upsampling by `factor` (align_corners=True, as released)."""

    def __init__(self, cin: int, cout: int, factor: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=1)
        self.bn = nn.BatchNorm2d(cout)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project and upsample."""
        x = self.bn(self.conv1(x))
        return F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=True)


class CSFM(nn.Module):
    """Builds x21 (1/8), x31 (1/16), x41 (1/32), then x32 (1/16), x42 (1/32), then x43 (1/32).

    Layer names follow the release (`down<src>_<factor>`, `up<src>_<factor>`), so the released
    checkpoint maps onto this module by prefix alone.
    """

    def __init__(self) -> None:
        super().__init__()
        # Level 2 (1/8): 128 + 128 + 128 + 128 = 512 channels.
        self.down1_2 = Down([64, 128])
        self.up3_2 = Up(320, 128, 2)
        self.up4_4 = Up(512, 128, 4)
        # Level 3 (1/16): 320 * 4 = 1280 channels.
        self.down1_4 = Down([64, 128, 320])
        self.down2_2 = Down([128, 320])
        self.up4_2 = Up(512, 320, 2)
        # Level 4 (1/32): 512 * 4 = 2048 channels.
        self.down1_8 = Down([64, 128, 320, 512])
        self.down2_4 = Down([128, 128, 512])
        self.down3_2 = Down([320, 512])
        # Second round: x32 = 512 + 1280 + 1024 = 2816, x42 = 512 + 1280 + 2048 = 3840.
        self.down21_2 = Down([512, 512])
        self.up41_2 = Up(2048, 1024, 2)
        self.down21_4 = Down([512, 512, 512])
        self.down31_2 = Down([1280, 1280])
        # Third round: x43 = 1024 + 3840 = 4864.
        self.down32_2 = Down([2816, 1024])

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor, x4: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (x21, x32, x43), the fused features at 1/8, 1/16 and 1/32."""
        x21 = torch.cat((self.down1_2(x1), x2, self.up3_2(x3), self.up4_4(x4)), dim=1)
        x31 = torch.cat((self.down1_4(x1), self.down2_2(x2), x3, self.up4_2(x4)), dim=1)
        x41 = torch.cat((self.down1_8(x1), self.down2_4(x2), self.down3_2(x3), x4), dim=1)
        x32 = torch.cat((self.down21_2(x21), x31, self.up41_2(x41)), dim=1)
        x42 = torch.cat((self.down21_4(x21), self.down31_2(x31), x41), dim=1)
        x43 = torch.cat((self.down32_2(x32), x42), dim=1)
        return x21, x32, x43
