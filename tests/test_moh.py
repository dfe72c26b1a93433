"""MoH (model/moh.py, arXiv 2410.11842) against a reference from the paper's equations
(forward in NumPy float64 with its balance loss, gradient through the same code in jax.numpy)
on a text-only and an image-heavy batch with two documents and padding in a row, and against a
NumPy transcription of SkyworkAI/MoH's gates and loss (`attention_expert_cases.py`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_expert_cases import (
    MIXES,
    MOH_CFG,
    B,
    D,
    L,
    batch,
    build,
    f64,
    lib_forward,
    moh_reference,
    skywork_moh_gates,
)

from moma_jax.config import MoHConfig
from moma_jax.model.moh import MoHAttention, moh_gates


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_moh_forward_and_balance_loss_match_the_papers_equations(mix):
    layer, params = build(MoHAttention, MOH_CFG)
    x, segment, positions, modality = batch(MIXES[mix])
    y, loss = jax.jit(lambda p: lib_forward(layer, p, x, segment, positions, modality))(params)
    want_y, want_loss = moh_reference(
        f64(params), x.astype(np.float64), segment, positions, modality, MOH_CFG, np
    )
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)


def test_moh_gradient_matches_the_papers_equations():
    layer, params = build(MoHAttention, MOH_CFG)
    x, segment, positions, modality = batch(MIXES["image_heavy"], seed=1)
    cotangent = np.random.default_rng(2).normal(size=(B, L, D)).astype(np.float32)

    def objective(forward):
        def f(p):
            y, loss = forward(p)
            return jnp.sum(y * cotangent) + 10.0 * loss  # the balance loss's gradient shows

        return f

    got = jax.jit(
        jax.grad(objective(lambda p: lib_forward(layer, p, x, segment, positions, modality)))
    )(params)
    ref = objective(
        lambda p: moh_reference(p, jnp.asarray(x), segment, positions, modality, MOH_CFG, jnp)
    )
    want = jax.jit(jax.grad(ref))({k: jnp.asarray(v) for k, v in params.items()})
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-5, err_msg=name)
    assert np.abs(got["w_router_GxDxC"]).max() > 0  # the routers learn through the gates


def test_moh_scaled_gates_and_loss_match_the_reference_code():
    cfg = dataclasses.replace(
        MOH_CFG, moh=MoHConfig(shared_heads=3, top_k=2, groups="shared", gates="scaled")
    )
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, D))
    s, r = 3, 5
    wg_1, wg, wg_0 = (rng.normal(size=(n, D)) * 0.5 for n in (s, r, 2))
    want_gates, want_loss = skywork_moh_gates(x, wg, wg_0, wg_1, s, 2)
    logits = np.concatenate([x @ wg_1.T, x @ wg.T, x @ wg_0.T], -1)[None]
    gates, f, p = jax.jit(moh_gates, static_argnums=(3, 4, 5, 6))(
        jnp.asarray(logits, jnp.float32), jnp.zeros((1, 20), jnp.int32), jnp.ones((1, 20)),
        s, 1, cfg.moh.top_k, "scaled",
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(gates)[0], want_gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(np.sum(f * p)) * r, want_loss, rtol=1e-5)
