"""Training: `train(config)` on a YAML train config; see jaxkv.train.config for its keys."""

from jaxkv.train.config import TrainConfig
from jaxkv.train.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
