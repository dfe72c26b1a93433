"""Segment-aware causal self-attention with RoPE and Chameleon's QK-norm."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ModelConfig
from moma_jax.model.context import Context
from moma_jax.model.layers import LayerNorm, param, rope

Norm = Callable[[jax.Array, Context], jax.Array]


def segment_causal_mask(segment_ids_BxL: jax.Array) -> jax.Array:
    """[B, 1, L, L] bool: query i sees key j iff j <= i and both lie in the same segment.

    Padding (segment 0) only sees padding, so no row is empty and no softmax is NaN; real tokens
    never see padding or another document.
    """
    length = segment_ids_BxL.shape[-1]
    causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return (same_BxLxL & causal_LxL)[:, None]


def attend(
    q_BxLxHxDh: jax.Array,
    k_BxLxHxDh: jax.Array,
    v_BxLxHxDh: jax.Array,
    ctx: Context,
    qk_norm: tuple[Norm, Norm] | None,
    rope_theta: float,
) -> jax.Array:
    """The attention sequence every layer kind shares, after its own q/k/v projections:

    1. QK-norm (Chameleon: LayerNorm over head_dim, shared by heads), when enabled;
    2. RoPE at each token's position (`ctx.positions`);
    3. softmax attention under `ctx.attn_mask` (segment-aware causal), or, when decoding,
       over the keys of `ctx.kv` (`model/cache.py`) after appending this call's.
    Returns the per-head outputs [B, L, H, Dh], before the output projection.
    """
    if qk_norm is not None:
        q_norm, k_norm = qk_norm
        q_BxLxHxDh, k_BxLxHxDh = q_norm(q_BxLxHxDh, ctx), k_norm(k_BxLxHxDh, ctx)
    q_BxLxHxDh = rope(q_BxLxHxDh, ctx.positions, rope_theta)
    k_BxLxHxDh = rope(k_BxLxHxDh, ctx.positions, rope_theta)
    if ctx.kv is None:
        mask = ctx.attn_mask
    else:
        k_BxLxHxDh, v_BxLxHxDh, mask = ctx.kv.append(k_BxLxHxDh, v_BxLxHxDh, ctx.present())
    return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, mask=mask)


class Attention(nnx.Module):
    """Multi-head attention with one set of projections for all tokens."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, dh, std, dt = (
            cfg.d_model, cfg.n_heads, cfg.resolved_head_dim, cfg.init_std, cfg.param_dtype
        )  # fmt: skip
        in_axes = ("embed", "heads", "head_dim")
        self.wq_DxHxDh = param(rngs, (d, h, dh), in_axes, std, dt)
        self.wk_DxHxDh = param(rngs, (d, h, dh), in_axes, std, dt)
        self.wv_DxHxDh = param(rngs, (d, h, dh), in_axes, std, dt)
        self.wo_HxDhxD = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), std, dt)
        self.q_norm = LayerNorm(dh, cfg) if cfg.qk_norm else None
        self.k_norm = LayerNorm(dh, cfg) if cfg.qk_norm else None
        self.rope_theta = cfg.rope_theta
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> jax.Array:
        dt = self.compute_dtype
        x = x_BxLxD.astype(dt)
        q, k, v = (
            jnp.einsum("bld,dhk->blhk", x, w[...].astype(dt))
            for w in (self.wq_DxHxDh, self.wk_DxHxDh, self.wv_DxHxDh)
        )
        qk_norm = None if self.q_norm is None or self.k_norm is None else (self.q_norm, self.k_norm)
        out_BxLxHxDh = attend(q, k, v, ctx, qk_norm, self.rope_theta)
        return jnp.einsum("blhk,hkd->bld", out_BxLxHxDh, self.wo_HxDhxD[...].astype(dt))
