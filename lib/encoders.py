"""Encoders: PVT-v2-b2 for RGB, a 1-channel ResNet-50 (or Res2Net-50 v1b) for the frequency image.

Pretrained ImageNet weights are read only from files the user names; nothing is downloaded.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import timm
import torch
from timm.models.pvt_v2 import checkpoint_filter_fn as pvt_checkpoint_filter_fn
from torch import nn
from torchvision.models import resnet50

from . import FREQ_ENCODER_NAMES
from .checkpoint import CheckpointError, describe_mismatch, read_state_dict
from .grad_checkpointing import checkpoint_stage

log = logging.getLogger(__name__)

PVT_URL = "https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b2.pth"
RESNET_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
RES2NET_URL = "https://shanghuagao.oss-cn-beijing.aliyuncs.com/res2net/res2net50_v1b_26w_4s-3cf99910.pth"


class RGBEncoder(nn.Module):
    """timm's PVT-v2-b2: features at 1/4, 1/8, 1/16, 1/32 with 64, 128, 320, 512 channels."""

    def __init__(self, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        self.body = timm.create_model("pvt_v2_b2", pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Four NCHW feature maps, each after its stage's LayerNorm."""
        return self.body.forward_intermediates(x, intermediates_only=True)


class ResNetFrequencyEncoder(nn.Module):
    """torchvision ResNet-50 with a 1-channel stem; stage names as in the release."""

    def __init__(self) -> None:
        super().__init__()
        net = resnet50(weights=None)
        self.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.normal_(self.conv1.weight, 0.0, 1.0)
        self.bn1, self.relu, self.maxpool = net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3_1, self.layer4_1 = net.layer1, net.layer2, net.layer3, net.layer4
        self.grad_checkpointing = False

    def forward(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Four feature maps (256, 512, 1024, 2048 channels at 1/4 .. 1/32)."""
        y = self.maxpool(self.relu(self.bn1(self.conv1(y))))
        features = []
        for stage in (self.layer1, self.layer2, self.layer3_1, self.layer4_1):
            y = checkpoint_stage(stage, y) if self.grad_checkpointing else stage(y)
            features.append(y)
        return features


class Res2NetFrequencyEncoder(nn.Module):
    """timm's res2net50d (= Res2Net-50 v1b 26w4s) with a 1-channel stem, as an alternative."""

    def __init__(self) -> None:
        super().__init__()
        self.body = timm.create_model("res2net50d", pretrained=False, in_chans=1, num_classes=0)
        nn.init.normal_(self.body.conv1[0].weight, 0.0, 1.0)
        self.grad_checkpointing = False

    def forward(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Four feature maps (256, 512, 1024, 2048 channels at 1/4 .. 1/32)."""
        if not self.grad_checkpointing:
            return self.body.forward_intermediates(y, indices=[1, 2, 3, 4], intermediates_only=True)
        # timm's forward_intermediates, one checkpoint per stage (timm's own would update BatchNorm twice).
        b = self.body
        y = b.maxpool(b.act1(b.bn1(b.conv1(y))))
        features = []
        for stage in (b.layer1, b.layer2, b.layer3, b.layer4):
            y = checkpoint_stage(stage, y)
            features.append(y)
        return features


FREQ_ENCODERS = dict(zip(FREQ_ENCODER_NAMES, (ResNetFrequencyEncoder, Res2NetFrequencyEncoder), strict=True))


def _pretrained_file(path: str | os.PathLike, what: str, url: str) -> dict[str, torch.Tensor]:
    """Read a pretrained weights file, or fail with a message naming it and where to get it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{what} weights not found: {path}. Download {url} and pass its path "
            f"(or train from scratch with --no_pretrained)."
        )
    return read_state_dict(path)


def _load_matching(module: nn.Module, state: dict[str, torch.Tensor], path: Path, skip: tuple[str, ...]) -> None:
    """Copy `state` into `module` except keys starting with `skip`; any other mismatch is an error."""
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(skip)}
    wanted = {k: v for k, v in state.items() if not k.startswith(skip)}
    problems = describe_mismatch(own, wanted)
    if problems:
        raise CheckpointError(f"{path} does not fit {type(module).__name__}: {problems}")
    module.load_state_dict(wanted, strict=False)


def load_pvt_pretrained(encoder: RGBEncoder, path: str | os.PathLike) -> None:
    """Load the original `pvt_v2_b2.pth` (original PVT-v2 key layout; timm's layout works too)."""
    state = _pretrained_file(path, "PVT-v2-b2 ImageNet", PVT_URL)
    state = pvt_checkpoint_filter_fn(state, encoder.body)
    _load_matching(encoder.body, state, Path(path), skip=("head.",))
    log.info("loaded PVT-v2-b2 weights from %s", path)


def load_resnet_pretrained(encoder: ResNetFrequencyEncoder, path: str | os.PathLike) -> None:
    """Load torchvision's ResNet-50 ImageNet file; the 1-channel stem stays normal(0, 1), as released."""
    state = _pretrained_file(path, "ResNet-50 ImageNet (torchvision)", RESNET_URL)
    state = {k.replace("layer3.", "layer3_1.", 1).replace("layer4.", "layer4_1.", 1): v for k, v in state.items()}
    _load_matching(encoder, state, Path(path), skip=("conv1.", "fc."))
    nn.init.normal_(encoder.conv1.weight, 0.0, 1.0)
    log.info("loaded ResNet-50 weights from %s", path)


def load_res2net_pretrained(encoder: Res2NetFrequencyEncoder, path: str | os.PathLike) -> None:
    """Load `res2net50_v1b_26w_4s-3cf99910.pth` (its keys are timm's res2net50d keys); stem conv re-initialised."""
    state = _pretrained_file(path, "Res2Net-50 v1b 26w4s ImageNet", RES2NET_URL)
    _load_matching(encoder.body, state, Path(path), skip=("conv1.0.", "fc."))
    nn.init.normal_(encoder.body.conv1[0].weight, 0.0, 1.0)
    log.info("loaded Res2Net-50 v1b weights from %s", path)


def load_pretrained_encoders(
    model: nn.Module,
    pvt_path: str | os.PathLike | None = None,
    resnet_path: str | os.PathLike | None = None,
    res2net_path: str | os.PathLike | None = None,
) -> None:
    """Initialise FSANet's encoders from ImageNet files, as the release does before training."""
    if pvt_path is not None:
        load_pvt_pretrained(model.rgb_encoder, pvt_path)
    encoder = model.freq_encoder
    path = resnet_path if isinstance(encoder, ResNetFrequencyEncoder) else res2net_path
    if path is None:
        return
    if isinstance(encoder, ResNetFrequencyEncoder):
        load_resnet_pretrained(encoder, path)
    else:
        load_res2net_pretrained(encoder, path)
