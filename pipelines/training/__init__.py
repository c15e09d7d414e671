"""Training: the run's configuration, reproducibility (seeds, RNG states, data order), checkpoints and
resume, and the loop that uses them."""
from pipelines.training.config import NonFiniteLossError, TrainConfig, TrainingError
from pipelines.training.loop import Trainer

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "TrainingError"]
