"""Mixture-of-Transformers block (Liang et al. 2024, arXiv 2411.04996).

Every non-embedding weight of the layer is untied by modality: Q/K/V/O projections, the QK-norm,
the attention and FFN RMSNorms and the SwiGLU feed-forward. Routing is deterministic (a token uses
its modality's weights; no router, no capacity, nothing dropped), and one global causal
self-attention runs over the whole mixed sequence. Per-modality weights are stacked on a leading
"modality" axis (M = N_MODALITIES), so the layer is one set of arrays. The layer is the shared
`Block` with the untied parts below, and they call the same math as the dense layer
(`layers.rms_norm`, `layers.layer_norm`, `layers.swiglu`, `attention.attend`).

Execution is by sorting, not masking (`by_modality`): each projection (Q/K/V fused, O) and the
FFN runs once per modality on that modality's tokens only, taken in order and run in one call
sized by the configured modality share plus slabs for the rest (`grouped.slab_apply`, the
machinery of the sparse FFN), then scattered back around the one global attention. Executed
FLOPs are the ideal ones plus the rounding of each modality's rows; gradients are exact, and a
modality with no tokens gets exactly zero gradient. (The masked form, every modality on every
token then `jnp.where`, ran M x the ideal projection and FFN FLOPs; it is the reference in
tests/test_mot.py.)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ModelConfig
from moma_jax.modality import N_MODALITIES
from moma_jax.model import grouped, routing
from moma_jax.model.attention import attend
from moma_jax.model.context import Context
from moma_jax.model.layers import (
    decode_sliced,
    layer_norm,
    ones_param,
    param,
    rms_norm,
    swiglu,
    zeros_param,
)
from moma_jax.model.routing import Dispatch


def by_modality(
    fn: Callable[..., jax.Array],
    x_BxLxX: jax.Array,
    modality_BxL: jax.Array,
    weights_M: tuple[jax.Array, ...],
    cfg: ModelConfig,
    decoding: bool = False,
    unit: jax.Array | None = None,
) -> jax.Array:
    """Each token through `fn` with its own modality's weights (`weights_M`: each stacked on a
    leading modality axis), computing only that modality's rows; float32 [B, L, Y].

    The tokens of modality m are taken in order (`routing.take_all`, every token of the batch,
    padding included, as the layer is defined on all positions) and run by `grouped.slab_apply`
    with the sparse FFN's `SparseConfig.slab_plan` for share_m * B * L expected rows (none when
    no shares are configured): a first part in one call, the rest in slabs, only as many as the
    batch needs. Nothing is computed for the other modality's rows.

    `decoding` (one-token steps of KV-cached generation): the modalities present in the step
    run one at a time (`grouped.chosen_experts_apply`), so a step of text tokens reads no image
    weights. Forward only. `unit` (`Context.unit`): the weights are still stacked over the layer
    units and modality m reads [unit, m]. Each modality's weights are cast to x's dtype.
    """
    b, length = modality_BxL.shape
    n = b * length
    x_1xNxX = x_BxLxX.reshape(1, n, -1)
    modality_N = modality_BxL.reshape(-1)
    if decoding:
        parts = [routing.take_all(modality_N == m, n)[0] for m in range(N_MODALITIES)]
        stacked = Dispatch(*(jnp.concatenate(a)[None] for a in zip(*parts, strict=True)))
        y_present, _ = grouped.chosen_experts_apply(fn, x_1xNxX, stacked, weights_M, unit)
        return y_present.reshape(b, length, -1)
    shares = cfg.moe.modality_shares
    # Cast whole, then slice: the order the training graph has always had (a slice cast after
    # slicing gives the same forward pass, but bf16 gradients that differ in their last bits
    # under XLA's excess precision).
    weights_M = tuple(w.astype(x_BxLxX.dtype) for w in weights_M)
    y_1xNxY = None
    for m in range(N_MODALITIES):
        dispatch, _ = routing.take_all(modality_N == m, n)
        dispatch = Dispatch(*(a[None] for a in dispatch))  # one routing group: [1, 1, N]
        expected = round(n * shares[m]) if shares else 0
        first, slab = cfg.moe.slab_plan(expected, n, 1)
        weights = tuple(w[m : m + 1] for w in weights_M)
        y, _ = grouped.slab_apply(fn, x_1xNxX, dispatch, weights, first, slab)
        y_1xNxY = y if y_1xNxY is None else y_1xNxY + y
    assert y_1xNxY is not None
    return y_1xNxY.reshape(b, length, -1)


def _linear(x_TxD: jax.Array, w_DxK: jax.Array) -> jax.Array:
    return jnp.dot(x_TxD, w_DxK)


def _linear_qkv(x_TxD: jax.Array, *w_DxK: jax.Array) -> jax.Array:
    """q, k and v side by side, each from its own weight (decoding reads them unconcatenated)."""
    return jnp.concatenate([jnp.dot(x_TxD, w) for w in w_DxK], axis=-1)


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

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> jax.Array:
        scale_BxLxD = gather_modality(self.scale_MxD[...], ctx.modality, x_BxLxD.ndim)
        return rms_norm(x_BxLxD, scale_BxLxD, self.eps)


class UntiedLayerNorm(nnx.Module):
    """QK-norm: LayerNorm over head_dim (shared by heads) with scale and bias per modality."""

    def __init__(self, dim: int, cfg: ModelConfig):
        m, dt = N_MODALITIES, cfg.param_dtype
        self.scale_MxDh = ones_param((m, dim), ("modality", "norm"), dt)
        self.bias_MxDh = zeros_param((m, dim), ("modality", "norm"), dt)
        self.eps = cfg.norm_eps

    def __call__(self, x_BxLxHxDh: jax.Array, ctx: Context) -> jax.Array:
        modality_BxL, ndim = ctx.modality, x_BxLxHxDh.ndim
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
        decode_sliced(self.wq_MxDxHxDh, self.wk_MxDxHxDh, self.wv_MxDxHxDh, self.wo_MxHxDhxD)
        self.q_norm = UntiedLayerNorm(dh, cfg) if cfg.qk_norm else None
        self.k_norm = UntiedLayerNorm(dh, cfg) if cfg.qk_norm else None
        self.rope_theta = cfg.rope_theta
        self.impl = cfg.attention
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.cfg = cfg

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> jax.Array:
        dt, modality_BxL, cfg = self.compute_dtype, ctx.modality, self.cfg
        b, length, d = x_BxLxD.shape
        h, dh = self.wq_MxDxHxDh.shape[-2:]
        # [(U,) M, D, H x Dh] each: in a decode step still stacked over the units (Context.unit)
        w_q, w_k, w_v = (
            w[...].reshape(*w.shape[:-2], h * dh)
            for w in (self.wq_MxDxHxDh, self.wk_MxDxHxDh, self.wv_MxDxHxDh)
        )
        wo = self.wo_MxHxDhxD[...]
        wo = wo.reshape(*wo.shape[:-3], h * dh, d)
        x_BxLxD = x_BxLxD.astype(dt)
        if ctx.decode_step(length):
            qkv = by_modality(
                _linear_qkv, x_BxLxD, modality_BxL, (w_q, w_k, w_v), cfg, True, ctx.unit
            )
        else:
            w_qkv = jnp.concatenate([w_q, w_k, w_v], axis=-1)
            qkv = by_modality(_linear, x_BxLxD, modality_BxL, (w_qkv,), cfg)
        qkv = qkv.astype(dt)
        q, k, v = (a.reshape(b, length, h, dh) for a in jnp.split(qkv, 3, axis=-1))
        qk_norm = None if self.q_norm is None or self.k_norm is None else (self.q_norm, self.k_norm)
        out_BxLxHxDh = attend(q, k, v, ctx, qk_norm, self.rope_theta, self.impl)
        out = out_BxLxHxDh.reshape(b, length, h * dh)
        decoding = ctx.decode_step(length)
        return by_modality(_linear, out, modality_BxL, (wo,), cfg, decoding, ctx.unit).astype(dt)


class UntiedSwiGLU(nnx.Module):
    """SwiGLU feed-forward with one set of weights per modality (`layers.swiglu` on each slice)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m, d, f = N_MODALITIES, cfg.d_model, cfg.resolved_ffn_hidden
        std, pdt = cfg.init_std, cfg.param_dtype
        self.w_gate_MxDxF = param(rngs, (m, d, f), ("modality", "embed", "mlp"), std, pdt)
        self.w_up_MxDxF = param(rngs, (m, d, f), ("modality", "embed", "mlp"), std, pdt)
        self.w_down_MxFxD = param(rngs, (m, f, d), ("modality", "mlp", "embed"), std, pdt)
        decode_sliced(self.w_gate_MxDxF, self.w_up_MxDxF, self.w_down_MxFxD)
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.cfg = cfg

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> tuple[jax.Array, dict]:
        dt = self.compute_dtype
        weights = tuple(w[...] for w in (self.w_gate_MxDxF, self.w_up_MxDxF, self.w_down_MxFxD))
        decoding = ctx.decode_step(x_BxLxD.shape[1])
        x_BxLxD = x_BxLxD.astype(dt)
        y = by_modality(swiglu, x_BxLxD, ctx.modality, weights, self.cfg, decoding, ctx.unit)
        return y.astype(dt), {}
