"""Token-choice routing and router losses against plain NumPy references."""

import jax.numpy as jnp
import numpy as np
import pytest
from routing_reference import (
    assert_dispatch_equal,
    np_token_choice,
    random_group,
    token_choice_jit,
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
