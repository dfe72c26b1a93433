"""NumPy references for the routing functions, written from the algorithms' descriptions
(loops over experts and tokens; no JAX), shared by the routing tests."""

import jax
import jax.numpy as jnp
import numpy as np

from moma_jax.model.routing import expert_choice, token_choice

# Jitted once per static shape: much faster on CPU than eager op-by-op dispatch, as layers run.
expert_choice_jit = jax.jit(expert_choice, static_argnums=3)
token_choice_jit = jax.jit(token_choice, static_argnums=(2, 3, 4))


def vmoe_buffer_index(gates, top_k):
    """[S, K] buffer position of each token's k-th choice under V-MoE's Batch Prioritized
    Routing, transcribed to NumPy from google-research/vmoe `vmoe/moe.py`,
    `_get_top_experts_per_item_common` with batch_priority=True (commit 1030c713): tokens
    permuted by descending top-1 gate, choices flattened rank-major, the position a cumsum of
    one-hots, then permuted back. Every token counts (V-MoE has no padding)."""
    group_size, num_experts = gates.shape
    expert_index = np.argsort(-gates, axis=1, kind="stable")[:, :top_k]
    top1 = np.take_along_axis(gates, expert_index[:, :1], axis=1)[:, 0]
    perm = np.argsort(-top1, kind="stable")
    expert_index = expert_index[perm].T.ravel()
    one_hot = np.eye(num_experts, dtype=np.int64)[expert_index]
    buffer_index = np.cumsum(one_hot, axis=0) * one_hot - 1
    buffer_index = buffer_index.reshape(-1, group_size, num_experts).swapaxes(0, 1)
    return buffer_index[np.argsort(perm, kind="stable")].max(axis=2)


def np_expert_choice(scores, eligible, k, capacity, ranking=None):
    """Each expert: eligible tokens sorted by (ranking desc, index asc), the ranking being the
    scores unless given; the first min(k, C) are kept, with their scores as gates."""
    n_tokens, n_experts = scores.shape
    ranking = scores if ranking is None else ranking
    token_index = np.zeros((n_experts, capacity), np.int64)
    gate = np.zeros((n_experts, capacity), np.float32)
    valid = np.zeros((n_experts, capacity), bool)
    candidates = [n for n in range(n_tokens) if eligible[n]]
    for e in range(n_experts):
        ranked = sorted(candidates, key=lambda n: (-ranking[n, e], n))
        for c, n in enumerate(ranked[: min(k, capacity)]):
            token_index[e, c], gate[e, c], valid[e, c] = n, scores[n, e], True
    dropped = n_experts * max(k - capacity, 0)
    wasted = n_experts * capacity - valid.sum()
    return token_index, gate, valid, dropped, wasted


def np_token_choice(probs, eligible, top_k, capacity, renormalize, priority=None):
    """Fill buffers choice rank by choice rank, tokens in order (by descending `priority`, ties
    to the lower index, where given: Batch Prioritized Routing); full buffers drop the rest."""
    n_tokens, n_experts = probs.shape
    token_index = np.zeros((n_experts, capacity), np.int64)
    gate = np.zeros((n_experts, capacity), np.float32)
    valid = np.zeros((n_experts, capacity), bool)
    choices = [
        sorted(range(n_experts), key=lambda e: (-probs[n, e], e))[:top_k] for n in range(n_tokens)
    ]
    fill = [0] * n_experts
    dropped = 0
    order: list[int] = list(range(n_tokens))
    if priority is not None:
        order = sorted(order, key=lambda n: (-priority[n], n))
    for rank in range(top_k):
        for n in order:
            if not eligible[n]:
                continue
            e = choices[n][rank]
            g = probs[n, e]
            if renormalize:
                g = g / sum(probs[n, x] for x in choices[n])
            if fill[e] < capacity:
                token_index[e, fill[e]], gate[e, fill[e]], valid[e, fill[e]] = n, g, True
                fill[e] += 1
            else:
                dropped += 1
    count = max(sum(eligible), 1)
    frac = np.zeros(n_experts)
    mean_prob = np.zeros(n_experts)
    for n in range(n_tokens):
        if eligible[n]:
            frac[choices[n][0]] += 1 / count
            mean_prob += probs[n] / count
    stats = {
        "dropped": dropped,
        "wasted": n_experts * capacity - valid.sum(),
        "frac_tokens_E": frac,
        "mean_prob_E": mean_prob,
    }
    return token_index, gate, valid, stats


def np_slot_capacity(n_tokens, share, c, n_experts, slack):
    """A slot count below or above k: ceil(slack * N * share * c / E), clipped to [1, N]."""
    return max(1, min(n_tokens, int(np.ceil(round(slack * n_tokens * share * c / n_experts, 6)))))


def np_gather(x, token_index):
    n_experts, capacity = token_index.shape
    out = np.zeros((n_experts, capacity, x.shape[1]), x.dtype)
    for e in range(n_experts):
        for c in range(capacity):
            out[e, c] = x[token_index[e, c]]
    return out


def np_combine(expert_out, token_index, gate, valid, n_tokens):
    y = np.zeros((n_tokens, expert_out.shape[-1]), np.float64)
    for e in range(token_index.shape[0]):
        for c in range(token_index.shape[1]):
            if valid[e, c]:
                y[token_index[e, c]] += gate[e, c] * expert_out[e, c]
    return y


def np_ec_k(count, c, n_experts):
    return int(np.floor(np.float32(count) * np.float32(c) / np.float32(n_experts)))


def assert_dispatch_equal(dispatch, token_index, gate, valid):
    got_valid = np.asarray(dispatch.valid_ExC)
    np.testing.assert_array_equal(got_valid, valid)
    np.testing.assert_array_equal(np.asarray(dispatch.token_index_ExC)[valid], token_index[valid])
    np.testing.assert_allclose(np.asarray(dispatch.gate_ExC), gate, rtol=1e-6, atol=0)
    assert np.all(np.asarray(dispatch.gate_ExC)[~valid] == 0.0)
    assert dispatch.token_index_ExC.dtype == jnp.int32
    assert dispatch.gate_ExC.dtype == jnp.float32


def random_group(seed, n_tokens=64, n_experts=8):
    """float32 scores, modality (0 text / 1 image) and a padding mask with a padded tail."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n_tokens, n_experts)).astype(np.float32)
    modality = rng.integers(0, 2, size=n_tokens).astype(np.int8)
    valid = np.arange(n_tokens) < n_tokens - rng.integers(0, n_tokens // 4)
    return logits, modality, valid
