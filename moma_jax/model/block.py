"""One transformer layer: shared attention plus a swappable feed-forward."""

from __future__ import annotations

import jax
from flax import nnx

from moma_jax.config import ModelConfig
from moma_jax.model.attention import Attention
from moma_jax.model.layers import RMSNorm


class Block(nnx.Module):
    """Pre-norm (Llama) or Swin-style post-norm (Chameleon-34B, MoMa, MoT) residual block.

    pre:  h = x + attn(norm(x));     out = h + ffn(norm(h))
    post: h = x + norm(attn(x));     out = h + norm(ffn(h))

    `ffn` maps (x_BxLxD, ctx) -> (y_BxLxD, aux); aux holds on-device values: entries under
    "losses" are added to the objective, entries under "metrics" are reported.
    """

    def __init__(self, cfg: ModelConfig, ffn: nnx.Module, *, rngs: nnx.Rngs):
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn = ffn
        self.attn_norm = RMSNorm(cfg.d_model, cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg)
        self.post_norm = cfg.norm_order == "post"

    def __call__(self, x_BxLxD: jax.Array, ctx: dict) -> tuple[jax.Array, dict]:
        if self.post_norm:
            h = x_BxLxD + self.attn_norm(self.attn(x_BxLxD, ctx)).astype(x_BxLxD.dtype)
            y, aux = self.ffn(h, ctx)
            return h + self.ffn_norm(y).astype(h.dtype), aux
        h = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), ctx).astype(x_BxLxD.dtype)
        y, aux = self.ffn(self.ffn_norm(h), ctx)
        return h + y.astype(h.dtype), aux
