"""Mixture of Tokens (Antoniak et al. 2023, arXiv 2310.15961): a continuous mixture of experts
that mixes tokens of different rows instead of routing each token (layer kind `motok`).

A group is a fixed set of rows: the `model.motok.group_rows` = G consecutive rows of the
micro-batch (rows kG .. kG+G-1), so the groups come from the config, never from how the batch is
sharded over devices. At each position l, for each of the E experts:

    w_ge = softmax_g((x_gl W_router)_e / tau)      over the group's real tokens at l
    m_e  = sum_g w_ge x_gl                          the expert's one mixed token
    y_gl = sum_e w_ge FFN_e(m_e)                    sent back by the same weights

(merge and emit weights are the same, as in llm-random's `continuous_moe.py`). Only tokens at
the same position of other rows mix: nothing moves along the sequence, so a token's output
never depends on later tokens of any row. It does depend on the other rows of its group, so a
teacher-forced evaluation depends on which rows share a batch; padding takes no part (weight
0). tau = 0 is the softmax's limit, evaluated exactly: each expert takes its top-scoring token
of the group with weight 1 (the first on ties), expert choice with one slot per expert; no
gradient reaches the router there.

Causal routing (`ctx.causal`: evaluation with --routing causal, generation with the KV cache)
is the paper's mixing switched off for inference, the group of one: a softmax over one token is
1, so every expert takes the token itself, and the sum is scaled by 1/G as llm-random's forward
rescales by group_size / original_group_size, so that uniform weights give the same output in
both modes. Each row is then on its own (cached decoding equals the full forward), at E expert
FFNs per token (describe reports it as causal_flops).

Modality: tokens mix whatever their modalities, as in the paper and the reference. Mixing only
tokens of one modality would run each expert once per modality present at a position, so the
work per token would vary with the batch's modality mix and the experiment could not be FLOP-
matched by construction; modality reaches the controller through the token's representation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ConfigError, ModelConfig
from moma_jax.model.context import Context
from moma_jax.model.layers import param, swiglu

_MASKED = -1e30  # a padding token's logit: exp underflows to exactly 0 beside any real token


def _per_expert(x_XxExI: jax.Array, w_ExIxO: jax.Array) -> jax.Array:
    """Each expert's own matmul over any leading axes: [..., E, I] x [E, I, O] -> [..., E, O]."""
    return jnp.einsum("...ei,eio->...eo", x_XxExI, w_ExIxO)


def mix_weights(
    logits_KxGxLxE: jax.Array, present_KxGxL: jax.Array, temperature: float
) -> jax.Array:
    """float32 [K, G, L, E]: each expert's weights over the G rows of each group at each
    position (sum 1 over the real tokens, 0 where a position has none)."""
    present = present_KxGxL[..., None]
    logits = logits_KxGxLxE.astype(jnp.float32)
    if temperature == 0:
        top_KxLxE = jnp.argmax(jnp.where(present, logits, _MASKED), axis=1)
        weights = jax.nn.one_hot(top_KxLxE, logits.shape[1], axis=1)
    else:  # masked after the division: finite at any temperature, so no NaN in the gradient
        weights = jax.nn.softmax(jnp.where(present, logits / temperature, _MASKED), axis=1)
    return jnp.where(present, weights, 0.0)


def mix_experts(
    x_KxGxLxD: jax.Array,
    weights_KxGxLxE: jax.Array,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array,
    w_down_ExFxD: jax.Array,
) -> jax.Array:
    """Merge (one mixed token per expert, group and position), each expert's SwiGLU on its
    mixed tokens, emit by the same weights: [K, G, L, D] in x's dtype."""
    w = weights_KxGxLxE.astype(x_KxGxLxD.dtype)
    mixed_KxLxExD = jnp.einsum("kgle,kgld->kled", w, x_KxGxLxD)
    y_KxLxExD = swiglu(mixed_KxLxExD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, _per_expert)
    return jnp.einsum("kgle,kled->kgld", w, y_KxLxExD)


class MixtureOfTokens(nnx.Module):
    """The Mixture-of-Tokens feed-forward (see the module docstring): a controller D x E and E
    stacked SwiGLU experts of hidden `model.motok.expert_hidden`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        t, d, std, dt = cfg.motok, cfg.d_model, cfg.init_std, cfg.param_dtype
        e, f = t.experts, t.resolved_expert_hidden(cfg.resolved_ffn_hidden)
        self.group_rows, self.temperature = t.group_rows, t.temperature
        self.router_DxE = param(rngs, (d, e), ("embed", None), std, dt)
        self.w_gate_ExDxF = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, dt)
        self.w_up_ExDxF = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, dt)
        self.w_down_ExFxD = param(rngs, (e, f, d), ("expert", "mlp", "embed"), std, dt)
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> tuple[jax.Array, dict]:
        b, length, d = x_BxLxD.shape
        g = 1 if ctx.causal else self.group_rows
        if b % g:
            raise ConfigError(
                f"{b} rows do not split into Mixture-of-Tokens groups of "
                f"model.motok.group_rows={g} rows"
            )
        dt = self.compute_dtype
        x_KxGxLxD = x_BxLxD.astype(dt).reshape(b // g, g, length, d)
        present_KxGxL = ctx.present().reshape(b // g, g, length)
        logits_KxGxLxE = jnp.einsum(
            "kgld,de->kgle",
            x_KxGxLxD,
            self.router_DxE[...].astype(dt),
            preferred_element_type=jnp.float32,
        )
        weights_KxGxLxE = mix_weights(logits_KxGxLxE, present_KxGxL, self.temperature)
        w_gate, w_up, w_down = (
            w[...].astype(dt) for w in (self.w_gate_ExDxF, self.w_up_ExDxF, self.w_down_ExFxD)
        )
        y_KxGxLxD = mix_experts(x_KxGxLxD, weights_KxGxLxE, w_gate, w_up, w_down)
        if ctx.causal:  # the group of one: every expert on the token, rescaled by 1/G
            y_KxGxLxD = y_KxGxLxD / self.group_rows
        metrics = {} if ctx.causal else {"motok/weight_entropy": _entropy(weights_KxGxLxE)}
        return y_KxGxLxD.reshape(b, length, d), {"metrics": metrics}


def _entropy(weights_KxGxLxE: jax.Array) -> jax.Array:
    """Mean entropy of the experts' mixing weights over the group, in units of ln G (1: uniform,
    0: one token per expert), over the positions with a real token."""
    g = weights_KxGxLxE.shape[1]
    p = weights_KxGxLxE
    ent_KxLxE = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=1)
    real_KxLxE = jnp.sum(p, axis=1) > 0
    mean = jnp.sum(ent_KxLxE * real_KxLxE) / jnp.maximum(jnp.sum(real_KxLxE), 1)
    return mean / jnp.log(float(max(g, 2)))
