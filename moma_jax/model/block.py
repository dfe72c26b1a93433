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

    Every built-in layer kind is this block with other parts (`model/attention_kinds.py`,
    `model/ssm_kinds.py`): `attn` maps (x, ctx) -> y, or (y, aux) when it has losses or
    metrics of its own (routed attention: model/moh.py);
    `ffn` maps (x, ctx) -> (y, aux), where aux holds on-device values (entries under
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
            a, attn_aux = self._attend(x_BxLxD, ctx)
            h = x_BxLxD + self.attn_norm(a, ctx).astype(dt)
            y, aux = self.ffn(h, ctx)
            return constrain(h + self.ffn_norm(y, ctx).astype(dt), ACTIVATION), merge(attn_aux, aux)
        a, attn_aux = self._attend(self.attn_norm(x_BxLxD, ctx), ctx)
        h = x_BxLxD + a.astype(dt)
        y, aux = self.ffn(self.ffn_norm(h, ctx), ctx)
        return constrain(h + y.astype(dt), ACTIVATION), merge(attn_aux, aux)

    def _attend(self, x_BxLxD: jax.Array, ctx: Context) -> tuple[jax.Array, dict]:
        out = self.attn(x_BxLxD, ctx)
        return out if isinstance(out, tuple) else (out, {})


def merge(attn_aux: dict, ffn_aux: dict) -> dict:
    """The attention's losses and metrics beside the feed-forward's (their names differ)."""
    if not attn_aux:
        return ffn_aux
    merged = dict(ffn_aux)
    for key in ("losses", "metrics"):
        merged[key] = {**attn_aux.get(key, {}), **ffn_aux.get(key, {})}
    return merged
