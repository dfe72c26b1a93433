"""Token-choice routing and router losses against plain NumPy references."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from routing_reference import (
    assert_dispatch_equal,
    np_token_choice,
    random_group,
    token_choice_jit,
    vmoe_buffer_index,
)

from moma_jax.model.routing import (
    router_scores,
    router_z_loss,
    switch_load_balance_loss,
)

# --- Token choice --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_experts", [4, 8])
@pytest.mark.parametrize(
    ("top_k", "renormalize"), [(1, False), (2, True)], ids=["switch", "gshard"]
)
@pytest.mark.parametrize("capacity_factor", [0.5, 4.0])
def test_token_choice_matches_numpy(seed, n_experts, top_k, renormalize, capacity_factor):
    logits, _, valid = random_group(seed, n_experts=n_experts)
    probs = np.asarray(router_scores(jnp.asarray(logits), "softmax"))
    capacity = max(1, int(capacity_factor * 64 * top_k / n_experts))
    dispatch, stats = token_choice_jit(
        jnp.asarray(probs), jnp.asarray(valid), top_k, capacity, renormalize
    )
    ref_index, ref_gate, ref_valid, ref_stats = np_token_choice(
        probs, valid, top_k, capacity, renormalize
    )
    assert_dispatch_equal(dispatch, ref_index, ref_gate, ref_valid)
    assert float(stats["dropped"]) == ref_stats["dropped"]
    assert float(stats["wasted"]) == ref_stats["wasted"]
    np.testing.assert_allclose(stats["frac_tokens_E"], ref_stats["frac_tokens_E"], rtol=1e-5)
    np.testing.assert_allclose(stats["mean_prob_E"], ref_stats["mean_prob_E"], rtol=1e-5)
    if capacity_factor == 4.0:
        assert ref_stats["dropped"] == 0  # room for everyone: nothing dropped
    if capacity_factor == 0.5:
        assert ref_stats["dropped"] > 0


def test_token_choice_first_choices_beat_second_choices():
    # Token 0 prefers expert 1 (second choice expert 0); tokens 1-3 prefer expert 0. With 3 slots,
    # expert 0 holds the three first choices and drops token 0's second choice despite its index.
    probs = np.array([[0.4, 0.6], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1], [0.1, 0.9]], np.float32)
    eligible = np.array([True, True, True, True, False])  # token 4 is padding
    dispatch, stats = token_choice_jit(jnp.asarray(probs), jnp.asarray(eligible), 2, 3, True)
    np.testing.assert_array_equal(dispatch.token_index_ExC[0], [1, 2, 3])
    np.testing.assert_array_equal(dispatch.token_index_ExC[1], [0, 1, 2])
    assert np.all(dispatch.valid_ExC)
    np.testing.assert_allclose(dispatch.gate_ExC[1], [0.6, 0.3, 0.2], rtol=1e-6)
    assert float(stats["dropped"]) == 2.0  # token 0 -> expert 0 and token 3 -> expert 1
    assert float(stats["wasted"]) == 0.0


def test_token_choice_ties_go_to_lower_expert_index():
    probs = jnp.full((4, 4), 0.25)
    dispatch, stats = token_choice_jit(probs, jnp.ones(4, bool), 2, 4, False)
    np.testing.assert_array_equal(dispatch.valid_ExC.sum(-1), [4, 4, 0, 0])
    np.testing.assert_array_equal(stats["frac_tokens_E"], [1.0, 0.0, 0.0, 0.0])


# --- Losses --------------------------------------------------------------------------------------


def test_switch_load_balance_loss_uniform_is_one():
    n_experts = 4
    probs = np.full((16, n_experts), 1 / n_experts, np.float32)
    probs[np.arange(16), np.arange(16) % n_experts] += 1e-3  # first choices spread evenly
    probs /= probs.sum(-1, keepdims=True)
    _, stats = token_choice_jit(jnp.asarray(probs), jnp.ones(16, bool), 1, 4, False)
    np.testing.assert_allclose(stats["frac_tokens_E"], 0.25)
    loss = switch_load_balance_loss(stats["frac_tokens_E"], stats["mean_prob_E"])
    np.testing.assert_allclose(loss, 1.0, rtol=1e-5)
    uniform = jnp.full(n_experts, 1 / n_experts)
    np.testing.assert_allclose(switch_load_balance_loss(uniform, uniform), 1.0, rtol=1e-6)


def test_switch_load_balance_loss_hand_example():
    # First choices 0, 0, 1, 0 -> f = (3/4, 1/4); P = (2.4/4, 1.6/4) = (0.6, 0.4).
    # Loss = 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1.
    probs = jnp.asarray([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    _, stats = token_choice_jit(probs, jnp.ones(4, bool), 1, 4, False)
    np.testing.assert_allclose(stats["frac_tokens_E"], [0.75, 0.25])
    np.testing.assert_allclose(stats["mean_prob_E"], [0.6, 0.4], rtol=1e-6)
    loss = switch_load_balance_loss(stats["frac_tokens_E"], stats["mean_prob_E"])
    np.testing.assert_allclose(loss, 1.1, rtol=1e-6)


def test_router_z_loss_against_numpy():
    logits, _, valid = random_group(6)
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    expected = np.mean(log_z[valid] ** 2)
    got = router_z_loss(jnp.asarray(logits), jnp.asarray(valid))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert float(router_z_loss(jnp.asarray(logits), jnp.zeros(64, bool))) == 0.0


# --- Batch Prioritized Routing (V-MoE) ----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("top_k", "renormalize"), [(1, False), (2, True)], ids=["top1", "top2"])
def test_batch_prioritized_routing_matches_numpy(seed, top_k, renormalize):
    logits, _, valid = random_group(seed, n_experts=4)
    probs = np.asarray(router_scores(jnp.asarray(logits), "softmax"))
    capacity = max(1, int(0.5 * 64 * top_k / 4))  # half the demand: many drops
    priority = probs.max(-1)
    dispatch, stats = token_choice_jit(
        jnp.asarray(probs), jnp.asarray(valid), top_k, capacity, renormalize, jnp.asarray(priority)
    )
    ref_index, ref_gate, ref_valid, ref_stats = np_token_choice(
        probs, valid, top_k, capacity, renormalize, priority
    )
    assert_dispatch_equal(dispatch, ref_index, ref_gate, ref_valid)
    assert float(stats["dropped"]) == ref_stats["dropped"] > 0
    # Position order drops as many assignments here (the same demand per expert), others.
    plain, _ = token_choice_jit(
        jnp.asarray(probs), jnp.asarray(valid), top_k, capacity, renormalize
    )
    assert not np.array_equal(plain.token_index_ExC, dispatch.token_index_ExC)


@pytest.mark.parametrize("top_k", [1, 2])
def test_batch_prioritized_routing_matches_vmoe(top_k):
    """The buffer position of every kept assignment equals V-MoE's (a NumPy transcription of
    its dispatcher; every token eligible, as V-MoE has no padding)."""
    logits, _, _ = random_group(5, n_tokens=32, n_experts=4)
    probs = np.asarray(router_scores(jnp.asarray(logits), "softmax"))
    capacity = 5
    dispatch, _ = token_choice_jit(
        jnp.asarray(probs), jnp.ones(32, bool), top_k, capacity, False, jnp.asarray(probs.max(-1))
    )
    buffer_SxK = vmoe_buffer_index(probs, top_k)
    choice_SxK = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    ours = {
        (int(t), e, c)
        for e in range(4)
        for c in range(capacity)
        if dispatch.valid_ExC[e, c]
        for t in [dispatch.token_index_ExC[e, c]]
    }
    theirs = {
        (s, int(choice_SxK[s, k]), int(buffer_SxK[s, k]))
        for s in range(32)
        for k in range(top_k)
        if buffer_SxK[s, k] < capacity
    }
    assert ours == theirs and len(ours) == 4 * capacity  # every buffer full, same positions


def test_batch_prioritized_routing_drops_the_least_confident_token():
    """Three tokens want expert 0, which has two slots: position order drops the last one,
    BPR the one with the lowest top weight (token 0, the first)."""
    probs = np.array([[0.55, 0.45], [0.9, 0.1], [0.8, 0.2]], np.float32)
    eligible = jnp.ones(3, bool)
    plain, _ = token_choice_jit(jnp.asarray(probs), eligible, 1, 2, False)
    bpr, _ = token_choice_jit(jnp.asarray(probs), eligible, 1, 2, False, jnp.max(probs, -1))
    np.testing.assert_array_equal(plain.token_index_ExC[0], [0, 1])
    np.testing.assert_array_equal(bpr.token_index_ExC[0], [1, 2])
    np.testing.assert_allclose(bpr.gate_ExC[0], [0.9, 0.8])


def test_expert_choice_z_loss_is_opt_in_and_matches_numpy():
    """ST-MoE's z-loss on an expert-choice router (`ec_router_z_loss_weight`): off by default;
    on, the weighted mean over routing groups of the eligible tokens' logsumexp(logits)^2."""
    from moma_jax.config import SparseConfig
    from moma_jax.routers import GroupRouting, get_router

    groups = [random_group(s, n_experts=4) for s in (0, 1)]
    logits = np.stack([g[0] for g in groups])
    eligible = np.stack([g[2] for g in groups])
    moe = SparseConfig(group_experts=(4,), modality_group=(0, 0), routing_group_tokens=64)
    row = get_router("expert_choice")

    def route(moe):
        r = GroupRouting(
            moe, row.slots(moe, 0), jnp.asarray(logits), jnp.asarray(eligible),
            jnp.asarray(eligible.sum(1), jnp.int32),
        )  # fmt: skip
        return row.route(r).losses

    assert route(moe) == {}
    on = route(dataclasses.replace(moe, ec_router_z_loss_weight=0.01))
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    per_group = [(lse[g] ** 2)[eligible[g]].mean() for g in range(2)]
    np.testing.assert_allclose(float(on["z_loss"]), 0.01 * np.mean(per_group), rtol=1e-5)
