"""Model numerics against independent references and properties that must hold."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moma_jax.config import ModelConfig
from moma_jax.losses import loss_sums, means_from_sums, target_mask
from moma_jax.model import Transformer
from moma_jax.model.attention import segment_causal_mask
from moma_jax.model.context import Context
from moma_jax.model.layers import rope

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, z_loss_weight=1e-4)


def test_segment_causal_mask_hand_example():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],  # padding sees only padding
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(np.asarray(segment_causal_mask(seg))[0, 0], expected)


def test_rope_matches_numpy_rotation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 2, 8)).astype(np.float32)
    pos = np.array([[0, 5, 9]])
    out = np.asarray(rope(jnp.asarray(x), jnp.asarray(pos), 10_000.0))
    half = 4
    for t in range(3):
        for i in range(half):
            theta = pos[0, t] * 10_000.0 ** (-i / half)
            c, s = np.cos(theta), np.sin(theta)
            a, b = x[0, t, :, i], x[0, t, :, i + half]
            np.testing.assert_allclose(out[0, t, :, i], a * c - b * s, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(out[0, t, :, i + half], b * c + a * s, rtol=1e-5, atol=1e-5)


def test_loss_sums_against_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, size=(2, 5))
    seg = np.array([[1, 1, 1, 2, 2], [1, 1, 0, 0, 0]])
    mod = np.array([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]])
    batch = {
        "tokens": jnp.asarray(tokens),
        "segment_ids": jnp.asarray(seg),
        "modality": jnp.asarray(mod),
    }
    got = jax.tree.map(float, loss_sums(jnp.asarray(logits), batch, 1e-3))
    ce: dict[int, list[float]] = {0: [], 1: []}
    zs = []
    for b in range(2):
        for t in range(4):
            if seg[b, t + 1] == seg[b, t] and seg[b, t + 1] > 0:
                row = logits[b, t].astype(np.float64)
                lse = np.log(np.exp(row).sum())
                ce[mod[b, t + 1]].append(lse - row[tokens[b, t + 1]])
                zs.append(1e-3 * lse**2)
    assert got["count"] == 4 and got["count_text"] == len(ce[0]) and got["count_image"] == 3
    np.testing.assert_allclose(got["ce_text"], sum(ce[0]), rtol=1e-5)
    np.testing.assert_allclose(got["ce_image"], sum(ce[1]), rtol=1e-5)
    np.testing.assert_allclose(got["z"], sum(zs), rtol=1e-5)
    means = jax.tree.map(float, means_from_sums(loss_sums(jnp.asarray(logits), batch, 1e-3)))
    np.testing.assert_allclose(means["loss"], (sum(ce[0]) + sum(ce[1])) / 4, rtol=1e-5)
    assert target_mask(jnp.asarray(seg)).shape == (2, 4)


def jitted(model):
    """The model's forward pass under jax.jit (eager NNX dispatches op by op and is slow)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, *args: nnx.merge(graphdef, st)(*args))
    return lambda *args: fn(state, *args)


def _inputs(seg_row):
    seg = jnp.asarray([seg_row], jnp.int32)
    pos = np.zeros_like(np.asarray(seg))
    for i in range(1, seg.shape[1]):
        pos[0, i] = pos[0, i - 1] + 1 if seg_row[i] == seg_row[i - 1] else 0
    return seg, jnp.asarray(pos)


@pytest.mark.parametrize("norm_order", ["pre", "post"])
def test_documents_in_one_row_do_not_interact(norm_order):
    """A packed row's logits equal those of each document run on its own."""
    cfg = dataclasses.replace(CFG, norm_order=norm_order)
    model = jitted(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (1, 9), 0, cfg.vocab_size)
    seg, pos = _inputs([1, 1, 1, 1, 2, 2, 2, 0, 0])
    mod = jnp.zeros_like(tokens)
    packed, _ = model(tokens, seg, pos, mod)
    first, _ = model(tokens[:, :4], jnp.ones((1, 4), jnp.int32), jnp.arange(4)[None], mod[:, :4])
    second, _ = model(tokens[:, 4:7], jnp.ones((1, 3), jnp.int32), jnp.arange(3)[None], mod[:, :3])
    np.testing.assert_allclose(packed[:, :4], first, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[:, 4:7], second, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unroll", [1, 0])
def test_scan_stack_equals_layers_applied_one_by_one(unroll):
    """The scanned stack (one unit per scan step, or unrolled) equals an explicit Python loop
    over the stacked layer weights."""
    model = Transformer(dataclasses.replace(CFG, scan_unroll=unroll), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 6), 0, CFG.vocab_size)
    seg, pos = jnp.ones((2, 6), jnp.int32), jnp.broadcast_to(jnp.arange(6), (2, 6))
    logits, _ = jitted(model)(tokens, seg, pos, jnp.zeros_like(tokens))
    graphdef, state = nnx.split(model.units)
    ctx = Context(
        positions=pos,
        segment_ids=seg,
        modality=jnp.zeros_like(tokens),
        attn_mask=segment_causal_mask(seg),
        routing_key=jax.random.key(0),
    )
    x = model.embed_VxD[...][tokens]
    for i in range(CFG.n_layers):
        unit = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
        x, _ = unit(x, ctx)
    manual = jnp.einsum("bld,dv->blv", model.final_norm(x), model.head_DxV[...])
    np.testing.assert_allclose(logits, manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_keep_gradients(remat):
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, CFG.vocab_size)
    batch = {
        "tokens": tokens,
        "segment_ids": jnp.ones_like(tokens),
        "positions": jnp.broadcast_to(jnp.arange(8), (2, 8)),
        "modality": jnp.zeros_like(tokens),
    }

    def grads(cfg):
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))

        def loss(p):
            logits, _ = nnx.merge(graphdef, p)(
                batch["tokens"], batch["segment_ids"], batch["positions"], batch["modality"]
            )
            return loss_sums(logits, batch, 0.0)["ce"]

        return jax.jit(jax.grad(loss))(params)

    base, other = grads(CFG), grads(dataclasses.replace(CFG, remat=remat))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), base, other)


def test_compute_dtype_bf16_runs_with_f32_logits():
    cfg = dataclasses.replace(CFG, compute_dtype="bfloat16")
    model = jitted(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((1, 4), jnp.int32)
    logits, _ = model(tokens, jnp.ones_like(tokens), jnp.arange(4)[None], tokens)
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_per_layer_routing_metrics_average_to_the_logged_means():
    """Each layer's routing metrics are logged as layer_{i}/...; their mean over layers is the
    layer-averaged metric, and the layers differ (they route differently)."""
    from moma_jax.config import SparseConfig

    moe = SparseConfig(routing_group_tokens=64, group_experts=(2, 2), modality_shares=(0.7, 0.3))
    cfg = ModelConfig(
        vocab_size=64, d_model=16, n_layers=3, n_heads=2, layer_pattern=("moe",), moe=moe
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    modality = jnp.asarray(rng.random((2, 32)) < 0.3, jnp.int32)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 32)), jnp.int32)
    seg = jnp.ones((2, 32), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(32), (2, 32))
    _, aux = jitted(model)(tokens, seg, pos, modality)
    metrics = aux["metrics"]
    for key in ("moe/text/score_mean", "moe/image/untaken_frac"):
        layers = [float(metrics[f"layer_{i}/{key}"]) for i in range(3)]
        assert np.mean(layers) == pytest.approx(float(metrics[key]), rel=1e-5)
    assert len({float(metrics[f"layer_{i}/moe/text/score_mean"]) for i in range(3)}) == 3
