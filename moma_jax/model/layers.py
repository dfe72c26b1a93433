"""The model's math, written once: parameters, norms, rotary embeddings, the SwiGLU feed-forward.

Every layer kind uses these functions: the dense, MoT and expert layers differ only in how their
weights are laid out (tied, per modality, per expert), never in the math.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ModelConfig
from moma_jax.model.context import Context

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: Axes, std: float, dtype: str) -> nnx.Param:
    """A normal(std) parameter annotated with logical axis names (mapped to the mesh elsewhere)."""
    value = jax.nn.initializers.normal(std)(rngs.params(), shape, jnp.dtype(dtype))
    return annotated(value, axes)


def annotated(value: jax.Array, axes: Axes) -> nnx.Param:
    """A parameter carrying logical axis names; sharding is applied later by the caller."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


# Weights a one-token decode step reads one slice of the leading axis at a time (an expert's, a
# modality's, `grouped.chosen_experts_apply`): marked here, they reach that step still stacked
# over the layer units (`Context.unit`), so only the chosen slices are read.
DECODE_SLICED = "decode_sliced"


def decode_sliced(*variables: nnx.Variable) -> None:
    """Marks `variables` as read slice by slice in decoding (see `DECODE_SLICED`); the layer
    that holds them must read them through `Context.unit` in a one-token decode step."""
    for var in variables:
        var.set_metadata(**{DECODE_SLICED: True})


def is_decode_sliced(path: tuple, value: object) -> bool:
    """The nnx filter of the variables `decode_sliced` marked."""
    del path
    return isinstance(value, nnx.Variable) and bool(value.get_metadata().get(DECODE_SLICED))


def ones_param(shape: tuple[int, ...], axes: Axes, dtype: str) -> nnx.Param:
    return annotated(jnp.ones(shape, jnp.dtype(dtype)), axes)


def zeros_param(shape: tuple[int, ...], axes: Axes, dtype: str) -> nnx.Param:
    return annotated(jnp.zeros(shape, jnp.dtype(dtype)), axes)


# --- Norms: float32 math over the last axis; scale (and bias) broadcast against x ---------------


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) * scale, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / std * scale + bias, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (block norms and the final norm)."""

    def __init__(self, dim: int, cfg: ModelConfig):
        self.scale = ones_param((dim,), ("norm",), cfg.param_dtype)
        self.eps = cfg.norm_eps

    def __call__(self, x: jax.Array, ctx: Context | None = None) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias (QK-norm: over head_dim, shared by heads)."""

    def __init__(self, dim: int, cfg: ModelConfig):
        self.scale = ones_param((dim,), ("norm",), cfg.param_dtype)
        self.bias = zeros_param((dim,), ("norm",), cfg.param_dtype)
        self.eps = cfg.norm_eps

    def __call__(self, x: jax.Array, ctx: Context | None = None) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


# --- Rotary embeddings and the feed-forward -----------------------------------------------------


def rope(x_BxLxHxDh: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half form) at per-token positions, in float32."""
    half = x_BxLxHxDh.shape[-1] // 2
    freqs_R = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BxLxR = positions_BxL[..., None].astype(jnp.float32) * freqs_R
    sin = jnp.sin(angles_BxLxR)[:, :, None, :]
    cos = jnp.cos(angles_BxLxR)[:, :, None, :]
    x32 = x_BxLxHxDh.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxDh.dtype)


def _matmul(x_XxD: jax.Array, w_DxF: jax.Array) -> jax.Array:
    return jnp.einsum("...d,df->...f", x_XxD, w_DxF)


def swiglu(
    x_XxD: jax.Array,
    w_gate_DxF: jax.Array,
    w_up_DxF: jax.Array,
    w_down_FxD: jax.Array,
    matmul: Callable[[jax.Array, jax.Array], jax.Array] = _matmul,
) -> jax.Array:
    """down(silu(x W_gate) * (x W_up)) over any leading axes X, in the inputs' dtype.

    Experts vmap it over their stacked weights; MoT calls it with one modality's slice; the
    ragged expert path passes a grouped `matmul` (rows sorted by expert, weights [E, ...]).
    """
    gate_XxF, up_XxF = matmul(x_XxD, w_gate_DxF), matmul(x_XxD, w_up_DxF)
    return matmul(jax.nn.silu(gate_XxF) * up_XxF, w_down_FxD)


class SwiGLU(nnx.Module):
    """The dense feed-forward: one `swiglu` for every token."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, std, dt = cfg.d_model, cfg.resolved_ffn_hidden, cfg.init_std, cfg.param_dtype
        self.w_gate_DxF = param(rngs, (d, f), ("embed", "mlp"), std, dt)
        self.w_up_DxF = param(rngs, (d, f), ("embed", "mlp"), std, dt)
        self.w_down_FxD = param(rngs, (f, d), ("mlp", "embed"), std, dt)
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> tuple[jax.Array, dict]:
        dt = self.compute_dtype
        w_gate, w_up, w_down = (
            w[...].astype(dt) for w in (self.w_gate_DxF, self.w_up_DxF, self.w_down_FxD)
        )
        return swiglu(x_BxLxD.astype(dt), w_gate, w_up, w_down), {}
