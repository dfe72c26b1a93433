"""One transformer layer: attention and a feed-forward, each wrapped in a normed residual."""

from __future__ import annotations

import jax
from flax import nnx

from moma_jax.config import ModelConfig
from moma_jax.model.context import Context
from moma_jax.sharding import constrain

ACTIVATION = ("batch", "length", None)  # rows over the batch axes; D whole (FSDP shards weights)


class Block(nnx.Module):
    """Pre-norm (Llama) or Swin-style post-norm (Chameleon-34B, MoMa, MoT) residual block.

    pre:  h = x + attn(norm(x));     out = h + ffn(norm(h))
    post: h = x + norm(attn(x));     out = h + norm(ffn(h))

    Every layer kind is this block with other parts (`model/kinds.py`): `attn` maps (x, ctx) ->
    y; `ffn` maps (x, ctx) -> (y, aux), where aux holds on-device values (entries under
    "losses" are added to the objective, entries under "metrics" are reported); norms map
    (x, ctx) -> x (MoT's read each token's modality from ctx, a `model.context.Context`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        attn: nnx.Module,
        ffn: nnx.Module,
        attn_norm: nnx.Module,
        ffn_norm: nnx.Module,
    ):
        self.attn = attn
        self.ffn = ffn
        self.attn_norm = attn_norm
        self.ffn_norm = ffn_norm
        self.post_norm = cfg.norm_order == "post"

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> tuple[jax.Array, dict]:
        """The residual stream enters and leaves sharded by rows (`sharding.constrain`: a
        no-op on one device)."""
        dt = x_BxLxD.dtype
        x_BxLxD = constrain(x_BxLxD, ACTIVATION)
        if self.post_norm:
            h = x_BxLxD + self.attn_norm(self.attn(x_BxLxD, ctx), ctx).astype(dt)
            y, aux = self.ffn(h, ctx)
            return constrain(h + self.ffn_norm(y, ctx).astype(dt), ACTIVATION), aux
        h = x_BxLxD + self.attn(self.attn_norm(x_BxLxD, ctx), ctx).astype(dt)
        y, aux = self.ffn(self.ffn_norm(h, ctx), ctx)
        return constrain(h + y.astype(dt), ACTIVATION), aux
