"""Training: state and optimizer, the pure step, checkpoints, metrics, and the loop."""

from moma_jax.train.loop import TrainingDivergedError, train

__all__ = ["TrainingDivergedError", "train"]
