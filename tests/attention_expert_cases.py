"""Shared pieces of the attention-expert tests (test_moh.py, test_switchhead.py,
test_attention_experts.py): small configs and batches, plain references written from the MoH
and SwitchHead papers' equations (xp: numpy or jax.numpy), NumPy transcriptions of the public
implementations on small cases, and a functional forward of the library's layers.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moma_jax.config import ModelConfig, MoHConfig, SwitchHeadConfig
from moma_jax.model.attention import segment_causal_mask
from moma_jax.model.context import Context

B, L, D = 2, 12, 16
MIXES = {"text_only": 0.0, "image_heavy": 0.8}


def layer_cfg(**changes) -> ModelConfig:
    base = ModelConfig(vocab_size=48, d_model=D, n_layers=2, n_heads=6, head_dim=4)
    return dataclasses.replace(base, **changes)


def batch(image_share: float, seed: int = 0):
    """x [B, L, D]; row 0 holds two documents and two padding positions, row 1 one document;
    positions restart in each document."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    segment = np.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * L], np.int32)
    positions = np.array([[*range(5), *range(5), 0, 0], list(range(L))], np.int32)
    modality = (rng.random((B, L)) < image_share).astype(np.int32)
    return x, segment, positions, modality


def context(segment, positions, modality) -> Context:
    seg = jnp.asarray(segment)
    return Context(
        positions=jnp.asarray(positions),
        segment_ids=seg,
        modality=jnp.asarray(modality),
        attn_mask=segment_causal_mask(seg),
    )


# ---- the references, from the papers' equations (xp: numpy or jax.numpy) ---------------------


def softmax(z, xp):
    e = xp.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def qk_norm(z, xp, eps=1e-5):
    """LayerNorm over head_dim at its initial scale 1 and bias 0."""
    mean = z.mean(-1, keepdims=True)
    return (z - mean) / xp.sqrt(((z - mean) ** 2).mean(-1, keepdims=True) + eps)


def rope(z_BxLxHxK, positions, xp, theta=10_000.0):
    half = z_BxLxHxK.shape[-1] // 2
    angle = positions[:, :, None, None] * theta ** (-np.arange(half) / half)
    z1, z2 = z_BxLxHxK[..., :half], z_BxLxHxK[..., half:]
    cos, sin = xp.cos(angle), xp.sin(angle)
    return xp.concatenate([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1)


def heads(x, wq, wk, v_BxLxHxK, segment, positions, xp):
    """softmax(QK^T / sqrt(Dh)) V per head: a query sees the keys of its own document up to
    itself (padding only padding), with QK-norm and RoPE."""
    q = rope(qk_norm(xp.einsum("bld,dhk->blhk", x, wq), xp), positions, xp)
    k = rope(qk_norm(xp.einsum("bld,dhk->blhk", x, wk), xp), positions, xp)
    scores = xp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    seen = (segment[:, :, None] == segment[:, None, :]) & np.tril(np.ones((L, L), bool))
    probs = softmax(xp.where(seen[:, None], scores, -1e30), xp)
    return xp.einsum("bhqs,bshk->bqhk", probs, v_BxLxHxK)


def top(scores, k, xp):
    """0/1 over the k highest scores of each row (last axis)."""
    rank = xp.argsort(xp.argsort(-scores, axis=-1), axis=-1)
    return (rank < k).astype(scores.dtype)


def moh_reference(p, x, segment, positions, modality, cfg, xp):
    """Jin et al. 2024, Eq. 3-6, with each token's own modality's router (W[modality]): shared
    heads weighted alpha_1 softmax(W_s x), the token's modality's top-k routed heads
    alpha_2 softmax(W_r x), other heads 0; o = sum_i g_i H_i W_O^i. Balance loss per modality
    over its present tokens, beta sum_i f_i P_i."""
    s, k, beta = cfg.moh.shared_heads, cfg.moh.top_k, cfg.moh.balance_weight
    r = (cfg.n_heads - s) // 2
    v = xp.einsum("bld,dhk->blhk", x, p["wv_DxHxDh"])
    h_BxLxHxK = heads(x, p["wq_DxHxDh"], p["wk_DxHxDh"], v, segment, positions, xp)
    logits = xp.einsum("bld,bldc->blc", x, p["w_router_GxDxC"][modality])
    p_s, p_r, alpha = (
        softmax(z, xp) for z in (logits[..., :s], logits[..., s : s + r], logits[..., s + r :])
    )
    chosen = top(p_r, k, xp)
    g_routed = alpha[..., 1:] * p_r * chosen
    is_text = (modality == 0)[..., None]
    g = xp.concatenate([alpha[..., :1] * p_s, is_text * g_routed, ~is_text * g_routed], -1)
    y = xp.einsum("blh,blhk,hkd->bld", g, h_BxLxHxK, p["wo_HxDhxD"])
    loss = 0.0
    for m in (0, 1):
        tokens = (modality == m) & (segment > 0)
        if tokens.any():
            loss = loss + beta * xp.sum(chosen[tokens].mean(0) * p_r[tokens].mean(0))
    return y, loss


def switchhead_reference(p, x, segment, positions, modality, cfg, xp):
    """Csordas et al. 2023, Eq. 8-10, with each token's own modality's experts and selections
    (W[modality]): per head, the top-k value experts by sigmoid score, weighted by it (at the
    key token); attention; the top-k output experts likewise (at the query token)."""
    k = cfg.switchhead.top_k

    def gates(w_sel_GxDxHxE):
        scores = 1 / (1 + xp.exp(-xp.einsum("bld,bldhe->blhe", x, w_sel_GxDxHxE[modality])))
        return scores * top(scores, k, xp)

    wv, wo = p["wv_GxExDxHxDh"][modality], p["wo_GxExHxDhxD"][modality]
    v = xp.einsum("blhe,bld,bledhk->blhk", gates(p["w_sel_v_GxDxHxE"]), x, wv)
    attended = heads(x, p["wq_DxHxDh"], p["wk_DxHxDh"], v, segment, positions, xp)
    return xp.einsum("blhe,blhk,blehkd->bld", gates(p["w_sel_o_GxDxHxE"]), attended, wo)


# ---- the public implementations, transcribed to NumPy on small cases --------------------------


def skywork_moh_gates(x_TxC, wg, wg_0, wg_1, shared_head, routed_head):
    """SkyworkAI/MoH, MoH-ViT/attention_native.py (commit 2cefd57), lines 94-113 (routed gates
    and l_aux) and 156-175 (shared gates and the two-part weights). Torch Linear weights are
    [out, in]; `routed_head` is the top-k count, num_experts the routed heads."""
    logits = x_TxC @ wg.T
    gates = softmax(logits, np)
    num_tokens, num_experts = gates.shape
    indices = np.argsort(-gates, axis=1, kind="stable")[:, :routed_head]
    mask = np.eye(num_experts)[indices].sum(axis=1)
    me, ce = gates.mean(axis=0), mask.mean(axis=0)
    l_aux = np.mean(me * ce) * num_experts * num_experts
    routed_head_gates = gates * mask
    denom_s = np.maximum(routed_head_gates.sum(axis=1, keepdims=True), np.finfo(np.float32).eps)
    routed_head_gates = routed_head_gates / denom_s * routed_head
    if shared_head > 1:
        shared_head_gates = softmax(x_TxC @ wg_1.T, np) * shared_head
    else:
        shared_head_gates = np.ones((num_tokens, shared_head)) * shared_head
    weight_0 = softmax(x_TxC @ wg_0.T, np) * 2
    shared_head_gates = weight_0[:, :1] * shared_head_gates
    routed_head_gates = weight_0[:, 1:] * routed_head_gates
    return np.concatenate([shared_head_gates, routed_head_gates], axis=1), l_aux


def csordas_switchhead(x, q_w, k_w, v, o, sel_v, sel_o, n_heads, n_experts, moe_k):
    """RobertCsordas/switchhead, switchhead/switchhead.py (commit 0bb2f61): SwitchHeadCore's
    get_sel (lines 106-121) and forward (lines 127-181) with SwitchHeadRope's attend at
    rotate_fraction=1 (lines 258-264; RotaryPosEncoding, lines 184-229) and the causal mask
    (lines 56-57); cvmm (switchhead/cvmm.py, lines 486-488 and 577-590) as loops: row j of a
    token's selection is x @ keys[sel_index_j], summed with the reduction weights. Torch
    shapes: q_w, k_w [H*dh, C]; v [H*E, C, dh]; o [H*E, dh, C]; sel_v, sel_o [H*E, C]."""
    b, t, _ = x.shape
    dh = v.shape[-1]
    scale = np.sqrt(1.0 / np.sqrt(dh))  # self.scale.sqrt()
    q, k = (x @ q_w.T) * scale, (x @ k_w.T) * scale

    def get_sel(src, w):
        sel = 1 / (1 + np.exp(-(src @ w.T).reshape(b, t, n_heads, -1)))
        sel_index = np.argsort(-sel, axis=-1, kind="stable")[..., :moe_k]
        sel_val = np.take_along_axis(sel, sel_index, -1)
        shifted = np.arange(n_heads)[:, None] * n_experts + sel_index
        return shifted.reshape(b, t, -1), sel_val  # cvmm_prepare_sel2(flatten(-2, -1), w)

    v_index, v_weight = get_sel(x, sel_v)
    o_index, o_weight = get_sel(x, sel_o)
    rows = np.stack([[[x[i, j] @ v[e] for e in v_index[i, j]] for j in range(t)] for i in range(b)])
    vv = (v_weight[..., None, :] @ rows.reshape(b, t, n_heads, moe_k, dh))[..., 0, :]
    vv = vv.transpose(0, 2, 1, 3)  # .transpose(-2, -3)
    q, k = (z.reshape(b, t, n_heads, dh).transpose(0, 2, 1, 3) for z in (q, k))
    inv_freq = 1.0 / (10000 ** (np.arange(0, dh, 2) / dh))
    emb = np.concatenate([np.arange(t)[:, None] * inv_freq] * 2, -1)

    def rotate(z):
        return z * np.cos(emb) + np.concatenate(
            [-z[..., dh // 2 :], z[..., : dh // 2]], -1
        ) * np.sin(emb)

    q, k = rotate(q), rotate(k)
    masked = np.triu(np.ones((t, t), bool), 1)
    scores = np.where(masked, -np.inf, q @ k.transpose(0, 1, 3, 2))  # scale=1.0
    res = (softmax(scores, np) @ vv).transpose(0, 2, 1, 3)  # [B, T, H, dh]
    out = np.zeros((b, t, o.shape[-1]))
    for i in range(b):
        for j in range(t):
            for n, e in enumerate(o_index[i, j]):  # out row n reads head n // moe_k
                out[i, j] += o_weight[i, j].reshape(-1)[n] * res[i, j, n // moe_k] @ o[e]
    return out


# ---- helpers -----------------------------------------------------------------------------------


def build(cls, cfg):
    layer = cls(cfg, rngs=nnx.Rngs(0))
    names = sorted(n for n in vars(layer) if n.startswith("w"))
    return layer, {n: np.asarray(getattr(layer, n)[...]) for n in names}


def lib_forward(layer, params, x, segment, positions, modality):
    """(y, summed losses) of the layer with `params` set (a function jax.grad can take;
    jitted where it runs alone: one compiled program instead of hundreds of eager ops)."""
    graphdef, state = nnx.split(layer)
    state = jax.tree.map(lambda a: a, state)  # a copy whose leaves take the given values
    nnx.replace_by_pure_dict(state, {**nnx.to_pure_dict(state), **params})
    y, aux = nnx.merge(graphdef, state)(jnp.asarray(x), context(segment, positions, modality))
    return y, sum(aux.get("losses", {}).values())


def f64(params):
    return {k: v.astype(np.float64) for k, v in params.items()}


MOH_CFG = layer_cfg(n_heads=8, init_std=0.3, moh=MoHConfig(shared_heads=2, top_k=2))
SWITCH_CFG = layer_cfg(n_heads=2, init_std=0.3, switchhead=SwitchHeadConfig(experts=3, top_k=2))
