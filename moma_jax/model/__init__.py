"""Flax NNX model code. Model code names logical axes only; `moma_jax.sharding` maps them."""

from moma_jax.model.block import Block
from moma_jax.model.kinds import LAYER_KINDS
from moma_jax.model.transformer import Transformer

__all__ = ["LAYER_KINDS", "Block", "Transformer"]
