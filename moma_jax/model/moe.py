"""The sparse SwiGLU feed-forward: modality groups of experts, each group with its own router.

One layer serves MoMa (a text group and an image group), mixed-modal MoE (one group for all
modalities) and the token-choice baselines; `model.moe` says which. Per routing group of
N tokens and per expert group:

1. eligibility: the group's tokens are those of its modalities, padding excluded (b_M of them);
2. routing by the group's row of `moma_jax/routers.py` (`model.moe.routing`; a one-expert
   group is the take-all row: no router, gate 1 for every token of its modalities, N slots):
   expert choice (each expert takes its top k_e = floor(b_M * c / E_M) tokens; its slot
   buffer holds floor(N * c / E_M), the most k_e can be, so nothing is ever dropped) or token
   choice (each token its top-k experts, capacity C: drops are the method's, counted);
   with `ctx.causal` every decision is the token's own (`Router.route_causal`):
   the aux router's score > 0.5 for expert choice, top-k without capacity for token choice,
   over each row as its own group, so no token is dropped or evicted by a later one, and no
   later token changes even the order in which an earlier token's expert outputs are summed;
3. experts (`EXPERT_COMPUTE[model.moe.expert_compute]`, `grouped.py`): each group's experts
   run their valid slots slab by slab (a batched SwiGLU
   over the stacked expert weights; slabs past the longest expert's slots are skipped), and a
   weighted scatter-add brings the outputs back to token positions.
Tokens taken by no expert get 0 here and keep only the residual.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ConfigError, ModelConfig, moe_routed_config, moe_shared_config
from moma_jax.model import aux_router, grouped, routing
from moma_jax.model.context import Context
from moma_jax.model.layers import decode_sliced, param, swiglu, zeros_param
from moma_jax.routers import GroupRouting, Routed
from moma_jax.sparse_config import SparseConfig

W = ("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD")  # an expert group's stacked weights


def group_attr(g: int) -> str:
    """Where expert group g lives in the layer: its parameters' path (kept as checkpoints
    name it), read back through `SparseFFN.groups`."""
    return f"group_{g}"


class ExpertGroup(nnx.Module):
    """E stacked SwiGLU experts (run by `grouped.slab_swiglu`), the router of its routing
    method's row where it has one, and an aux router where causal routing needs one. Every
    parameter carries `expert_group=g` (flops.active_params reads it)."""

    def __init__(self, cfg: ModelConfig, g: int, *, rngs: nnx.Rngs):
        d, f, std, dt = cfg.d_model, cfg.resolved_ffn_hidden, cfg.init_std, cfg.param_dtype
        row, n_experts = cfg.moe.router(g), cfg.moe.group_experts[g]
        self.n_experts = n_experts
        self.router_DxE = (
            param(rngs, (d, row.router_columns(cfg.moe, g)), ("embed", None), std, dt)
            if row.has_router
            else None
        )
        # Rows with learned per-expert thresholds (top-any): zeros at the start, as DynMoE's.
        self.router_threshold_E = (
            zeros_param((n_experts,), (None,), dt) if row.has_thresholds else None
        )
        self.w_gate_ExDxF = param(rngs, (n_experts, d, f), ("expert", "embed", "mlp"), std, dt)
        self.w_up_ExDxF = param(rngs, (n_experts, d, f), ("expert", "embed", "mlp"), std, dt)
        self.w_down_ExFxD = param(rngs, (n_experts, f, d), ("expert", "mlp", "embed"), std, dt)
        decode_sliced(self.w_gate_ExDxF, self.w_up_ExDxF, self.w_down_ExFxD)
        ranks_group = row.needs_aux_router
        self.aux_router = aux_router.maybe_aux_router(cfg, n_experts, rngs) if ranks_group else None
        for _, var in nnx.iter_graph(self):
            if isinstance(var, nnx.Variable):
                var.set_metadata(expert_group=g)


class SparseFFN(nnx.Module):
    """Mixture of expert groups selected by modality (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.moe = cfg.moe
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        routed = moe_routed_config(cfg)  # fine-grained experts: hidden / granularity
        for g in range(cfg.moe.n_groups):
            setattr(self, group_attr(g), ExpertGroup(routed, g, rngs=rngs))
        # DeepSeekMoE's shared experts: a take-all layer over the same groups of modalities.
        self.shared = (
            SparseFFN(moe_shared_config(cfg), rngs=rngs) if cfg.moe.shared_experts else None
        )
        if self.shared is not None:
            for g, group in enumerate(self.shared.groups):
                for _, var in nnx.iter_graph(group):
                    if isinstance(var, nnx.Variable):
                        var.set_metadata(expert_group=None, shared_group=g)

    @property
    def groups(self) -> list[ExpertGroup]:
        return [getattr(self, group_attr(g)) for g in range(self.moe.n_groups)]

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> tuple[jax.Array, dict]:
        """Route each expert group's tokens, run the experts on their slots, combine."""
        moe = self.moe
        b, length, d = x_BxLxD.shape
        causal = ctx.causal
        n = length if causal else moe.routing_group_tokens  # causal: a row's tokens only
        if (b * length) % n:
            raise ConfigError(
                f"a micro-batch of {b} rows x {length} tokens does not split into routing groups "
                f"of model.moe.routing_group_tokens={n}"
            )
        x_GxNxD = x_BxLxD.reshape(-1, n, d)
        modality_GxN = ctx.modality.reshape(-1, n)
        valid_GxN = (ctx.segment_ids > 0).reshape(-1, n)
        key = ctx.routing_key
        losses: dict[str, jax.Array] = {}
        metrics: dict[str, jax.Array] = {}
        dispatches = []
        for g, group in enumerate(self.groups):
            name = moe.group_name(g)
            with jax.named_scope(f"route_{name}"):
                group_key = None if key is None or causal else jax.random.fold_in(key, g)
                dispatch, group_losses, group_metrics = self._route(
                    group, g, x_GxNxD, modality_GxN, valid_GxN, group_key, causal
                )
            dispatches.append(dispatch)
            losses.update({f"moe/{name}/{k}": v for k, v in group_losses.items()})
            metrics.update({f"moe/{name}/{k}": v for k, v in group_metrics.items()})
        with jax.named_scope("experts"):
            weights = [tuple(getattr(grp, w)[...] for w in W) for grp in self.groups]
            x_GxNxD = x_GxNxD.astype(self.compute_dtype)
            if ctx.decode_step(length):  # one-token causal steps: only the chosen experts run
                y_GxNxD, used_rows = _chosen_experts(x_GxNxD, dispatches, weights, ctx.unit)
            else:
                run_experts = EXPERT_COMPUTE[moe.expert_compute]
                y_GxNxD, used_rows = run_experts(moe, x_GxNxD, dispatches, weights, causal)
        if not causal:  # the training layout's static rows
            routed = sum((jnp.sum(dsp.valid_ExC) for dsp in dispatches), start=jnp.zeros(()))
            metrics["moe/rows_used_frac"] = used_rows / (moe.static_rows * x_GxNxD.shape[0])
            metrics["moe/padding_frac"] = (used_rows - routed) / jnp.maximum(used_rows, 1.0)
        y_BxLxD = y_GxNxD.reshape(b, length, d).astype(x_BxLxD.dtype)
        if self.shared is not None:  # take-all: no losses; its metrics (0 untaken) are not kept
            y_BxLxD = y_BxLxD + self.shared(x_BxLxD, ctx.replace(capture=False))[0]
        aux: dict[str, Any] = {"losses": losses, "metrics": metrics}
        if ctx.capture:  # routing decisions for analysis (moma_jax.analysis.route)
            aux["capture"] = self._capture(dispatches, x_BxLxD, n)
        return y_BxLxD, aux

    def _route(self, group: ExpertGroup, g: int, x_GxNxD, modality_GxN, valid_GxN, key, causal):
        """One expert group's dispatch by its routing method's row, with the row's losses, the
        routing metrics, and (teacher-forced) its aux router's loss against the decisions."""
        moe, n = self.moe, x_GxNxD.shape[1]
        row, modalities = moe.router(g), moe.modalities(g)
        eligible_GxN, count_G = jax.vmap(
            lambda mod, val: routing.modality_eligibility(mod, val, modalities)
        )(modality_GxN, valid_GxN)
        logits_GxNxE = w32 = threshold_E = None
        if group.router_DxE is not None:
            x32, w32 = x_GxNxD.astype(jnp.float32), group.router_DxE[...].astype(jnp.float32)
            logits_GxNxE = row.router_logits(moe, x32, w32)
        if group.router_threshold_E is not None:
            threshold_E = group.router_threshold_E[...].astype(jnp.float32)
        slots = n if causal else moe.group_slots(g)
        r = GroupRouting(
            moe, slots, logits_GxNxE, eligible_GxN, count_G, key,
            router_DxE=w32, threshold_E=threshold_E,
        )  # fmt: skip
        if causal:
            if row.needs_aux_router:
                router = aux_router.require(group.aux_router, f"expert group {moe.group_name(g)!r}")
                r = r._replace(aux_logits_GxNxE=router(x_GxNxD))
            routed: Routed = row.route_causal(r)
        else:
            routed = row.route(r)
        losses = dict(routed.losses)
        if (
            logits_GxNxE is not None
            and not causal
            and (moe.limoe_local_weight > 0 or moe.limoe_global_weight > 0)
        ):
            local, global_ = routing.limoe_entropy_losses(
                logits_GxNxE, modality_GxN, eligible_GxN, modalities, moe.limoe_global_threshold
            )
            losses["limoe_local"] = moe.limoe_local_weight * local
            losses["limoe_global"] = moe.limoe_global_weight * global_
        metrics = _metrics(
            routed.scores_GxNxE, eligible_GxN, count_G, routed.dispatch, routed.stats
        )
        metrics.update(routed.metrics or {})
        if group.aux_router is not None and not causal:
            taken_GxNxE = jax.vmap(lambda dsp: _taken(dsp, n))(routed.dispatch)
            aux_losses, aux_metrics = aux_router.aux_terms(
                group.aux_router, x_GxNxD, taken_GxNxE, eligible_GxN[..., None]
            )
            losses.update(aux_losses)
            metrics.update(aux_metrics)
        return routed.dispatch, losses, metrics

    def _capture(self, dispatches, x_BxLxD: jax.Array, n: int) -> dict[str, Any]:
        """Each group's decisions seen from the tokens, with its aux router's prediction."""
        b, length, _ = x_BxLxD.shape
        capture = {}
        for g, (group, dsp) in enumerate(zip(self.groups, dispatches, strict=True)):
            view = _token_view(dsp, n, b, length)
            if group.aux_router is not None:  # its prediction of each decision
                view["aux_score"] = jax.nn.sigmoid(group.aux_router(x_BxLxD))
            capture[self.moe.group_name(g)] = view
        return capture


def _taken(dsp, n: int) -> jax.Array:
    """[N, E] bool: which experts took each token, from one routing group's dispatch."""
    experts = dsp.valid_ExC.shape[0]
    e_ExC = jnp.broadcast_to(jnp.arange(experts)[:, None], dsp.valid_ExC.shape)
    taken = jnp.zeros((n, experts), jnp.float32)
    return taken.at[dsp.token_index_ExC, e_ExC].add(dsp.valid_ExC.astype(jnp.float32)) > 0


def _metrics(scores_GxNxE, eligible_GxN, count_G, dispatch, stats) -> dict[str, jax.Array]:
    """Per-expert load, router score mean and entropy, dropped and wasted shares (on device)."""
    elig = eligible_GxN.astype(jnp.float32)
    n_elig = jnp.maximum(jnp.sum(elig), 1.0)
    taken_GxE = jnp.sum(dispatch.valid_ExC, axis=-1).astype(jnp.float32)
    load_E = jnp.sum(taken_GxE, axis=0) / jnp.maximum(jnp.sum(taken_GxE), 1.0)
    p_GxNxE = scores_GxNxE / jnp.maximum(jnp.sum(scores_GxNxE, -1, keepdims=True), 1e-9)
    entropy_GxN = -jnp.sum(p_GxNxE * jnp.log(jnp.maximum(p_GxNxE, 1e-9)), axis=-1)
    slots = dispatch.valid_ExC.shape[-1] * dispatch.valid_ExC.shape[-2] * count_G.shape[0]
    n_tok = eligible_GxN.shape[0] * eligible_GxN.shape[1]
    token_hit_GxN = jax.vmap(
        lambda dsp, n: (
            jnp.zeros((n,), jnp.float32)
            .at[dsp.token_index_ExC]
            .add(dsp.valid_ExC.astype(jnp.float32))
        ),
        in_axes=(0, None),
    )(dispatch, eligible_GxN.shape[1])
    out = {
        "score_mean": jnp.sum(jnp.mean(scores_GxNxE, -1) * elig) / n_elig,
        "score_entropy": jnp.sum(entropy_GxN * elig) / n_elig,
        "dropped_frac": jnp.sum(stats["dropped"])
        / jnp.maximum(jnp.sum(taken_GxE) + jnp.sum(stats["dropped"]), 1.0),
        "wasted_frac": jnp.sum(stats["wasted"]) / slots,
        "untaken_frac": jnp.sum((token_hit_GxN == 0) * elig) / n_elig,
        "experts_per_token": jnp.sum(token_hit_GxN * elig) / n_elig,
        "multi_expert_frac": jnp.sum((token_hit_GxN > 1) * elig) / n_elig,
        "tokens_share": jnp.sum(elig) / n_tok,
    }
    out.update({f"load_{e}": load_E[e] for e in range(load_E.shape[0])})
    return out


def _token_view(dispatch, n: int, b: int, length: int) -> dict[str, jax.Array]:
    """A dispatch seen from the tokens: taken [B, L, E] (which experts took each token) and
    gate [B, L, E] (its combine weight from each)."""

    def one(dsp):
        experts = dsp.valid_ExC.shape[0]
        e_ExC = jnp.broadcast_to(jnp.arange(experts)[:, None], dsp.valid_ExC.shape)
        gate = jnp.zeros((n, experts), jnp.float32)
        gate = gate.at[dsp.token_index_ExC, e_ExC].add(jnp.where(dsp.valid_ExC, dsp.gate_ExC, 0))
        return _taken(dsp, n), gate

    taken_GxNxE, gate_GxNxE = jax.vmap(one)(dispatch)
    experts = taken_GxNxE.shape[-1]
    return {
        "taken": taken_GxNxE.reshape(b, length, experts),
        "gate": gate_GxNxE.reshape(b, length, experts),
    }


def _slab_experts(moe: SparseConfig, x_GxNxD, dispatches, weights, causal: bool):
    """`expert_compute="slabs"`: each group's first slots in one batched call, the rest in
    slabs (`grouped.slab_swiglu`). Causal dispatches hold N slots per expert: slabs of the
    group's share of `tile_rows`, as many as the longest expert needs."""
    n = x_GxNxD.shape[1]
    y_GxNxD, used_rows = jnp.zeros(x_GxNxD.shape, jnp.float32), jnp.zeros(())
    for g, (dispatch, w) in enumerate(zip(dispatches, weights, strict=True)):
        first, slab = moe.first_slots(g), moe.slab_slots(g)
        if causal:
            slab = max(8, min(moe.tile_rows // moe.group_experts[g], n))
            first = min(8, n)
        w_gate, w_up, w_down = (a.astype(x_GxNxD.dtype) for a in w)
        y, used = grouped.slab_swiglu(x_GxNxD, dispatch, w_gate, w_up, w_down, first, slab)
        y_GxNxD = y_GxNxD + y
        used_rows = used_rows + (used * moe.group_experts[g] * x_GxNxD.shape[0]).astype(jnp.float32)
    return y_GxNxD, used_rows


def _chosen_experts(x_GxNxD, dispatches, weights, unit: jax.Array | None):
    """Causal one-token steps (decoding, N = 1 per routing group): each group's experts that
    some token chose, one at a time (`grouped.chosen_experts_apply`, reading [unit, e] of the
    layer-stacked weights, `Context.unit`); the others read no weights. Rows run: the chosen
    experts' slots."""
    y_GxNxD, used_rows = jnp.zeros(x_GxNxD.shape, jnp.float32), jnp.zeros(())
    for dispatch, w in zip(dispatches, weights, strict=True):
        y, ran = grouped.chosen_experts_apply(swiglu, x_GxNxD, dispatch, w, unit)
        y_GxNxD = y_GxNxD + y
        used_rows = used_rows + (ran * dispatch.valid_ExC.shape[-1] * x_GxNxD.shape[0])
    return y_GxNxD, used_rows.astype(jnp.float32)


def _ragged_experts(moe: SparseConfig, x_GxNxD, dispatches, weights, causal: bool):
    """`expert_compute="ragged_dot"`: every valid slot of every group as one row, sorted by
    global expert inside `grouped.ragged_swiglu`, then combined per group. Rows run = routed
    slots (no padding)."""
    del moe, causal  # no slabs: the rows are the routed slots, whatever the layout
    n, d = x_GxNxD.shape[1], x_GxNxD.shape[-1]
    rows, experts, first = [], [], 0
    for dsp in dispatches:
        n_experts = dsp.valid_ExC.shape[1]
        rows.append(jax.vmap(lambda x, idx: x[idx])(x_GxNxD, dsp.token_index_ExC))
        expert_GxExC = jnp.broadcast_to(
            first + jnp.arange(n_experts)[None, :, None], dsp.valid_ExC.shape
        )
        experts.append(jnp.where(dsp.valid_ExC, expert_GxExC, -1))
        first += n_experts
    x_RxD = jnp.concatenate([r.reshape(-1, d) for r in rows])
    expert_R = jnp.concatenate([e.reshape(-1) for e in experts])
    stacked = [
        jnp.concatenate([w.astype(x_GxNxD.dtype) for w in ws], axis=0)
        for ws in zip(*weights, strict=True)
    ]
    out_RxD = grouped.ragged_swiglu(x_RxD, expert_R, *stacked)
    y_GxNxD, start = jnp.zeros(x_GxNxD.shape, jnp.float32), 0
    with jax.named_scope("combine"):
        for r, dsp in zip(rows, dispatches, strict=True):
            out = out_RxD[start : start + r.size // d].reshape(r.shape)
            y_GxNxD = y_GxNxD + jax.vmap(lambda o, s: grouped.combine_slots(o, s, n))(out, dsp)
            start += r.size // d
    return y_GxNxD, jnp.sum(expert_R >= 0).astype(jnp.float32)


# One row per expert-compute path (`model.moe.expert_compute`, names in
# `sparse_config.EXPERT_COMPUTE`): (moe, x [G, N, D] in the compute dtype, dispatches,
# weights per group, causal) -> (y [G, N, D] float32, expert rows run).
EXPERT_COMPUTE = {"slabs": _slab_experts, "ragged_dot": _ragged_experts}
