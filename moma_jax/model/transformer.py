"""The decoder: token embedding, a scanned stack of repeating layer units, final norm, LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ConfigError, ModelConfig
from moma_jax.metric_names import layer_metric
from moma_jax.model.attention import segment_causal_mask
from moma_jax.model.context import Context, UnitAux
from moma_jax.model.kinds import build_layer, check_layer_kinds, layer_kind
from moma_jax.model.layers import RMSNorm, is_decode_sliced, param
from moma_jax.model.lookup import embed

ROUTING = ("teacher_forced", "causal")  # see model/aux_router.py

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def merge_aux(auxes: list[dict]) -> tuple[dict, dict]:
    """Combines aux dicts of several layers: (losses added up, metrics averaged)."""
    losses: dict = {}
    metrics: dict = {}
    for aux in auxes:
        for k, v in aux.get("losses", {}).items():
            losses[k] = losses.get(k, 0.0) + v
        for k, v in aux.get("metrics", {}).items():
            metrics.setdefault(k, []).append(v)
    return losses, {k: sum(v) / len(v) for k, v in metrics.items()}


class Unit(nnx.Module):
    """One repeat of model.layer_pattern: a block per entry, applied in order."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.n_blocks = len(cfg.layer_pattern)
        # The blocks that carry decode state (a KV cache, a recurrent state), by the kinds'
        # rows, and how each wraps its arrays for a decode pass.
        rows = [layer_kind(k) for k in cfg.layer_pattern]
        self.stateful = tuple(row.decode_state != "none" for row in rows)
        self.decode_cache = tuple(row.decode_cache for row in rows)
        for i, kind in enumerate(cfg.layer_pattern):
            setattr(self, f"block_{i}", build_layer(cfg, kind, rngs))

    def __call__(
        self, x_BxLxD: jax.Array, ctx: Context, cache: dict | None = None
    ) -> tuple[jax.Array, UnitAux]:
        """Returns the output and the blocks' aux (`UnitAux`). Decoding: `cache` holds this
        unit's decode state per block ({j: arrays}), returned updated in UnitAux.cache."""
        auxes, caches = [], {}
        for i in range(self.n_blocks):
            block_ctx = ctx
            if cache is not None and self.stateful[i]:  # decoding: the block's state
                assert ctx.cache_index is not None  # Transformer.__call__ passes both
                caches[i] = self.decode_cache[i](cache[i], ctx.cache_index)
                block_ctx = ctx.replace(kv=caches[i])
            x_BxLxD, aux = getattr(self, f"block_{i}")(x_BxLxD, block_ctx)
            auxes.append(aux)
        losses, metrics = merge_aux(auxes)
        return x_BxLxD, UnitAux(
            losses=losses,
            metrics=metrics,
            per_block={j: aux.get("metrics", {}) for j, aux in enumerate(auxes)},
            capture={j: aux["capture"] for j, aux in enumerate(auxes) if "capture" in aux},
            cache={j: c.arrays() for j, c in caches.items()},
        )


class Transformer(nnx.Module):
    """Chameleon-style early-fusion decoder over one stream of text and image tokens."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        check_layer_kinds(cfg)
        self.cfg = cfg
        self.embed_VxD = param(
            rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 1.0, cfg.param_dtype
        )

        # Stack the units along a leading "layers" axis so one scanned body serves every depth:
        # compile time is flat in depth and the checkpoint layout is the same for any n_layers.
        @nnx.split_rngs(splits=cfg.n_units)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_units(rngs: nnx.Rngs) -> Unit:
            return Unit(cfg, rngs=rngs)

        self.units = make_units(rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg)
        self.head_DxV = param(
            rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, cfg.param_dtype
        )

    def __call__(
        self,
        tokens_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        positions_BxL: jax.Array,
        modality_BxL: jax.Array,
        routing_key: jax.Array | None = None,
        capture: bool = False,
        routing: str = "teacher_forced",
        cache: dict | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, dict]:
        """Returns float32 logits [B, L, V] and the aux dict (losses summed, metrics averaged;
        with `capture`, aux["capture"][layer][group] holds each expert layer's routing seen
        from the tokens: taken and gate, [B, L, E]; MoD layers add ["mod"]["keep"] [B, L]).

        `routing`: "teacher_forced" (the training routers, which see the routing group) or
        "causal" (each token decides alone: aux routers, `model/aux_router.py`). Decoding:
        `cache` (from `init_cache`, causal routing) holds the keys and values of the first
        `cache_index` tokens of every row; these tokens are the next ones, and aux["cache"] is
        the updated cache."""
        cfg = self.cfg
        if routing not in ROUTING:
            raise ConfigError(f"routing={routing!r} is not one of {ROUTING}")
        if cache is not None and routing != "causal":
            raise ConfigError("decoding with a KV cache routes causally: pass routing='causal'")
        dt = jnp.dtype(cfg.compute_dtype)
        ctx = Context(
            positions=positions_BxL,
            segment_ids=segment_ids_BxL,
            modality=modality_BxL,
            attn_mask=segment_causal_mask(segment_ids_BxL) if cache is None else None,
            cache_index=cache_index,
            causal=routing == "causal",
            capture=capture,
        )
        x_BxLxD = embed(self.embed_VxD[...], tokens_BxL, dt)

        # A one-token decode step takes the weights it reads slice by slice (`decode_sliced`)
        # whole, stacked over the units, and reads [unit, slice] (`Context.unit`).
        stacked: nnx.State | None = None
        if ctx.decode_step(tokens_BxL.shape[1]):
            graphdef, stacked, units_state = nnx.split(self.units, is_decode_sliced, ...)  # type: ignore[misc]
        else:
            graphdef, units_state = nnx.split(self.units)

        def body(x, xs):
            unit_state, index, unit_cache = xs
            states = (unit_state,) if stacked is None else (stacked, unit_state)
            unit = nnx.merge(graphdef, *states)
            # No key (evaluation): routers run without noise.
            key = None if routing_key is None else jax.random.fold_in(routing_key, index)
            unit_ctx = ctx.replace(routing_key=key, unit=None if stacked is None else index)
            return unit(x, unit_ctx, unit_cache)

        if cfg.remat in _REMAT and cache is None:
            body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=False)
        x_BxLxD, aux_U = jax.lax.scan(
            body,
            x_BxLxD,
            (units_state, jnp.arange(cfg.n_units), cache),
            unroll=cfg.resolved_scan_unroll if cache is None else cfg.decode_scan_unroll,
        )
        aux = {
            "losses": {k: jnp.sum(v) for k, v in aux_U.losses.items()},
            "metrics": {k: jnp.mean(v, axis=0) for k, v in aux_U.metrics.items()},
        }
        # Each layer's own routing metrics beside the averages: layer u * blocks + j.
        blocks = len(cfg.layer_pattern)
        for j, metrics in aux_U.per_block.items():
            for k, v_U in metrics.items():
                for u in range(cfg.n_units):
                    aux["metrics"][layer_metric(u * blocks + j, k)] = v_U[u]
        if cache is not None:
            aux["cache"] = aux_U.cache
        if capture:
            aux["capture"] = {
                u * blocks + j: jax.tree.map(lambda a, u=u: a[u], groups)
                for j, groups in aux_U.capture.items()
                for u in range(cfg.n_units)
            }
        x_BxLxD = self.final_norm(x_BxLxD)
        logits_BxLxV = jnp.einsum(
            "bld,dv->blv",
            x_BxLxD,
            self.head_DxV[...].astype(dt),
            preferred_element_type=jnp.float32,
        )
        return logits_BxLxV, aux

    def init_cache(self, batch: int, length: int) -> dict:
        """An empty KV cache for `batch` rows of up to `length` tokens: per block of the
        layer pattern whose kind carries decode state (`LayerKind.decode_state`): k and v
        [U, B, S, H, Dh] and keep [U, B, S]."""
        cfg, cache = self.cfg, {}
        for j, kind in enumerate(cfg.layer_pattern):
            state = layer_kind(kind).decode_state
            if callable(state):
                one = state(cfg, batch, length)
                cache[j] = {k: jnp.broadcast_to(v, (cfg.n_units, *v.shape)) for k, v in one.items()}
        return cache
