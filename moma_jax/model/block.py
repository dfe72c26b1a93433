"""One transformer layer: shared attention plus a swappable feed-forward chosen by layer kind."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from moma_jax.config import ConfigError, ModelConfig
from moma_jax.model.attention import Attention
from moma_jax.model.layers import RMSNorm, SwiGLU

# Layer kind -> feed-forward constructor. Sparse layer families register their FFN here; the
# block never asks which model it belongs to. An FFN maps (x_BxLxD, ctx) -> (y_BxLxD, aux) where
# aux holds on-device scalars: entries under "losses" are added to the objective, the rest are
# reported as metrics.
FFN_KINDS: dict[str, Callable[..., nnx.Module]] = {"dense": SwiGLU}


def check_layer_kinds(cfg: ModelConfig) -> None:
    unknown = [k for k in cfg.layer_pattern if k not in FFN_KINDS]
    if unknown:
        raise ConfigError(
            f"model.layer_pattern has unknown layer kinds {unknown}; known: {sorted(FFN_KINDS)}"
        )


class Block(nnx.Module):
    """Pre-norm (Llama) or Swin-style post-norm (Chameleon-34B, MoMa, MoT) residual block.

    pre:  h = x + attn(norm(x));     out = h + ffn(norm(h))
    post: h = x + norm(attn(x));     out = h + norm(ffn(h))
    """

    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn = FFN_KINDS[kind](cfg, rngs=rngs)
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
