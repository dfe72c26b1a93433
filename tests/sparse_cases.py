"""Shared by the routing-method tests (top-p, null experts, shared experts): a small sparse
layer's config, inputs with a modality mix and padding, the layer's forward, and its output and
gradient checked against a test's loop-over-experts oracle."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moma_jax.config import ModelConfig, SparseConfig
from moma_jax.model.context import Context
from moma_jax.model.moe import SparseFFN

SHARES = (0.75, 0.25)
W = ("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD")  # an expert group's stacked weights


def model_cfg(ffn_hidden: int = 0, **moe) -> ModelConfig:
    """d=16, routing groups of 32 tokens, slabs of 8 rows (several per expert, with padding)."""
    sparse = SparseConfig(
        routing_group_tokens=32, modality_shares=SHARES, **{"tile_rows": 8, **moe}
    )
    return ModelConfig(
        vocab_size=64, d_model=16, n_layers=1, n_heads=2, ffn_hidden=ffn_hidden, moe=sparse
    )


def inputs(seed=0, groups=2, n=32, image_share=0.3, padding=3):
    """x [G, N, 16], modality (image with probability `image_share`), segment ids with the
    last `padding` positions of each row padding."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(groups, n, 16)).astype(np.float32)
    modality = (rng.random((groups, n)) < image_share).astype(np.int32)
    segment = np.ones((groups, n), np.int32)
    if padding:
        segment[:, -padding:] = 0
    return x, modality, segment


def swiglu(x, wg, wu, wd):
    return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd


def run_layer(layer, x, modality, segment, causal=False):
    """(y, aux) of the layer (it reads no positions)."""
    segment = jnp.asarray(segment)
    return layer(jnp.asarray(x), Context(segment, segment, jnp.asarray(modality), causal=causal))


def assert_output_matches(cfg: ModelConfig, oracle, image_share: float) -> None:
    """The jitted layer's output equals `oracle(layer, cfg, x, modality, segment)`."""
    layer = SparseFFN(cfg, rngs=nnx.Rngs(0))
    x, modality, segment = inputs(image_share=image_share)
    got = jax.jit(lambda x: run_layer(layer, x, modality, segment)[0])(x)
    np.testing.assert_allclose(got, oracle(layer, cfg, x, modality, segment), rtol=1e-5, atol=1e-5)


def assert_gradient_matches(cfg: ModelConfig, oracle) -> None:
    """The layer's parameter gradient (of sum(sin(y))) equals the oracle's, whose selection is
    made from the concrete layer; the routers reach the loss only through the gates, so their
    gradients are checked too."""
    layer = SparseFFN(cfg, rngs=nnx.Rngs(1))
    x, modality, segment = inputs(seed=1)
    graphdef, params = nnx.split(layer)

    def loss(fn, p):
        return jnp.sum(jnp.sin(fn(nnx.merge(graphdef, p))))

    got = jax.jit(jax.grad(lambda p: loss(lambda m: run_layer(m, x, modality, segment)[0], p)))(
        params
    )
    want = jax.grad(lambda p: loss(lambda m: oracle(m, cfg, x, modality, segment, layer), p))(
        params
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5), got, want)


def assert_routes_causally_as_trained(layer, cfg: ModelConfig) -> None:
    """A per-token router: causal routing gives the teacher-forced output, it needs no aux
    router, and tokens after position 20 change no earlier output, teacher-forced or causal."""
    x, modality, segment = inputs(seed=3)
    forward = jax.jit(lambda x, c: run_layer(layer, x, modality, segment, c)[0], static_argnums=1)
    teacher, causal = forward(x, False), forward(x, True)
    np.testing.assert_allclose(causal, teacher, rtol=1e-6, atol=1e-6)
    later = x.copy()
    later[:, 20:] = np.random.default_rng(9).normal(size=later[:, 20:].shape)
    np.testing.assert_array_equal(forward(later, False)[:, :20], teacher[:, :20])
    np.testing.assert_array_equal(forward(later, True)[:, :20], causal[:, :20])
    assert not cfg.moe.needs_aux_routers


def assert_flop_matched_without_aux_stage(experiment: str) -> None:
    """`{experiment}_tiny`'s ideal training FLOPs per token are within 5% of dense_tiny's (the
    per-token routers' ideal count assumes `capacity` experts per token; the measured count is
    logged) and no aux-router stage is registered for it (it routes causally as trained)."""
    from moma_jax import registry
    from moma_jax.model.kinds import train_flops_per_token
    from moma_jax.runtime import resolve_shares

    cfg = resolve_shares(registry.get(f"{experiment}_tiny"))
    dense = resolve_shares(registry.get("dense_tiny"))
    ratio = train_flops_per_token(cfg.model, 256) / train_flops_per_token(dense.model, 256)
    assert abs(ratio - 1) < 0.05, ratio
    assert not cfg.model.moe.needs_aux_routers
    assert not [n for n in registry.names() if n.startswith(f"{experiment}_") and "aux" in n]
