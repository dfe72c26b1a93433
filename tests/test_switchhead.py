"""SwitchHead (model/switchhead.py, arXiv 2312.07987) against a reference from the paper's
equations (forward in NumPy float64, gradient through the same code in jax.numpy) on a
text-only and an image-heavy batch with two documents and padding in a row, and against a NumPy
transcription of RobertCsordas/switchhead (`attention_expert_cases.py`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_expert_cases import (
    MIXES,
    SWITCH_CFG,
    B,
    D,
    L,
    batch,
    build,
    csordas_switchhead,
    f64,
    lib_forward,
    switchhead_reference,
)

from moma_jax.config import SwitchHeadConfig
from moma_jax.model.switchhead import SwitchHeadAttention


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_switchhead_forward_matches_the_papers_equations(mix):
    layer, params = build(SwitchHeadAttention, SWITCH_CFG)
    x, segment, positions, modality = batch(MIXES[mix])
    y, _ = jax.jit(lambda p: lib_forward(layer, p, x, segment, positions, modality))(params)
    want = switchhead_reference(
        f64(params), x.astype(np.float64), segment, positions, modality, SWITCH_CFG, np
    )
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)


def test_switchhead_gradient_matches_the_papers_equations():
    layer, params = build(SwitchHeadAttention, SWITCH_CFG)
    x, segment, positions, modality = batch(MIXES["image_heavy"], seed=1)
    cotangent = np.random.default_rng(2).normal(size=(B, L, D)).astype(np.float32)
    got = jax.jit(
        jax.grad(
            lambda p: jnp.sum(lib_forward(layer, p, x, segment, positions, modality)[0] * cotangent)
        )
    )(params)
    want = jax.jit(
        jax.grad(
            lambda p: jnp.sum(
                switchhead_reference(
                    p, jnp.asarray(x), segment, positions, modality, SWITCH_CFG, jnp
                )
                * cotangent
            )
        )
    )({k: jnp.asarray(v) for k, v in params.items()})
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-5, err_msg=name)
    # Both modalities' experts and selections learn (an image-heavy batch has text too).
    assert np.all(np.abs(got["w_sel_v_GxDxHxE"]).reshape(2, -1).max(-1) > 0)


def test_switchhead_matches_the_reference_code():
    """One shared group (the reference has no modality groups), no QK-norm (it has none)."""
    cfg = dataclasses.replace(
        SWITCH_CFG, qk_norm=False, switchhead=SwitchHeadConfig(experts=3, top_k=2, groups="shared")
    )
    layer, p = build(SwitchHeadAttention, cfg)
    x, _, _, _ = batch(0.5, seed=4)
    segment, positions = np.ones((B, L), np.int32), np.tile(np.arange(L), (B, 1))
    text = np.zeros((B, L), np.int32)
    y, _ = jax.jit(lambda q: lib_forward(layer, q, x, segment, positions, text))(p)
    h, e = cfg.n_heads, cfg.switchhead.experts
    p = f64(p)
    want = csordas_switchhead(
        x.astype(np.float64),
        p["wq_DxHxDh"].reshape(D, -1).T,
        p["wk_DxHxDh"].reshape(D, -1).T,
        np.stack([p["wv_GxExDxHxDh"][0, j % e, :, j // e] for j in range(h * e)]),
        np.stack([p["wo_GxExHxDhxD"][0, j % e, j // e] for j in range(h * e)]),
        np.stack([p["w_sel_v_GxDxHxE"][0, :, j // e, j % e] for j in range(h * e)]),
        np.stack([p["w_sel_o_GxDxHxE"][0, :, j // e, j % e] for j in range(h * e)]),
        h, e, cfg.switchhead.top_k,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
