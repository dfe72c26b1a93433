"""Routing rows whose experts per token vary, each token deciding alone (`moma_jax/routers.py`
holds the table, the fixed-count rows and the `threshold` dispatch these use): top-p, null
experts and top-any. All are dropless (N slots per expert) and route causally as they train, so
they need no aux router; `moe/{group}/experts_per_token` logs what they use."""

from __future__ import annotations

from typing import Any

from moma_jax.routers import (
    GroupRouting,
    Routed,
    Router,
    SparseSettings,
    register_router,
    threshold,
)


class TopP(Router):
    """Top-p (dynamic) routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic
    Routing in MoE Models", arXiv 2403.07652): softmax P over the group's experts; a token
    takes its experts in descending P until their mass reaches p (`model.moe.top_p`), so one
    at least and all at most, each with gate P (not renormalised). Every decision is the
    token's own and nothing is dropped (N slots per expert), so it routes causally as it
    trains: no aux router. Losses: the dynamic loss, `top_p_entropy_weight` x the mean entropy
    of P (fewer experts per token as it falls), and the balance loss, `lb_loss_weight` x
    E sum_e f_e P_e (f_e: the share of the group's tokens taking e; P_e: its mean prob).
    FLOPs: `model.moe.capacity` is the experts per token the ideal count assumes; the measured
    mean is logged (`moe/{group}/experts_per_token`)."""

    name = "top_p"

    def slots(self, moe: SparseSettings, group: int) -> int:
        return moe.routing_group_tokens

    def experts_per_token(self, moe: SparseSettings, group: int) -> float:
        return moe.capacity

    def route(self, r: GroupRouting) -> Routed:
        import jax
        import jax.numpy as jnp

        from moma_jax.model import routing

        moe = r.moe
        probs_GxNxE = jax.nn.softmax(r.logits_GxNxE.astype(jnp.float32), axis=-1)
        taken_GxNxE = jax.vmap(lambda p: routing.top_p_taken(p, moe.top_p))(probs_GxNxE)
        routed = threshold(r, taken_GxNxE, probs_GxNxE, probs_GxNxE)
        elig_GxNx1 = r.eligible_GxN[..., None].astype(jnp.float32)
        count = jnp.maximum(jnp.sum(elig_GxNx1), 1.0)
        log_p = jnp.log(jnp.maximum(probs_GxNxE, jnp.finfo(jnp.float32).tiny))
        entropy = -jnp.sum(probs_GxNxE * log_p * elig_GxNx1) / count
        frac_E = jnp.sum(taken_GxNxE * elig_GxNx1, axis=(0, 1)) / count
        mean_prob_E = jnp.sum(probs_GxNxE * elig_GxNx1, axis=(0, 1)) / count
        losses = {
            "entropy_loss": moe.top_p_entropy_weight * entropy,
            "lb_loss": moe.lb_loss_weight * routing.switch_load_balance_loss(frac_E, mean_prob_E),
        }
        return routed._replace(losses=losses)

    route_causal = route


class NullExperts(Router):
    """AdaMoE (Zeng et al. 2024, arXiv 2406.13233): token choice top-k over the group's E
    experts and `model.moe.null_experts` n null experts, which output zero at no cost, so a
    token uses between 0 and k real experts. Softmax over all E + n logits; the gates of the
    real experts a token chose are renormalised over them (a token that chose only null
    experts keeps the residual). Balance: the Switch loss over all E + n experts,
    (E + n) sum_e f_e P_e with f_e summed over the k choices, so the null experts' share is
    held near n / (E + n) and a token uses k E / (E + n) real experts on average: the ideal
    FLOPs count. Dropless and per token (N slots per expert): causal as it trains."""

    name = "token_choice_null"

    def router_columns(self, moe: SparseSettings, group: int) -> int:
        return moe.group_experts[group] + moe.null_experts

    def slots(self, moe: SparseSettings, group: int) -> int:
        return moe.routing_group_tokens

    def experts_per_token(self, moe: SparseSettings, group: int) -> float:
        experts = moe.group_experts[group]
        return moe.top_k * experts / (experts + moe.null_experts)

    def route(self, r: GroupRouting) -> Routed:
        import jax
        import jax.numpy as jnp

        from moma_jax.model import routing

        moe = r.moe
        columns = r.logits_GxNxE.shape[-1]
        experts = columns - moe.null_experts
        probs_GxNxC = jax.nn.softmax(r.logits_GxNxE.astype(jnp.float32), axis=-1)
        chosen_GxNxC, _ = jax.vmap(lambda p: routing.top_k_taken(p, moe.top_k, False))(probs_GxNxC)
        real_GxNxE = chosen_GxNxC[..., :experts]
        weight_GxNxE = jnp.where(real_GxNxE, probs_GxNxC[..., :experts], 0.0)
        total_GxNx1 = jnp.sum(weight_GxNxE, axis=-1, keepdims=True)
        gate_GxNxE = weight_GxNxE / jnp.where(total_GxNx1 > 0, total_GxNx1, 1.0)
        routed = threshold(r, real_GxNxE, gate_GxNxE, probs_GxNxC[..., :experts])
        elig_GxNx1 = r.eligible_GxN[..., None].astype(jnp.float32)
        count = jnp.maximum(jnp.sum(elig_GxNx1), 1.0)
        frac_C = jnp.sum(chosen_GxNxC * elig_GxNx1, axis=(0, 1)) / count
        mean_prob_C = jnp.sum(probs_GxNxC * elig_GxNx1, axis=(0, 1)) / count
        lb = routing.switch_load_balance_loss(frac_C, mean_prob_C)
        return routed._replace(losses={"lb_loss": moe.lb_loss_weight * lb})

    route_causal = route


class TopAny(Router):
    """DynMoE's top-any gating (Guo et al. 2024, "Dynamic Mixture of Experts: An Auto-Tuning
    Approach for Efficient Transformer Models", arXiv 2405.14297): scores
    s_e = sigmoid(tau cos(x, w_e)) against learned per-expert thresholds
    t_e = sigmoid(tau theta_e) (`router_threshold_E`, zeros at the start; tau is
    `model.moe.top_any_tau`, fixed, 1 as DynMoE's); a token takes every expert with s_e > t_e,
    each at gate 1/k (k taken; straight-through gradient of relu(s_e - t_e) for the 0/1
    choice), and a token that takes none its top-1 expert by s at gate 1 (DynMoE's inference
    fallback, used here in training too, so training and generation route alike). Losses,
    `top_any_loss_weight` x each: DynMoE's diverse-and-simple gate loss on the router's expert
    embeddings, its balance loss over the tokens that chose, and its efficiency loss (the mean
    choice). Per token and dropless (N slots per expert): causal as it trains, no aux router.
    FLOPs: `model.moe.capacity` is the experts per token the ideal count assumes; the measured
    mean is logged (`moe/{group}/experts_per_token`), and the share of tokens on the fallback
    (`moe/{group}/fallback_frac`)."""

    name = "top_any"
    has_thresholds = True

    def router_logits(self, moe: SparseSettings, x_GxNxD: Any, w_DxE: Any) -> Any:
        import jax.numpy as jnp

        eps = 1e-12  # as torch's F.normalize
        x_unit = x_GxNxD / jnp.maximum(jnp.linalg.norm(x_GxNxD, axis=-1, keepdims=True), eps)
        w_unit = w_DxE / jnp.maximum(jnp.linalg.norm(w_DxE, axis=0, keepdims=True), eps)
        return moe.top_any_tau * jnp.einsum("gnd,de->gne", x_unit, w_unit)

    def slots(self, moe: SparseSettings, group: int) -> int:
        return moe.routing_group_tokens

    def experts_per_token(self, moe: SparseSettings, group: int) -> float:
        return moe.capacity

    def route(self, r: GroupRouting) -> Routed:
        import jax
        import jax.numpy as jnp

        from moma_jax.model import routing

        moe = r.moe
        scores_GxNxE = jax.nn.sigmoid(r.logits_GxNxE)
        thresholds_E = jax.nn.sigmoid(moe.top_any_tau * r.threshold_E)
        taken_GxNxE, gate_GxNxE, chosen_GxNxE = jax.vmap(
            lambda s: routing.top_any_gates(s, thresholds_E)
        )(scores_GxNxE)
        routed = threshold(r, taken_GxNxE, gate_GxNxE, scores_GxNxE)
        experts = chosen_GxNxE.shape[-1]
        terms = routing.top_any_losses(
            chosen_GxNxE.reshape(-1, experts), r.eligible_GxN.reshape(-1), r.router_DxE
        )
        weight = moe.top_any_loss_weight
        losses = {f"{name}_loss": weight * value for name, value in terms.items()}
        # Tokens that chose no expert and took the top-1 fallback, among the group's tokens.
        elig_GxN = r.eligible_GxN.astype(jnp.float32)
        none_GxN = (jnp.sum(jax.lax.stop_gradient(chosen_GxNxE), axis=-1) == 0) * elig_GxN
        fallback = jnp.sum(none_GxN) / jnp.maximum(jnp.sum(elig_GxN), 1.0)
        return routed._replace(losses=losses, metrics={"fallback_frac": fallback})

    route_causal = route


register_router(TopP())
register_router(NullExperts())
register_router(TopAny())
