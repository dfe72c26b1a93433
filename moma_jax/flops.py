"""Analytic FLOPs per token, by layer kind, "ideal" and "executed", and parameter counts.

Each layer kind's row (`model/kinds.py`) names its formula here; the whole-model totals
(`forward_flops_per_token`, `train_flops_per_token`) are summed there over the layer pattern.

Conventions: a multiply-add is 2 FLOPs; training = 3 x forward (backward = 2 x forward; the
recomputation of rematerialised layers is not model FLOPs). Attention scores and values use the
causal convention by default: a token at position t attends to t+1 keys, so a row of L tokens
averages (L+1)/2 keys; `attention="full"` counts all L keys, as XLA executes a masked L x L.
Norms, RoPE, softmax, gathers and the embedding lookup are not counted (< 1% at these shapes).

"Ideal" is what the MoMa paper counts: each token's own experts only (expert choice with
capacity c: c expert FFNs per token on average; token choice: top_k; a one-expert group: 1),
its group's router. "Executed" is what the layers run: for the sparse FFN, the expert slots in
use (`model/grouped.py`: each expert's routed slots at the configured modality shares, rounded
up as the slabs run them, `SparseConfig.executed_rows`) and every group's router over every
token of the routing group; for MoT, each modality's projections and FFN over all tokens
(masked compute). The overflow slabs' backward recomputes their SwiGLU (not counted, like remat).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from flax import nnx

from moma_jax.config import ModelConfig, mod_inner_config, moe_routed_config, moe_shared_config


def attended_keys(seq_len: int, attention: str = "causal") -> float:
    """Keys a query attends to on average (the module docstring's convention)."""
    return (seq_len + 1) / 2 if attention == "causal" else seq_len


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, attention: str = "causal") -> float:
    """Q/K/V/O projections plus scores and weighted values, per token, forward."""
    d, hk = cfg.d_model, cfg.n_heads * cfg.resolved_head_dim
    keys = attended_keys(seq_len, attention)
    return 2 * d * 3 * hk + 2 * hk * d + 2 * 2 * hk * keys


def ffn_flops_per_token(cfg: ModelConfig) -> float:
    """One SwiGLU: gate, up and down projections."""
    return 2 * 3 * cfg.d_model * cfg.resolved_ffn_hidden


def sparse_layer_flops(cfg: ModelConfig, seq_len: int, attention: str) -> tuple[float, float]:
    """Needs `model.moe.modality_shares` (ConfigError when unset): the ideal count weights each
    group by its token share, and the executed count is what the layer's buffers hold."""
    moe, d = cfg.moe, cfg.d_model
    attn = attention_flops_per_token(cfg, seq_len, attention)
    ffn = ffn_flops_per_token(moe_routed_config(cfg))  # one (fine-grained) routed expert
    ideal = executed = attn
    for g in range(moe.n_groups):
        row = moe.router(g)
        router = 2 * d * row.router_columns(moe, g) if row.has_router else 0.0
        ideal += moe.group_share(g) * (router + moe.experts_per_token(g) * ffn)
        executed += router  # every group's router scores every token of the routing group
    executed += moe.executed_rows / moe.routing_group_tokens * ffn
    if moe.shared_experts:  # always-on experts: their own take-all layer, attention once
        shared = sparse_layer_flops(moe_shared_config(cfg), seq_len, attention)
        ideal, executed = ideal + shared[0] - attn, executed + shared[1] - attn
    return ideal, executed


def dense_layer_flops(cfg: ModelConfig, seq_len: int, attention: str) -> tuple[float, float]:
    flops = attention_flops_per_token(cfg, seq_len, attention) + ffn_flops_per_token(cfg)
    return flops, flops


def mot_layer_flops(cfg: ModelConfig, seq_len: int, attention: str) -> tuple[float, float]:
    """MoT runs each token's projections and FFN with its own modality's weights only
    (`mot.by_modality`): executed = ideal, up to the rounding of each modality's rows (to 8,
    or to a slab of `model.moe.tile_rows` rows where a batch exceeds its share)."""
    ideal, _ = dense_layer_flops(cfg, seq_len, attention)
    return ideal, ideal


def motok_layer_flops(cfg: ModelConfig, seq_len: int, attention: str) -> tuple[float, float]:
    """Mixture of Tokens (`model/mixture_of_tokens.py`), per token: attention, the controller
    (D x E), merging into and emitting from the E mixed tokens of its group (2 x E x D
    multiply-adds), and its 1/G share of the E experts' SwiGLUs on the group's mixed tokens.
    The layer runs exactly this: executed = ideal."""
    flops = attention_flops_per_token(cfg, seq_len, attention) + motok_ffn_flops(cfg)
    return flops, flops


def motok_ffn_flops(cfg: ModelConfig, causal: bool = False) -> float:
    """A Mixture-of-Tokens FFN's forward FLOPs per token: trained (controller, mixing, its 1/G
    share of the experts) or at causal inference (the group of one: all E expert SwiGLUs on
    the token, no controller, nothing mixed)."""
    t, d = cfg.motok, cfg.d_model
    f = t.resolved_expert_hidden(cfg.resolved_ffn_hidden)
    experts = float(t.experts * 2 * 3 * d * f)
    if causal:
        return experts
    return 2 * d * t.experts + 2 * 2 * t.experts * d + experts / t.group_rows


def mamba_mixer_flops(cfg: ModelConfig) -> tuple[float, float]:
    """(ideal, executed) forward FLOPs per token of one Mamba mixer (model/mamba.py), with
    Di = int(expand x D), Ds = d_state, Dr = dt_rank, W = d_conv:

        in_proj 2 D 2Di + conv 2 W Di + x_proj 2 Di (Dr + 2 Ds) + dt_proj 2 Dr Di
        + scan 7 Di Ds + 4 Di + out_proj 2 Di D

    The scan's 7 per state element: delta A, its exp, (delta u) B, a h + b (2), C h (2); its 4
    per channel: delta u, D u and its sum, the silu(z) gate. Softplus and silu are not counted
    (as norms are not). Executed adds 5 Di Ds: the associative scan's combines (about two per
    element, 3 FLOPs each, instead of the sequential 2) and the initial-state term. Mixture-of-
    Mamba runs each token's own modality's projections only: the same counts."""
    mb, d = cfg.mamba, cfg.d_model
    di, ds, dr, w = mb.d_inner(d), mb.d_state, mb.resolved_dt_rank(d), mb.d_conv
    projections = 2 * d * 2 * di + 2 * di * (dr + 2 * ds) + 2 * dr * di + 2 * di * d
    ideal = projections + 2 * w * di + 7 * di * ds + 4 * di
    return ideal, ideal + 5 * di * ds


def mamba_layer_flops(cfg: ModelConfig, seq_len: int, attention: str) -> tuple[float, float]:
    """A Mamba mixer and one SwiGLU (layer kinds `mamba` and `mom`); independent of seq_len."""
    ideal, executed = mamba_mixer_flops(cfg)
    ffn = ffn_flops_per_token(cfg)
    return ideal + ffn, executed + ffn


def mamba_sparse_layer_flops(cfg: ModelConfig, seq_len: int, attention: str) -> tuple[float, float]:
    """A Mamba mixer and the sparse FFN of `model.moe` (layer kind `mamba_moe`): the sparse
    layer's count with its attention replaced by the mixer."""
    attn = attention_flops_per_token(cfg, seq_len, attention)
    sparse = sparse_layer_flops(cfg, seq_len, attention)
    mixer = mamba_mixer_flops(cfg)
    return sparse[0] - attn + mixer[0], sparse[1] - attn + mixer[1]


def mod_layer_flops(inner: Callable[[ModelConfig, int, str], tuple[float, float]]):
    """Mixture-of-Depths: the router on every token, the wrapped block on the selected share of
    them only, whose attention sees the selected tokens of a sequence (capacity x seq_len)."""

    def flops(cfg: ModelConfig, seq_len: int, attention: str) -> tuple[float, float]:
        capacity = cfg.mod.capacity
        ideal, executed = inner(mod_inner_config(cfg), max(1, int(seq_len * capacity)), attention)
        router = 2 * cfg.d_model
        return router + capacity * ideal, router + capacity * executed

    return flops


def aux_router_flops(out: float, d: int) -> float:
    """Forward FLOPs of one aux router (`model/aux_router.py`: D x D/2, then D/2 x out)."""
    return 2 * d * (d // 2) + 2 * (d // 2) * out


def sparse_aux_routers(cfg: ModelConfig) -> tuple[float, float]:
    """(aux routers a token passes, their FLOPs) in one sparse layer at causal inference: the
    token's modality group's, where that group's routing row needs one (expert choice with more
    than one expert), weighted by the group's token share."""
    moe, routers, flops = cfg.moe, 0.0, 0.0
    for g, experts in enumerate(moe.group_experts):
        if moe.router(g).needs_aux_router:
            routers += moe.group_share(g)
            flops += moe.group_share(g) * aux_router_flops(experts, cfg.d_model)
    return routers, flops


def mod_aux_routers(inner: Callable[[ModelConfig], tuple[float, float]]):
    """A Mixture-of-Depths layer's: its own aux router on every token, plus the inner layer's
    (causal inference runs every token through them)."""

    def aux_routers(cfg: ModelConfig) -> tuple[float, float]:
        routers, flops = inner(cfg)
        return routers + 1, flops + aux_router_flops(1, cfg.d_model)

    return aux_routers


def count_params(state: nnx.State) -> int:
    """Parameters in a (possibly abstract) state."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def active_params(cfg: ModelConfig, state: nnx.State) -> float:
    """Parameters one token uses under ideal routing, read from the (abstract) state's shapes.
    Sparse models need `model.moe.modality_shares` (ConfigError when unset).

    A weight with a logical "modality" axis counts one modality's slice (MoT); an expert weight
    of group g counts experts_per_token(g) experts, weighted by the group's token share; a router
    counts by its group's share. Everything else counts whole.
    """
    total = 0.0
    for _, var in nnx.to_flat_state(state):
        size = math.prod(var.shape)
        metadata = var.get_metadata()
        axes = metadata.get("out_sharding") or ()
        group = metadata.get("expert_group")  # set by the sparse FFN's expert groups
        shared = metadata.get("shared_group")  # a group's shared (always-on) experts
        if shared is not None:
            total += size * cfg.moe.group_share(shared)
        elif "modality" in axes:
            total += size / var.shape[axes.index("modality")]
        elif group is not None and "expert" in axes:
            experts = var.shape[axes.index("expert")]
            per_token = cfg.moe.experts_per_token(group)
            total += size * cfg.moe.group_share(group) * per_token / experts
        elif group is not None:
            total += size * cfg.moe.group_share(group)
        else:
            total += size
    return total


def paper_params(cfg: ModelConfig, experts: float = 1) -> float:
    """MoMa Table 1's formula: 2Vd + l(4d^2 + E * 8d^2)."""
    d = cfg.d_model
    return 2 * cfg.vocab_size * d + cfg.n_layers * (4 * d * d + experts * 8 * d * d)
