"""Layer kinds: the names `model.layer_pattern` may use, each a constructor of one layer.

A layer maps (x_BxLxD, ctx) -> (x_BxLxD, aux). Every kind is the one residual `Block` with
different parts; layers never ask which model they belong to, and families differ only by the
kinds in their pattern and by their config.
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from moma_jax.config import ConfigError, ModelConfig
from moma_jax.model.attention import Attention
from moma_jax.model.block import Block
from moma_jax.model.layers import RMSNorm, SwiGLU
from moma_jax.model.mod import MoDBlock
from moma_jax.model.moe import SparseFFN
from moma_jax.model.mot import UntiedAttention, UntiedRMSNorm, UntiedSwiGLU


def _shared_attention_block(cfg: ModelConfig, ffn: nnx.Module, rngs: nnx.Rngs) -> Block:
    """One attention for all modalities around `ffn` (built first: the RNG stream's order)."""
    return Block(
        cfg,
        ffn=ffn,
        attn=Attention(cfg, rngs=rngs),
        attn_norm=RMSNorm(cfg.d_model, cfg),
        ffn_norm=RMSNorm(cfg.d_model, cfg),
    )


def dense_block(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """Shared attention, one SwiGLU."""
    return _shared_attention_block(cfg, SwiGLU(cfg, rngs=rngs), rngs)


def sparse_block(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """Shared attention, the sparse FFN of `model.moe` (MoMa, mixed-modal MoE, token choice)."""
    return _shared_attention_block(cfg, SparseFFN(cfg, rngs=rngs), rngs)


def mot_block(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """Mixture-of-Transformers (Liang et al. 2024): every weight of the layer per modality."""
    return Block(
        cfg,
        attn=UntiedAttention(cfg, rngs=rngs),
        ffn=UntiedSwiGLU(cfg, rngs=rngs),
        attn_norm=UntiedRMSNorm(cfg.d_model, cfg),
        ffn_norm=UntiedRMSNorm(cfg.d_model, cfg),
    )


LAYER_KINDS: dict[str, Callable[[ModelConfig, nnx.Rngs], nnx.Module]] = {
    "dense": dense_block,
    "moe": sparse_block,
    "mot": mot_block,
}


def _mod(build: Callable[[ModelConfig, nnx.Rngs], nnx.Module]):
    def mod_block(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
        """Mixture-of-Depths around the kind (model/mod.py)."""
        return MoDBlock(cfg, build, rngs=rngs)

    return mod_block


# Mixture-of-Depths around each kind: mod_dense, mod_moe, mod_mot.
for _kind, _build in list(LAYER_KINDS.items()):
    LAYER_KINDS[f"mod_{_kind}"] = _mod(_build)


def check_layer_kinds(cfg: ModelConfig) -> None:
    """Every entry of `model.layer_pattern` names a layer kind (ConfigError otherwise)."""
    unknown = [k for k in cfg.layer_pattern if k not in LAYER_KINDS]
    if unknown:
        raise ConfigError(
            f"model.layer_pattern has unknown layer kinds {unknown}; known: {sorted(LAYER_KINDS)}"
        )


def build_layer(cfg: ModelConfig, kind: str, rngs: nnx.Rngs) -> nnx.Module:
    return LAYER_KINDS[kind](cfg, rngs)
