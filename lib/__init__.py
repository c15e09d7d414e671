"""FSANet: the model, its encoders and checkpoint loading.

The exports load on first use (PEP 562), so `import lib.checkpoint` or `lib.frequency` does not import
timm and torchvision: test.py's OpenVINO path needs only those two and starts seconds sooner.
"""
from __future__ import annotations

import importlib
from typing import Any

# Names of the frequency encoders (lib.encoders.FREQ_ENCODERS holds their classes), for argument parsers.
FREQ_ENCODER_NAMES = ("resnet50", "res2net50")

_EXPORTS = {"FSANet": ".fsanet", "load_checkpoint": ".checkpoint", "fsanet_from_checkpoint": ".checkpoint",
            "CheckpointError": ".checkpoint", "load_pretrained_encoders": ".encoders"}

__all__ = ["FSANet", "load_checkpoint", "fsanet_from_checkpoint", "load_pretrained_encoders", "CheckpointError",
           "FREQ_ENCODER_NAMES"]


def __getattr__(name: str) -> Any:
    """Import the module that defines export `name` when it is first used."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
