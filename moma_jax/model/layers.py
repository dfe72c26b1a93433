"""Small building blocks: norms, rotary embeddings, the SwiGLU feed-forward and dtype helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float, dtype: str
) -> nnx.Param:
    """A normal(std) parameter annotated with logical axis names (mapped to the mesh elsewhere)."""
    value = jax.nn.initializers.normal(std)(rngs.params(), shape, dtype_of(dtype))
    return annotated(value, axes)


def annotated(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter carrying logical axis names; sharding is applied later by the caller."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def ones_param(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: str) -> nnx.Param:
    return annotated(jnp.ones(shape, dtype_of(dtype)), axes)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, computed in float32."""

    def __init__(self, dim: int, cfg: ModelConfig):
        self.scale = ones_param((dim,), ("norm",), cfg.param_dtype)
        self.eps = cfg.norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias in float32 (QK-norm: over head_dim, shared by heads)."""

    def __init__(self, dim: int, cfg: ModelConfig):
        self.scale = ones_param((dim,), ("norm",), cfg.param_dtype)
        self.bias = annotated(jnp.zeros((dim,), dtype_of(cfg.param_dtype)), ("norm",))
        self.eps = cfg.norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def rope(x_BxLxHxDh: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half form) at per-token positions, in float32."""
    half = x_BxLxHxDh.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BxLxK = positions_BxL[..., None].astype(jnp.float32) * freqs
    sin = jnp.sin(angles_BxLxK)[:, :, None, :]
    cos = jnp.cos(angles_BxLxK)[:, :, None, :]
    x32 = x_BxLxHxDh.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxDh.dtype)


class SwiGLU(nnx.Module):
    """Dense SwiGLU feed-forward: down(silu(x W_gate) * (x W_up))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, std = cfg.d_model, cfg.resolved_ffn_hidden, cfg.init_std
        self.w_gate_DF = param(rngs, (d, f), ("embed", "mlp"), std, cfg.param_dtype)
        self.w_up_DF = param(rngs, (d, f), ("embed", "mlp"), std, cfg.param_dtype)
        self.w_down_FD = param(rngs, (f, d), ("mlp", "embed"), std, cfg.param_dtype)
        self.compute_dtype = dtype_of(cfg.compute_dtype)

    def __call__(self, x_BxLxD: jax.Array, ctx: dict) -> tuple[jax.Array, dict]:
        dt = self.compute_dtype
        x = x_BxLxD.astype(dt)
        gate_BxLxF = jnp.einsum("bld,df->blf", x, self.w_gate_DF[...].astype(dt))
        up_BxLxF = jnp.einsum("bld,df->blf", x, self.w_up_DF[...].astype(dt))
        h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
        return jnp.einsum("blf,fd->bld", h_BxLxF, self.w_down_FD[...].astype(dt)), {}
