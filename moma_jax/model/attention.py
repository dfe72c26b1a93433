"""Segment-aware causal self-attention with RoPE and Chameleon's QK-norm.

The softmax attention runs in XLA (`model.attention="xla"`: scores under the [B, 1, L, L] mask)
or in Pallas's flash-attention kernel (`"pallas"`: `jax.experimental.pallas.ops.gpu.attention`,
Triton on a GPU), which takes the documents' segment ids instead of a mask and never builds the
L x L scores; `"pallas_interpret"` runs that kernel in Pallas's interpreter on any backend, which
is how the CPU tests check it against the XLA path (forward and gradient). Decoding with a KV
cache always uses the XLA path.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ConfigError, ModelConfig
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
    impl: str = "xla",
) -> jax.Array:
    """The attention sequence every layer kind shares, after its own q/k/v projections:

    1. QK-norm (Chameleon: LayerNorm over head_dim, shared by heads), when enabled;
    2. RoPE at each token's position (`ctx.positions`);
    3. softmax attention under `ctx.attn_mask` (segment-aware causal; by `impl`, the
       module's docstring), or, when decoding, over the keys of `ctx.kv` (`model/cache.py`)
       after appending this call's.
    Returns the per-head outputs [B, L, H, Dh], before the output projection.
    """
    if qk_norm is not None:
        q_norm, k_norm = qk_norm
        q_BxLxHxDh, k_BxLxHxDh = q_norm(q_BxLxHxDh, ctx), k_norm(k_BxLxHxDh, ctx)
    q_BxLxHxDh = rope(q_BxLxHxDh, ctx.positions, rope_theta)
    k_BxLxHxDh = rope(k_BxLxHxDh, ctx.positions, rope_theta)
    if ctx.kv is None:
        mask = ctx.attn_mask
        if impl != "xla" and flash_fits(q_BxLxHxDh.shape[1]):
            # ctx.attn_mask is segment_causal_mask(ctx.segment_ids) wherever a layer sets it.
            return flash_attention(
                q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, ctx.segment_ids, impl == "pallas_interpret"
            )
    else:
        k_BxLxHxDh, v_BxLxHxDh, mask = ctx.kv.append(k_BxLxHxDh, v_BxLxHxDh, ctx.present())
    return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, mask=mask)


def check_backend(impl: str) -> None:
    """ConfigError if `model.attention=impl` cannot run on this backend."""
    if impl == "pallas" and jax.default_backend() != "gpu":
        raise ConfigError(
            f"model.attention=pallas runs a Triton kernel, which needs a GPU (this backend is "
            f"{jax.default_backend()}); use --set model.attention=xla here"
        )


FLASH_BLOCK = 128  # the kernel's forward tiles along L (its default)
FLASH_BLOCK_BACKWARD = 32  # its backward tiles (its default)


def flash_fits(length: int) -> bool:
    """Whether the kernel's tiles (min(block, L): Triton needs powers of two of at least 16)
    divide a length; other lengths (a Mixture-of-Depths layer's gathered tokens, say) take the
    XLA path: the same attention."""
    tiles = [min(b, length) for b in (FLASH_BLOCK, FLASH_BLOCK_BACKWARD)]
    return all(t >= 16 and t & (t - 1) == 0 and length % t == 0 for t in tiles)


def flash_attention(
    q_BxLxHxDh: jax.Array,
    k_BxLxHxDh: jax.Array,
    v_BxLxHxDh: jax.Array,
    segment_ids_BxL: jax.Array,
    interpret: bool,
) -> jax.Array:
    """Pallas's flash-attention kernel, causal within equal segment ids: the mask of
    `segment_causal_mask` (padding, segment 0, sees only padding), softmax scale 1/sqrt(Dh)."""
    check_backend("pallas_interpret" if interpret else "pallas")
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    length = q_BxLxHxDh.shape[1]
    fwd, bwd = min(FLASH_BLOCK, length), min(FLASH_BLOCK_BACKWARD, length)
    blocks = pallas_attention.BlockSizes(
        block_q=fwd,
        block_k=fwd,
        block_q_dkv=bwd,
        block_kv_dkv=bwd,
        block_q_dq=bwd,
        block_kv_dq=bwd,
    )
    return pallas_attention.mha(
        q_BxLxHxDh,
        k_BxLxHxDh,
        v_BxLxHxDh,
        segment_ids_BxL,
        sm_scale=q_BxLxHxDh.shape[-1] ** -0.5,
        causal=True,
        block_sizes=blocks,
        interpret=interpret,
    )


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
        self.impl = cfg.attention
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> jax.Array:
        dt = self.compute_dtype
        x = x_BxLxD.astype(dt)
        q, k, v = (
            jnp.einsum("bld,dhk->blhk", x, w[...].astype(dt))
            for w in (self.wq_DxHxDh, self.wk_DxHxDh, self.wv_DxHxDh)
        )
        qk_norm = None if self.q_norm is None or self.k_norm is None else (self.q_norm, self.k_norm)
        out_BxLxHxDh = attend(q, k, v, ctx, qk_norm, self.rope_theta, self.impl)
        return jnp.einsum("blhk,hkd->bld", out_BxLxHxDh, self.wo_HxDhxD[...].astype(dt))
