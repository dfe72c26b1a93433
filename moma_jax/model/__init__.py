"""Flax NNX model code. Model code names logical axes only; `moma_jax.sharding` maps them."""

from moma_jax.model.block import FFN_KINDS, Block
from moma_jax.model.transformer import Transformer

__all__ = ["FFN_KINDS", "Block", "Transformer"]
