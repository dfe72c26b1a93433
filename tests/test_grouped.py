"""Grouped expert compute (model/grouped.py): the tile scan and its hand-written VJP against a
per-row NumPy-style oracle, unused tiles, and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma_jax.model.grouped import grouped_swiglu
from moma_jax.model.layers import swiglu

TILE, D, F, E = 4, 6, 10, 4  # expert 3 gets no tile


def case(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    tile_expert = np.array([2, 2, 0, -1, 1, -1], np.int32)  # unused tiles between used ones
    x = rng.normal(size=(len(tile_expert) * TILE, D)).astype(np.float32)
    w = [rng.normal(size=s).astype(np.float32) * 0.3 for s in ((E, D, F), (E, D, F), (E, F, D))]
    return jnp.asarray(x, dtype), jnp.asarray(tile_expert), [jnp.asarray(a, dtype) for a in w]


def oracle(x, tile_expert, w):
    """Row by row: the SwiGLU of the row's tile's expert; 0 for rows of unused tiles."""
    rows = []
    for r in range(x.shape[0]):
        e = int(tile_expert[r // TILE])
        rows.append(jnp.zeros(D) if e < 0 else swiglu(x[r], w[0][e], w[1][e], w[2][e]))
    return jnp.stack(rows)


def test_forward_matches_per_row_oracle():
    x, tile_expert, w = case()
    got = jax.jit(grouped_swiglu, static_argnums=5)(x, tile_expert, *w, TILE)
    np.testing.assert_allclose(got, oracle(x, tile_expert, w), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[3 * TILE : 4 * TILE] == 0.0)


def test_gradient_matches_autodiff_of_oracle():
    x, tile_expert, w = case(1)
    probe = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)

    def loss(fn, x, *w):
        return jnp.sum(jnp.sin(fn(x, *w)) * probe)

    def grouped(x, *w):
        return grouped_swiglu(x, tile_expert, *w, TILE)

    def reference(x, *w):
        return oracle(x, tile_expert, w)

    argnums = (0, 1, 2, 3)
    got = jax.jit(jax.grad(lambda x, *w: loss(grouped, x, *w), argnums=argnums))(x, *w)
    want = jax.grad(lambda x, *w: loss(reference, x, *w), argnums=argnums)(x, *w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # An expert no tile uses gets exactly zero gradient; rows of unused tiles too.
    for g in got[1:]:
        np.testing.assert_array_equal(np.asarray(g)[3], 0.0)
    np.testing.assert_array_equal(np.asarray(got[0])[3 * TILE : 4 * TILE], 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16])
def test_low_precision_inputs_keep_their_dtype(dtype):
    x, tile_expert, w = case(3, dtype)
    y = grouped_swiglu(x, tile_expert, *w, TILE)
    assert y.dtype == dtype
    grads = jax.grad(
        lambda *w: jnp.sum(grouped_swiglu(x, tile_expert, *w, TILE)), argnums=(0, 1, 2)
    )(*w)
    assert all(g.dtype == dtype for g in grads)
    want = oracle(x.astype(jnp.float32), tile_expert, [a.astype(jnp.float32) for a in w])
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=0.05, atol=0.05)
