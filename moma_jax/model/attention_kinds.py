"""The attention layer kinds: rows of the layer-kind table (`model/kinds.py`) whose token mixer
is attention. Each is the shared residual `Block` with different parts:

    dense       shared attention, one SwiGLU
    moe         shared attention, the sparse FFN of `model.moe` (MoMa's modality groups,
                mixed-modal MoE, token choice, every router of `model/routing.py`)
    mot         Mixture-of-Transformers: every weight of the layer per modality
    moh         Mixture-of-Head attention per modality group (`model/moh.py`), one SwiGLU
    switchhead  SwitchHead's value/output experts per head per modality (`model/switchhead.py`)
    motok       Mixture of Tokens (`model/mixture_of_tokens.py`), not modality-aware
    mod_dense, mod_moe, mod_mot   Mixture-of-Depths around dense, moe, mot (`kinds.mod_kind`)

The state-space kinds are in `model/ssm_kinds.py`; a new kind is one `register_layer_kind`
from any module (tests/test_extend.py).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from moma_jax import flops as flops_lib
from moma_jax.config import ModelConfig
from moma_jax.model import cache as kv_cache
from moma_jax.model.attention import Attention
from moma_jax.model.block import Block
from moma_jax.model.kinds import (
    LAYER_KINDS,
    LayerKind,
    mod_kind,
    register_layer_kind,
    sharding_rules,
)
from moma_jax.model.layers import RMSNorm, SwiGLU
from moma_jax.model.mixture_of_tokens import MixtureOfTokens
from moma_jax.model.moe import SparseFFN
from moma_jax.model.moh import moh_block, moh_describe, moh_layer_flops
from moma_jax.model.mot import UntiedAttention, UntiedRMSNorm, UntiedSwiGLU
from moma_jax.model.switchhead import switchhead_block, switchhead_describe, switchhead_layer_flops


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


def motok_block(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """Shared attention, the Mixture-of-Tokens FFN of `model.motok` (Antoniak et al. 2023)."""
    return _shared_attention_block(cfg, MixtureOfTokens(cfg, rngs=rngs), rngs)


def mot_block(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """Mixture-of-Transformers (Liang et al. 2024): every weight of the layer per modality."""
    return Block(
        cfg,
        attn=UntiedAttention(cfg, rngs=rngs),
        ffn=UntiedSwiGLU(cfg, rngs=rngs),
        attn_norm=UntiedRMSNorm(cfg.d_model, cfg),
        ffn_norm=UntiedRMSNorm(cfg.d_model, cfg),
    )


def kv_decode_state(cfg: ModelConfig, batch: int, length: int) -> dict[str, jax.Array]:
    """An attention layer's KV cache (`model/cache.py`)."""
    dt = jax.numpy.dtype(cfg.compute_dtype)
    return kv_cache.empty(batch, length, cfg.n_heads, cfg.resolved_head_dim, dt)


def _sparse_needs_aux_routers(cfg: ModelConfig) -> bool:
    """A group's routing row decides (expert choice ranks the whole routing group)."""
    return cfg.moe.needs_aux_routers


def _sparse_describe(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    groups = [
        {
            "name": moe.group_name(g),
            "experts": moe.group_experts[g],
            "slots": moe.group_slots(g),
            "first_slots": moe.first_slots(g),
            "slab_slots": moe.slab_slots(g),
            # what the ideal FLOPs assume; per-token routers log the measured mean
            "experts_per_token": moe.router(g).experts_per_token(moe, g),
        }
        for g in range(moe.n_groups)
    ]
    return {
        "groups": groups,
        "routing": moe.routing,
        "capacity": moe.capacity,
        "routing_group_tokens": moe.routing_group_tokens,
    }


def _motok_describe(cfg: ModelConfig) -> dict[str, Any]:
    t = cfg.motok
    return {
        "experts": t.experts,
        "group_rows": t.group_rows,
        "expert_hidden": t.resolved_expert_hidden(cfg.resolved_ffn_hidden),
        "temperature": t.temperature,
        "ffn_flops": flops_lib.motok_ffn_flops(cfg),
        # generation and --routing causal: the group of one, every expert on every token
        "causal_ffn_flops": flops_lib.motok_ffn_flops(cfg, causal=True),
    }


_ATTENTION_AXES = ("embed", "heads", "head_dim", "mlp", "norm")

register_layer_kind(
    "dense",
    LayerKind(
        build=dense_block,
        flops=flops_lib.dense_layer_flops,
        sharding=sharding_rules(*_ATTENTION_AXES),
        decode_state=kv_decode_state,
    ),
)
register_layer_kind(
    "moe",
    LayerKind(
        build=sparse_block,
        flops=flops_lib.sparse_layer_flops,
        sharding=sharding_rules(*_ATTENTION_AXES, "expert"),
        decode_state=kv_decode_state,
        reads_modality_shares=True,
        sparse_ffn=True,
        needs_aux_routers=_sparse_needs_aux_routers,
        describe=_sparse_describe,
        aux_routers=flops_lib.sparse_aux_routers,
    ),
)
register_layer_kind(
    "mot",
    LayerKind(
        build=mot_block,
        flops=flops_lib.mot_layer_flops,
        sharding=sharding_rules(*_ATTENTION_AXES, "modality"),
        decode_state=kv_decode_state,
        reads_modality_shares=True,
    ),
)
# Attention experts, routed per token inside each modality group (no aux router; the ordinary
# KV cache): MoH's heads as experts (model/moh.py) and SwitchHead's value and output experts
# per head (model/switchhead.py). "head_gate": MoH's router columns, replicated.
register_layer_kind(
    "moh",
    LayerKind(
        build=moh_block,
        flops=moh_layer_flops,
        sharding={**sharding_rules(*_ATTENTION_AXES, "modality"), "head_gate": None},
        decode_state=kv_decode_state,
        describe=moh_describe,
    ),
)
register_layer_kind(
    "switchhead",
    LayerKind(
        build=switchhead_block,
        flops=switchhead_layer_flops,
        sharding=sharding_rules(*_ATTENTION_AXES, "modality", "expert"),
        decode_state=kv_decode_state,
        describe=switchhead_describe,
    ),
)

# Mixture of Tokens: its groups are rows at one position, so nothing leaks along the sequence
# and causal routing (the group of one) needs no aux router.
register_layer_kind(
    "motok",
    LayerKind(
        build=motok_block,
        flops=flops_lib.motok_layer_flops,
        sharding=sharding_rules(*_ATTENTION_AXES, "expert"),
        decode_state=kv_decode_state,
        describe=_motok_describe,
    ),
)


# Mixture-of-Depths around each kind: mod_dense, mod_moe, mod_mot.
for _kind in ("dense", "moe", "mot"):
    register_layer_kind(f"mod_{_kind}", mod_kind(LAYER_KINDS[_kind]))
