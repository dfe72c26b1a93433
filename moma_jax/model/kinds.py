"""Layer kinds: the names `model.layer_pattern` may use, each a constructor of one layer.

A layer maps (x_BxLxD, ctx) -> (x_BxLxD, aux). Layers never ask which model they belong to;
families differ only by the kinds in their pattern and by their config.
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from moma_jax.config import ConfigError, ModelConfig
from moma_jax.model.block import Block
from moma_jax.model.layers import SwiGLU
from moma_jax.model.moe import SparseFFN
from moma_jax.model.mot import MoTBlock


def _dense(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    return Block(cfg, SwiGLU(cfg, rngs=rngs), rngs=rngs)


LAYER_KINDS: dict[str, Callable[[ModelConfig, nnx.Rngs], nnx.Module]] = {
    "dense": _dense,
    "moe": lambda cfg, rngs: Block(cfg, SparseFFN(cfg, rngs=rngs), rngs=rngs),  # MoMa, MoE
    "mot": lambda cfg, rngs: MoTBlock(cfg, rngs=rngs),  # Mixture-of-Transformers (Liang 2024)
}


def build_layer(cfg: ModelConfig, kind: str, rngs: nnx.Rngs) -> nnx.Module:
    return LAYER_KINDS[kind](cfg, rngs)


def check_layer_kinds(cfg: ModelConfig) -> None:
    unknown = [k for k in cfg.layer_pattern if k not in LAYER_KINDS]
    if unknown:
        raise ConfigError(
            f"model.layer_pattern has unknown layer kinds {unknown}; known: {sorted(LAYER_KINDS)}"
        )
