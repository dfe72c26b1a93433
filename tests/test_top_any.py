"""DynMoE's top-any gating inside modality groups (`routers_per_token.TopAny`, Guo et al. 2024,
arXiv 2405.14297) against NumPy written from the paper's equations (scores
s_e = sigmoid(tau cos(x, w_e)) against thresholds t_e = sigmoid(tau theta_e); a token takes
every e with s_e > t_e at gate 1/k, else its top-1 expert at gate 1; the layer's output and
gradient, the straight-through gradient of the thresholds included; the three losses), and
against a NumPy transcription of the authors' code, LINs-lab/DynMoE (commit 4927232),
`DeepSpeed-0.9.5/deepspeed/moe/sharded_moe.py`: `GAMoEGateT.forward`, lines 519-554 (both
branches: training, sign(relu(s - t)); inference, the same plus the top-1 one-hot for a token
with none), `topanygating_opt`, lines 434-481 (the combine weights gates / clamp(K, 1) and
l_aux = diverse-and-simple + balance + efficiency), and `deepspeed/moe/loss.py`,
`diverse_and_simple_gate_loss`, lines 4-15. The reference's expert mask is all ones (no
experts added or removed) and its temperature log(1 / init_t) = 0 (tau = 1, not trained)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sparse_cases
from cli_args import small
from flax import nnx
from sparse_cases import W, assert_gradient_matches, assert_output_matches, inputs, run_layer

from moma_jax import registry
from moma_jax.commands.cli import main
from moma_jax.config import ConfigError, ModelConfig, validate
from moma_jax.model.moe import SparseFFN
from moma_jax.overrides import apply_overrides
from moma_jax.train.metrics import read_jsonl

# --- NumPy from the paper's equations ---------------------------------------------------------


def np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def np_unit(a, axis):
    return a / np.linalg.norm(a, axis=axis, keepdims=True)


def np_top_any(x, w, theta, tau):
    """(scores [T, E], chosen [T, E] bool, gate [T, E]) of tokens x [T, D], router w [D, E],
    thresholds theta [E]: chosen s_e > t_e at gate 1/k; a token with none: top-1 at gate 1."""
    scores = np_sigmoid(tau * np_unit(x, 1) @ np_unit(w, 0))
    chosen = scores > np_sigmoid(tau * theta)
    k = chosen.sum(1, keepdims=True)
    gate = chosen / np.maximum(k, 1)
    none = k[:, 0] == 0
    gate[none, scores[none].argmax(1)] = 1.0
    return scores, chosen, gate


def np_losses(w, chosen):
    """The three losses (unweighted) over the eligible tokens' choices `chosen` [T, E]."""
    experts = w.shape[1]
    unit = np_unit(w, 0)
    diversity = np.linalg.norm(unit.T @ unit - np.eye(experts)) + np.linalg.norm(w, axis=0).mean()
    active = chosen[chosen.sum(1) > 0]
    share = active / active.sum(1, keepdims=True)
    balance = experts * (share.mean(0) * active.mean(0)).sum()
    return {"diversity": diversity, "balance": balance, "efficiency": chosen.mean()}


def model_cfg(**moe) -> ModelConfig:
    return sparse_cases.model_cfg(routing="top_any", **moe)


def set_thresholds(layer, seed, mean=0.25, scale=0.25):
    """Random thresholds theta ~ N(mean, scale^2): some tokens take none (the fallback), some
    several (`test_cases_hold_fallback_and_multi_expert_tokens`)."""
    rng = np.random.default_rng(seed)
    for group in layer.groups:
        if group.router_threshold_E is not None:
            theta = mean + rng.normal(size=group.router_threshold_E.shape) * scale
            group.router_threshold_E[...] = jnp.asarray(theta, jnp.float32)


def params64(group) -> tuple[np.ndarray, np.ndarray]:
    """The group's router w [D, E] and thresholds theta [E], float64."""
    return (
        np.asarray(group.router_DxE[...], np.float64),
        np.asarray(group.router_threshold_E[...], np.float64),
    )


def oracle(layer, cfg, x, modality, segment, concrete=None):
    """Every expert runs densely on every token, weighted by its gate: the selection is NumPy's
    (from `concrete`'s router), the gate's value chosen / k, its gradient the straight-through
    one, d gate_e / d(s_e - t_e) = 1 / k on chosen experts; the fallback's gate is constant."""
    moe, concrete = cfg.moe, concrete or layer
    tau = moe.top_any_tau
    outs = []
    for xg, mg, sg in zip(x, modality, segment, strict=True):
        y = jnp.zeros_like(xg)
        for g, experts in enumerate(moe.group_experts):
            grp, fixed = layer.groups[g], concrete.groups[g]
            mods = [m for m, gg in enumerate(moe.modality_group) if gg == g]
            eligible = (np.isin(mg, mods) & (sg > 0))[:, None]
            if experts == 1:
                gates = jnp.asarray(eligible, jnp.float32)
            else:
                _, chosen, gate = np_top_any(np.asarray(xg, np.float64), *params64(fixed), tau)
                k = np.maximum(chosen.sum(1, keepdims=True), 1)
                w = grp.router_DxE[...]
                cos = (xg / jnp.linalg.norm(xg, axis=1, keepdims=True)) @ (
                    w / jnp.linalg.norm(w, axis=0, keepdims=True)
                )
                d = jax.nn.sigmoid(tau * cos) - jax.nn.sigmoid(tau * grp.router_threshold_E[...])
                straight = chosen * (d - jax.lax.stop_gradient(d)) / k  # value 0
                gates = (jnp.asarray(gate, jnp.float32) + straight) * eligible
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
        (dict(group_experts=(4, 1), top_any_tau=3.0), 0.3),
        (dict(group_experts=(4, 4)), 0.9),  # image-heavy
        (dict(group_experts=(4, 4)), 1.0),  # only image tokens
        (dict(group_experts=(4, 4)), 0.0),  # only text tokens
    ],
)
def test_layer_matches_the_loop_over_experts(moe, image_share):
    cfg = model_cfg(**moe)
    layer = SparseFFN(cfg, rngs=nnx.Rngs(0))
    set_thresholds(layer, seed=1)
    x, modality, segment = inputs(image_share=image_share)
    got = jax.jit(lambda x: run_layer(layer, x, modality, segment)[0])(x)
    np.testing.assert_allclose(got, oracle(layer, cfg, x, modality, segment), rtol=1e-5, atol=1e-5)


def test_zero_thresholds_at_the_start_match_too():
    assert_output_matches(model_cfg(group_experts=(4, 4)), oracle, 0.3)


def test_cases_hold_fallback_and_multi_expert_tokens():
    """The random thresholds above give tokens that take none (the top-1 fallback) and tokens
    that take several, so the layer tests cover both."""
    cfg = model_cfg(group_experts=(4, 4))
    layer = SparseFFN(cfg, rngs=nnx.Rngs(0))
    set_thresholds(layer, seed=1)
    x, _, _ = inputs()
    for group in layer.groups:
        tokens = x.reshape(-1, 16).astype(np.float64)
        counts = np_top_any(tokens, *params64(group), 1.0)[1].sum(1)
        assert (counts == 0).any() and (counts >= 2).any(), np.bincount(counts)


def test_gradient_matches_the_loop_over_experts():
    """Router, thresholds and experts: the thresholds reach the output only through the
    straight-through gate, so their gradient checks it."""
    assert_gradient_matches(model_cfg(group_experts=(4, 4)), oracle)


def test_losses_and_experts_per_token_match_numpy():
    cfg = model_cfg(group_experts=(4, 4), top_any_loss_weight=0.5)
    layer = SparseFFN(cfg, rngs=nnx.Rngs(2))
    set_thresholds(layer, seed=2)
    x, modality, segment = inputs(seed=2)
    aux = jax.jit(lambda x: run_layer(layer, x, modality, segment)[1])(x)
    for g, name in enumerate(("text", "image")):
        w, theta = params64(layer.groups[g])
        eligible = ((modality == g) & (segment > 0)).reshape(-1)
        tokens = x.reshape(-1, 16).astype(np.float64)[eligible]
        _, chosen, gate = np_top_any(tokens, w, theta, 1.0)
        for term, want in np_losses(w, chosen).items():
            got = aux["losses"][f"moe/{name}/{term}_loss"]
            np.testing.assert_allclose(got, 0.5 * want, rtol=1e-5, err_msg=term)
        used = (gate > 0).sum(1)
        metrics = aux["metrics"]
        np.testing.assert_allclose(metrics[f"moe/{name}/experts_per_token"], used.mean())
        multi = metrics[f"moe/{name}/multi_expert_frac"]
        np.testing.assert_allclose(multi, (used > 1).mean(), rtol=1e-6)
        assert metrics[f"moe/{name}/untaken_frac"] == 0  # the fallback routes every token
        none = chosen.sum(1) == 0
        np.testing.assert_allclose(metrics[f"moe/{name}/fallback_frac"], none.mean(), rtol=1e-6)
        assert 0 < none.mean() < 1


def test_loss_gradient_is_the_straight_through_one():
    """d(losses)/d(router, thresholds) against the losses written in JAX from the equations,
    with NumPy's selection and the chosen indicator's straight-through gradient
    d chosen_e / d(s_e - t_e) = 1 on chosen experts, 0 elsewhere."""
    cfg = model_cfg(group_experts=(4, 4), top_any_loss_weight=1.0)
    layer = SparseFFN(cfg, rngs=nnx.Rngs(4))
    set_thresholds(layer, seed=4)
    x, modality, segment = inputs(seed=4)
    graphdef, params = nnx.split(layer)

    def layer_loss(p):
        losses = run_layer(nnx.merge(graphdef, p), x, modality, segment)[1]["losses"]
        return sum(losses.values())

    def oracle_loss(p):
        model, total = nnx.merge(graphdef, p), jnp.zeros(())
        for g in range(2):
            grp = model.groups[g]
            assert grp.router_DxE is not None and grp.router_threshold_E is not None
            eligible = ((modality == g) & (segment > 0)).reshape(-1)
            tokens = x.reshape(-1, 16)[eligible]
            _, chosen, _ = np_top_any(tokens.astype(np.float64), *params64(layer.groups[g]), 1.0)
            w = grp.router_DxE[...]
            unit = w / jnp.linalg.norm(w, axis=0, keepdims=True)
            cos = (tokens / np.linalg.norm(tokens, axis=1, keepdims=True)) @ unit
            d = jax.nn.sigmoid(cos) - jax.nn.sigmoid(grp.router_threshold_E[...])
            st = chosen + chosen * (d - jax.lax.stop_gradient(d))
            active = chosen.sum(1) > 0
            share = st[active] / jnp.sum(st[active], axis=1, keepdims=True)
            balance = 4 * jnp.sum(jnp.mean(share, 0) * chosen[active].mean(0))
            gram = unit.T @ unit - jnp.eye(4)
            diversity = jnp.sqrt(jnp.sum(gram**2)) + jnp.mean(jnp.linalg.norm(w, axis=0))
            total = total + diversity + balance + jnp.mean(st)
        return total

    got = jax.jit(jax.grad(layer_loss))(params)
    want = jax.jit(jax.grad(oracle_loss))(params)
    for g in range(2):
        for name in ("router_DxE", "router_threshold_E"):
            a, b = (getattr(t[f"group_{g}"], name)[...] for t in (got, want))
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)
            assert np.abs(np.asarray(b)).max() > 0


# --- The authors' code, transcribed (torch -> NumPy) -------------------------------------------


def dynmoe_gate(x, sim_matrix, gates, training, temperature=0.0):
    """`GAMoEGateT.forward` (sharded_moe.py 519-554), fp32, experts_mask all ones."""
    logit_scale = np.exp(min(temperature, np.log(1.0 / 0.01)))
    logits = np_sigmoid((np_unit(x, 1) @ np_unit(sim_matrix, 0)) * logit_scale)
    gates = np_sigmoid(gates * logit_scale)
    if training:
        logits = np.sign(np.maximum(logits - gates, 0))
        top_k = (logits > 0).sum(1)
    else:
        new_logits = np.sign(np.maximum(logits - gates, 0))
        top_k = (new_logits > 0).sum(1)
        mask = (new_logits.sum(1) == 0).astype(int)[:, None]
        one_hot = np.eye(logits.shape[1])[logits.argmax(1)]
        logits = mask * one_hot + new_logits
        top_k = np.maximum(top_k, 1)
    return logits, top_k


def dynmoe_combine_and_loss(gates, top_k, sim_matrix):
    """`topanygating_opt` (434-481) with `diverse_and_simple_gate_loss` (loss.py 4-15): the
    combine weights summed over the capacity axis ([S, E]) and l_aux."""
    mask = gates.astype(int)
    capacity = mask.sum(0).max()
    experts = gates.shape[1]
    non_zero = gates.sum(1) > 0
    normalized = gates[non_zero] / gates[non_zero].sum(1, keepdims=True)
    balance = (normalized.mean(0) * mask[non_zero].mean(0)).mean() * experts * experts
    efficiency = gates.mean()
    unit = np_unit(sim_matrix, 0)
    sim_loss = np.linalg.norm(unit.T @ unit - np.eye(experts))
    simple_loss = np.linalg.norm(sim_matrix, axis=0).mean()
    l_aux = sim_loss + simple_loss + balance + efficiency
    locations = ((np.cumsum(mask, 0) * mask) - 1) % (capacity + 1)
    gates = gates / np.maximum(top_k, 1)[:, None]
    locations_sc = np.eye(capacity + 1)[locations]
    combine = np.einsum("se,sec->sec", gates, locations_sc[:, :, :-1])
    return combine.sum(-1), l_aux


def test_layer_matches_the_transcribed_dynmoe_gate():
    """One mixed group of 8, no padding (the reference masks nothing): the output is the
    inference branch's combine weights (with the top-1 fallback) times the experts; the
    training branch agrees on every token that chose; l_aux = the sum of our three losses."""
    cfg = model_cfg(group_experts=(8,), modality_group=(0, 0), top_any_loss_weight=1.0)
    layer = SparseFFN(cfg, rngs=nnx.Rngs(5))
    set_thresholds(layer, seed=5)
    x, modality, segment = inputs(seed=5, padding=0)
    y, aux = jax.jit(lambda x: run_layer(layer, x, modality, segment))(x)
    tokens = x.reshape(-1, 16).astype(np.float64)
    w, theta = params64(layer.groups[0])
    infer, infer_k = dynmoe_gate(tokens, w, theta, training=False)
    combine, _ = dynmoe_combine_and_loss(infer, infer_k, w)
    grp = layer.groups[0]
    want = sum(
        combine[:, e : e + 1]
        * sparse_cases.swiglu(tokens, *(np.asarray(getattr(grp, n)[...][e], np.float64) for n in W))
        for e in range(8)
    )
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), want, rtol=1e-5, atol=1e-5)
    train, train_k = dynmoe_gate(tokens, w, theta, training=True)
    train_combine, l_aux = dynmoe_combine_and_loss(train, train_k, w)
    chose = train_k > 0
    assert 0 < chose.sum() < len(chose)  # fallback tokens present
    np.testing.assert_allclose(train_combine[chose], combine[chose], rtol=1e-12)
    ours = sum(v for k, v in aux["losses"].items() if k.startswith("moe/text+image/"))
    np.testing.assert_allclose(ours, l_aux, rtol=1e-5)


# --- Causal, FLOPs, config, training ------------------------------------------------------


def test_routes_causally_as_it_trains_and_no_token_moves_an_earlier_one():
    cfg = model_cfg(group_experts=(4, 4))
    layer = SparseFFN(cfg, rngs=nnx.Rngs(3))
    set_thresholds(layer, seed=3)
    sparse_cases.assert_routes_causally_as_trained(layer, cfg)


def test_the_experiments_ideal_flops_assume_one_expert_and_it_needs_no_aux_stage():
    """The ideal count assumes `capacity` (1) experts per token; the measured count is logged
    (experts_per_token), so this checks the accounting, not the compute."""
    sparse_cases.assert_flop_matched_without_aux_stage("moma_4t4i_topany")
    assert registry.get("moma_4t4i_topany_tiny").model.moe.routing == "top_any"


@pytest.mark.parametrize(
    "key, value", [("top_any_tau", "0"), ("top_any_tau", "101"), ("top_any_loss_weight", "-1")]
)
def test_bad_values_fail_at_config_time(key, value):
    cfg = registry.get("moma_4t4i_topany_tiny")
    with pytest.raises(ConfigError, match=key):
        validate(apply_overrides(cfg, [f"model.moe.{key}={value}"]))
    assert dataclasses.is_dataclass(cfg)


def test_the_experiment_trains_two_steps(tmp_path, data_dir):
    """End to end at a tiny shape: the thresholds train, checkpoint and log with the model."""
    keys = small(
        "model.n_layers=1", "data.seq_len=64", "data.batch_size=4",
        "model.moe.routing_group_tokens=64", "run.log_every=1", "run.eval_batches=1",
    )  # fmt: skip
    args = ["--exp", "moma_4t4i_topany_tiny", "--workdir", str(tmp_path), "--steps", "2", *keys]
    assert main(args) == 0
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for name in ("text", "image"):
        assert rows[-1][f"moe/{name}/experts_per_token"] >= 1
        assert np.isfinite(rows[-1][f"moe/{name}/efficiency_loss"])
        assert 0 <= rows[-1][f"moe/{name}/fallback_frac"] <= 1
