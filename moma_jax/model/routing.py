"""Routing for sparse FFN layers: small pure functions over ONE routing group of N tokens.

The layer vmaps these over routing groups. Router math (scores, top-k, gates, losses) is
float32. Dispatch is index based: an expert's C slots hold token indices (`grouped.py` packs
them, gathers the tokens and scatter-adds the weighted outputs); no N x E x C one-hot tensor is
ever built.

Expert choice (MoMa inside a modality group; Zhou et al. 2022), `expert_choice`:
  1. Rank tokens per expert by score; ineligible tokens (padding, other modalities) get -inf so
     they rank below every eligible token. Ties go to the lower token index (`lax.top_k`).
  2. Each expert takes its top C tokens into a static buffer of C slots
     (`SparseConfig.group_slots`).
  3. Only the first k slots are valid, k = floor(b_M * c / E) (`ec_k`, may be traced), and a slot
     is valid only if its token is eligible. Gate = the token's score where valid, else 0.
  4. Report `dropped` = selections lost because k > C and `wasted` = slots left invalid.

Token choice (Switch top-1, GShard top-2), `token_choice`:
  1. Each eligible token picks its top K experts by router prob (ties to the lower expert index).
  2. Gates are the chosen probs, renormalised over the K choices if asked (GShard top-2).
  3. Buffer positions: all first choices come before any second choice, then token order; an
     assignment is kept iff its position in that expert's buffer is < C, else it is dropped.
  4. Kept assignments are scattered into the [E, C] dispatch; report `dropped`, `wasted` and the
     per-expert statistics of the Switch load-balancing loss.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Dispatch(NamedTuple):
    """Which token fills each of an expert's C slots, with its combine weight.

    token_index_ExC: int32 token in [0, N); some in-range token where the slot is not valid.
    gate_ExC: float32 combine weight; exactly 0.0 where the slot is not valid.
    valid_ExC: bool, the slot holds a routed token.
    """

    token_index_ExC: jax.Array
    gate_ExC: jax.Array
    valid_ExC: jax.Array


# --- Router scores -------------------------------------------------------------------------------


def router_scores(logits_NxE: jax.Array, kind: str) -> jax.Array:
    """float32 scores: "sigmoid" per expert (MoMa, not renormalised) or "softmax" over experts."""
    logits = logits_NxE.astype(jnp.float32)
    if kind == "sigmoid":
        return jax.nn.sigmoid(logits)
    if kind == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    raise ValueError(f"unknown router score kind {kind!r}; expected 'sigmoid' or 'softmax'")


def ranking_scores(logits_NxE: jax.Array, kind: str) -> jax.Array:
    """What expert choice ranks tokens by: the logits for "sigmoid", log-softmax for "softmax".

    Both are monotone in the score of the same (token, expert) but do not saturate in float32.
    """
    logits = logits_NxE.astype(jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1) if kind == "softmax" else logits


def round_robin(eligible_N: jax.Array, n_experts: int) -> jax.Array:
    """[N, E] float32 preferences that deal the eligible tokens out in turn: the i-th eligible
    token prefers expert i mod E, then i + 1 mod E, ... (a balanced assignment, for
    `model.moe.force_balanced`). As an expert-choice ranking, each expert's top tokens are its
    own turns in token order; as token-choice probabilities, its top-k are the next k experts."""
    turn_N = jnp.cumsum(eligible_N, dtype=jnp.int32) - 1
    offset_NxE = (jnp.arange(n_experts)[None, :] - turn_N[:, None]) % n_experts
    return (n_experts - offset_NxE).astype(jnp.float32) / n_experts - turn_N[:, None] * 1e-6


def gumbel_sigmoid_logits(logits_NxE: jax.Array, key: jax.Array) -> jax.Array:
    """x + G' - G'' with G', G'' iid Gumbel(0, 1) (upcycling noise); apply the sigmoid after."""
    g_2xNxE = jax.random.gumbel(key, (2, *logits_NxE.shape), jnp.float32)
    return logits_NxE.astype(jnp.float32) + g_2xNxE[0] - g_2xNxE[1]


# --- Expert choice -------------------------------------------------------------------------------


def modality_eligibility(
    modality_N: jax.Array, valid_N: jax.Array, modalities: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """Deterministic grouping: eligible = valid & modality in `modalities`; count (int32)."""
    in_group_N = jnp.isin(modality_N, jnp.asarray(modalities, modality_N.dtype))
    eligible_N = valid_N.astype(bool) & in_group_N
    return eligible_N, jnp.sum(eligible_N, dtype=jnp.int32)


def ec_k(count: jax.Array, capacity_per_token: float, n_experts: int) -> jax.Array:
    """Per-expert token count k = floor(count * c / E), int32, as float32 (count * c) / E."""
    k = jnp.asarray(count, jnp.float32) * jnp.float32(capacity_per_token) / jnp.float32(n_experts)
    return jnp.floor(k).astype(jnp.int32)


def expert_choice(
    scores_NxE: jax.Array,
    eligible_N: jax.Array,
    k: jax.Array | int,
    capacity: int,
    ranking_NxE: jax.Array | None = None,
) -> tuple[Dispatch, dict[str, jax.Array]]:
    """Expert-choice dispatch of one routing group into [E, capacity] slots.

    1. Ranking: `ranking_NxE` (default: the scores; must be finite and order tokens as the
       scores do), with -inf for ineligible tokens.
    2. Each expert takes its top `capacity` tokens (`lax.top_k`: ties to the lower token index).
    3. Slot c is valid iff c < k and its token is eligible; gate = score there, else 0.
    4. Stats: dropped = E * max(k - capacity, 0); wasted = E * capacity - valid slots.
    """
    n_tokens, n_experts = scores_NxE.shape
    if not 0 <= capacity <= n_tokens:
        raise ValueError(f"expert_choice capacity {capacity} must lie in [0, {n_tokens}]")
    scores_ExN = scores_NxE.astype(jnp.float32).T
    rank_by_ExN = scores_ExN if ranking_NxE is None else ranking_NxE.astype(jnp.float32).T
    ranking_ExN = jnp.where(eligible_N[None, :], rank_by_ExN, -jnp.inf)
    _, token_index_ExC = jax.lax.top_k(ranking_ExN, capacity)
    token_index_ExC = token_index_ExC.astype(jnp.int32)
    k = jnp.asarray(k, jnp.int32)
    in_k_ExC = jnp.arange(capacity, dtype=jnp.int32)[None, :] < k
    valid_ExC = in_k_ExC & eligible_N[token_index_ExC]
    score_ExC = jnp.take_along_axis(scores_ExN, token_index_ExC, axis=1)
    gate_ExC = jnp.where(valid_ExC, score_ExC, 0.0)
    stats = {
        "dropped": (n_experts * jnp.maximum(k - capacity, 0)).astype(jnp.float32),
        "wasted": (n_experts * capacity - jnp.sum(valid_ExC)).astype(jnp.float32),
    }
    return Dispatch(token_index_ExC, gate_ExC, valid_ExC), stats


def take_all(eligible_N: jax.Array, capacity: int) -> tuple[Dispatch, dict[str, jax.Array]]:
    """A one-expert group (modality untying): its one expert takes every eligible token, in
    token order, gate 1 -- `expert_choice` on all-equal scores, without its top-k (a sort).

    Slot i holds the i-th eligible token (positions from a cumulative sum, one scatter).
    """
    n_tokens = eligible_N.shape[0]
    if not 0 <= capacity <= n_tokens:
        raise ValueError(f"take_all capacity {capacity} must lie in [0, {n_tokens}]")
    eligible_N = eligible_N.astype(bool)
    slot_N = jnp.where(eligible_N, jnp.cumsum(eligible_N, dtype=jnp.int32) - 1, capacity)
    tokens_N = jnp.arange(n_tokens, dtype=jnp.int32)
    token_index_C = jnp.zeros((capacity,), jnp.int32).at[slot_N].set(tokens_N, mode="drop")
    count = jnp.sum(eligible_N, dtype=jnp.int32)
    valid_C = jnp.arange(capacity, dtype=jnp.int32) < count
    stats = {
        "dropped": jnp.maximum(count - capacity, 0).astype(jnp.float32),
        "wasted": (capacity - jnp.sum(valid_C)).astype(jnp.float32),
    }
    dispatch = Dispatch(token_index_C[None], valid_C[None].astype(jnp.float32), valid_C[None])
    return dispatch, stats


# --- Token choice --------------------------------------------------------------------------------


def token_choice(
    probs_NxE: jax.Array,
    eligible_N: jax.Array,
    top_k: int,
    capacity: int,
    renormalize: bool,
    priority_N: jax.Array | None = None,
) -> tuple[Dispatch, dict[str, jax.Array]]:
    """Token-choice (Switch top-1 / GShard top-2) dispatch of one routing group.

    1. Each token picks its top_k experts by prob (`lax.top_k`: ties to the lower expert index).
    2. Gates: the chosen probs, divided by their sum over the top_k choices if `renormalize`.
    3. Order the (choice rank, token) assignments rank-major, tokens in position order or, with
       `priority_N` (Batch Prioritized Routing), by descending priority (ties to the lower
       position); an eligible assignment's position in its expert's buffer is the running count
       (cumsum) of earlier assignments to that expert.
    4. Keep an assignment iff position < capacity; scatter kept ones into the [E, C] slots.
    5. Stats: dropped, wasted, and for the Switch loss (over eligible tokens) frac_tokens_E
       (share whose FIRST choice is e) and mean_prob_E (mean router prob).
    """
    n_tokens, n_experts = probs_NxE.shape
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"token_choice top_k {top_k} must lie in [1, {n_experts}]")
    probs_NxE = probs_NxE.astype(jnp.float32)
    top_prob_NxK, expert_NxK = jax.lax.top_k(probs_NxE, top_k)
    if renormalize:
        total_Nx1 = jnp.sum(top_prob_NxK, axis=-1, keepdims=True)
        top_prob_NxK = top_prob_NxK / jnp.maximum(total_Nx1, jnp.finfo(jnp.float32).tiny)

    order_N = jnp.arange(n_tokens, dtype=jnp.int32)
    if priority_N is not None:  # the order in which tokens claim buffer positions
        order_N = jnp.argsort(-priority_N.astype(jnp.float32), stable=True).astype(jnp.int32)
    # Rank-major flattening: every first choice precedes every second choice.
    expert_KN = expert_NxK[order_N].T.reshape(-1)
    gate_KN = top_prob_NxK[order_N].T.reshape(-1)
    token_KN = jnp.tile(order_N, top_k)
    eligible_KN = jnp.tile(eligible_N.astype(bool)[order_N], top_k)
    mask_KNxE = jax.nn.one_hot(expert_KN, n_experts, dtype=jnp.int32) * eligible_KN[:, None]
    position_KNxE = jnp.cumsum(mask_KNxE, axis=0) - 1
    position_KN = jnp.take_along_axis(position_KNxE, expert_KN[:, None], axis=1)[:, 0]
    kept_KN = eligible_KN & (position_KN < capacity)

    # Out-of-range slots are dropped by the scatter, so unkept assignments write nothing.
    slot_KN = jnp.where(kept_KN, position_KN, capacity)
    token_index_ExC = jnp.zeros((n_experts, capacity), jnp.int32)
    token_index_ExC = token_index_ExC.at[expert_KN, slot_KN].set(token_KN, mode="drop")
    gate_ExC = jnp.zeros((n_experts, capacity), jnp.float32)
    gate_ExC = gate_ExC.at[expert_KN, slot_KN].set(gate_KN, mode="drop")
    valid_ExC = jnp.zeros((n_experts, capacity), bool).at[expert_KN, slot_KN].set(True, mode="drop")

    eligible_Nx1 = eligible_N.astype(jnp.float32)[:, None]
    count = jnp.maximum(jnp.sum(eligible_Nx1), 1.0)
    first_NxE = jax.nn.one_hot(expert_NxK[:, 0], n_experts, dtype=jnp.float32)
    stats = {
        "dropped": jnp.sum(eligible_KN & ~kept_KN).astype(jnp.float32),
        "wasted": (n_experts * capacity - jnp.sum(valid_ExC)).astype(jnp.float32),
        "frac_tokens_E": jnp.sum(first_NxE * eligible_Nx1, axis=0) / count,
        "mean_prob_E": jnp.sum(probs_NxE * eligible_Nx1, axis=0) / count,
    }
    return Dispatch(token_index_ExC, gate_ExC, valid_ExC), stats


# --- Auxiliary losses ----------------------------------------------------------------------------


def switch_load_balance_loss(frac_tokens_E: jax.Array, mean_prob_E: jax.Array) -> jax.Array:
    """Switch load-balancing loss E * sum_e f_e * P_e (1.0 at perfect balance)."""
    n_experts = frac_tokens_E.shape[-1]
    return n_experts * jnp.sum(frac_tokens_E.astype(jnp.float32) * mean_prob_E.astype(jnp.float32))


def deepseek_balance_losses(
    probs_TxE: jax.Array, chosen_TxE: jax.Array, eligible_T: jax.Array, top_k: int, devices: int
) -> tuple[jax.Array, jax.Array]:
    """DeepSeekMoE's balance losses (Dai et al. 2024, arXiv 2401.06066, eqs. 12-17) over the T
    eligible tokens: expert-level sum_i f_i P_i with f_i = E / (K T) * (tokens choosing i among
    their top K) and P_i the mean prob; device-level sum_d f'_d P'_d over `devices` contiguous
    expert sets (numpy.array_split's: E need not divide), f'_d the mean f_i, P'_d the sum P_i.
    Both are 1 at perfect balance."""
    n_experts = probs_TxE.shape[-1]
    elig_Tx1 = eligible_T[:, None].astype(jnp.float32)
    count = jnp.maximum(jnp.sum(elig_Tx1), 1.0)
    chosen_E = jnp.sum(chosen_TxE.astype(jnp.float32) * elig_Tx1, axis=0)
    f_E = n_experts * chosen_E / (top_k * count)
    p_E = jnp.sum(probs_TxE.astype(jnp.float32) * elig_Tx1, axis=0) / count
    expert = jnp.sum(f_E * p_E)
    sets = np.array_split(np.arange(n_experts), devices)
    device = sum((jnp.mean(f_E[d]) * jnp.sum(p_E[d]) for d in sets), start=jnp.zeros(()))
    return expert, device


def router_z_loss(logits_NxE: jax.Array, eligible_N: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over eligible tokens of logsumexp(logits)^2 (0 if none)."""
    log_z_N = jax.nn.logsumexp(logits_NxE.astype(jnp.float32), axis=-1)
    eligible = eligible_N.astype(jnp.float32)
    return jnp.sum(jnp.square(log_z_N) * eligible) / jnp.maximum(jnp.sum(eligible), 1.0)


def limoe_entropy_losses(
    logits_GxNxE: jax.Array,
    modality_GxN: jax.Array,
    eligible_GxN: jax.Array,
    modalities: tuple[int, ...],
    threshold: float,
) -> tuple[jax.Array, jax.Array]:
    """LIMoE's per-modality entropy losses (Mustafa et al. 2022, arXiv 2206.02770), summed over
    the group's modalities m, with p_t = softmax of token t's router logits over the group's
    experts and G_m the eligible tokens of m in every routing group of the call:

    local  = sum_m mean_{t in G_m} H(p_t)          (low: each token sure of its experts)
    global = sum_m max(0, threshold - H(mean_{t in G_m} p_t))   (the marginal spread out)

    A modality without tokens adds 0 to both."""
    log_p = jax.nn.log_softmax(logits_GxNxE.astype(jnp.float32), axis=-1)
    p = jnp.exp(log_p)
    entropy_GxN = -jnp.sum(p * log_p, axis=-1)
    local, global_ = jnp.zeros(()), jnp.zeros(())
    for m in modalities:
        in_m = (eligible_GxN & (modality_GxN == m)).astype(jnp.float32)
        count = jnp.sum(in_m)
        safe = jnp.maximum(count, 1.0)
        local = local + jnp.sum(entropy_GxN * in_m) / safe
        marginal_E = jnp.sum(p * in_m[..., None], axis=(0, 1)) / safe
        h = -jnp.sum(marginal_E * jnp.log(jnp.maximum(marginal_E, jnp.finfo(jnp.float32).tiny)))
        global_ = global_ + jnp.where(count > 0, jnp.maximum(0.0, threshold - h), 0.0)
    return local, global_


# --- Causal routing (aux routers; model/aux_router.py) ------------------------------------------


def threshold_dispatch(taken_NxE: jax.Array, gate_NxE: jax.Array) -> Dispatch:
    """Per-token decisions as a dispatch with N slots per expert (nothing can be dropped):
    expert e's taken tokens first, in token order (a stable sort), gate where valid, else 0."""
    taken_ExN = taken_NxE.astype(bool).T
    token_index_ExN = jnp.argsort(~taken_ExN, axis=-1, stable=True).astype(jnp.int32)
    valid_ExN = jnp.take_along_axis(taken_ExN, token_index_ExN, axis=-1)
    gate_ExN = jnp.take_along_axis(gate_NxE.astype(jnp.float32).T, token_index_ExN, axis=-1)
    return Dispatch(token_index_ExN, jnp.where(valid_ExN, gate_ExN, 0.0), valid_ExN)


def top_k_taken(probs_NxE: jax.Array, top_k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """Token choice without capacity: (taken [N, E] bool, gate [N, E]) of each token's top-k."""
    n_experts = probs_NxE.shape[-1]
    top_prob_NxK, expert_NxK = jax.lax.top_k(probs_NxE.astype(jnp.float32), top_k)
    if renormalize:
        total = jnp.sum(top_prob_NxK, axis=-1, keepdims=True)
        top_prob_NxK = top_prob_NxK / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)
    one_hot_NxKxE = jax.nn.one_hot(expert_NxK, n_experts, dtype=jnp.float32)
    gate_NxE = jnp.sum(one_hot_NxKxE * top_prob_NxK[..., None], axis=1)
    return jnp.sum(one_hot_NxKxE, axis=1) > 0, gate_NxE


def top_p_taken(probs_NxE: jax.Array, threshold: float) -> jax.Array:
    """Top-p (dynamic) routing's choice, [N, E] bool: each token's experts in descending prob
    (ties to the lower expert index) until their mass reaches `threshold`; the expert at rank j
    is taken iff the mass of the experts ranked before it is below the threshold, so a token
    always takes its top expert and at most all of them."""
    n_tokens, n_experts = probs_NxE.shape
    sorted_NxE, expert_NxE = jax.lax.top_k(probs_NxE.astype(jnp.float32), n_experts)
    # The mass ranked strictly before each expert (an exclusive cumulative sum).
    zeros_Nx1 = jnp.zeros((n_tokens, 1), jnp.float32)
    before_NxE = jnp.concatenate([zeros_Nx1, jnp.cumsum(sorted_NxE, axis=-1)[:, :-1]], axis=-1)
    take_NxE = before_NxE < threshold
    rows_NxE = jnp.broadcast_to(jnp.arange(n_tokens)[:, None], (n_tokens, n_experts))
    return jnp.zeros((n_tokens, n_experts), bool).at[rows_NxE, expert_NxE].set(take_NxE)


def top_any_gates(
    scores_NxE: jax.Array, thresholds_E: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """DynMoE's top-any gating (Guo et al. 2024, arXiv 2405.14297) over sigmoid scores s and
    per-expert thresholds t (both in (0, 1)): (taken [N, E] bool, gate [N, E], chosen [N, E]).

    chosen: sign(relu(s - t)), 1 where s > t, else 0, with the straight-through gradient of
    relu(s - t) (the sign's gradient taken as 1: s and t learn where s > t only). A token with
    k >= 1 chosen experts combines them with gate chosen / k (k is a count: no gradient); a token
    with none takes its top-1 expert by s at gate 1 (the fallback, constant: no gradient).
    taken: the chosen experts, or the fallback expert."""
    scores32_NxE = scores_NxE.astype(jnp.float32)
    margin_NxE = jax.nn.relu(scores32_NxE - thresholds_E.astype(jnp.float32))  # relu'(0) = 0
    chosen_NxE = margin_NxE - jax.lax.stop_gradient(margin_NxE)
    chosen_NxE = chosen_NxE + jax.lax.stop_gradient((margin_NxE > 0).astype(jnp.float32))
    count_Nx1 = jnp.sum(jax.lax.stop_gradient(chosen_NxE), axis=-1, keepdims=True)
    top1_NxE = jax.nn.one_hot(jnp.argmax(scores32_NxE, axis=-1), scores_NxE.shape[-1])
    fallback_NxE = jnp.where(count_Nx1 == 0, top1_NxE, 0.0)
    gate_NxE = chosen_NxE / jnp.maximum(count_Nx1, 1.0) + fallback_NxE
    taken_NxE = (jax.lax.stop_gradient(chosen_NxE) + fallback_NxE) > 0
    return taken_NxE, gate_NxE, chosen_NxE


def top_any_losses(
    chosen_TxE: jax.Array, eligible_T: jax.Array, router_DxE: jax.Array
) -> dict[str, jax.Array]:
    """DynMoE's auxiliary losses (unweighted) over T eligible tokens' `top_any_gates` choices
    (straight-through, before the top-1 fallback) and the router's expert embeddings w_e:

    diversity: ||W_n^T W_n - I||_F + mean_e ||w_e|| (W_n: unit columns), the "diverse and
      simple" gate loss: experts' embeddings apart, and small;
    balance: E sum_e m_e c_e over the tokens that chose at least one expert, m_e the mean of
      chosen_e / sum_e' chosen_e' (with its straight-through gradient), c_e the share choosing e
      (0 if no token chose);
    efficiency: the mean of chosen over tokens and experts (fewer experts per token as it
      falls)."""
    n_experts = chosen_TxE.shape[-1]
    w32_DxE = router_DxE.astype(jnp.float32)
    norm_E = jnp.sqrt(jnp.sum(jnp.square(w32_DxE), axis=0))
    unit_DxE = w32_DxE / jnp.maximum(norm_E, 1e-12)
    off_ExE = unit_DxE.T @ unit_DxE - jnp.eye(n_experts, dtype=jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny  # the Frobenius norm's gradient stays finite at 0
    diversity = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(off_ExE)), tiny)) + jnp.mean(norm_E)
    eligible_Tx1 = eligible_T[:, None].astype(jnp.float32)
    chosen_TxE = chosen_TxE.astype(jnp.float32) * eligible_Tx1
    total_Tx1 = jnp.sum(chosen_TxE, axis=-1, keepdims=True)
    active_Tx1 = (jax.lax.stop_gradient(total_Tx1) > 0).astype(jnp.float32)
    n_active = jnp.maximum(jnp.sum(active_Tx1), 1.0)
    share_TxE = chosen_TxE / jnp.where(active_Tx1 > 0, total_Tx1, 1.0)
    mean_share_E = jnp.sum(share_TxE, axis=0) / n_active
    frac_E = jnp.sum(jax.lax.stop_gradient(chosen_TxE), axis=0) / n_active
    balance = n_experts * jnp.sum(mean_share_E * frac_E)
    count = jnp.maximum(jnp.sum(eligible_Tx1), 1.0)
    efficiency = jnp.sum(chosen_TxE) / (count * n_experts)
    return {"diversity": diversity, "balance": balance, "efficiency": efficiency}
