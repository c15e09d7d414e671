"""FSANet (Jiang et al., TNNLS 2024): frequency- and scale-aware dichotomous image segmentation.

Reads like the architecture figure: a high-pass frequency image feeds a second encoder, MF fuses
its features into the RGB encoder's, CSFM fuses scales, HCF enlarges context, SFF decodes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .csfm import CSFM
from .encoders import FREQ_ENCODERS, RGBEncoder
from .frequency import FrequencyFilter
from .hcf import HCF
from .head import Head
from .mf import MF
from .sff import SFF

RGB_CHANNELS = (64, 128, 320, 512)
FREQ_CHANNELS = (256, 512, 1024, 2048)
# HCF inputs: x1 (1/4), x21 (1/8), x32 (1/16), x43 (1/32).
HCF_CHANNELS = (64, 512, 2816, 4864)
# Parameters the release declares but whose value never reaches the loss: the filter radius (the mask is
# built with torch.where) and modules it never calls. They are frozen so that nothing writes them: under
# DataParallel their missing gradients would otherwise become zeros, and AdaXW would decay them.
NEVER_USED = ("frequency.radius", "sff.bn_out", "head.conv_up2", "head.conv_up3", "head.conv_up4")


class FSANet(nn.Module):
    """The released FSANet; `model(x)` returns logits (P1, P2, P3, P4) and the frequency image."""

    def __init__(self, freq_encoder: str = "resnet50", drop_path_rate: float = 0.1, radius: float = 100.0) -> None:
        super().__init__()
        if freq_encoder not in FREQ_ENCODERS:
            raise ValueError(f"freq_encoder must be one of {sorted(FREQ_ENCODERS)}, not {freq_encoder!r}")
        self.frequency = FrequencyFilter(radius)
        self.rgb_encoder = RGBEncoder(drop_path_rate)
        self.freq_encoder = FREQ_ENCODERS[freq_encoder]()
        self.mf = nn.ModuleList(MF(f, r) for f, r in zip(FREQ_CHANNELS, RGB_CHANNELS))
        self.csfm = CSFM()
        self.hcf = nn.ModuleList(HCF(c, 64) for c in HCF_CHANNELS)
        # One SFF serves all three decoder steps, as released.
        self.sff = SFF(64)
        self.head = Head(64)
        # Layout of the features that several convolutions read; optimize_for_inference sets
        # channels_last so each is converted once instead of once per reading convolution.
        self.memory_format = torch.contiguous_format
        for name in self.never_used_parameters():
            self.get_parameter(name).requires_grad_(False)

    @classmethod
    def empty(cls, device: torch.device | str = "cpu", **options: Any) -> FSANet:
        """FSANet(**options) with its tensors allocated on `device` but not initialised (as torch.empty), for a
        strict load that sets every one: drawing 109 M random numbers first costs half a second."""
        with torch.device("meta"):
            model = cls(**options)
        return model.to_empty(device=device)

    def never_used_parameters(self) -> list[str]:
        """Names of the parameters under NEVER_USED (frozen; the state dict keeps them)."""
        return [name for name, _ in self.named_parameters()
                if any(name == n or name.startswith(n + ".") for n in NEVER_USED)]

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Frequency image, both encoders and MF: the four fused features and the frequency image."""
        freq = self.frequency(x)
        rgb_features = self.rgb_encoder(x)
        freq_features = self.freq_encoder(freq.to(x.dtype))
        fused = [mf(r, f) for mf, r, f in zip(self.mf, rgb_features, freq_features)]
        return [f.contiguous(memory_format=self.memory_format) for f in fused], freq

    def decode(self, fused: list[torch.Tensor]) -> list[torch.Tensor]:
        """CSFM, HCF and SFF: decoder outputs o1 (1/4), o2 (1/8), o3 (1/16) and x43' (1/32)."""
        x1, x2, x3, x4 = fused
        x21, x32, x43 = (f.contiguous(memory_format=self.memory_format) for f in self.csfm(x1, x2, x3, x4))
        x1, x21, x32, x43 = (hcf(f) for hcf, f in zip(self.hcf, (x1, x21, x32, x43)))
        o3 = self.sff(x32, x43)
        o2 = self.sff(x21, o3)
        o1 = self.sff(x1, o2)
        return [o1, o2, o3, x43]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(P1, P2, P3, P4, frequency) for an ImageNet-normalised B x 3 x H x W batch (H, W % 32 == 0)."""
        fused, freq = self.encode(x)
        levels = self.decode(fused)
        maps = [self.head(level, factor) for level, factor in zip(levels, (2, 4, 8, 16))]
        return (*maps, freq)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder activations in the backward pass (PVT-v2 blocks, ResNet stages) to save memory."""
        self.rgb_encoder.body.set_grad_checkpointing(enable)
        self.freq_encoder.grad_checkpointing = enable

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """P1 alone: the same final map as forward()[0] without computing the unused heads."""
        fused, _ = self.encode(x)
        return self.head(self.decode(fused)[0], 2)
