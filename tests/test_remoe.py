"""ReMoE's ReLU routing inside modality groups (`routers_relu.ReLURouting`, Wang et al. 2024,
arXiv 2412.14711) against NumPy: the layer's output and gradient (a loop over experts with
gates ReLU(x W_r)), the L1 loss and the coefficient's update transcribed from thu-ml/ReMoE,
and the coefficient as training state: checkpointed, restored exactly on resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
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
from moma_jax.train import controls
from moma_jax.train.metrics import read_jsonl


def model_cfg(**moe) -> ModelConfig:
    return sparse_cases.model_cfg(routing="relu", **moe)


def oracle(layer, cfg, x, modality, segment, concrete=None):
    """y = sum_e ReLU(x W_r)_e E_e(x) over the token's group, every expert run densely; the
    selection (gate > 0) is NumPy's, from `concrete`'s router; one-expert groups take all."""
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
                logits = np.asarray(xg, np.float64) @ np.asarray(fixed.router_DxE[...], np.float64)
                selected = (logits > 0) & eligible[:, None]
                gates = jnp.maximum(xg @ grp.router_DxE[...], 0.0) * selected
            for e in range(experts):
                wg, wu, wd = (getattr(grp, n)[...][e] for n in W)
                y = y + gates[:, e : e + 1] * ((jax.nn.silu(xg @ wg) * (xg @ wu)) @ wd)
        outs.append(y)
    return jnp.stack(outs)


@pytest.mark.parametrize(
    "moe, image_share",
    [
        (dict(group_experts=(4, 4)), 0.3),
        (dict(group_experts=(8,), modality_group=(0, 0)), 0.3),  # mixed-modal
        (dict(group_experts=(4, 1)), 0.3),  # text routed, image untied
        (dict(group_experts=(4, 4)), 0.9),  # image-heavy
        (dict(group_experts=(4, 4)), 0.0),  # only text tokens
    ],
)
def test_layer_matches_the_loop_over_experts(moe, image_share):
    assert_output_matches(model_cfg(**moe), oracle, image_share)


def test_gradient_matches_the_loop_over_experts():
    assert_gradient_matches(model_cfg(group_experts=(4, 4)), oracle)


def reference_l1_reg(logits, k):
    """thu-ml/ReMoE, megatron/core/transformer/moe/router.py L353-362 (`ReLURouter.
    l1_reg_load_balancing`: probs = relu(logits), routing_map = probs > 0, tokens per expert =
    routing_map.sum(0)) and moe_utils.py L46-55 (`switch_load_balancing_loss_func`: sum(probs.
    sum(0) * tokens_per_expert) * E / (N * N * topk)), the coefficient left out (ours weights
    it by the controlled coefficient); and the sparsity it records (L360)."""
    probs = np.maximum(logits, 0.0)
    routing_map = probs > 0
    tokens_per_expert = routing_map.sum(0)
    n, experts = probs.shape
    l1 = np.sum(probs.sum(0) * tokens_per_expert) * experts / (n * n * k)
    return l1, 1 - routing_map.sum() / routing_map.size


@pytest.mark.parametrize("capacity", [1.0, 2.0])
def test_the_l1_loss_and_experts_per_token_match_the_reference(capacity):
    cfg = model_cfg(group_experts=(4, 4), capacity=capacity)
    layer = SparseFFN(cfg, rngs=nnx.Rngs(2))
    x, modality, segment = inputs(seed=2, image_share=0.4)
    aux = jax.jit(lambda x: run_layer(layer, x, modality, segment)[1])(x)
    for g, name in enumerate(("text", "image")):
        router = np.asarray(getattr(layer, f"group_{g}").router_DxE[...], np.float64)
        eligible = ((modality == g) & (segment > 0)).reshape(-1)
        logits = (x.astype(np.float64) @ router).reshape(-1, 4)[eligible]
        l1, sparsity = reference_l1_reg(logits, capacity)
        np.testing.assert_allclose(aux["losses"][f"moe/{name}/l1_reg"], l1, rtol=1e-5)
        per_token = aux["metrics"][f"moe/{name}/experts_per_token"]
        np.testing.assert_allclose(1 - per_token / 4, sparsity, rtol=1e-5)
    assert set(controls.specs(_experiment(capacity=capacity))) == {
        "moe/text/l1_reg",
        "moe/image/l1_reg",
    }


def _experiment(**moe):
    cfg = registry.get("moma_4t4i_remoe_tiny")
    return apply_overrides(cfg, [f"model.moe.{k}={v}" for k, v in moe.items()])


def reference_update(coeff, sparsity, target, multiplier):
    """thu-ml/ReMoE megatron/training/training.py L1496-1502 in float32, as there (a CUDA
    float32 tensor times a Python float); XLA may divide by the constant via its reciprocal,
    so values agree to an ulp per step, not bitwise."""
    coeff = np.float32(coeff)
    return coeff * np.float32(multiplier) if sparsity < target else coeff / np.float32(multiplier)


def test_the_coefficient_update_matches_the_reference():
    cfg = _experiment(capacity=1.0)
    state = controls.initial(cfg)
    want = {k: np.float32(1e-8) for k in state}
    update = jax.jit(lambda s, m: controls.update(cfg, s, m))
    for per_token in (2.5, 1.5, 1.0, 0.5, 1.2, 0.9, 3.0):
        metrics = {"moe/text/experts_per_token": jnp.float32([per_token])}  # [n_micro]
        metrics["moe/image/experts_per_token"] = jnp.float32([2.0 - per_token / 2])
        metrics |= {f"moe/{g}/tokens_share": jnp.float32([0.5]) for g in ("text", "image")}
        for k in want:
            group = k.split("/")[1]
            sparsity = 1 - float(metrics[f"moe/{group}/experts_per_token"][0]) / 4
            want[k] = reference_update(want[k], sparsity, 1 - 1 / 4, 1.2)
        state = update(state, metrics)
        for k in want:
            np.testing.assert_allclose(state[k], want[k], rtol=1e-6, err_msg=f"{k} {per_token}")


def test_micro_batches_without_the_groups_tokens_do_not_move_its_coefficient():
    """A micro-batch with no image tokens reads 0 experts per token; the step's measure weights
    micro-batches by their token share, and a step with no image token leaves the image
    coefficient as it is (else it would shrink toward an underflow to 0 that never recovers)."""
    cfg = _experiment(capacity=1.0)
    start = {k: jnp.float32(1e-3) for k in controls.initial(cfg)}
    metrics = {
        "moe/text/experts_per_token": jnp.float32([1.5, 0.9]),
        "moe/text/tokens_share": jnp.float32([0.2, 0.8]),  # weighted mean 1.02 > 1: grows
        "moe/image/experts_per_token": jnp.float32([0.0, 0.0]),
        "moe/image/tokens_share": jnp.float32([0.0, 0.0]),  # no image token at all
    }
    out = controls.update(cfg, start, metrics)
    np.testing.assert_allclose(out["moe/text/l1_reg"], 1.2e-3, rtol=1e-6)
    assert float(out["moe/image/l1_reg"]) == np.float32(1e-3)
    floor = controls.update(cfg, {k: jnp.float32(1e-38) for k in start}, metrics | {
        "moe/text/experts_per_token": jnp.float32([0.5, 0.5])})  # fmt: skip
    assert float(floor["moe/text/l1_reg"]) > 0  # clamped at float32's smallest normal


def test_routes_causally_as_it_trains_and_no_token_moves_an_earlier_one():
    cfg = model_cfg(group_experts=(4, 4))
    sparse_cases.assert_routes_causally_as_trained(SparseFFN(cfg, rngs=nnx.Rngs(3)), cfg)


def test_the_experiments_ideal_flops_assume_one_expert_and_it_needs_no_aux_stage():
    sparse_cases.assert_flop_matched_without_aux_stage("moma_4t4i_remoe")


@pytest.mark.parametrize("key, value", [("relu_l1_init", "0"), ("relu_l1_multiplier", "1.0")])
def test_bad_control_settings_fail_at_config_time(key, value):
    with pytest.raises(ConfigError, match=key):
        validate(
            apply_overrides(registry.get("moma_4t4i_remoe_tiny"), [f"model.moe.{key}={value}"])
        )


STEPS = 6
# A large start, so the coefficient moves the loss: a resume that lost it would not match.
KEYS = ("run.log_every=1", "run.eval_every=100", "run.checkpoint_every=3",
        "model.moe.relu_l1_init=0.05", "model.moe.routing_group_tokens=512")  # fmt: skip
ARGS = ["--exp", "moma_4t4i_remoe_tiny", *small(*KEYS)]


def _restored(workdir, step):
    path = (workdir / "checkpoints" / str(step) / "state").absolute()
    return ocp.PyTreeCheckpointer().restore(path)


def test_the_coefficient_is_checkpointed_and_a_resumed_run_continues_it_exactly(tmp_path, data_dir):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*ARGS, "--workdir", str(straight), "--steps", str(STEPS)]) == 0
    assert main([*ARGS, "--workdir", str(resumed), "--steps", "3"]) == 0
    assert main([*ARGS, "--workdir", str(resumed), "--steps", str(STEPS)]) == 0
    rows = {r["step"]: r for r in read_jsonl(straight / "metrics.jsonl") if "loss" in r}
    again = {r["step"]: r for r in read_jsonl(resumed / "metrics.jsonl") if "loss" in r}
    assert sorted(again) == list(range(1, STEPS + 1))
    for step in rows:  # bitwise: the resumed run restored the coefficients, not 0.05 again
        assert rows[step]["loss_total"] == again[step]["loss_total"], step
        assert rows[step]["moe/text/l1_reg_coeff"] == again[step]["moe/text/l1_reg_coeff"]
    # The logged coefficients follow the reference's rule from the logged experts per token.
    for group in ("text", "image"):
        coeff = np.float32(0.05)
        for step in range(1, STEPS + 1):
            logged = rows[step][f"moe/{group}/l1_reg_coeff"]
            np.testing.assert_allclose(logged, coeff, rtol=1e-6, err_msg=f"{group} {step}")
            sparsity = 1 - rows[step][f"moe/{group}/experts_per_token"] / 4
            coeff = reference_update(coeff, sparsity, 0.75, 1.2)
        saved = _restored(straight, STEPS)["controls"][f"moe/{group}/l1_reg"]
        np.testing.assert_allclose(saved, coeff, rtol=1e-6)  # the next step's coefficient
    a, b = _restored(straight, STEPS), _restored(resumed, STEPS)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert json.loads((straight / "config.json").read_text())["model"]["moe"]["routing"] == "relu"


def test_a_state_saved_before_controls_existed_restores_into_the_new_layout(tmp_path):
    """A model without adapted losses keeps the state layout of checkpoints written before
    `TrainState.controls` (three fields, as a flax struct then): they restore unchanged."""
    import flax

    from moma_jax.train.state import TrainState

    @flax.struct.dataclass
    class Before:
        step: jax.Array
        params: dict
        opt_state: dict

    old = Before(jnp.int32(7), {"w": jnp.arange(3.0)}, {"mu": jnp.ones(2)})
    mgr = ocp.CheckpointManager(tmp_path)
    mgr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(old)))
    mgr.wait_until_finished()
    target = jax.eval_shape(lambda: TrainState(old.step, old.params, old.opt_state, {}))  # type: ignore[arg-type]
    state = mgr.restore(7, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    mgr.close()
    assert isinstance(state, TrainState) and state.controls == {} and int(state.step) == 7
    np.testing.assert_array_equal(state.params["w"], old.params["w"])
