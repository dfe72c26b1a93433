"""Mixture-of-Transformers block (Liang et al. 2024, arXiv 2411.04996).

Every non-embedding weight of the layer is untied by modality: Q/K/V/O projections, the QK-norm,
the attention and FFN RMSNorms and the SwiGLU feed-forward. Routing is deterministic (a token uses
its modality's weights; no router, no capacity, nothing dropped), and one global causal
self-attention runs over the whole mixed sequence. Per-modality weights are stacked on a leading
"modality" axis (M = len(MODALITY_NAMES)), so the layer is one set of arrays.

Execution is masked compute: every projection (and the whole FFN) runs once per modality on all
tokens, and each token keeps the result of its own modality (`jnp.where`). Shapes stay static and
each per-modality product is exactly the dense layer's einsum, but the executed FLOPs of the
projections and the FFN are M x the ideal (M = 2: 2x); the attention scores and weighted values
run once (1x). Per layer, executed / ideal = (M (P + F) + S) / (P + F + S) with P the Q/K/V/O
projections, F the FFN and S the scores and values: 1.6 at d=512, 1.86 at d=2048 (L=4096, causal).
Gradients are exact: a modality with no tokens gets exactly zero gradient.

Why not sort tokens by modality and run `jax.lax.ragged_dot` (ideal FLOPs)? On CPU it measured no
faster than masked compute (it executes like M dense products); whether it wins on GPU/TPU is
unmeasured, so the one path here is the simple exact one.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ModelConfig
from moma_jax.data.vocab import MODALITY_NAMES
from moma_jax.model.layers import annotated, dtype_of, ones_param, param, rope

N_MODALITIES = len(MODALITY_NAMES)


def per_modality(fn: Callable[[int], jax.Array], modality_BxL: jax.Array) -> jax.Array:
    """Masked compute: each token [b, l] of the result is fn(modality[b, l])[b, l].

    `fn(m)` computes modality m's output for all tokens ([B, L, ...]); the other modalities'
    rows are discarded with `jnp.where`, so their gradient is exactly zero.
    """
    out = None
    for m in range(N_MODALITIES):
        y = fn(m)
        keep = (modality_BxL == m).reshape(modality_BxL.shape + (1,) * (y.ndim - 2))
        out = jnp.where(keep, y, jnp.zeros_like(y) if out is None else out)
    return out


def gather_modality(w_MxX: jax.Array, modality_BxL: jax.Array) -> jax.Array:
    """Per-token copy [B, L, ...] of a small per-modality parameter (norm scales and biases).

    An id outside [0, M) reads NaN (jnp.take's fill mode), so a bad modality fails loudly.
    """
    return jnp.take(w_MxX, modality_BxL.astype(jnp.int32), axis=0)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """`layers.RMSNorm` with a scale that broadcasts against x (here: one per token)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """`layers.LayerNorm` with scale and bias that broadcast against x (one per token)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class UntiedRMSNorm(nnx.Module):
    """RMSNorm over the last axis with one scale per modality, in float32."""

    def __init__(self, dim: int, cfg: ModelConfig):
        self.scale_MxD = ones_param((N_MODALITIES, dim), ("modality", "norm"), cfg.param_dtype)
        self.eps = cfg.norm_eps

    def __call__(self, x_BxLxD: jax.Array, modality_BxL: jax.Array) -> jax.Array:
        return rms_norm(x_BxLxD, gather_modality(self.scale_MxD[...], modality_BxL), self.eps)


class UntiedLayerNorm(nnx.Module):
    """QK-norm: LayerNorm over head_dim (shared by heads) with scale and bias per modality."""

    def __init__(self, dim: int, cfg: ModelConfig):
        m, dt = N_MODALITIES, cfg.param_dtype
        self.scale_MxK = ones_param((m, dim), ("modality", "norm"), dt)
        self.bias_MxK = annotated(jnp.zeros((m, dim), dtype_of(dt)), ("modality", "norm"))
        self.eps = cfg.norm_eps

    def __call__(self, x_BxLxHxK: jax.Array, modality_BxL: jax.Array) -> jax.Array:
        scale_BxLx1xK = gather_modality(self.scale_MxK[...], modality_BxL)[:, :, None]
        bias_BxLx1xK = gather_modality(self.bias_MxK[...], modality_BxL)[:, :, None]
        return layer_norm(x_BxLxHxK, scale_BxLx1xK, bias_BxLx1xK, self.eps)


class UntiedAttention(nnx.Module):
    """Global causal attention over the mixed sequence; projections and QK-norm per modality."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m, d, h, dh = N_MODALITIES, cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
        std, pdt = cfg.init_std, cfg.param_dtype
        in_axes = ("modality", "embed", "heads", "head_dim")
        self.wq_MxDxHxK = param(rngs, (m, d, h, dh), in_axes, std, pdt)
        self.wk_MxDxHxK = param(rngs, (m, d, h, dh), in_axes, std, pdt)
        self.wv_MxDxHxK = param(rngs, (m, d, h, dh), in_axes, std, pdt)
        self.wo_MxHxKxD = param(
            rngs, (m, h, dh, d), ("modality", "heads", "head_dim", "embed"), std, pdt
        )
        self.q_norm = UntiedLayerNorm(dh, cfg) if cfg.qk_norm else None
        self.k_norm = UntiedLayerNorm(dh, cfg) if cfg.qk_norm else None
        self.rope_theta = cfg.rope_theta
        self.compute_dtype = dtype_of(cfg.compute_dtype)

    def __call__(self, x_BxLxD: jax.Array, ctx: dict) -> jax.Array:
        dt, modality_BxL = self.compute_dtype, ctx["modality"]
        x = x_BxLxD.astype(dt)

        def project_in(w_MxDxHxK: nnx.Param) -> jax.Array:
            w = w_MxDxHxK[...].astype(dt)
            return per_modality(lambda m: jnp.einsum("bld,dhk->blhk", x, w[m]), modality_BxL)

        q_BxLxHxK = project_in(self.wq_MxDxHxK)
        k_BxLxHxK = project_in(self.wk_MxDxHxK)
        v_BxLxHxK = project_in(self.wv_MxDxHxK)
        if self.q_norm is not None:
            q_BxLxHxK = self.q_norm(q_BxLxHxK, modality_BxL)
            k_BxLxHxK = self.k_norm(k_BxLxHxK, modality_BxL)
        q_BxLxHxK = rope(q_BxLxHxK, ctx["positions"], self.rope_theta)
        k_BxLxHxK = rope(k_BxLxHxK, ctx["positions"], self.rope_theta)
        out_BxLxHxK = jax.nn.dot_product_attention(
            q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=ctx["attn_mask"]
        )
        wo = self.wo_MxHxKxD[...].astype(dt)
        return per_modality(lambda m: jnp.einsum("blhk,hkd->bld", out_BxLxHxK, wo[m]), modality_BxL)


class UntiedSwiGLU(nnx.Module):
    """SwiGLU feed-forward with one set of weights per modality: down(silu(x W_gate) * (x W_up))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m, d, f = N_MODALITIES, cfg.d_model, cfg.resolved_ffn_hidden
        std, pdt = cfg.init_std, cfg.param_dtype
        self.w_gate_MxDxF = param(rngs, (m, d, f), ("modality", "embed", "mlp"), std, pdt)
        self.w_up_MxDxF = param(rngs, (m, d, f), ("modality", "embed", "mlp"), std, pdt)
        self.w_down_MxFxD = param(rngs, (m, f, d), ("modality", "mlp", "embed"), std, pdt)
        self.compute_dtype = dtype_of(cfg.compute_dtype)

    def __call__(self, x_BxLxD: jax.Array, ctx: dict) -> jax.Array:
        dt = self.compute_dtype
        x = x_BxLxD.astype(dt)
        w_gate = self.w_gate_MxDxF[...].astype(dt)
        w_up = self.w_up_MxDxF[...].astype(dt)
        w_down = self.w_down_MxFxD[...].astype(dt)

        def ffn(m: int) -> jax.Array:
            gate_BxLxF = jnp.einsum("bld,df->blf", x, w_gate[m])
            up_BxLxF = jnp.einsum("bld,df->blf", x, w_up[m])
            return jnp.einsum("blf,fd->bld", jax.nn.silu(gate_BxLxF) * up_BxLxF, w_down[m])

        return per_modality(ffn, ctx["modality"])


class MoTBlock(nnx.Module):
    """A `Block` whose every weight is per modality (same norm orders, same interface).

    pre:  h = x + attn(norm(x));     out = h + ffn(norm(h))
    post: h = x + norm(attn(x));     out = h + norm(ffn(h))

    with attn, ffn and both norms using each token's own modality's weights (ctx["modality"]).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn = UntiedAttention(cfg, rngs=rngs)
        self.ffn = UntiedSwiGLU(cfg, rngs=rngs)
        self.attn_norm = UntiedRMSNorm(cfg.d_model, cfg)
        self.ffn_norm = UntiedRMSNorm(cfg.d_model, cfg)
        self.post_norm = cfg.norm_order == "post"

    def __call__(self, x_BxLxD: jax.Array, ctx: dict) -> tuple[jax.Array, dict]:
        mod, dt = ctx["modality"], x_BxLxD.dtype
        if self.post_norm:
            h = x_BxLxD + self.attn_norm(self.attn(x_BxLxD, ctx), mod).astype(dt)
            return h + self.ffn_norm(self.ffn(h, ctx), mod).astype(dt), {}
        h = x_BxLxD + self.attn(self.attn_norm(x_BxLxD, mod), ctx).astype(dt)
        return h + self.ffn(self.ffn_norm(h, mod), ctx).astype(dt), {}
