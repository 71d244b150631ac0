"""Training a backbone and its exit heads (`epee train`)."""

from .trainer import TrainConfig, build_model, train

__all__ = ["TrainConfig", "build_model", "train"]
