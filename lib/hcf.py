"""HCF: hierarchical context fusion, a cascade of growing asymmetric receptive fields."""
from __future__ import annotations

import torch
from torch import nn


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm, no activation (the release's BasicConv2d)."""

    def __init__(self, cin: int, cout: int, kernel_size: int | tuple[int, int],
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve and normalise."""
        return self.bn(self.conv(x))


def asymmetric(cin: int, cout: int, k: int) -> list[ConvBN]:
    """A 1 x k then k x 1 pair of ConvBN layers."""
    return [ConvBN(cin, cout, (1, k), (0, k // 2)), ConvBN(cout, cout, (k, 1), (k // 2, 0))]


class HCF(nn.Module):
    """Reduces a feature to `cout` channels with 3-, 5- and 7-wide context, each fed the previous one."""

    def __init__(self, cin: int, cout: int = 64) -> None:
        super().__init__()
        self.branch1_1 = nn.Sequential(ConvBN(cin, cout, 1), *asymmetric(cout, cout, 3))
        self.branch1_2 = nn.Sequential(*asymmetric(2 * cout, cout, 5))
        self.branch1_3 = nn.Sequential(*asymmetric(2 * cout, cout, 7))
        self.branch2 = nn.Sequential(ConvBN(cin, cout, 1))
        self.branch3 = nn.Sequential(ConvBN(cin, cout, 1))
        self.branch4 = nn.Sequential(ConvBN(cin, cout, 1))
        self.branch5 = nn.Sequential(ConvBN(cin, cout, 1))
        self.conv_cat = ConvBN(2 * cout, cout, 3, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(shortcut + cascade of context branches)."""
        a = self.branch1_2(torch.cat((self.branch1_1(x), self.branch2(x)), dim=1))
        a = self.branch1_3(torch.cat((a, self.branch3(x)), dim=1))
        a = self.conv_cat(torch.cat((a, self.branch4(x)), dim=1))
        return self.relu(self.branch5(x) + a)
