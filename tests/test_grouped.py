"""Expert compute (model/grouped.py): slabs and the ragged path against a per-slot oracle,
skipped slabs, gradients, and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma_jax.model.grouped import (
    chosen_experts_apply,
    combine_slots,
    ragged_swiglu,
    slab_swiglu,
)
from moma_jax.model.layers import swiglu
from moma_jax.model.routing import Dispatch

G, N, D, F, E, C = 2, 12, 6, 10, 3, 7


def case(seed=0, dtype=jnp.float32, lengths=((5, 2, 0), (3, 7, 1))):
    """Routing groups whose experts hold valid prefixes of the given lengths."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(G, N, D)), dtype)
    token = rng.integers(0, N, size=(G, E, C)).astype(np.int32)
    valid = np.arange(C)[None, None, :] < np.asarray(lengths)[:, :, None]
    gate = np.where(valid, rng.uniform(0.2, 1.0, size=(G, E, C)), 0.0).astype(np.float32)
    dispatch = Dispatch(jnp.asarray(token), jnp.asarray(gate), jnp.asarray(valid))
    shapes = ((E, D, F), (E, D, F), (E, F, D))
    w = [jnp.asarray(rng.normal(size=s) * 0.3, dtype) for s in shapes]
    return x, dispatch, w


def oracle(x, dispatch, w):
    """Slot by slot: y[g, token] += gate * SwiGLU_e(x[g, token]) over valid slots."""
    y = np.zeros((G, N, D))
    for g in range(G):
        for e in range(E):
            for c in range(C):
                if dispatch.valid_ExC[g, e, c]:
                    t = int(dispatch.token_index_ExC[g, e, c])
                    out = swiglu(
                        x[g, t].astype(jnp.float32), *(a[e].astype(jnp.float32) for a in w)
                    )
                    y[g, t] += float(dispatch.gate_ExC[g, e, c]) * np.asarray(out)
    return y


def run_slabs(x, dispatch, w, slab, first=0):
    w_gate, w_up, w_down = w
    return slab_swiglu(x, dispatch, w_gate, w_up, w_down, first, slab)


@pytest.mark.parametrize("first", [0, 2, 7, 9])
@pytest.mark.parametrize("slab", [1, 2, 3, 16])
def test_slabs_match_the_per_slot_oracle(slab, first):
    x, dispatch, w = case()
    y, used = jax.jit(run_slabs, static_argnums=(3, 4))(x, dispatch, w, slab, first)
    np.testing.assert_allclose(y, oracle(x, dispatch, w), rtol=1e-5, atol=1e-6)
    # The first slots always run; the longest prefix (7) decides how many slabs follow.
    first = min(first, C)
    assert int(used) == first + -(-max(7 - first, 0) // slab) * slab


def test_slabs_past_every_prefix_are_skipped():
    x, dispatch, w = case(lengths=((2, 1, 0), (0, 2, 1)))
    y, used = jax.jit(run_slabs, static_argnums=(3, 4))(x, dispatch, w, 2, 1)
    assert int(used) == 1 + 2  # the first slot, then one slab of 2 (of 3)
    np.testing.assert_allclose(y, oracle(x, dispatch, w), rtol=1e-5, atol=1e-6)


def test_gradients_match_autodiff_of_the_oracle_path():
    x, dispatch, w = case(1)
    probe = jnp.asarray(np.random.default_rng(2).normal(size=(G, N, D)), jnp.float32)

    def dense_path(x, *w):  # every slot computed, no slabs, no skipping
        outs = jax.vmap(lambda xg, idx: jax.vmap(swiglu)(xg[idx], *w))(x, dispatch.token_index_ExC)
        return jax.vmap(lambda o, d: combine_slots(o, d, N))(outs, dispatch)

    def loss(fn, x, *w):
        return jnp.sum(jnp.sin(fn(x, *w)) * probe)

    argnums = (0, 1, 2, 3)
    got = jax.jit(
        jax.grad(
            lambda x, *w: loss(lambda *a: run_slabs(a[0], dispatch, a[1:], 3)[0], x, *w), argnums
        )
    )(x, *w)
    want = jax.grad(lambda x, *w: loss(dense_path, x, *w), argnums)(x, *w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_ragged_path_matches_the_oracle_and_its_gradient():
    x, dispatch, w = case(3)

    def ragged(x, *w):
        rows = jax.vmap(lambda xg, idx: xg[idx])(x, dispatch.token_index_ExC).reshape(-1, D)
        expert = jnp.where(dispatch.valid_ExC, jnp.arange(E)[None, :, None], -1).reshape(-1)
        out = ragged_swiglu(rows, expert, *w).reshape(G, E, C, D)
        return jax.vmap(lambda o, d: combine_slots(o, d, N))(out, dispatch)

    np.testing.assert_allclose(ragged(x, *w), oracle(x, dispatch, w), rtol=1e-5, atol=1e-6)
    got = jax.grad(lambda *a: jnp.sum(ragged(*a) ** 2), argnums=(0, 1))(x, *w)
    want = jax.grad(
        lambda *a: jnp.sum(run_slabs(a[0], dispatch, a[1:], 2)[0] ** 2), argnums=(0, 1)
    )(x, *w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_compute_with_float32_combine():
    x, dispatch, w = case(4, jnp.bfloat16)
    y, _ = run_slabs(x, dispatch, w, 2)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, oracle(x, dispatch, w), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("lengths", "ran"),
    [(((5, 2, 0), (3, 7, 1)), 3), (((5, 0, 0), (3, 0, 0)), 1), (((0, 2, 0), (0, 0, 4)), 2),
     (((0, 0, 0), (0, 0, 0)), 0)],
)  # fmt: skip
def test_chosen_experts_run_only_the_experts_some_group_chose(lengths, ran):
    """The decode path: the oracle's sums from a loop over the experts that some routing group
    chose, and no other (its trip count)."""
    x, dispatch, w = case(5, lengths=lengths)
    y, count = jax.jit(chosen_experts_apply, static_argnums=0)(swiglu, x, dispatch, tuple(w))
    assert int(count) == ran
    np.testing.assert_allclose(y, oracle(x, dispatch, w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, run_slabs(x, dispatch, w, 2)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unit", [0, 2])
def test_chosen_experts_read_their_layer_from_the_unit_stack(unit):
    """Decoding hands the loop the weights stacked over the layer units ([U, E, ...],
    `Context.unit`): expert e of layer `unit` reads [unit, e], the oracle's sums with that
    layer's weights; float32 weights are cast to bfloat16 activations as they are read."""
    x, dispatch, w = case(6)
    stacks = [jnp.stack([a * (1.0 + 0.5 * u) for u in range(3)]) for a in w]  # 3 different layers
    layer = [s[unit] for s in stacks]
    run = jax.jit(chosen_experts_apply, static_argnums=0)
    y, count = run(swiglu, x, dispatch, tuple(stacks), jnp.int32(unit))
    assert int(count) == 3
    np.testing.assert_allclose(y, oracle(x, dispatch, layer), rtol=1e-5, atol=1e-6)
    y16, _ = run(swiglu, x.astype(jnp.bfloat16), dispatch, tuple(stacks), jnp.int32(unit))
    assert y16.dtype == jnp.float32
    want16 = oracle(x.astype(jnp.bfloat16), dispatch, [a.astype(jnp.bfloat16) for a in layer])
    np.testing.assert_allclose(y16, want16, rtol=0.05, atol=0.05)
