"""Inference fast paths that keep the release's outputs to float32 round-off.

`optimize_for_inference` folds BatchNorm into the preceding convolutions and stores weights
channels_last (on CPU this removes most layout copies around the convolutions);
`use_release_compute` puts back the release's slower way of computing the same thing (explicit
attention, the filter mask rebuilt every call) so benchmarks can time both in one run.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import Bottleneck

from .csfm import Down, Up
from .encoders import ResNetFrequencyEncoder
from .frequency import FrequencyFilter
from .hcf import ConvBN
from .sff import SFF

# (conv, bn) attribute pairs where the forward pass applies bn directly to conv's output.
FOLDABLE: dict[type, tuple[tuple[str, str], ...]] = {
    ConvBN: (("conv", "bn"),),
    Up: (("conv1", "bn"),),
    SFF: (("conv_xy", "bn_xy"), ("conv_gate", "bn_gate")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    ResNetFrequencyEncoder: (("conv1", "bn1"),),
}


def _fold_pair(module: nn.Module, conv_name: str, bn_name: str) -> None:
    """Replace module.conv by conv∘bn and module.bn by Identity."""
    conv, bn = getattr(module, conv_name), getattr(module, bn_name)
    if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
        setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
        setattr(module, bn_name, nn.Identity())


def _fold_sequential(seq: nn.Sequential) -> None:
    """Fold every Conv2d immediately followed by a BatchNorm2d inside a Sequential."""
    names = list(seq._modules)
    for first, second in zip(names[:-1], names[1:]):
        _fold_pair(seq, first, second)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold inference-mode BatchNorm into convolutions in place (the model must be in eval mode)."""
    if model.training:
        raise ValueError("fold_batchnorm needs model.eval(): folding uses the running statistics")
    for module in list(model.modules()):
        for conv_name, bn_name in FOLDABLE.get(type(module), ()):
            _fold_pair(module, conv_name, bn_name)
        if isinstance(module, Down):
            _fold_pair(module, f"conv{module.num_convs}", "bn")
        if isinstance(module, nn.Sequential):
            _fold_sequential(module)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store weights channels_last and have FSANet keep its shared features in that layout."""
    model.to(memory_format=torch.channels_last)
    if hasattr(model, "memory_format"):
        model.memory_format = torch.channels_last
    return model


def cast_for_autocast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store conv and linear weights in `dtype` once, instead of autocast casting them on every call.

    The model must then run under `torch.autocast(..., dtype=dtype)`; its outputs are identical to
    autocast over float32 weights (the same rounding, done once). Norm layers stay float32.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.to(dtype)
    return model


def optimize_for_inference(model: nn.Module, fold_bn: bool = True, channels_last: bool = True,
                           autocast_dtype: torch.dtype | None = None) -> nn.Module:
    """Eval mode, BatchNorm folded, channels_last weights (fewer layout copies around convs); same outputs.

    With `autocast_dtype` (bf16/fp16), conv and linear weights are also stored in that dtype for use
    under torch.autocast (see cast_for_autocast).
    """
    model.eval()
    if fold_bn:
        fold_batchnorm(model)
    if channels_last:
        to_channels_last(model)
    if autocast_dtype is not None:
        cast_for_autocast(model, autocast_dtype)
    return model


def use_release_compute(model: nn.Module) -> nn.Module:
    """Compute as the release does: explicit softmax attention, filter mask rebuilt on every call."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
        if isinstance(module, FrequencyFilter):
            module.cache_mask = False
    return model
