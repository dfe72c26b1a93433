"""The train step: gradient accumulation is exact, the schedule has the paper's shape."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moma_jax import registry
from moma_jax.config import ModelConfig
from moma_jax.sharding import make_mesh
from moma_jax.train.state import init_state, lr_schedule, make_optimizer
from moma_jax.train.step import make_train_step


def test_schedule_warms_up_then_decays_to_one_percent():
    cfg = registry.get("dense_90m").optim
    lr = lr_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(2000)) == pytest.approx(0.5e-4)
    assert float(lr(4000)) == pytest.approx(1e-4)
    midway = 4000 + (160_000 - 4000) // 2
    assert float(lr(midway)) == pytest.approx((1e-4 + 1e-6) / 2, rel=1e-4)
    assert float(lr(160_000)) == pytest.approx(1e-6)


def test_gradient_accumulation_equals_full_batch():
    base = registry.get("dense_tiny")
    model = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2)
    results = []
    rng = np.random.default_rng(0)
    seg = np.repeat(np.array([[1] * 10 + [2] * 4 + [0] * 2]), 4, axis=0)
    batch = {
        "tokens": jnp.asarray(rng.integers(0, 64, size=(4, 16)), jnp.int32),
        "modality": jnp.asarray(rng.integers(0, 2, size=(4, 16)), jnp.int32),
        "segment_ids": jnp.asarray(seg, jnp.int32),
        "positions": jnp.asarray(np.tile(np.r_[np.arange(10), np.arange(4), 0, 1], (4, 1))),
    }
    batch["segment_ids"] = batch["segment_ids"].at[1, 3:].set(0)  # uneven counts per row
    for micro in (1, 4):
        cfg = dataclasses.replace(
            base,
            model=model,
            data=dataclasses.replace(base.data, batch_size=4, micro_batches=micro),
        )
        tx = make_optimizer(cfg.optim)
        graphdef, init_fn, _, _ = init_state(cfg, tx, make_mesh(cfg.mesh))
        state = init_fn()
        state = dataclasses.replace(state, step=state.step + 10)  # past warm-up's lr = 0
        new_state, metrics = jax.jit(make_train_step(graphdef, cfg, tx))(state, batch)
        results.append((new_state.params, metrics))
    (p1, m1), *others = results
    for p, m in others:
        np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-6)
        np.testing.assert_allclose(m["grad_norm"], m1["grad_norm"], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p, p1)
