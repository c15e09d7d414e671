"""FSANet: the model, its encoders and checkpoint loading."""
from .checkpoint import CheckpointError, load_checkpoint
from .encoders import load_pretrained_encoders
from .fsanet import FSANet

__all__ = ["FSANet", "load_checkpoint", "load_pretrained_encoders", "CheckpointError"]
