"""Segment-aware causal self-attention with RoPE and Chameleon's QK-norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ModelConfig
from moma_jax.model.layers import LayerNorm, dtype_of, param, rope


def segment_causal_mask(segment_ids_BxL: jax.Array) -> jax.Array:
    """[B, 1, L, L] bool: query i sees key j iff j <= i and both lie in the same segment.

    Padding (segment 0) only sees padding, so no row is empty and no softmax is NaN; real tokens
    never see padding or another document.
    """
    length = segment_ids_BxL.shape[-1]
    causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return (same_BxLxL & causal_LxL)[:, None]


class Attention(nnx.Module):
    """Multi-head attention: projections, QK-norm over head_dim, RoPE, masked softmax."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, dh, std = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim, cfg.init_std
        self.wq_DxHxK = param(
            rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, cfg.param_dtype
        )
        self.wk_DxHxK = param(
            rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, cfg.param_dtype
        )
        self.wv_DxHxK = param(
            rngs, (d, h, dh), ("embed", "heads", "head_dim"), std, cfg.param_dtype
        )
        self.wo_HxKxD = param(
            rngs, (h, dh, d), ("heads", "head_dim", "embed"), std, cfg.param_dtype
        )
        self.q_norm = LayerNorm(dh, cfg) if cfg.qk_norm else None
        self.k_norm = LayerNorm(dh, cfg) if cfg.qk_norm else None
        self.rope_theta = cfg.rope_theta
        self.compute_dtype = dtype_of(cfg.compute_dtype)

    def __call__(self, x_BxLxD: jax.Array, ctx: dict) -> jax.Array:
        dt = self.compute_dtype
        x = x_BxLxD.astype(dt)
        q_BxLxHxK = jnp.einsum("bld,dhk->blhk", x, self.wq_DxHxK[...].astype(dt))
        k_BxLxHxK = jnp.einsum("bld,dhk->blhk", x, self.wk_DxHxK[...].astype(dt))
        v_BxLxHxK = jnp.einsum("bld,dhk->blhk", x, self.wv_DxHxK[...].astype(dt))
        if self.q_norm is not None:
            q_BxLxHxK, k_BxLxHxK = self.q_norm(q_BxLxHxK), self.k_norm(k_BxLxHxK)
        q_BxLxHxK = rope(q_BxLxHxK, ctx["positions"], self.rope_theta)
        k_BxLxHxK = rope(k_BxLxHxK, ctx["positions"], self.rope_theta)
        out_BxLxHxK = jax.nn.dot_product_attention(
            q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=ctx["attn_mask"]
        )
        return jnp.einsum("blhk,hkd->bld", out_BxLxHxK, self.wo_HxKxD[...].astype(dt))
