"""Mixture-of-Depths (Raposo et al. 2024), as MoMa uses it: a layer kind `mod_{kind}` that
sends only some tokens through a `kind` block.

Per routing group of N tokens (`model.moe.routing_group_tokens`, rows x length), before any
modality split:

1. router weight r = sigmoid(x w), w: D x 1 (float32);
2. the top k = floor(N x `model.mod.capacity`) real tokens by router logit (padding never),
   gathered into a static [k, D] buffer sorted by original index;
3. the wrapped block runs on that buffer only: its attention among the selected tokens, with a
   mask from the gathered (row, segment, position) (same row, same segment, key before query;
   empty slots get segment 0) and RoPE at the gathered positions; a sparse FFN inside routes
   over the buffer and sizes its slots from k;
4. selected token: x + r x (block(x) - x); skipped token: x, bit-identical.

The executed FLOPs drop with the capacity (a gathered buffer, not a mask over all tokens).

With `ctx.causal` a token goes through the block iff its aux router's score is
> 0.5 (`model/aux_router.py`; the main router still gives the weight): no capacity, no
regrouping, rows kept as they are; the block runs on every position with the skipped ones as
segment 0 (so no selected token sees them; a KV cache marks them absent, `model/cache.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ModelConfig, mod_inner_config, mod_selected_tokens
from moma_jax.model import aux_router
from moma_jax.model.attention import segment_causal_mask
from moma_jax.model.context import Context
from moma_jax.model.layers import param


def select(logits_GxN: jax.Array, valid_GxN: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(index_GxK sorted ascending, chosen_GxK): the top-k real tokens by logit; where a group
    has fewer than k real tokens the rest of its slots hold padding (chosen False)."""
    ranking = jnp.where(valid_GxN, logits_GxN, -jnp.inf)
    _, top_GxK = jax.lax.top_k(ranking, k)
    index_GxK = jnp.sort(top_GxK, axis=-1)
    chosen_GxK = jnp.take_along_axis(valid_GxN, index_GxK, axis=-1)
    return index_GxK, chosen_GxK


class MoDBlock(nnx.Module):
    """A block of `kind` that only the routed tokens go through (see the module docstring)."""

    def __init__(
        self, cfg: ModelConfig, build: Callable[[ModelConfig, nnx.Rngs], Any], *, rngs: nnx.Rngs
    ):
        self.router_Dx1 = param(
            rngs, (cfg.d_model, 1), ("embed", None), cfg.init_std, cfg.param_dtype
        )
        self.block = build(mod_inner_config(cfg), rngs)
        self.group = cfg.moe.routing_group_tokens
        self.k = mod_selected_tokens(cfg)
        self.aux_router = aux_router.maybe_aux_router(cfg, 1, rngs)
        self.z_loss_weight = cfg.mod.router_z_loss_weight

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> tuple[jax.Array, dict]:
        if ctx.causal:
            return self._causal(x_BxLxD, ctx)
        b, length, d = x_BxLxD.shape
        n, k = self.group, self.k
        x_GxNxD = x_BxLxD.reshape(-1, n, d)
        g = x_GxNxD.shape[0]

        def grouped(a_BxL: jax.Array) -> jax.Array:
            return a_BxL.reshape(g, n)

        segment_GxN = grouped(ctx.segment_ids)
        w_D = self.router_Dx1[...][:, 0].astype(jnp.float32)
        logits_GxN = jnp.einsum("gnd,d->gn", x_GxNxD.astype(jnp.float32), w_D)
        index_GxK, chosen_GxK = select(logits_GxN, segment_GxN > 0, k)

        def gather(a_GxN: jax.Array) -> jax.Array:
            return jnp.take_along_axis(a_GxN, index_GxK, axis=-1)

        # A routing group spans whole rows: (row, segment) names a document piece; empty slots
        # get segment 0, which only sees segment 0.
        row_GxN = grouped(jnp.broadcast_to(jnp.arange(b)[:, None], (b, length)))
        seg_GxK = jnp.where(
            chosen_GxK, gather(row_GxN) * (jnp.max(segment_GxN) + 1) + gather(segment_GxN), 0
        )
        inner_ctx = ctx.replace(
            positions=gather(grouped(ctx.positions)),
            segment_ids=seg_GxK,
            modality=gather(grouped(ctx.modality)),
            attn_mask=segment_causal_mask(seg_GxK),
        )
        xs_GxKxD = jnp.take_along_axis(x_GxNxD, index_GxK[..., None], axis=1)
        ys_GxKxD, aux = self.block(xs_GxKxD, inner_ctx)
        weight_GxK = jax.nn.sigmoid(gather(logits_GxN))
        update = (ys_GxKxD - xs_GxKxD).astype(jnp.float32) * weight_GxK[..., None]
        new_GxKxD = jnp.where(
            chosen_GxK[..., None], xs_GxKxD + update.astype(x_BxLxD.dtype), xs_GxKxD
        )
        out_GxNxD = jax.vmap(lambda x, i, v: x.at[i].set(v))(x_GxNxD, index_GxK, new_GxKxD)
        aux = dict(aux)
        metrics = dict(aux.get("metrics", {}))
        real = jnp.maximum(jnp.sum(segment_GxN > 0), 1)
        if self.z_loss_weight > 0:  # opt-in: z-loss of a one-logit router, logit^2
            z = jnp.sum(jnp.square(logits_GxN) * (segment_GxN > 0)) / real
            aux["losses"] = {**aux.get("losses", {}), "mod/z_loss": self.z_loss_weight * z}
        metrics["mod/keep_frac"] = jnp.sum(chosen_GxK) / real
        metrics["mod/weight_mean"] = jnp.sum(weight_GxK * chosen_GxK) / jnp.maximum(
            jnp.sum(chosen_GxK), 1
        )
        # Which tokens of each routing group went through the block (aux targets, capture).
        kept_GxN = jax.vmap(lambda i, c: jnp.zeros((n,), bool).at[i].set(c))(index_GxK, chosen_GxK)
        if self.aux_router is not None:
            losses, counts = aux_router.aux_terms(
                self.aux_router, x_GxNxD, kept_GxN[..., None], (segment_GxN > 0)[..., None]
            )
            aux["losses"] = {**aux.get("losses", {}), **{f"mod/{k}": v for k, v in losses.items()}}
            metrics.update({f"mod/{k}": v for k, v in counts.items()})
        aux["metrics"] = metrics
        if ctx.capture:  # the inner layer's view scattered back to token positions

            def scatter(a_GxKxX: jax.Array) -> jax.Array:
                zeros = jnp.zeros((g, n) + a_GxKxX.shape[2:], a_GxKxX.dtype)
                full = jax.vmap(lambda z, i, v: z.at[i].set(v))(zeros, index_GxK, a_GxKxX)
                return full.reshape((b, length) + a_GxKxX.shape[2:])

            inner = jax.tree.map(lambda a: a.reshape((g, k) + a.shape[2:]), aux.get("capture", {}))
            keep = {"keep": kept_GxN.reshape(b, length)}
            if self.aux_router is not None:
                keep["aux_score"] = jax.nn.sigmoid(self.aux_router(x_BxLxD)[..., 0])
            aux["capture"] = {**jax.tree.map(scatter, inner), "mod": keep}
        return out_GxNxD.reshape(b, length, d), aux

    def _causal(self, x_BxLxD: jax.Array, ctx: Context) -> tuple[jax.Array, dict]:
        """Each token decides alone by its aux router; see the module docstring."""
        router = aux_router.require(self.aux_router, "Mixture-of-Depths layer")
        real_BxL = ctx.segment_ids > 0
        chosen_BxL = real_BxL & (router(x_BxLxD)[..., 0] > 0)
        segment_BxL = jnp.where(chosen_BxL, ctx.segment_ids, 0)
        inner_ctx = ctx.replace(segment_ids=segment_BxL, keep=chosen_BxL)
        if ctx.attn_mask is not None:
            inner_ctx = inner_ctx.replace(attn_mask=segment_causal_mask(segment_BxL))
        ys_BxLxD, aux = self.block(x_BxLxD, inner_ctx)
        w_D = self.router_Dx1[...][:, 0].astype(jnp.float32)
        weight_BxL = jax.nn.sigmoid(jnp.einsum("bld,d->bl", x_BxLxD.astype(jnp.float32), w_D))
        update = (ys_BxLxD - x_BxLxD).astype(jnp.float32) * weight_BxL[..., None]
        out = jnp.where(chosen_BxL[..., None], x_BxLxD + update.astype(x_BxLxD.dtype), x_BxLxD)
        aux = dict(aux)
        real = jnp.maximum(jnp.sum(real_BxL), 1)
        aux["metrics"] = {**aux.get("metrics", {}), "mod/keep_frac": jnp.sum(chosen_BxL) / real}
        if ctx.capture:
            keep = {"keep": chosen_BxL, "aux_score": jax.nn.sigmoid(router(x_BxLxD)[..., 0])}
            aux["capture"] = {**aux.get("capture", {}), "mod": keep}
        return out, aux
