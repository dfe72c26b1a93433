"""LIMoE's per-modality entropy losses (`routing.limoe_entropy_losses`, Mustafa et al. 2022,
arXiv 2206.02770) against NumPy written from the paper's definitions (local: the mean routing
entropy of a modality's tokens; global: the entropy of their mean routing distribution, held
above a threshold), their gradient against finite differences, and their opt-in wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moma_jax import registry
from moma_jax.config import ModelConfig, SparseConfig
from moma_jax.model.context import Context
from moma_jax.model.moe import SparseFFN
from moma_jax.model.routing import limoe_entropy_losses


def np_limoe(logits, modality, eligible, modalities, tau):
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    local = glob = 0.0
    for m in modalities:
        rows = p[eligible & (modality == m)]
        if not len(rows):
            continue
        local += np.mean([-(r * np.log(r)).sum() for r in rows])
        marginal = rows.mean(0)
        glob += max(0.0, tau - (-(marginal * np.log(marginal)).sum()))
    return local, glob


def case(seed, image_share=0.3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3, 20, 8)) * 2
    modality = (rng.random((3, 20)) < image_share).astype(np.int32)
    eligible = rng.random((3, 20)) < 0.9
    return logits, modality, eligible


@pytest.mark.parametrize("image_share, tau", [(0.3, 1.5), (0.3, 2.5), (0.0, 2.0), (1.0, 0.0)])
def test_losses_match_numpy(image_share, tau):
    logits, modality, eligible = case(0, image_share)
    got = limoe_entropy_losses(jnp.asarray(logits), modality, eligible, (0, 1), tau)
    want = np_limoe(logits, modality, eligible, (0, 1), tau)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_gradient_matches_finite_differences():
    logits, modality, eligible = case(1)

    def total(x):
        local, glob = limoe_entropy_losses(x, modality, eligible, (0, 1), 2.5)
        return local + 3.0 * glob

    grad = np.asarray(jax.grad(total)(jnp.asarray(logits, jnp.float32)))
    assert np.abs(grad).max() > 0
    rng, eps = np.random.default_rng(2), 1e-5
    for _ in range(12):
        i = tuple(rng.integers(0, s) for s in logits.shape)
        up, down = logits.copy(), logits.copy()
        up[i] += eps
        down[i] -= eps
        fd = []
        for x in (up, down):
            local, glob = np_limoe(x, modality, eligible, (0, 1), 2.5)
            fd.append(local + 3.0 * glob)
        np.testing.assert_allclose(grad[i], (fd[0] - fd[1]) / (2 * eps), rtol=2e-3, atol=2e-5)


def test_opt_in_on_the_layer_and_the_experiment():
    def losses(**moe):
        sparse = SparseConfig(
            group_experts=(8,), modality_group=(0, 0), routing_group_tokens=32,
            modality_shares=(0.75, 0.25), tile_rows=8, **moe,
        )  # fmt: skip
        cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, moe=sparse)
        layer = SparseFFN(cfg, rngs=nnx.Rngs(0))
        seg = jnp.ones((2, 32), jnp.int32)
        modality = jnp.asarray(np.random.default_rng(0).random((2, 32)) < 0.3, jnp.int32)
        x = jax.random.normal(jax.random.key(0), (2, 32, 16))
        router = np.asarray(layer.groups[0].router_DxE[...], np.float64)  # type: ignore[index]
        logits = np.asarray(x, np.float64) @ router
        want = np_limoe(logits, np.asarray(modality), np.ones((2, 32), bool), (0, 1), 3.0)
        return layer(x, Context(seg, seg, modality))[1]["losses"], want

    assert not any("limoe" in k for k in losses()[0])
    on, (local, glob) = losses(
        limoe_local_weight=0.5, limoe_global_weight=0.25, limoe_global_threshold=3.0
    )
    assert glob > 0  # 3 nats > ln 8: always short of the threshold
    np.testing.assert_allclose(on["moe/text+image/limoe_local"], 0.5 * local, rtol=1e-5)
    np.testing.assert_allclose(on["moe/text+image/limoe_global"], 0.25 * glob, rtol=1e-5)
    moe = registry.get("moe_8x_limoe_tiny").model.moe
    assert moe.limoe_local_weight > 0 and moe.limoe_global_weight > 0


def test_a_global_weight_without_a_threshold_is_refused():
    from moma_jax.config import ConfigError, validate
    from moma_jax.overrides import apply_overrides

    cfg = registry.get("moe_8x_tiny")
    with pytest.raises(ConfigError, match="limoe_global_threshold > 0"):
        validate(apply_overrides(cfg, ["model.moe.limoe_global_weight=0.01"]))
