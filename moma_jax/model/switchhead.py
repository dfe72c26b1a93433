"""SwitchHead attention (Csordas et al. 2023, arXiv 2312.07987): per head, the value and output
projections are mixtures of experts; queries and keys are shared.

Each head h has E = `model.switchhead.experts` value experts W_V^{h,e} and output experts
W_O^{h,e} per routing group (`model.switchhead.groups`: "modality", a set per modality, so a
text token mixes text experts and an image token image experts; "shared", one set for all).
A token x selects by sigmoid scores and its own group's selection weights, top_k per head:

    s_V^h = sigmoid(x W_SV^h),  s_O^h = sigmoid(x W_SO^h)        (the group's E experts)
    V^h   = sum_{e in top_k(s_V^h)} s_V^h[e] x W_V^{h,e}          (at the key/value token)
    y     = sum_h sum_{e in top_k(s_O^h)} s_O^h[e] (A^h V^h) W_O^{h,e}   (at the query token)

with A^h = softmax(Q^h K^h^T / sqrt(Dh)) the ordinary causal attention (QK-norm and RoPE as in
every layer, `attention.attend`). The gates are the sigmoid scores themselves, not
renormalised (the reference code's `get_sel`). The selection is per token, so the layer is
causal, needs no aux router, and the ordinary KV cache holds the mixed values. No balancing
loss: the reference module has none.

Compute: every expert of every group runs on every token and the gates mask them (static
shapes); the FLOPs row reports the ideal count (top_k experts per head) and the executed one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax import flops as flops_lib
from moma_jax.config import ModelConfig
from moma_jax.kind_config import attention_expert_groups
from moma_jax.model.attention import attend
from moma_jax.model.block import Block
from moma_jax.model.context import Context
from moma_jax.model.layers import LayerNorm, RMSNorm, SwiGLU, param
from moma_jax.model.moh import group_names, group_of, own_group, top_k_mask


def switch_gates(
    x_BxLxD: jax.Array, w_sel_GxDxHxE: jax.Array, group_BxL: jax.Array, top_k: int
) -> jax.Array:
    """[B, L, G, H, E] float32: each token's gates, s[e] on its group's top_k experts per head,
    0 elsewhere (every group's selection runs on every token; each keeps its own)."""
    n_groups = w_sel_GxDxHxE.shape[0]
    logits_BxLxGxHxE = jnp.einsum(
        "bld,gdhe->blghe", x_BxLxD, w_sel_GxDxHxE, preferred_element_type=jnp.float32
    )
    b, length, _, h, e = logits_BxLxGxHxE.shape
    own_BxLxHxE = own_group(logits_BxLxGxHxE.reshape(b, length, n_groups, h * e), group_BxL)
    scores_BxLxHxE = jax.nn.sigmoid(own_BxLxHxE.reshape(b, length, h, e))
    gates_BxLxHxE = scores_BxLxHxE * top_k_mask(scores_BxLxHxE, top_k)
    in_group_BxLxG = jax.nn.one_hot(group_BxL, n_groups, dtype=jnp.float32)
    return in_group_BxLxG[..., None, None] * gates_BxLxHxE[:, :, None]


class SwitchHeadAttention(nnx.Module):
    """Shared queries and keys; value and output experts per head (the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim
        std, dt, sh = cfg.init_std, cfg.param_dtype, cfg.switchhead
        g, e = attention_expert_groups(sh.groups), sh.experts
        in_axes = ("embed", "heads", "head_dim")
        self.wq_DxHxDh = param(rngs, (d, h, dh), in_axes, std, dt)
        self.wk_DxHxDh = param(rngs, (d, h, dh), in_axes, std, dt)
        self.wv_GxExDxHxDh = param(
            rngs, (g, e, d, h, dh), ("modality", "expert", *in_axes), std, dt
        )
        self.wo_GxExHxDhxD = param(
            rngs, (g, e, h, dh, d), ("modality", "expert", "heads", "head_dim", "embed"), std, dt
        )
        sel_axes = ("modality", "embed", "heads", "expert")
        self.w_sel_v_GxDxHxE = param(rngs, (g, d, h, e), sel_axes, std, dt)
        self.w_sel_o_GxDxHxE = param(rngs, (g, d, h, e), sel_axes, std, dt)
        self.q_norm = LayerNorm(dh, cfg) if cfg.qk_norm else None
        self.k_norm = LayerNorm(dh, cfg) if cfg.qk_norm else None
        self.rope_theta, self.impl = cfg.rope_theta, cfg.attention
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.switchhead = sh

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> tuple[jax.Array, dict]:
        dt, sh = self.compute_dtype, self.switchhead
        x = x_BxLxD.astype(dt)
        group_BxL = group_of(sh.groups, ctx.modality)
        gate_v = switch_gates(x, self.w_sel_v_GxDxHxE[...].astype(dt), group_BxL, sh.top_k)
        gate_o = switch_gates(x, self.w_sel_o_GxDxHxE[...].astype(dt), group_BxL, sh.top_k)
        q, k = (
            jnp.einsum("bld,dhk->blhk", x, w[...].astype(dt))
            for w in (self.wq_DxHxDh, self.wk_DxHxDh)
        )
        v_all_BxLxGxExHxDh = jnp.einsum("bld,gedhk->blgehk", x, self.wv_GxExDxHxDh[...].astype(dt))
        v = jnp.einsum("blgehk,blghe->blhk", v_all_BxLxGxExHxDh, gate_v.astype(dt))
        qk_norm = None if self.q_norm is None or self.k_norm is None else (self.q_norm, self.k_norm)
        out_BxLxHxDh = attend(q, k, v, ctx, qk_norm, self.rope_theta, self.impl)
        gated_BxLxGxExHxDh = jnp.einsum("blhk,blghe->blgehk", out_BxLxHxDh, gate_o.astype(dt))
        y = jnp.einsum("blgehk,gehkd->bld", gated_BxLxGxExHxDh, self.wo_GxExHxDhxD[...].astype(dt))
        # Per group: the mean gate of a chosen output expert over the group's present tokens.
        weight_BxLxG = jax.nn.one_hot(group_BxL, gate_o.shape[2]) * ctx.present()[..., None]
        chosen = sh.top_k * gate_o.shape[3] * jnp.maximum(weight_BxLxG.sum((0, 1)), 1.0)
        mean_gate_G = jnp.einsum("blghe,blg->g", gate_o, weight_BxLxG) / chosen
        metrics = {
            f"switchhead/{name}/mean_gate": mean_gate_G[g]
            for g, name in enumerate(group_names(sh.groups))
        }
        return y, {"metrics": metrics}


def switchhead_block(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """SwitchHead attention, one SwiGLU (built first, as the dense block's)."""
    ffn = SwiGLU(cfg, rngs=rngs)
    return Block(
        cfg,
        ffn=ffn,
        attn=SwitchHeadAttention(cfg, rngs=rngs),
        attn_norm=RMSNorm(cfg.d_model, cfg),
        ffn_norm=RMSNorm(cfg.d_model, cfg),
    )


def switchhead_layer_flops(cfg: ModelConfig, seq_len: int, attention: str) -> tuple[float, float]:
    """Ideal: Q and K, top_k value and output experts per head, the attention, the token's
    group's two selections, the SwiGLU. Executed: every expert of every group, every group's
    selections."""
    d, hk, sh = cfg.d_model, cfg.n_heads * cfg.resolved_head_dim, cfg.switchhead
    groups = attention_expert_groups(sh.groups)
    keys = flops_lib.attended_keys(seq_len, attention)
    selection = 2 * 2 * d * cfg.n_heads * sh.experts
    qk_attend = 2 * d * 2 * hk + 2 * 2 * hk * keys
    vo = 2 * 2 * d * hk  # one value and one output expert per head
    ffn = flops_lib.ffn_flops_per_token(cfg)
    ideal = qk_attend + sh.top_k * vo + selection + ffn
    executed = qk_attend + groups * sh.experts * vo + groups * selection + ffn
    return ideal, executed


def switchhead_describe(cfg: ModelConfig) -> dict:
    sh = cfg.switchhead
    return {
        "heads": cfg.n_heads,
        "experts_per_head": sh.experts,
        "top_k": sh.top_k,
        "routing_groups": list(group_names(sh.groups)),
    }
