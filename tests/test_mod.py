"""Mixture-of-Depths: selection against NumPy, skipped tokens bit-identical, attention among the
selected tokens only, executed FLOPs that drop with the capacity, and a training run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moma_jax import registry
from moma_jax.config import ModConfig, ModelConfig, SparseConfig
from moma_jax.model.attention import segment_causal_mask
from moma_jax.model.context import Context
from moma_jax.model.kinds import build_layer, layer_flops
from moma_jax.model.mod import select


def numpy_select(logits, valid, k):
    out_index, out_chosen = [], []
    for lg, va in zip(logits, valid, strict=True):
        order = sorted(range(len(lg)), key=lambda i: (-(lg[i] if va[i] else -np.inf), i))[:k]
        idx = sorted(order)
        out_index.append(idx)
        out_chosen.append([bool(va[i]) for i in idx])
    return np.asarray(out_index), np.asarray(out_chosen)


@pytest.mark.parametrize("n_valid", [32, 20, 5])
def test_selection_matches_numpy(n_valid):
    rng = np.random.default_rng(n_valid)
    logits = rng.normal(size=(3, 32)).astype(np.float32)
    valid = np.zeros((3, 32), bool)
    for g in range(3):
        valid[g, rng.permutation(32)[:n_valid]] = True
    index, chosen = select(jnp.asarray(logits), jnp.asarray(valid), 8)
    ref_index, ref_chosen = numpy_select(logits, valid, 8)
    np.testing.assert_array_equal(np.asarray(chosen), ref_chosen)
    # Where fewer than k are real the padding slots' indices are arbitrary; the real ones match.
    np.testing.assert_array_equal(np.asarray(index)[ref_chosen], ref_index[ref_chosen])
    assert not np.any(np.asarray(chosen) & ~np.take_along_axis(valid, np.asarray(index), 1))


def _layer(kind="mod_dense", capacity=0.25, z_loss=0.0):
    moe = SparseConfig(routing_group_tokens=64, modality_shares=(0.7, 0.3))
    cfg = ModelConfig(
        vocab_size=32,
        d_model=16,
        n_layers=1,
        n_heads=2,
        layer_pattern=(kind,),
        moe=moe,
        mod=ModConfig(capacity=capacity, router_z_loss_weight=z_loss),
    )
    return cfg, build_layer(cfg, kind, nnx.Rngs(0))


def _ctx(b=2, length=32, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((b, length), np.int32)
    seg[0, 20:] = 2
    seg[1, 28:] = 0  # padding
    pos = np.zeros_like(seg)
    for r in range(b):
        for i in range(1, length):
            pos[r, i] = pos[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] else 0
    seg_j = jnp.asarray(seg)
    return Context(
        segment_ids=seg_j,
        positions=jnp.asarray(pos),
        modality=jnp.asarray(rng.random((b, length)) < 0.3, jnp.int32),
        attn_mask=segment_causal_mask(seg_j),
    )


def _run(layer, x, ctx):
    graphdef, state = nnx.split(layer)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, ctx)[0])(state, x)


@pytest.mark.parametrize("kind", ["mod_dense", "mod_moe", "mod_mot"])
def test_skipped_tokens_pass_bit_identical(kind):
    cfg, layer = _layer(kind)
    ctx = _ctx()
    x = jax.random.normal(jax.random.key(1), (2, 32, 16))
    y = np.asarray(_run(layer, x, ctx))
    changed = np.any(y != np.asarray(x), axis=-1)
    assert changed.sum() <= 16  # k = 64 x 0.25 per routing group (the two rows)
    assert changed.sum() >= 12 and not changed[1, 28:].any()  # padding never goes through


def test_attention_sees_only_the_selected_tokens():
    """Changing a skipped token orthogonally to the router (so the same tokens are selected)
    leaves every selected token's output bit-identical: the block attends among the selected
    tokens only, not over a mask of all tokens."""
    cfg, layer = _layer()
    ctx = _ctx()
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 32, 16)))
    y = np.asarray(_run(layer, jnp.asarray(x), ctx))
    selected = np.any(y != x, axis=-1)
    r, i = np.argwhere(~selected & (np.asarray(ctx.segment_ids) > 0))[0]
    w = np.asarray(layer.router_Dx1[...])[:, 0]
    v = np.random.default_rng(0).normal(size=16).astype(np.float32)
    v -= (v @ w) / (w @ w) * w  # no change to the router logit
    x2 = x.copy()
    x2[r, i] += 3.0 * v
    y2 = np.asarray(_run(layer, jnp.asarray(x2), ctx))
    np.testing.assert_array_equal(np.any(y2 != x2, axis=-1), selected)
    np.testing.assert_allclose(y2[selected], y[selected], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(y2[r, i], x2[r, i])


def test_executed_flops_drop_with_the_capacity():
    cfg, _ = _layer()
    for kind in ("dense", "moe", "mot"):
        ideal, executed = layer_flops(cfg, f"mod_{kind}", 256)
        dense_ideal, dense_executed = layer_flops(cfg, kind, 256)
        assert executed < 0.35 * dense_executed and ideal < 0.35 * dense_ideal, kind


def test_mod_moma_trains(tmp_path, data_dir):
    from cli_args import small

    from moma_jax.commands.cli import main

    assert "mod_moma_4t4i_tiny" in registry.names()
    keys = small("model.moe.routing_group_tokens=1024", "run.log_every=1")
    args = ["--exp", "mod_moma_4t4i_tiny", "--workdir", str(tmp_path), "--steps", "2", *keys]
    assert main(args) == 0
    cfg = registry.get("mod_moma_4t4i_tiny")
    assert cfg.model.layer_pattern == ("mod_moe", "moe")
    assert dataclasses.asdict(cfg.model.mod) == {"capacity": 0.25, "router_z_loss_weight": 0.0}


def test_paper_size_mod_moma_matches_the_paper_table():
    """mod_moma_4t4i_1.4b (32 x 2304): ~11.9B parameters (MoMa Table 1) and ideal FLOPs per
    token within 10% of dense_1.4b's (the MoD shapes are FLOP-matched)."""
    from moma_jax.commands.describe import describe

    mod = describe(registry.get("mod_moma_4t4i_1.4b"))
    dense = describe(registry.get("dense_1.4b"))
    assert mod["params_total"] == pytest.approx(11.9e9, rel=0.06)
    assert mod["flops_per_token_ideal"] == pytest.approx(dense["flops_per_token_ideal"], rel=0.10)
    assert [layer["kind"] for layer in mod["layer_plan"]["unit"]] == ["mod_moe", "moe"]


def test_router_z_loss_is_opt_in_and_the_mean_squared_logit():
    """ST-MoE's z-loss on the MoD router (one logit: logsumexp is the logit), over real tokens."""
    ctx, x = _ctx(), jax.random.normal(jax.random.key(2), (2, 32, 16))
    _, off = _layer()
    assert "mod/z_loss" not in off(x, ctx)[1].get("losses", {})
    _, layer = _layer(z_loss=0.5)
    losses = layer(x, ctx)[1]["losses"]
    logits = np.asarray(x) @ np.asarray(layer.router_Dx1[...])[:, 0]
    real = np.asarray(ctx.segment_ids) > 0
    expected = 0.5 * np.sum(logits**2 * real) / real.sum()
    np.testing.assert_allclose(float(losses["mod/z_loss"]), expected, rtol=1e-5)
