"""AdaMoE's null experts inside modality groups (`routers.NullExperts`, Zeng et al. 2024,
arXiv 2406.13233) against a NumPy transcription of the authors' code, CengZihao/AdaMoE
(commit 180f1227), `exp_2/LLaMA_Factory/src/llamafactory/model/adaptive_moe_utils.py`:
`CustomMixtralSparseMoeBlock.forward`, lines 116-126 and 135-148 (softmax over the real and
null experts' logits, top-k, the real experts' weights renormalised over them, every chosen
real expert's output weighted and summed), and `load_balancing_loss_func_with_null_experts`,
lines 43-55 and 84-85 (the case without an attention mask: one-hot of the top-k choices
averaged over tokens, times the mean probs, summed, times E + n). The reference's real-expert
mask `selected_experts <= 7` assumes 8 real experts; the transcription uses E. Its line 53
("## modified", meant to treat the null experts apart) slices the top-k axis of a [K, E + n]
array at E and so changes nothing: what that code computes, and what we compute, is the Switch
loss over all E + n columns, not a null-pooled variant the paper may describe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sparse_cases
from flax import nnx
from sparse_cases import W, assert_gradient_matches, assert_output_matches, inputs, run_layer

from moma_jax import registry
from moma_jax.config import ConfigError, ModelConfig, validate
from moma_jax.model.moe import SparseFFN
from moma_jax.overrides import apply_overrides


def adamoe_weights(logits, n_real, top_k):
    """[T, E] combine weight of each real expert (0 where not chosen), as the block's forward
    builds them: softmax over E + n, top-k, real experts' weights over their sum (sum 0 -> 1)."""
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    selected = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, selected, axis=-1)
    mask = selected < n_real
    chosen = weights * mask
    total = chosen.sum(-1, keepdims=True)
    total[total == 0] = 1
    out = np.zeros((len(logits), n_real))
    for t in range(len(logits)):
        for k in range(top_k):
            if mask[t, k]:
                out[t, selected[t, k]] = chosen[t, k] / total[t, 0]
    return out, probs, selected


def adamoe_balance_loss(probs, selected, n_columns):
    """`load_balancing_loss_func_with_null_experts` without a mask."""
    expert_mask = np.eye(n_columns)[selected]  # [T, K, E + n]
    tokens_per_expert = expert_mask.mean(0)  # [K, E + n]
    router_prob_per_expert = probs.mean(0)
    return (tokens_per_expert * router_prob_per_expert[None]).sum() * n_columns


def model_cfg(**moe) -> ModelConfig:
    moe = {"routing": "token_choice_null", "router_score": "softmax", "top_k": 2,
           "null_experts": 4, **moe}  # fmt: skip
    return sparse_cases.model_cfg(**moe)


def oracle(layer, cfg, x, modality, segment, concrete=None):
    """Every real expert runs on every token, weighted by the transcription's choice (made in
    NumPy from `concrete`) with traced renormalised weights from `layer`."""
    moe, concrete = cfg.moe, concrete or layer
    outs = []
    for xg, mg, sg in zip(x, modality, segment, strict=True):
        y = jnp.zeros_like(xg)
        for g, experts in enumerate(moe.group_experts):
            grp, fixed = getattr(layer, f"group_{g}"), getattr(concrete, f"group_{g}")
            mods = [m for m, gg in enumerate(moe.modality_group) if gg == g]
            eligible = np.isin(mg, mods) & (sg > 0)
            logits = np.asarray(xg, np.float64) @ np.asarray(fixed.router_DxE[...], np.float64)
            weights, _, _ = adamoe_weights(logits, experts, moe.top_k)
            chosen = (weights > 0) & eligible[:, None]
            probs = jax.nn.softmax(xg @ grp.router_DxE[...], axis=-1)[:, :experts] * chosen
            total = jnp.sum(probs, -1, keepdims=True)
            gates = probs / jnp.where(total > 0, total, 1.0)
            for e in range(experts):
                wg, wu, wd = (getattr(grp, n)[...][e] for n in W)
                y = y + gates[:, e : e + 1] * ((jax.nn.silu(xg @ wg) * (xg @ wu)) @ wd)
        outs.append(y)
    return jnp.stack(outs)


@pytest.mark.parametrize(
    "moe, image_share",
    [
        (dict(group_experts=(4, 4)), 0.3),
        (dict(group_experts=(8,), modality_group=(0, 0)), 0.3),
        (dict(group_experts=(4, 4), top_k=3, null_experts=2), 0.9),  # image-heavy
        (dict(group_experts=(4, 4)), 1.0),  # only image tokens
        (dict(group_experts=(4, 4)), 0.0),  # only text tokens
    ],
)
def test_layer_matches_the_transcribed_block(moe, image_share):
    assert_output_matches(model_cfg(**moe), oracle, image_share)


def test_gradient_matches_the_transcribed_block():
    assert_gradient_matches(model_cfg(group_experts=(4, 4)), oracle)


def test_balance_loss_and_experts_per_token_match_the_transcription():
    cfg = model_cfg(group_experts=(8,), modality_group=(0, 0), lb_loss_weight=1.0)
    layer = SparseFFN(cfg, rngs=nnx.Rngs(2))
    x, modality, segment = inputs(seed=2, padding=0)  # the reference's case: no mask
    aux = jax.jit(lambda x: run_layer(layer, x, modality, segment)[1])(x)
    router_param = layer.groups[0].router_DxE
    assert router_param is not None
    router = np.asarray(router_param[...], np.float64)
    logits = x.reshape(-1, 16).astype(np.float64) @ router
    weights, probs, selected = adamoe_weights(logits, 8, 2)
    want = adamoe_balance_loss(probs, selected, 12)
    np.testing.assert_allclose(aux["losses"]["moe/text+image/lb_loss"], want, rtol=1e-5)
    used = (weights > 0).sum(1)
    metrics = aux["metrics"]
    np.testing.assert_allclose(metrics["moe/text+image/experts_per_token"], used.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["moe/text+image/untaken_frac"], (used == 0).mean())


def test_routes_causally_as_it_trains_and_no_token_moves_an_earlier_one():
    cfg = model_cfg(group_experts=(4, 4))
    sparse_cases.assert_routes_causally_as_trained(SparseFFN(cfg, rngs=nnx.Rngs(3)), cfg)


def test_the_experiment_is_flop_matched():
    sparse_cases.assert_flop_matched_without_aux_stage("moma_4t4i_null")


def test_null_experts_without_their_routing_are_refused():
    cfg = registry.get("moma_4t4i_tiny")
    with pytest.raises(ConfigError, match="null_experts=2 has no effect"):
        validate(apply_overrides(cfg, ["model.moe.null_experts=2"]))
