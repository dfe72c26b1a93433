"""ReMoE's ReLU routing (Wang et al. 2024, "ReMoE: Fully Differentiable Mixture-of-Experts with
ReLU Routing", arXiv 2412.14711), a row of the routers' table (`moma_jax/routers.py`).

A token's gate from expert e is R_e(x) = ReLU(x W_r)_e, and y = sum_e R_e(x) E_e(x): every
expert with a positive gate takes the token, so the experts per token vary and nothing ranks
tokens against each other (causal as it trains, no aux router; dropless, N slots per expert).
Sparsity comes from an L1 penalty in the Switch form, lambda E sum_e f_e P_e with
f_e = (tokens taking e) / (N k) and P_e = sum_n R_e(x_n) / N over the group's eligible tokens
of the batch (k: `model.moe.capacity`, the experts per token aimed at), whose coefficient
lambda is training state (`train/controls.py`): it starts at `model.moe.relu_l1_init` and
after each step is multiplied by `relu_l1_multiplier` while the step's measured experts per
token (mean over layers and micro-batches) exceed k, divided by it otherwise; the paper's
sparsity 1 - k/E is that target. Transcribed from thu-ml/ReMoE: `ReLURouter` in
megatron/core/transformer/moe/router.py, `switch_load_balancing_loss_func` in moe_utils.py,
and the coefficient update in megatron/training/training.py (`moe_relu_routing`); one
coefficient per expert group (text and image have their own targets), shared by the layers as
the reference shares one over the model. Early in training (lambda ~ 1e-8) most gates are
positive: the executed FLOPs follow the measured experts per token, logged as
`moe/{group}/experts_per_token`, while the ideal FLOPs count k.
"""

from __future__ import annotations

from moma_jax.routers import (
    Control,
    GroupRouting,
    Routed,
    Router,
    SparseSettings,
    register_router,
    threshold,
)


class ReLURouting(Router):
    """ReMoE: gates ReLU(x W_r); experts where the gate is positive; controlled L1 loss."""

    name = "relu"

    def slots(self, moe: SparseSettings, group: int) -> int:
        return moe.routing_group_tokens

    def experts_per_token(self, moe: SparseSettings, group: int) -> float:
        return moe.capacity

    def control(self, moe: SparseSettings, group: int) -> Control:
        return Control(
            loss="l1_reg",
            metric="experts_per_token",
            target=moe.capacity,
            init=moe.relu_l1_init,
            multiplier=moe.relu_l1_multiplier,
        )

    def route(self, r: GroupRouting) -> Routed:
        import jax
        import jax.numpy as jnp

        gate_GxNxE = jax.nn.relu(r.logits_GxNxE.astype(jnp.float32))
        taken_GxNxE = gate_GxNxE > 0
        routed = threshold(r, taken_GxNxE, gate_GxNxE, gate_GxNxE)
        elig_GxNx1 = r.eligible_GxN[..., None].astype(jnp.float32)
        count = jnp.maximum(jnp.sum(elig_GxNx1), 1.0)
        experts = gate_GxNxE.shape[-1]
        tokens_E = jnp.sum(taken_GxNxE * elig_GxNx1, axis=(0, 1))  # no gradient: a count
        gate_sum_E = jnp.sum(gate_GxNxE * elig_GxNx1, axis=(0, 1))
        l1 = experts * jnp.sum(gate_sum_E * tokens_E) / (count * count * r.moe.capacity)
        return routed._replace(losses={"l1_reg": l1})

    route_causal = route


register_router(ReLURouting())
