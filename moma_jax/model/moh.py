"""Mixture-of-Head attention (MoH; Jin et al. 2024, arXiv 2410.11842): heads as experts.

Of the layer's `model.n_heads` heads, `model.moh.shared_heads` (h_s) are always on; the others
are routed heads, split evenly into one set per routing group (`model.moh.groups`: "modality",
a set per modality, so a text token is routed among the text heads and an image token among
the image heads, as MoMa's FFN experts; "shared", one set for every token). A token's group
router W (one per group) scores its shared heads, its group's routed heads and the two parts:

    g_i = alpha_1 softmax(W_s x)_i                          i a shared head
    g_i = alpha_2 softmax(W_r x)_i  if i in top_k(W_r x)    i a routed head of its group
    [alpha_1, alpha_2] = softmax(W_h x);   o = sum_i g_i H_i W_O^i

(the paper's Eq. 4-5, `model.moh.gates="paper"`; "scaled" is SkyworkAI/MoH's code, which
renormalises the chosen routed gates and scales each part by its head count and by 2; the
routed heads of other groups get g = 0). Routing is per token (token choice), so it is causal
and needs no aux router. The balance loss of each group over its own present tokens is the
paper's Eq. 6, beta * sum_i f_i P_i over the group's routed heads (f_i: share of tokens
choosing head i, P_i: mean router probability; "scaled" multiplies by the routed heads, as the
code does).

Compute: every head's queries, keys, values and attention run for every token and the gates
mask the unchosen heads (static shapes; keys and values of every head are needed anyway, since
a later token may choose any head); the FLOPs row reports the ideal count (each token's
h_s + top_k heads for Q, O and the attention itself, all heads' K and V) and the executed one.
Decoding uses the ordinary KV cache: every head's keys and values are cached.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax import flops as flops_lib
from moma_jax.config import ModelConfig
from moma_jax.kind_config import attention_expert_groups
from moma_jax.modality import MODALITY_NAMES
from moma_jax.model.attention import attend
from moma_jax.model.block import Block
from moma_jax.model.context import Context
from moma_jax.model.layers import LayerNorm, RMSNorm, SwiGLU, param


def group_of(cfg_groups: str, modality_BxL: jax.Array) -> jax.Array:
    """[B, L] each token's routing group: its modality, or 0 when every token shares one."""
    if cfg_groups == "modality":
        return modality_BxL.astype(jnp.int32)
    return jnp.zeros_like(modality_BxL, jnp.int32)


def group_names(cfg_groups: str) -> tuple[str, ...]:
    return MODALITY_NAMES if cfg_groups == "modality" else ("+".join(MODALITY_NAMES),)


def own_group(values_BxLxGxX: jax.Array, group_BxL: jax.Array) -> jax.Array:
    """[B, L, X]: each token's own group's slice of a per-group quantity."""
    index = group_BxL[:, :, None, None].astype(jnp.int32)
    return jnp.take_along_axis(values_BxLxGxX, index, axis=2)[:, :, 0]


def top_k_mask(scores_XxE: jax.Array, k: int) -> jax.Array:
    """[..., E] float 0/1: the k highest scores of each row."""
    _, index_XxK = jax.lax.top_k(scores_XxE, k)
    return jnp.sum(jax.nn.one_hot(index_XxK, scores_XxE.shape[-1], dtype=jnp.float32), axis=-2)


def moh_gates(
    logits_BxLxC: jax.Array,
    group_BxL: jax.Array,
    present_BxL: jax.Array,
    shared: int,
    n_groups: int,
    top_k: int,
    mode: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Head gates [B, L, H] from each token's own router logits (C = h_s + r + 2 columns:
    W_s x, W_r x, W_h x), and per group the balance terms: f and P [G, r] over the group's
    present tokens. Float32."""
    logits = logits_BxLxC.astype(jnp.float32)
    r = logits.shape[-1] - shared - 2
    p_shared = jax.nn.softmax(logits[..., :shared], axis=-1)
    p_routed = jax.nn.softmax(logits[..., shared : shared + r], axis=-1)
    alpha = jax.nn.softmax(logits[..., shared + r :], axis=-1)
    chosen = top_k_mask(p_routed, top_k)
    g_routed = p_routed * chosen
    if mode == "scaled":  # SkyworkAI/MoH: renormalised, each part x its heads, x 2
        g_routed = g_routed / jnp.maximum(g_routed.sum(-1, keepdims=True), 1e-7) * top_k
        p_shared, alpha = p_shared * shared, alpha * 2
    g_shared = alpha[..., :1] * p_shared
    g_routed = alpha[..., 1:] * g_routed
    in_group_BxLxG = jax.nn.one_hot(group_BxL, n_groups, dtype=jnp.float32)
    routed_BxLxGxR = in_group_BxLxG[..., None] * g_routed[:, :, None, :]
    gates = jnp.concatenate([g_shared, routed_BxLxGxR.reshape(*g_routed.shape[:2], -1)], -1)
    # The balance terms over each group's present tokens (padding never counts).
    weight_BxLxG = in_group_BxLxG * present_BxL[..., None].astype(jnp.float32)
    count_G = jnp.maximum(weight_BxLxG.sum((0, 1)), 1.0)
    f_GxR = jnp.einsum("blg,blr->gr", weight_BxLxG, chosen) / count_G[:, None]
    p_GxR = jnp.einsum("blg,blr->gr", weight_BxLxG, p_routed) / count_G[:, None]
    return gates, f_GxR, p_GxR


class MoHAttention(nnx.Module):
    """Multi-head attention whose heads are gated per token (the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
        std, dt, moh = cfg.init_std, cfg.param_dtype, cfg.moh
        in_axes = ("embed", "heads", "head_dim")
        self.wq_DxHxDh = param(rngs, (d, h, dh), in_axes, std, dt)
        self.wk_DxHxDh = param(rngs, (d, h, dh), in_axes, std, dt)
        self.wv_DxHxDh = param(rngs, (d, h, dh), in_axes, std, dt)
        self.wo_HxDhxD = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), std, dt)
        self.n_groups = attention_expert_groups(moh.groups)
        routed = (h - moh.shared_heads) // self.n_groups
        # Each group's router: W_s, W_r and W_h side by side (C = h_s + r + 2 columns).
        columns = moh.shared_heads + routed + 2
        self.w_router_GxDxC = param(
            rngs, (self.n_groups, d, columns), ("modality", "embed", "head_gate"), std, dt
        )
        self.q_norm = LayerNorm(dh, cfg) if cfg.qk_norm else None
        self.k_norm = LayerNorm(dh, cfg) if cfg.qk_norm else None
        self.rope_theta, self.impl = cfg.rope_theta, cfg.attention
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.moh = moh

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> tuple[jax.Array, dict]:
        dt, moh = self.compute_dtype, self.moh
        x = x_BxLxD.astype(dt)
        q, k, v = (
            jnp.einsum("bld,dhk->blhk", x, w[...].astype(dt))
            for w in (self.wq_DxHxDh, self.wk_DxHxDh, self.wv_DxHxDh)
        )
        qk_norm = None if self.q_norm is None or self.k_norm is None else (self.q_norm, self.k_norm)
        out_BxLxHxDh = attend(q, k, v, ctx, qk_norm, self.rope_theta, self.impl)
        # Every group's router on every token (executed), each token keeps its own group's.
        logits_BxLxGxC = jnp.einsum(
            "bld,gdc->blgc", x, self.w_router_GxDxC[...].astype(dt),
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        group_BxL = group_of(moh.groups, ctx.modality)
        gates_BxLxH, f_GxR, p_GxR = moh_gates(
            own_group(logits_BxLxGxC, group_BxL), group_BxL, ctx.present(),
            moh.shared_heads, self.n_groups, moh.top_k, moh.gates,
        )  # fmt: skip
        out_BxLxHxDh = out_BxLxHxDh * gates_BxLxH[..., None].astype(dt)
        y = jnp.einsum("blhk,hkd->bld", out_BxLxHxDh, self.wo_HxDhxD[...].astype(dt))
        balance_G = jnp.sum(f_GxR * p_GxR, axis=-1)
        if moh.gates == "scaled":
            balance_G = balance_G * f_GxR.shape[-1]
        losses, metrics = {}, {}
        for g, name in enumerate(group_names(moh.groups)):
            losses[f"moh/{name}/balance_loss"] = moh.balance_weight * balance_G[g]
            metrics[f"moh/{name}/balance"] = balance_G[g]
        return y, {"losses": losses, "metrics": metrics}


def moh_block(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """MoH attention, one SwiGLU (built first, as the dense block's)."""
    ffn = SwiGLU(cfg, rngs=rngs)
    return Block(
        cfg,
        ffn=ffn,
        attn=MoHAttention(cfg, rngs=rngs),
        attn_norm=RMSNorm(cfg.d_model, cfg),
        ffn_norm=RMSNorm(cfg.d_model, cfg),
    )


def moh_layer_flops(cfg: ModelConfig, seq_len: int, attention: str) -> tuple[float, float]:
    """Ideal: keys and values of every head, queries, attention and output of the token's
    h_s + top_k heads, its group's router, the SwiGLU. Executed: every head, every group's
    router (the module docstring)."""
    d, h, dh, moh = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim, cfg.moh
    groups = attention_expert_groups(moh.groups)
    routed = (h - moh.shared_heads) // groups
    active = moh.shared_heads + moh.top_k
    router = 2 * d * (moh.shared_heads + routed + 2)
    keys = flops_lib.attended_keys(seq_len, attention)
    ffn = flops_lib.ffn_flops_per_token(cfg)
    ideal = 2 * d * 2 * h * dh + 2 * d * 2 * active * dh + 2 * 2 * active * dh * keys
    executed = flops_lib.attention_flops_per_token(cfg, seq_len, attention)
    return ideal + router + ffn, executed + groups * router + ffn


def moh_describe(cfg: ModelConfig) -> dict:
    moh = cfg.moh
    groups = attention_expert_groups(moh.groups)
    return {
        "heads": cfg.n_heads,
        "shared_heads": moh.shared_heads,
        "routed_heads_per_group": (cfg.n_heads - moh.shared_heads) // groups,
        "top_k": moh.top_k,
        "routing_groups": list(group_names(moh.groups)),
        "gates": moh.gates,
    }
