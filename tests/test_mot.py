"""Mixture-of-Transformers block: dense equivalence per modality, a NumPy reference, untied
gradients, and the parameter count of a whole MoT model."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moma_jax.config import ModelConfig
from moma_jax.flops import count_params
from moma_jax.modality import N_MODALITIES
from moma_jax.model import Transformer
from moma_jax.model.attention import segment_causal_mask
from moma_jax.model.block import Block
from moma_jax.model.context import Context
from moma_jax.model.kinds import build_layer
from moma_jax.model.mot import UntiedAttention

CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, ffn_hidden=24)
SEG = [1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0]  # two documents and padding in one row
MOD = [0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0]


def _build(make: Callable[[], nnx.Module], seed: int, std: float = 0.02) -> Any:
    """A module built abstractly and filled from NumPy (eager NNX init compiles every small op
    and is slow on CPU): weights normal(std); norm scales 1 + 0.3 normal and biases 0.3 normal,
    so the tests see which norm parameters a token uses."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        z = rng.normal(size=leaf.shape)
        value = 1 + 0.3 * z if "scale" in name else 0.3 * z if "bias" in name else std * z
        return value.astype(leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _mot(cfg: ModelConfig, seed: int = 0) -> Any:
    block = _build(lambda: build_layer(cfg, "mot", nnx.Rngs(0)), seed)
    assert isinstance(block, Block) and isinstance(block.attn, UntiedAttention)
    return block


def _ctx(seg_rows, mod_rows) -> Context:
    seg = np.asarray(seg_rows, np.int32)
    pos = np.zeros_like(seg)
    for i in range(1, seg.shape[1]):
        pos[:, i] = np.where(seg[:, i] == seg[:, i - 1], pos[:, i - 1] + 1, 0)
    return Context(
        positions=jnp.asarray(pos),
        segment_ids=jnp.asarray(seg),
        modality=jnp.asarray(mod_rows, jnp.int8),
        attn_mask=jax.jit(segment_causal_mask)(seg),
        routing_key=jax.random.key(0),
    )


def _x(cfg: ModelConfig, seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(2, len(SEG), cfg.d_model)), "f4")


@jax.jit(static_argnums=0)
def _apply(graphdef, state, x_BxLxD, ctx):
    return nnx.merge(graphdef, state)(x_BxLxD, ctx)


def _forward(layer: nnx.Module, x_BxLxD: jax.Array, ctx: Context):
    return _apply(*nnx.split(layer), x_BxLxD, ctx)


def _dense_copy(cfg: ModelConfig, mot: Any, m: int) -> Any:
    """A dense `Block` holding modality m's slice of the MoT weights."""
    dense = _build(lambda: build_layer(cfg, "dense", nnx.Rngs(0)), seed=99)
    copies = [
        (dense.attn.wq_DxHxDh, mot.attn.wq_MxDxHxDh),
        (dense.attn.wk_DxHxDh, mot.attn.wk_MxDxHxDh),
        (dense.attn.wv_DxHxDh, mot.attn.wv_MxDxHxDh),
        (dense.attn.wo_HxDhxD, mot.attn.wo_MxHxDhxD),
        (dense.attn_norm.scale, mot.attn_norm.scale_MxD),
        (dense.ffn_norm.scale, mot.ffn_norm.scale_MxD),
        (dense.ffn.w_gate_DxF, mot.ffn.w_gate_MxDxF),
        (dense.ffn.w_up_DxF, mot.ffn.w_up_MxDxF),
        (dense.ffn.w_down_FxD, mot.ffn.w_down_MxFxD),
    ]
    if cfg.qk_norm:
        for dn, mn in ((dense.attn.q_norm, mot.attn.q_norm), (dense.attn.k_norm, mot.attn.k_norm)):
            copies += [(dn.scale, mn.scale_MxDh), (dn.bias, mn.bias_MxDh)]
    for dst, src in copies:
        assert dst.shape == src.shape[1:]
        dst[...] = np.asarray(src[...])[m]
    return dense


@pytest.mark.parametrize("norm_order", ["pre", "post"])
@pytest.mark.parametrize("m", range(N_MODALITIES))
def test_one_modality_equals_dense_block_with_that_slice(norm_order, m):
    cfg = dataclasses.replace(CFG, norm_order=norm_order)
    mot = _mot(cfg, seed=m)
    x = _x(cfg, seed=1)
    ctx = _ctx([SEG, SEG], np.full((2, len(SEG)), m))
    got, aux = _forward(mot, x, ctx)
    want, _ = _forward(_dense_copy(cfg, mot, m), x, ctx)
    assert aux == {}
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- plain NumPy (float64) reference of the MoT block ----


def _np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _np_layer_norm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def _np_rope(x_HxK, pos, theta):
    half = x_HxK.shape[-1] // 2
    ang = pos * theta ** (-np.arange(half) / half)
    a, b = x_HxK[:, :half], x_HxK[:, half:]
    return np.concatenate(
        [a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1
    )


def _np_mot_row(cfg, w, x_LxD, seg, pos, mod):
    """One row, token by token: each token uses its own modality's weights."""
    eps, length = cfg.norm_eps, len(seg)

    def silu(z):
        return z / (1 + np.exp(-z))

    def attn(a_LxD):
        q, k, v = (
            np.stack([np.einsum("d,dhk->hk", a_LxD[t], w[n][mod[t]]) for t in range(length)])
            for n in "qkv"
        )
        for t in range(length):
            if cfg.qk_norm:
                mt = mod[t]
                q[t] = _np_layer_norm(q[t], w["qs"][mt], w["qb"][mt], eps)
                k[t] = _np_layer_norm(k[t], w["ks"][mt], w["kb"][mt], eps)
            q[t], k[t] = (
                _np_rope(q[t], pos[t], cfg.rope_theta),
                _np_rope(k[t], pos[t], cfg.rope_theta),
            )
        out = np.zeros((length, cfg.d_model))
        for i in range(length):
            seen = [j for j in range(i + 1) if seg[j] == seg[i]]
            s = np.einsum("hk,jhk->hj", q[i], k[seen]) / np.sqrt(q.shape[-1])
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[i] = np.einsum("hj,jhk,hkd->d", p, v[seen], w["o"][mod[i]])
        return out

    def ffn(a_LxD):
        rows = []
        for t in range(length):
            mt = mod[t]
            h = silu(a_LxD[t] @ w["gate"][mt]) * (a_LxD[t] @ w["up"][mt])
            rows.append(h @ w["down"][mt])
        return np.stack(rows)

    def norm(a_LxD, name):
        return np.stack([_np_rms(a_LxD[t], w[name][mod[t]], eps) for t in range(length)])

    if cfg.norm_order == "post":
        h = x_LxD + norm(attn(x_LxD), "attn_norm")
        return h + norm(ffn(h), "ffn_norm")
    h = x_LxD + attn(norm(x_LxD, "attn_norm"))
    return h + ffn(norm(h, "ffn_norm"))


@pytest.mark.parametrize("norm_order,qk_norm", [("post", True), ("pre", True), ("post", False)])
def test_mixed_sequence_matches_numpy_reference(norm_order, qk_norm):
    cfg = dataclasses.replace(CFG, norm_order=norm_order, qk_norm=qk_norm)
    mot = _mot(cfg, seed=3)
    mod_rows = [MOD, [1 - m for m in MOD]]
    ctx = _ctx([SEG, SEG], mod_rows)
    x = _x(cfg, seed=4)
    got, _ = _forward(mot, x, ctx)

    def f64(v):
        return np.asarray(v[...], np.float64)

    a = mot.attn
    w = {
        "q": f64(a.wq_MxDxHxDh),
        "k": f64(a.wk_MxDxHxDh),
        "v": f64(a.wv_MxDxHxDh),
        "o": f64(a.wo_MxHxDhxD),
        "attn_norm": f64(mot.attn_norm.scale_MxD),
        "ffn_norm": f64(mot.ffn_norm.scale_MxD),
        "gate": f64(mot.ffn.w_gate_MxDxF),
        "up": f64(mot.ffn.w_up_MxDxF),
        "down": f64(mot.ffn.w_down_MxFxD),
    }
    if qk_norm:
        w |= {
            "qs": f64(a.q_norm.scale_MxDh),
            "qb": f64(a.q_norm.bias_MxDh),
            "ks": f64(a.k_norm.scale_MxDh),
            "kb": f64(a.k_norm.bias_MxDh),
        }
    pos = np.asarray(ctx.positions)
    for b in range(2):
        want = _np_mot_row(cfg, w, np.asarray(x[b], np.float64), SEG, pos[b], mod_rows[b])
        np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm_order", ["pre", "post"])
@pytest.mark.parametrize("present", range(N_MODALITIES))
def test_absent_modality_gets_exactly_zero_gradient(norm_order, present):
    cfg = dataclasses.replace(CFG, norm_order=norm_order)
    graphdef, params = nnx.split(_mot(cfg, seed=5))
    x = _x(cfg, seed=6)
    ctx = _ctx([SEG, SEG], np.full((2, len(SEG)), present))

    def loss(p):
        y, _ = nnx.merge(graphdef, p)(x, ctx)
        return jnp.sum(jnp.sin(y))

    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == 13  # q k v o, 2 x QK-norm (scale, bias), 2 RMSNorms, gate up down
    for path, g in leaves:
        g = np.asarray(g)
        assert g.shape[0] == N_MODALITIES, path
        for m in range(N_MODALITIES):
            if m == present:
                assert np.abs(g[m]).max() > 0, (path, m)
            else:
                assert not g[m].any(), (path, m)


def test_mot_transformer_has_twice_the_dense_layer_parameters():
    """Total = embeddings + final norm + n_layers * M * (dense layer's parameters)."""

    def abstract_count(cfg):
        return count_params(nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))))

    cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=4, n_heads=4)
    d, f, dh = cfg.d_model, cfg.resolved_ffn_hidden, cfg.resolved_head_dim
    hk = cfg.n_heads * dh
    dense_layer = 4 * d * hk + 3 * d * f + 2 * d + 2 * 2 * dh  # + 2 RMSNorms + QK LayerNorms
    outside = 2 * cfg.vocab_size * d + d  # untied embedding and head, final RMSNorm
    dense = abstract_count(cfg)
    mot = abstract_count(dataclasses.replace(cfg, layer_pattern=("mot",)))
    assert dense == outside + cfg.n_layers * dense_layer
    assert mot == outside + cfg.n_layers * N_MODALITIES * dense_layer
    assert mot == N_MODALITIES * (dense - outside) + outside


def test_mot_transformer_runs_a_mixed_batch():
    cfg = dataclasses.replace(CFG, layer_pattern=("mot",))
    graphdef, state = nnx.split(_build(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), seed=8))
    ctx = _ctx([SEG], [MOD])
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, cfg.vocab_size, (1, len(SEG))))
    fn = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
    logits, aux = fn(state, tokens, ctx.segment_ids, ctx.positions, ctx.modality)
    assert logits.shape == (1, len(SEG), cfg.vocab_size) and np.isfinite(logits).all()
    assert aux == {"losses": {}, "metrics": {}}


def _masked(fn_m, modality_BxL):
    """The masked reference: every modality's result for every token, each token keeping its
    own (`jnp.where`), as the layer ran before sorting (M x the ideal FLOPs)."""
    out = None
    for m in range(N_MODALITIES):
        y = fn_m(m)
        keep = (modality_BxL == m).reshape(modality_BxL.shape + (1,) * (y.ndim - 2))
        out = jnp.where(keep, y, jnp.zeros_like(y) if out is None else out)
    return out


def _masked_block(mot, x, ctx):
    """The MoT block computed by masking, from the block's own weights and norms."""
    from moma_jax.model.attention import attend
    from moma_jax.model.layers import swiglu

    mod, a = ctx.modality, mot.attn
    w = {n: getattr(a, n)[...] for n in ("wq_MxDxHxDh", "wk_MxDxHxDh", "wv_MxDxHxDh")}

    def attn(h):
        q, k, v = (
            _masked(lambda m, w=w[n]: jnp.einsum("bld,dhk->blhk", h, w[m]), mod)
            for n in ("wq_MxDxHxDh", "wk_MxDxHxDh", "wv_MxDxHxDh")
        )
        qk = None if a.q_norm is None else (a.q_norm, a.k_norm)
        o = attend(q, k, v, ctx, qk, a.rope_theta)
        return _masked(lambda m: jnp.einsum("blhk,hkd->bld", o, a.wo_MxHxDhxD[...][m]), mod)

    f = mot.ffn
    weights = (f.w_gate_MxDxF[...], f.w_up_MxDxF[...], f.w_down_MxFxD[...])

    def ffn(h):
        return _masked(lambda m: swiglu(h, *(wt[m] for wt in weights)), mod)

    if mot.post_norm:
        h = x + mot.attn_norm(attn(x), ctx)
        return h + mot.ffn_norm(ffn(h), ctx)
    h = x + attn(mot.attn_norm(x, ctx))
    return h + ffn(mot.ffn_norm(h, ctx))


@pytest.mark.parametrize("shares", [(), (0.6, 0.4), (0.95, 0.05)])
def test_sorted_equals_masked_forward_and_gradient(shares):
    """The sorted layer (first rows sized by the shares, slabs for the rest) computes what the
    masked layer computes, and its gradients; with shares that fit the batch or not at all."""
    moe = dataclasses.replace(CFG.moe, modality_shares=shares, tile_rows=2)
    cfg = dataclasses.replace(CFG, norm_order="post", moe=moe)
    mot = _mot(cfg, seed=11)
    x = _x(cfg, 11)
    ctx = _ctx([SEG, SEG[::-1]], [MOD, MOD[::-1]])
    graphdef, params = nnx.split(mot)
    probe = jnp.asarray(np.random.default_rng(12).normal(size=x.shape), jnp.float32)

    def loss(fn, p, x):
        return jnp.sum(jnp.sin(fn(nnx.merge(graphdef, p), x)) * probe)

    def sorted_fn(block, x):
        return block(x, ctx)[0]

    def masked_fn(block, x):
        return _masked_block(block, x, ctx)

    np.testing.assert_allclose(
        jax.jit(lambda x: sorted_fn(mot, x))(x), masked_fn(mot, x), rtol=1e-5, atol=1e-6
    )
    got = jax.jit(jax.grad(lambda p, x: loss(sorted_fn, p, x), argnums=(0, 1)))(params, x)
    want = jax.grad(lambda p, x: loss(masked_fn, p, x), argnums=(0, 1))(params, x)
    # Float32 sums in another order (weight gradients add up every token): ~1e-6 apart.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), got, want)
