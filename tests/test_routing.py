"""Routing functions against plain NumPy references written from the algorithms' descriptions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from routing_reference import (
    assert_dispatch_equal,
    expert_choice_jit,
    np_combine,
    np_ec_k,
    np_expert_choice,
    np_gather,
    np_slot_capacity,
    np_token_choice,
    random_group,
)

from moma_jax.model import grouped
from moma_jax.model.routing import (
    Dispatch,
    ec_k,
    expert_choice,
    gumbel_sigmoid_logits,
    modality_eligibility,
    ranking_scores,
    round_robin,
    router_scores,
    take_all,
    token_choice,
)


def gather_combine(x_NxD, dispatch, scale_E=None):
    """The layer's gather and combine for one expert group, each expert e's output being
    scale_E[e] * its input."""
    n_experts = dispatch.valid_ExC.shape[0]
    scale_E = jnp.ones((n_experts,)) if scale_E is None else scale_E
    out_ExCxD = scale_E[:, None, None] * x_NxD[dispatch.token_index_ExC]
    return grouped.combine_slots(out_ExCxD, dispatch, x_NxD.shape[0])


# --- Scores and noise ----------------------------------------------------------------------------


def test_router_scores_against_numpy():
    logits, _, _ = random_group(0)
    sig = np.asarray(router_scores(jnp.asarray(logits), "sigmoid"))
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-logits)), rtol=1e-6)
    soft = np.asarray(router_scores(jnp.asarray(logits, jnp.bfloat16), "softmax"))
    assert soft.dtype == np.float32
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="sigmoid"):
        router_scores(jnp.asarray(logits), "relu")


def test_gumbel_sigmoid_noise_is_logistic():
    zeros = jnp.zeros((512, 256))
    key = jax.random.key(0)
    noisy = np.asarray(gumbel_sigmoid_logits(zeros, key))
    np.testing.assert_array_equal(noisy, np.asarray(gumbel_sigmoid_logits(zeros, key)))
    assert not np.array_equal(noisy, np.asarray(gumbel_sigmoid_logits(zeros, jax.random.key(1))))
    # G' - G'' of iid Gumbel(0, 1) is Logistic(0, 1): mean 0, variance pi^2 / 3.
    assert abs(noisy.mean()) < 0.03
    assert abs(noisy.var() - math.pi**2 / 3) < 0.05
    shifted = np.asarray(gumbel_sigmoid_logits(zeros + 2.0, key))
    np.testing.assert_allclose(shifted - noisy, 2.0, atol=1e-5)


# --- Expert choice -------------------------------------------------------------------------------


def test_modality_eligibility():
    modality = jnp.asarray([0, 1, 1, 0, 2, 1], jnp.int8)
    valid = jnp.asarray([True, True, False, True, True, True])
    eligible, count = modality_eligibility(modality, valid, (1,))
    np.testing.assert_array_equal(eligible, [False, True, False, False, False, True])
    assert count.dtype == jnp.int32 and int(count) == 2
    eligible, count = modality_eligibility(modality, valid, (0, 2))
    np.testing.assert_array_equal(eligible, [True, False, False, True, True, False])
    assert int(count) == 3


def test_ec_k_matches_numpy():
    counts = np.arange(0, 300)
    for c in [1.0, 2.0, 0.5, 1.25]:
        for n_experts in [1, 3, 4, 6, 8]:
            got = np.asarray(ec_k(jnp.asarray(counts, jnp.int32), c, n_experts))
            assert got.dtype == np.int32
            np.testing.assert_array_equal(got, [np_ec_k(n, c, n_experts) for n in counts])


def test_ec_k_hand_values():
    assert int(ec_k(jnp.int32(64), 1.0, 4)) == 16  # MoMa: b_M * (1 / E_M)
    assert int(ec_k(jnp.int32(13), 2.0, 8)) == 3  # EC paper: n * c / e with c = 2
    assert int(ec_k(jnp.int32(0), 1.0, 4)) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_experts", [4, 8])
@pytest.mark.parametrize("slack", [0.8, 1.0, 1.5, "dropless"])
@pytest.mark.parametrize("mix", ["random", "image_heavy", "text_only", "image_only"])
def test_expert_choice_matches_numpy(seed, n_experts, slack, mix):
    logits, modality, valid = random_group(seed, n_experts=n_experts)
    rng = np.random.default_rng(seed)
    modality = {
        "random": modality,
        "image_heavy": (rng.random(64) < 0.9).astype(np.int8),
        "text_only": np.zeros(64, np.int8),
        "image_only": np.ones(64, np.int8),
    }[mix]
    scores = np.asarray(router_scores(jnp.asarray(logits), "sigmoid"))
    for group in [(0,), (1,), (0, 1)]:
        eligible, count = modality_eligibility(jnp.asarray(modality), jnp.asarray(valid), group)
        k = ec_k(count, 1.0, n_experts)
        # Slots sized for half the group (the mixed group overflows them: k > capacity), or
        # for the whole routing group (the layer's dropless size: never below k).
        capacity = (
            64 // n_experts
            if slack == "dropless"
            else np_slot_capacity(64, 0.5, 1.0, n_experts, slack)
        )
        dispatch, stats = expert_choice_jit(jnp.asarray(scores), eligible, k, capacity)
        ref_index, ref_gate, ref_valid, dropped, wasted = np_expert_choice(
            scores, np.asarray(eligible), int(k), capacity
        )
        if slack == "dropless":
            assert dropped == 0
        assert_dispatch_equal(dispatch, ref_index, ref_gate, ref_valid)
        assert float(stats["dropped"]) == dropped and float(stats["wasted"]) == wasted
        # Padding and other modalities are never selected.
        assert np.all(np.asarray(eligible)[np.asarray(dispatch.token_index_ExC)[ref_valid]])


def test_expert_choice_all_text_group_leaves_image_experts_empty():
    logits, _, valid = random_group(3, n_experts=4)
    modality = jnp.zeros(64, jnp.int8)
    eligible, count = modality_eligibility(modality, jnp.asarray(valid), (1,))
    k = ec_k(count, 1.0, 4)
    assert int(count) == 0 and int(k) == 0
    dispatch, stats = expert_choice_jit(
        router_scores(jnp.asarray(logits), "sigmoid"), eligible, k, 6
    )
    assert not np.any(dispatch.valid_ExC) and np.all(np.asarray(dispatch.gate_ExC) == 0.0)
    assert float(stats["wasted"]) == 4 * 6 and float(stats["dropped"]) == 0.0


def test_expert_choice_k_above_capacity_reports_drops():
    logits, _, valid = random_group(4, n_experts=4)
    scores = np.asarray(router_scores(jnp.asarray(logits), "softmax"))
    eligible = jnp.asarray(valid)
    dispatch, stats = expert_choice_jit(jnp.asarray(scores), eligible, jnp.int32(11), 7)
    ref_index, ref_gate, ref_valid, dropped, wasted = np_expert_choice(scores, valid, 11, 7)
    assert_dispatch_equal(dispatch, ref_index, ref_gate, ref_valid)
    assert np.all(ref_valid) and float(stats["wasted"]) == wasted == 0
    assert float(stats["dropped"]) == dropped == 4 * (11 - 7)


def test_expert_choice_ranks_on_logits_where_sigmoid_saturates():
    """sigmoid(17) == sigmoid(30) == 1.0 in float32: ranking on the scores ties them (lower
    index wins), ranking on the logits keeps their order; the gates are the scores either way."""
    logits = np.zeros((8, 2), np.float32)
    logits[[1, 2, 5], 0] = [17.0, 30.0, 25.0]
    logits[[3, 4], 1] = [-40.0, 20.0]
    scores = np.asarray(router_scores(jnp.asarray(logits), "sigmoid"))
    assert scores[1, 0] == scores[2, 0] == scores[5, 0] == 1.0
    eligible = np.ones(8, bool)
    ranking = np.asarray(ranking_scores(jnp.asarray(logits), "sigmoid"))
    dispatch, _ = expert_choice_jit(jnp.asarray(scores), jnp.asarray(eligible), 2, 2, ranking)
    ref = np_expert_choice(scores, eligible, 2, 2, ranking=logits)
    assert_dispatch_equal(dispatch, *ref[:3])
    np.testing.assert_array_equal(dispatch.token_index_ExC[0], [2, 5])  # not [1, 2]
    by_scores, _ = expert_choice_jit(jnp.asarray(scores), jnp.asarray(eligible), 2, 2)
    np.testing.assert_array_equal(by_scores.token_index_ExC[0], [1, 2])
    # Softmax ranks by log-probs: the same order as the probabilities where they do not tie.
    soft = np.asarray(ranking_scores(jnp.asarray(logits), "softmax"))
    np.testing.assert_allclose(soft, logits - np.log(np.exp(logits).sum(-1, keepdims=True)))


def test_expert_choice_ties_go_to_lower_token_index():
    scores = np.full((8, 2), 0.5, np.float32)
    scores[6, 0] = 0.9  # expert 0: token 6 first, then the tied tokens in index order
    eligible = np.array([False, True, True, True, True, True, True, True])
    dispatch, _ = expert_choice_jit(jnp.asarray(scores), jnp.asarray(eligible), 4, 4)
    np.testing.assert_array_equal(dispatch.token_index_ExC, [[6, 1, 2, 3], [1, 2, 3, 4]])
    assert np.all(dispatch.valid_ExC)


def test_expert_choice_single_expert_of_ones_takes_group_in_order():
    _, modality, valid = random_group(5)
    eligible, count = modality_eligibility(jnp.asarray(modality), jnp.asarray(valid), (1,))
    capacity = 48  # more slots than image tokens
    dispatch, stats = expert_choice_jit(jnp.ones((64, 1)), eligible, count, capacity)
    n = int(count)
    np.testing.assert_array_equal(dispatch.token_index_ExC[0, :n], np.flatnonzero(eligible))
    np.testing.assert_array_equal(dispatch.valid_ExC[0], np.arange(capacity) < n)
    np.testing.assert_array_equal(dispatch.gate_ExC[0], (np.arange(capacity) < n).astype(float))
    assert float(stats["wasted"]) == capacity - n and float(stats["dropped"]) == 0.0


# --- Pack, gather and combine ---------------------------------------------------------------------


def test_gather_and_combine_against_numpy_loops():
    rng = np.random.default_rng(7)
    n_tokens, d_model = 10, 6
    x = rng.normal(size=(n_tokens, d_model)).astype(np.float32)
    # Token 3 is taken by all three experts, token 1 by two: their contributions must add up.
    token_index = np.array([[3, 1, 0, 9], [3, 1, 5, 2], [3, 7, 8, 0]], np.int32)
    valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
    gate = np.where(valid, rng.uniform(size=valid.shape), 0.0).astype(np.float32)
    dispatch = Dispatch(jnp.asarray(token_index), jnp.asarray(gate), jnp.asarray(valid))

    np.testing.assert_array_equal(
        jnp.asarray(x)[dispatch.token_index_ExC], np_gather(x, token_index)
    )
    out = rng.normal(size=(3, 4, d_model)).astype(np.float32)
    out[0, 3] = np.inf  # an unused slot's output never reaches a token
    out[2, 2] = np.nan
    y = grouped.combine_slots(jnp.asarray(out), dispatch, n_tokens)
    expected = np_combine(out, token_index, gate, valid, n_tokens)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        y[3], sum(gate[e, 0] * out[e, 0] for e in range(3)), rtol=1e-5, atol=1e-6
    )
    assert np.all(np.asarray(y)[[4, 6]] == 0.0)  # untaken tokens get nothing (residual only)
    assert y.dtype == jnp.float32


def test_expert_choice_gates_carry_router_gradients():
    logits, _, valid = random_group(8, n_experts=4)
    x = jnp.asarray(np.random.default_rng(8).normal(size=(64, 5)), jnp.float32)

    def loss(logits_NxE):
        dispatch, _ = expert_choice(router_scores(logits_NxE, "sigmoid"), jnp.asarray(valid), 8, 8)
        return jnp.sum(gather_combine(x, dispatch))

    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(logits)))
    assert np.all(np.isfinite(grad)) and np.count_nonzero(grad) == 4 * 8


# --- jit and vmap over routing groups ------------------------------------------------------------


def test_jit_vmap_over_groups_with_traced_k():
    n_groups, n_experts, d_model = 3, 4, 5
    groups = [random_group(10 + g, n_experts=n_experts) for g in range(n_groups)]
    logits_GxNxE = jnp.asarray(np.stack([g[0] for g in groups]))
    modality_GxN = jnp.asarray(np.stack([g[1] for g in groups]))
    valid_GxN = jnp.asarray(np.stack([g[2] for g in groups]))
    x_GxNxD = jnp.asarray(
        np.random.default_rng(9).normal(size=(n_groups, 64, d_model)), jnp.float32
    )
    capacity = np_slot_capacity(64, 0.5, 1.0, n_experts, 1.0)

    def ec_layer(logits_NxE, modality_N, valid_N, x_NxD):
        eligible_N, count = modality_eligibility(modality_N, valid_N, (1,))
        scores_NxE = router_scores(logits_NxE, "sigmoid")
        dispatch, stats = expert_choice(
            scores_NxE, eligible_N, ec_k(count, 1.0, n_experts), capacity
        )
        return dispatch, stats, gather_combine(x_NxD, dispatch, jnp.full((n_experts,), 2.0))

    def tc_layer(logits_NxE, valid_N):
        return token_choice(router_scores(logits_NxE, "softmax"), valid_N, 2, 20, True)

    ec_out = jax.jit(jax.vmap(ec_layer))(logits_GxNxE, modality_GxN, valid_GxN, x_GxNxD)
    tc_out = jax.jit(jax.vmap(tc_layer))(logits_GxNxE, valid_GxN)
    for g, (logits, modality, valid) in enumerate(groups):
        eligible = valid & (modality == 1)
        scores = np.asarray(router_scores(jnp.asarray(logits), "sigmoid"))
        k = np_ec_k(eligible.sum(), 1.0, n_experts)
        ref_index, ref_gate, ref_valid, dropped, wasted = np_expert_choice(
            scores, eligible, k, capacity
        )
        dispatch, stats, y = jax.tree.map(lambda a, g=g: a[g], ec_out)
        assert_dispatch_equal(dispatch, ref_index, ref_gate, ref_valid)
        assert float(stats["dropped"]) == dropped and float(stats["wasted"]) == wasted
        x = np.asarray(x_GxNxD[g])
        expected = np_combine(2.0 * np_gather(x, ref_index), ref_index, ref_gate, ref_valid, 64)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)

        probs = np.asarray(router_scores(jnp.asarray(logits), "softmax"))
        ref_index, ref_gate, ref_valid, ref_stats = np_token_choice(probs, valid, 2, 20, True)
        dispatch, stats = jax.tree.map(lambda a, g=g: a[g], tc_out)
        assert_dispatch_equal(dispatch, ref_index, ref_gate, ref_valid)
        assert float(stats["dropped"]) == ref_stats["dropped"]


def test_round_robin_deals_eligible_tokens_out_in_turn():
    eligible = np.array([1, 0, 1, 1, 1, 0, 1, 1, 1, 1], bool)  # 8 eligible tokens
    pref = round_robin(jnp.asarray(eligible), 4)
    scores = jnp.full((10, 4), 0.5)
    dispatch, stats = expert_choice_jit(scores, jnp.asarray(eligible), 2, 2, pref)
    turns = np.flatnonzero(eligible)
    for e in range(4):  # expert e takes the eligible tokens of turns e and e + 4
        np.testing.assert_array_equal(dispatch.token_index_ExC[e], turns[[e, e + 4]])
    assert float(stats["dropped"]) == 0.0
    probs = np.asarray(pref / jnp.sum(pref, -1, keepdims=True))
    _, _, valid, ref_stats = np_token_choice(probs, eligible, 2, 4, True)
    assert np.all(valid) and ref_stats["dropped"] == 0  # top-2: turns i and i + 1 mod 4


@pytest.mark.parametrize("mix", ["random", "image_only", "text_only"])
def test_take_all_equals_expert_choice_on_equal_scores(mix):
    _, modality, valid = random_group(6)
    modality = {
        "random": modality,
        "image_only": np.ones(64, np.int8),
        "text_only": np.zeros(64, np.int8),
    }[mix]
    eligible, count = modality_eligibility(jnp.asarray(modality), jnp.asarray(valid), (1,))
    for capacity in (64, 40):
        got, got_stats = take_all(eligible, capacity)
        want, want_stats = expert_choice_jit(jnp.ones((64, 1)), eligible, count, capacity)
        np.testing.assert_array_equal(got.valid_ExC, want.valid_ExC)
        valid_slots = np.asarray(got.valid_ExC)
        np.testing.assert_array_equal(
            np.asarray(got.token_index_ExC)[valid_slots],
            np.asarray(want.token_index_ExC)[valid_slots],
        )
        np.testing.assert_array_equal(got.gate_ExC, want.gate_ExC)
        assert float(got_stats["dropped"]) == float(want_stats["dropped"])
        assert float(got_stats["wasted"]) == float(want_stats["wasted"])
