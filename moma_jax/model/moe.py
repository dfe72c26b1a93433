"""The sparse SwiGLU feed-forward: modality groups of experts, each group with its own router.

One layer serves MoMa (a text group and an image group), mixed-modal MoE (one group for all
modalities) and the token-choice baselines; `model.moe` says which. Per routing group of
N tokens and per expert group:

1. eligibility: the group's tokens are those of its modalities, padding excluded (b_M of them);
2. routing: expert choice (each expert takes its top k_e = floor(b_M * c / E_M) tokens; its
   slot buffer holds floor(N * c / E_M), the most k_e can be, so nothing is ever dropped) or
   token choice (each token its top-k experts, capacity C: drops are the method's, counted);
   a one-expert group has no router: gate 1 for every token of its modalities, N slots;
   with `ctx.causal` every decision is the token's own (`_route_causal`): the
   aux router's score > 0.5 for expert choice, top-k without capacity for token choice, over
   each row as its own group, so no token is dropped or evicted by a later one, and no
   later token changes even the order in which an earlier token's expert outputs are summed;
3. `grouped.py`: each group's experts run their valid slots slab by slab (a batched SwiGLU
   over the stacked expert weights; slabs past the longest expert's slots are skipped), and a
   weighted scatter-add brings the outputs back to token positions.
Tokens taken by no expert get 0 here and keep only the residual.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ConfigError, ModelConfig
from moma_jax.model import aux_router, grouped, routing
from moma_jax.model.context import Context
from moma_jax.model.layers import param

W = ("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD")  # an expert group's stacked weights


class ExpertGroup(nnx.Module):
    """E stacked SwiGLU experts (run by `grouped.slab_swiglu`) and, for E > 1, their router."""

    def __init__(self, cfg: ModelConfig, n_experts: int, *, rngs: nnx.Rngs):
        d, f, std, dt = cfg.d_model, cfg.resolved_ffn_hidden, cfg.init_std, cfg.param_dtype
        self.n_experts = n_experts
        self.router_DxE = (
            param(rngs, (d, n_experts), ("embed", None), std, dt) if n_experts > 1 else None
        )
        self.w_gate_ExDxF = param(rngs, (n_experts, d, f), ("expert", "embed", "mlp"), std, dt)
        self.w_up_ExDxF = param(rngs, (n_experts, d, f), ("expert", "embed", "mlp"), std, dt)
        self.w_down_ExFxD = param(rngs, (n_experts, f, d), ("expert", "mlp", "embed"), std, dt)
        ranks_group = n_experts > 1 and cfg.moe.routing == "expert_choice"
        self.aux_router = aux_router.maybe_aux_router(cfg, n_experts, rngs) if ranks_group else None


class SparseFFN(nnx.Module):
    """Mixture of expert groups selected by modality (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.moe = cfg.moe
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        for g, n_experts in enumerate(cfg.moe.group_experts):
            setattr(self, f"group_{g}", ExpertGroup(cfg, n_experts, rngs=rngs))

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> tuple[jax.Array, dict]:
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
        losses: dict[str, jax.Array] = {}
        metrics: dict[str, jax.Array] = {}
        dispatches = []
        for g in range(moe.n_groups):
            group: ExpertGroup = getattr(self, f"group_{g}")
            name = moe.group_name(g)
            with jax.named_scope(f"route_{name}"):
                modalities = moe.modalities(g)
                eligible_GxN, count_G = jax.vmap(
                    lambda mod, val, ms=modalities: routing.modality_eligibility(mod, val, ms)
                )(modality_GxN, valid_GxN)
                key = ctx.routing_key
                key = None if key is None else jax.random.fold_in(key, g)
                route = self._route_causal if causal else self._route
                dispatch, group_losses, group_metrics = route(
                    group, g, x_GxNxD, eligible_GxN, count_G, key
                )
            dispatches.append(dispatch)
            losses.update({f"moe/{name}/{k}": v for k, v in group_losses.items()})
            metrics.update({f"moe/{name}/{k}": v for k, v in group_metrics.items()})
        with jax.named_scope("experts"):
            dt = self.compute_dtype
            weights = [
                tuple(getattr(getattr(self, f"group_{g}"), name)[...].astype(dt) for name in W)
                for g in range(moe.n_groups)
            ]
            x_dt = x_GxNxD.astype(dt)
            if moe.expert_compute == "ragged_dot":
                outs, used_rows = _ragged_experts(x_dt, dispatches, weights)
                with jax.named_scope("combine"):
                    y_GxNxD = sum(
                        (
                            jax.vmap(lambda o, dsp: grouped.combine_slots(o, dsp, n))(out, dsp)
                            for out, dsp in zip(outs, dispatches, strict=True)
                        ),
                        start=jnp.zeros(x_GxNxD.shape, jnp.float32),
                    )
            else:
                y_GxNxD, used_rows = jnp.zeros(x_GxNxD.shape, jnp.float32), jnp.zeros(())
                for g, (dispatch, (w_gate, w_up, w_down)) in enumerate(
                    zip(dispatches, weights, strict=True)
                ):
                    first, slab = moe.first_slots(g), moe.slab_slots(g)
                    if causal:  # N slots per expert: slabs, as many as the longest needs
                        slab = max(8, min(moe.tile_rows // moe.group_experts[g], n))
                        first = min(8, n)
                    y, used = grouped.slab_swiglu(x_dt, dispatch, w_gate, w_up, w_down, first, slab)
                    y_GxNxD = y_GxNxD + y
                    slots = used * moe.group_experts[g] * x_GxNxD.shape[0]
                    used_rows = used_rows + slots.astype(jnp.float32)
        routed = sum((jnp.sum(dsp.valid_ExC) for dsp in dispatches), start=jnp.zeros(()))
        if not causal:  # the training layout's static rows
            metrics["moe/rows_used_frac"] = used_rows / (moe.static_rows * x_GxNxD.shape[0])
            metrics["moe/padding_frac"] = (used_rows - routed) / jnp.maximum(used_rows, 1.0)
        y_BxLxD = y_GxNxD.reshape(b, length, d).astype(x_BxLxD.dtype)
        aux: dict[str, Any] = {"losses": losses, "metrics": metrics}
        if ctx.capture:  # routing decisions for analysis (moma_jax.analysis.route)
            aux["capture"] = {}
            for g, dsp in enumerate(dispatches):
                view = _token_view(dsp, n, b, length)
                router = getattr(self, f"group_{g}").aux_router
                if router is not None:  # its prediction of each decision
                    view["aux_score"] = jax.nn.sigmoid(router(x_BxLxD))
                aux["capture"][moe.group_name(g)] = view
        return y_BxLxD, aux

    def _route(self, group: ExpertGroup, g: int, x_GxNxD, eligible_GxN, count_G, key):
        """Dispatch for one expert group, with its auxiliary losses and routing metrics."""
        moe = self.moe
        experts, slots = group.n_experts, moe.group_slots(g)
        losses: dict[str, jax.Array] = {}
        if experts == 1:  # pure modality untying: every eligible token, gate 1
            scores_GxNxE = jnp.ones(eligible_GxN.shape + (1,), jnp.float32)
            dispatch, stats = jax.vmap(lambda e: routing.take_all(e, slots))(eligible_GxN)
            return dispatch, losses, _metrics(scores_GxNxE, eligible_GxN, count_G, dispatch, stats)
        assert group.router_DxE is not None  # every group of more than one expert has a router
        logits_GxNxE = jnp.einsum(
            "gnd,de->gne", x_GxNxD.astype(jnp.float32), group.router_DxE[...].astype(jnp.float32)
        )
        if moe.routing == "token_choice":
            probs_GxNxE = jax.nn.softmax(logits_GxNxE, axis=-1)
            if moe.force_balanced:
                turns_GxNxE = jax.vmap(lambda e: routing.round_robin(e, experts))(eligible_GxN)
                probs_GxNxE = turns_GxNxE / jnp.sum(turns_GxNxE, -1, keepdims=True)
            dispatch, stats = jax.vmap(
                lambda p, e: routing.token_choice(p, e, moe.top_k, slots, moe.top_k > 1)
            )(probs_GxNxE, eligible_GxN)
            # Switch's balancing loss over the whole batch: f and P averaged over all groups.
            lb = routing.switch_load_balance_loss(
                jnp.mean(stats["frac_tokens_E"], axis=0), jnp.mean(stats["mean_prob_E"], axis=0)
            )
            z = jnp.mean(jax.vmap(routing.router_z_loss)(logits_GxNxE, eligible_GxN))
            losses = {"lb_loss": moe.lb_loss_weight * lb, "z_loss": moe.router_z_loss_weight * z}
            scores_GxNxE = probs_GxNxE
        else:
            if moe.router_noise == "gumbel" and key is not None:
                logits_GxNxE = routing.gumbel_sigmoid_logits(logits_GxNxE, key)
            scores_GxNxE = routing.router_scores(logits_GxNxE, moe.router_score)
            # Rank on logits (sigmoid) or log-probs (softmax): the float32 scores saturate
            # (sigmoid is exactly 1.0 from logit 16.6) and would tie; gates stay the scores.
            ranking_GxNxE = routing.ranking_scores(logits_GxNxE, moe.router_score)
            if moe.force_balanced:
                ranking_GxNxE = jax.vmap(lambda e: routing.round_robin(e, experts))(eligible_GxN)
            k_G = jax.vmap(lambda c: routing.ec_k(c, moe.capacity, experts))(count_G)
            dispatch, stats = jax.vmap(
                lambda s, e, k, r: routing.expert_choice(s, e, k, slots, ranking_NxE=r)
            )(scores_GxNxE, eligible_GxN, k_G, ranking_GxNxE)
        metrics = _metrics(scores_GxNxE, eligible_GxN, count_G, dispatch, stats)
        if group.aux_router is not None:
            taken_GxNxE = jax.vmap(lambda dsp: _taken(dsp, eligible_GxN.shape[1]))(dispatch)
            aux_losses, aux_metrics = aux_router.aux_terms(
                group.aux_router, x_GxNxD, taken_GxNxE, eligible_GxN[..., None]
            )
            losses.update(aux_losses)
            metrics.update(aux_metrics)
        return dispatch, losses, metrics

    def _route_causal(self, group: ExpertGroup, g: int, x_GxNxD, eligible_GxN, count_G, key):
        """Every token decides alone (a row per group, N slots per expert, nothing dropped):
        expert choice by its aux router's score > 0.5 with the main router's score as the
        gate; token choice by its top-k; a one-expert group takes every eligible token."""
        del key  # no router noise at evaluation
        moe, experts, n = self.moe, group.n_experts, x_GxNxD.shape[1]
        if experts == 1:
            dispatch, stats = jax.vmap(lambda e: routing.take_all(e, n))(eligible_GxN)
            scores_GxNxE = jnp.ones(eligible_GxN.shape + (1,), jnp.float32)
            return dispatch, {}, _metrics(scores_GxNxE, eligible_GxN, count_G, dispatch, stats)
        assert group.router_DxE is not None
        logits_GxNxE = jnp.einsum(
            "gnd,de->gne", x_GxNxD.astype(jnp.float32), group.router_DxE[...].astype(jnp.float32)
        )
        if moe.routing == "token_choice":
            scores_GxNxE = jax.nn.softmax(logits_GxNxE, axis=-1)
            taken_GxNxE, gate_GxNxE = jax.vmap(
                lambda p: routing.top_k_taken(p, moe.top_k, moe.top_k > 1)
            )(scores_GxNxE)
        else:
            router = aux_router.require(group.aux_router, f"expert group {moe.group_name(g)!r}")
            scores_GxNxE = routing.router_scores(logits_GxNxE, moe.router_score)
            taken_GxNxE, gate_GxNxE = router(x_GxNxD) > 0, scores_GxNxE
        taken_GxNxE = taken_GxNxE & eligible_GxN[..., None]
        dispatch = jax.vmap(routing.threshold_dispatch)(taken_GxNxE, gate_GxNxE)
        valid = jnp.sum(dispatch.valid_ExC, dtype=jnp.float32)
        stats = {"dropped": jnp.zeros(()), "wasted": dispatch.valid_ExC.size - valid}
        return dispatch, {}, _metrics(scores_GxNxE, eligible_GxN, count_G, dispatch, stats)


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


def _ragged_experts(x_GxNxD, dispatches, weights):
    """`model.moe.expert_compute="ragged_dot"`: every valid slot of every group as one row,
    sorted by global expert inside `grouped.ragged_swiglu`; outputs back in [G, E, C, D] per
    group. Rows run = routed slots (no padding)."""
    rows, experts, first = [], [], 0
    for dsp in dispatches:
        n_experts = dsp.valid_ExC.shape[1]
        rows.append(jax.vmap(lambda x, idx: x[idx])(x_GxNxD, dsp.token_index_ExC))
        expert_GxExC = jnp.broadcast_to(
            first + jnp.arange(n_experts)[None, :, None], dsp.valid_ExC.shape
        )
        experts.append(jnp.where(dsp.valid_ExC, expert_GxExC, -1))
        first += n_experts
    d = x_GxNxD.shape[-1]
    x_RxD = jnp.concatenate([r.reshape(-1, d) for r in rows])
    expert_R = jnp.concatenate([e.reshape(-1) for e in experts])
    stacked = [jnp.concatenate(ws, axis=0) for ws in zip(*weights, strict=True)]
    out_RxD = grouped.ragged_swiglu(x_RxD, expert_R, *stacked)
    outs, start = [], 0
    for r in rows:
        outs.append(out_RxD[start : start + r.size // d].reshape(r.shape))
        start += r.size // d
    return outs, jnp.sum(expert_R >= 0).astype(jnp.float32)
