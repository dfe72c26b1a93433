"""Top-p (dynamic) routing inside modality groups (`routers.TopP`, Huang et al. 2024, arXiv
2403.07652) against NumPy written from the paper's equations: the selection (experts in
descending softmax prob until their mass reaches p), the layer's output and gradient (a loop
over experts with gates P on the selected ones), the dynamic and balance losses; per-token
routing needs no aux router and no token changes an earlier one's output."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sparse_cases
from flax import nnx
from sparse_cases import W, assert_gradient_matches, assert_output_matches, inputs, run_layer

from moma_jax import registry
from moma_jax.config import ConfigError, ModelConfig, validate
from moma_jax.model.moe import SparseFFN
from moma_jax.model.routing import top_p_taken
from moma_jax.overrides import apply_overrides


def np_top_p(probs, p):
    """[N, E] bool: per token, experts sorted by descending prob (ties: lower index first)
    are added while the mass already taken is below p."""
    taken = np.zeros(probs.shape, bool)
    for t, row in enumerate(probs):
        mass = 0.0
        for e in sorted(range(len(row)), key=lambda e: (-row[e], e)):
            if mass >= p:
                break
            taken[t, e] = True
            mass += row[e]
    return taken


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


@pytest.mark.parametrize("p", [0.05, 0.4, 0.7, 1.0])
def test_selection_matches_numpy(p):
    rng = np.random.default_rng(0)
    probs = np_softmax(rng.normal(size=(200, 6)) * 2).astype(np.float32)
    got = np.asarray(jax.jit(top_p_taken, static_argnums=1)(probs, p))
    np.testing.assert_array_equal(got, np_top_p(probs.astype(np.float64), p))
    assert got.sum(1).min() >= 1  # every token takes its top expert
    if p == 1.0:
        assert got.sum(1).mean() > 5  # (float mass may reach 1 a hair early)


def model_cfg(**moe) -> ModelConfig:
    return sparse_cases.model_cfg(routing="top_p", router_score="softmax", **moe)


def oracle(layer, cfg, x, modality, segment, concrete=None):
    """Every expert runs densely on every token; NumPy's top-p selection (from `concrete`'s
    router) times the traced softmax P weights its output; one-expert groups take all."""
    moe, concrete = cfg.moe, concrete or layer
    outs = []
    for xg, mg, sg in zip(x, modality, segment, strict=True):
        y = jnp.zeros_like(xg)
        for g, experts in enumerate(moe.group_experts):
            grp, fixed = getattr(layer, f"group_{g}"), getattr(concrete, f"group_{g}")
            mods = [m for m, gg in enumerate(moe.modality_group) if gg == g]
            eligible = np.isin(mg, mods) & (sg > 0)
            if experts == 1:
                gates = jnp.asarray(eligible[:, None], jnp.float32)
            else:
                probs = np_softmax(np.asarray(xg, np.float64) @ np.asarray(fixed.router_DxE[...]))
                selected = np_top_p(probs, moe.top_p) & eligible[:, None]
                gates = jax.nn.softmax(xg @ grp.router_DxE[...], axis=-1) * selected
            for e in range(experts):
                wg, wu, wd = (getattr(grp, n)[...][e] for n in W)
                y = y + gates[:, e : e + 1] * ((jax.nn.silu(xg @ wg) * (xg @ wu)) @ wd)
        outs.append(y)
    return jnp.stack(outs)


@pytest.mark.parametrize(
    "moe, image_share",
    [
        (dict(group_experts=(4, 4)), 0.3),
        (dict(group_experts=(8,), modality_group=(0, 0)), 0.3),
        (dict(group_experts=(4, 1), top_p=0.7), 0.3),
        (dict(group_experts=(4, 4)), 0.9),  # image-heavy
        (dict(group_experts=(4, 4)), 1.0),  # only image tokens
        (dict(group_experts=(4, 4)), 0.0),  # only text tokens
    ],
)
def test_layer_matches_the_loop_over_experts(moe, image_share):
    assert_output_matches(model_cfg(**moe), oracle, image_share)


def test_gradient_matches_the_loop_over_experts():
    assert_gradient_matches(model_cfg(group_experts=(4, 4)), oracle)


def test_losses_and_experts_per_token_match_numpy():
    cfg = model_cfg(group_experts=(4, 4), lb_loss_weight=0.5, top_p_entropy_weight=0.25)
    layer = SparseFFN(cfg, rngs=nnx.Rngs(2))
    x, modality, segment = inputs(seed=2)
    aux = jax.jit(lambda x: run_layer(layer, x, modality, segment)[1])(x)
    for g, name in enumerate(("text", "image")):
        router = np.asarray(getattr(layer, f"group_{g}").router_DxE[...], np.float64)
        probs = np_softmax(x.astype(np.float64) @ router).reshape(-1, 4)
        eligible = ((modality == g) & (segment > 0)).reshape(-1)
        taken = np_top_p(probs, 0.4)[eligible]
        p = probs[eligible]
        entropy = -(p * np.log(p)).sum(-1).mean()
        balance = 4 * (taken.mean(0) * p.mean(0)).sum()
        losses = aux["losses"]
        np.testing.assert_allclose(losses[f"moe/{name}/entropy_loss"], 0.25 * entropy, rtol=1e-5)
        np.testing.assert_allclose(losses[f"moe/{name}/lb_loss"], 0.5 * balance, rtol=1e-5)
        metrics = aux["metrics"]
        np.testing.assert_allclose(metrics[f"moe/{name}/experts_per_token"], taken.sum(1).mean())
        multi = (taken.sum(1) > 1).mean()
        np.testing.assert_allclose(metrics[f"moe/{name}/multi_expert_frac"], multi, rtol=1e-6)


def test_routes_causally_as_it_trains_and_no_token_moves_an_earlier_one():
    cfg = model_cfg(group_experts=(4, 4))
    sparse_cases.assert_routes_causally_as_trained(SparseFFN(cfg, rngs=nnx.Rngs(3)), cfg)


def test_the_experiments_ideal_flops_assume_one_expert_and_it_needs_no_aux_stage():
    """The ideal count assumes `capacity` (1) experts per token; the measured count is logged
    (experts_per_token), so this checks the accounting, not the compute."""
    sparse_cases.assert_flop_matched_without_aux_stage("moma_4t4i_topp")
    assert registry.get("moma_4t4i_topp_tiny").model.moe.routing == "top_p"


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_bad_thresholds_fail_at_config_time(value):
    cfg = registry.get("moma_4t4i_topp_tiny")
    with pytest.raises(ConfigError, match="top_p"):
        validate(apply_overrides(cfg, [f"model.moe.top_p={value}"]))
    assert dataclasses.is_dataclass(cfg)
