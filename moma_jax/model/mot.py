"""Mixture-of-Transformers block (Liang et al. 2024, arXiv 2411.04996).

Every non-embedding weight of the layer is untied by modality: Q/K/V/O projections, the QK-norm,
the attention and FFN RMSNorms and the SwiGLU feed-forward. Routing is deterministic (a token uses
its modality's weights; no router, no capacity, nothing dropped), and one global causal
self-attention runs over the whole mixed sequence. Per-modality weights are stacked on a leading
"modality" axis (M = N_MODALITIES), so the layer is one set of arrays. The layer is the shared
`Block` with the untied parts below, and they call the same math as the dense layer
(`layers.rms_norm`, `layers.layer_norm`, `layers.swiglu`, `attention.attend`).

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
from moma_jax.modality import N_MODALITIES
from moma_jax.model.attention import attend
from moma_jax.model.layers import layer_norm, ones_param, param, rms_norm, swiglu, zeros_param


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
    assert out is not None
    return out


def gather_modality(w_MxX: jax.Array, modality_BxL: jax.Array, ndim: int) -> jax.Array:
    """Per-token copy of a small per-modality parameter (norm scales and biases), shaped
    [B, L, 1, ..., X] to broadcast against an `ndim`-dimensional activation.

    An id outside [0, M) reads NaN (jnp.take's fill mode), so a bad modality fails loudly.
    """
    w_BxLxX = jnp.take(w_MxX, modality_BxL.astype(jnp.int32), axis=0)
    return w_BxLxX.reshape(w_BxLxX.shape[:2] + (1,) * (ndim - 3) + w_BxLxX.shape[2:])


class UntiedRMSNorm(nnx.Module):
    """RMSNorm over the last axis with one scale per modality."""

    def __init__(self, dim: int, cfg: ModelConfig):
        self.scale_MxD = ones_param((N_MODALITIES, dim), ("modality", "norm"), cfg.param_dtype)
        self.eps = cfg.norm_eps

    def __call__(self, x_BxLxD: jax.Array, ctx: dict) -> jax.Array:
        scale_BxLxD = gather_modality(self.scale_MxD[...], ctx["modality"], x_BxLxD.ndim)
        return rms_norm(x_BxLxD, scale_BxLxD, self.eps)


class UntiedLayerNorm(nnx.Module):
    """QK-norm: LayerNorm over head_dim (shared by heads) with scale and bias per modality."""

    def __init__(self, dim: int, cfg: ModelConfig):
        m, dt = N_MODALITIES, cfg.param_dtype
        self.scale_MxDh = ones_param((m, dim), ("modality", "norm"), dt)
        self.bias_MxDh = zeros_param((m, dim), ("modality", "norm"), dt)
        self.eps = cfg.norm_eps

    def __call__(self, x_BxLxHxDh: jax.Array, ctx: dict) -> jax.Array:
        modality_BxL, ndim = ctx["modality"], x_BxLxHxDh.ndim
        scale_BxLx1xDh = gather_modality(self.scale_MxDh[...], modality_BxL, ndim)
        bias_BxLx1xDh = gather_modality(self.bias_MxDh[...], modality_BxL, ndim)
        return layer_norm(x_BxLxHxDh, scale_BxLx1xDh, bias_BxLx1xDh, self.eps)


class UntiedAttention(nnx.Module):
    """Global causal attention over the mixed sequence; projections and QK-norm per modality."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m, d, h, dh = N_MODALITIES, cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
        std, pdt = cfg.init_std, cfg.param_dtype
        in_axes = ("modality", "embed", "heads", "head_dim")
        self.wq_MxDxHxDh = param(rngs, (m, d, h, dh), in_axes, std, pdt)
        self.wk_MxDxHxDh = param(rngs, (m, d, h, dh), in_axes, std, pdt)
        self.wv_MxDxHxDh = param(rngs, (m, d, h, dh), in_axes, std, pdt)
        self.wo_MxHxDhxD = param(
            rngs, (m, h, dh, d), ("modality", "heads", "head_dim", "embed"), std, pdt
        )
        self.q_norm = UntiedLayerNorm(dh, cfg) if cfg.qk_norm else None
        self.k_norm = UntiedLayerNorm(dh, cfg) if cfg.qk_norm else None
        self.rope_theta = cfg.rope_theta
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

    def __call__(self, x_BxLxD: jax.Array, ctx: dict) -> jax.Array:
        dt, modality_BxL = self.compute_dtype, ctx["modality"]
        x = x_BxLxD.astype(dt)

        def project_in(w_MxDxHxDh: nnx.Param) -> jax.Array:
            w = w_MxDxHxDh[...].astype(dt)
            return per_modality(lambda m: jnp.einsum("bld,dhk->blhk", x, w[m]), modality_BxL)

        q, k, v = (project_in(w) for w in (self.wq_MxDxHxDh, self.wk_MxDxHxDh, self.wv_MxDxHxDh))
        qk_norm = None if self.q_norm is None or self.k_norm is None else (self.q_norm, self.k_norm)
        out_BxLxHxDh = attend(q, k, v, ctx, qk_norm, self.rope_theta)
        wo = self.wo_MxHxDhxD[...].astype(dt)

        def project_out(m: int) -> jax.Array:
            return jnp.einsum("blhk,hkd->bld", out_BxLxHxDh, wo[m])

        return per_modality(project_out, modality_BxL)


class UntiedSwiGLU(nnx.Module):
    """SwiGLU feed-forward with one set of weights per modality (`layers.swiglu` on each slice)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m, d, f = N_MODALITIES, cfg.d_model, cfg.resolved_ffn_hidden
        std, pdt = cfg.init_std, cfg.param_dtype
        self.w_gate_MxDxF = param(rngs, (m, d, f), ("modality", "embed", "mlp"), std, pdt)
        self.w_up_MxDxF = param(rngs, (m, d, f), ("modality", "embed", "mlp"), std, pdt)
        self.w_down_MxFxD = param(rngs, (m, f, d), ("modality", "mlp", "embed"), std, pdt)
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

    def __call__(self, x_BxLxD: jax.Array, ctx: dict) -> tuple[jax.Array, dict]:
        dt = self.compute_dtype
        x = x_BxLxD.astype(dt)
        w_gate, w_up, w_down = (
            w[...].astype(dt) for w in (self.w_gate_MxDxF, self.w_up_MxDxF, self.w_down_MxFxD)
        )
        y = per_modality(lambda m: swiglu(x, w_gate[m], w_up[m], w_down[m]), ctx["modality"])
        return y, {}
