"""DeepSeekMoE's shared and fine-grained experts inside modality groups (Dai et al. 2024,
arXiv 2401.06066; `model.moe.granularity`, `shared_experts`): the layer against NumPy loops
written from the paper's equation, h = u + sum of the shared experts' FFN(u) + sum over the
routed fine-grained experts of g_i FFN_i(u) (here the residual is the block's), with the
routed experts chosen as MoMa does (expert choice in each modality group) or by token choice;
and the token-choice form against a NumPy transcription of deepseek-ai/DeepSeek-V3
`inference/model.py` (commit 9b4e978): `Gate.forward` lines 576-597 with score_func
"softmax", one group, no bias (weights = the original softmax scores of the top-k, times
route_scale 1) and `MoE.forward` lines 683-693 (each chosen expert's output times its weight,
plus the shared experts' MLP of hidden n_shared_experts x moe_inter_dim)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sparse_cases
from flax import nnx
from sparse_cases import W, assert_gradient_matches, assert_output_matches, inputs, swiglu

from moma_jax import registry
from moma_jax.config import ModelConfig
from moma_jax.flops import active_params
from moma_jax.model.kinds import train_flops_per_token
from moma_jax.model.moe import SparseFFN
from moma_jax.runtime import resolve_shares


def model_cfg(**moe) -> ModelConfig:
    return sparse_cases.model_cfg(ffn_hidden=48, **moe)


def oracle(layer, cfg, x, modality, segment, concrete=None):
    """Per routing group and expert group: the shared expert on every eligible token (gate 1),
    plus each routed expert densely on every token, weighted by a NumPy selection from
    `concrete`'s router (expert choice: each expert its top floor(b_M c / E) eligible tokens,
    gate sigmoid; token choice: each token its top-k softmax probs, not renormalised) with the
    traced gate from `layer`."""
    moe, concrete = cfg.moe, concrete or layer
    outs = []
    for xg, mg, sg in zip(x, modality, segment, strict=True):
        y = jnp.zeros_like(xg)
        for g, experts in enumerate(moe.group_experts):
            grp, fixed = layer.groups[g], concrete.groups[g]
            mods = [m for m, gg in enumerate(moe.modality_group) if gg == g]
            eligible = np.isin(mg, mods) & (sg > 0)
            logits = np.asarray(xg, np.float64) @ np.asarray(fixed.router_DxE[...], np.float64)
            traced = xg @ grp.router_DxE[...]
            selected = np.zeros((len(xg), experts), np.float32)
            if moe.routing == "expert_choice":
                k = int(np.floor(np.float32(eligible.sum()) * np.float32(moe.capacity / experts)))
                for e in range(experts):
                    ranked = [t for t in np.argsort(-logits[:, e], kind="stable") if eligible[t]]
                    selected[ranked[:k], e] = 1.0
                gates = jax.nn.sigmoid(traced) * selected
            else:
                top = np.argsort(-logits, axis=-1, kind="stable")[:, : moe.top_k]
                for t in np.flatnonzero(eligible):
                    selected[t, top[t]] = 1.0
                gates = jax.nn.softmax(traced, axis=-1) * selected
            for e in range(experts):
                y = y + gates[:, e : e + 1] * swiglu(xg, *(getattr(grp, n)[...][e] for n in W))
            if layer.shared is not None:
                shared = layer.shared.groups[g]
                w = [getattr(shared, n)[...][0] for n in W]
                y = y + jnp.asarray(eligible[:, None], jnp.float32) * swiglu(xg, *w)
        outs.append(y)
    return jnp.stack(outs)


def run_layer(layer, x, modality, segment):
    return sparse_cases.run_layer(layer, x, modality, segment)[0]


EXPERT_CHOICE = dict(group_experts=(7, 7), granularity=4, shared_experts=1, capacity=3.0)
TOKEN_CHOICE = dict(
    group_experts=(7,), modality_group=(0, 0), granularity=4, shared_experts=1,
    routing="token_choice", router_score="softmax", top_k=3, capacity=8.0,
    top_k_renormalize=False,
)  # fmt: skip


@pytest.mark.parametrize(
    "moe, image_share",
    [
        (EXPERT_CHOICE, 0.3),
        (EXPERT_CHOICE, 0.9),  # image-heavy
        (EXPERT_CHOICE, 0.0),  # text only
        ({**EXPERT_CHOICE, "shared_experts": 0, "group_experts": (8, 8), "capacity": 4.0}, 0.3),
        ({**EXPERT_CHOICE, "shared_experts": 2, "capacity": 2.0}, 1.0),  # image only
        (TOKEN_CHOICE, 0.3),
    ],
)
def test_layer_matches_the_loop_over_experts(moe, image_share):
    cfg = model_cfg(**moe)
    layer = SparseFFN(cfg, rngs=nnx.Rngs(0))
    assert layer.groups[0].w_up_ExDxF.shape[-1] == 12  # 48 / granularity 4
    if cfg.moe.shared_experts:
        assert layer.shared is not None
        assert layer.shared.groups[0].w_up_ExDxF.shape == (1, 16, 12 * cfg.moe.shared_experts)
    assert_output_matches(cfg, oracle, image_share)


@pytest.mark.parametrize("moe", [EXPERT_CHOICE, TOKEN_CHOICE])
def test_gradient_matches_the_loop_over_experts(moe):
    assert_gradient_matches(model_cfg(**moe), oracle)


def deepseek_v3_moe(x, gate_weight, experts, shared, topk):
    """NumPy transcription of DeepSeek-V3's `Gate.forward` (softmax, one group, no bias,
    route_scale 1) and `MoE.forward`: y[idx] += expert(x[idx]) * weights[idx, top]; y + z."""

    def mlp(v, w1, w3, w2):  # Expert / MLP: w2(silu(w1 x) * w3 x)
        h = v @ w1
        return ((h / (1 + np.exp(-h))) * (v @ w3)) @ w2

    scores = x @ gate_weight.T
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    scores = scores / scores.sum(-1, keepdims=True)
    indices = np.argsort(-scores, axis=-1, kind="stable")[:, :topk]
    weights = np.take_along_axis(scores, indices, axis=1)
    y = np.zeros_like(x)
    for i, expert in enumerate(experts):
        idx, top = np.nonzero(indices == i)
        y[idx] += mlp(x[idx], *expert) * weights[idx, top, None]
    return y + mlp(x, *shared)


def test_token_choice_form_matches_the_deepseek_v3_transcription():
    """Every token one modality group (mixed), no padding, capacity large enough that nothing
    drops: the case the reference (dropless, no modalities) computes."""
    cfg = model_cfg(**TOKEN_CHOICE)
    layer = SparseFFN(cfg, rngs=nnx.Rngs(2))
    x, modality, _ = inputs(seed=2)
    segment = np.ones_like(modality)
    got = np.asarray(jax.jit(lambda x: run_layer(layer, x, modality, segment))(x))
    grp, shared = layer.groups[0], layer.shared.groups[0]  # type: ignore[union-attr]
    w = {n: np.asarray(getattr(grp, n)[...], np.float64) for n in W}
    experts = [(w[W[0]][e], w[W[1]][e], w[W[2]][e]) for e in range(7)]
    s = [np.asarray(getattr(shared, n)[...][0], np.float64) for n in W]
    router = np.asarray(grp.router_DxE[...], np.float64)  # type: ignore[index]
    want = deepseek_v3_moe(x.reshape(-1, 16).astype(np.float64), router.T, experts, s, 3)
    np.testing.assert_allclose(got.reshape(-1, 16), want, rtol=1e-4, atol=1e-5)


def test_experiments_are_flop_and_parameter_matched():
    dense = resolve_shares(registry.get("dense_tiny"))
    flops = train_flops_per_token(dense.model, 256)
    for name in ("moma_fine4_tiny", "moma_4t4i_shared_tiny", "deepseek_8x_tiny"):
        cfg = resolve_shares(registry.get(name))
        ratio = train_flops_per_token(cfg.model, 256) / flops
        assert abs(ratio - 1) < 0.05, (name, ratio)
    cfg = resolve_shares(registry.get("moma_4t4i_shared_tiny"))
    layer = nnx.eval_shape(lambda: SparseFFN(cfg.model, rngs=nnx.Rngs(0)))
    state = nnx.state(layer)
    m, f = cfg.model.d_model, cfg.model.resolved_ffn_hidden
    # one FFN's worth per token: 1 shared + 3 routed quarter-experts, plus the routers' share
    routers = sum(cfg.model.moe.group_share(g) * m * 15 for g in range(2))
    assert active_params(cfg.model, state) == pytest.approx(3 * m * f + routers, rel=0.01)
    assert dataclasses.asdict(cfg.model.moe)["shared_experts"] == 1


def test_upcycling_needs_the_same_expert_layout():
    """A one-expert-per-group source cannot seed fine-grained experts (a whole FFN is copied)
    nor shared ones (none to copy): a ConfigError, never a silent fresh init."""
    from moma_jax.config import ConfigError
    from moma_jax.train.upcycle import upcycle_params

    source = nnx.state(SparseFFN(model_cfg(group_experts=(1, 1)), rngs=nnx.Rngs(0)))
    for moe, match in (
        (dict(group_experts=(8, 8), granularity=4, capacity=4.0), "granularity must match"),
        (dict(group_experts=(4, 4), shared_experts=1), "no shared experts"),
    ):
        target = nnx.state(SparseFFN(model_cfg(**moe), rngs=nnx.Rngs(1)))
        with pytest.raises(ConfigError, match=match):
            upcycle_params(source, target)


def np_deepseek_balance(probs, chosen, k, devices):
    """DeepSeekMoE (arXiv 2401.06066) eqs. 12-14 and 15-17, written out: f_i = N'/(K'T) sum_t
    1(token t selects i), P_i = (1/T) sum_t s_{i,t}; L_Exp = sum_i f_i P_i; over D device sets
    E_d: f'_d = mean_{j in E_d} f_j, P'_d = sum_{j in E_d} P_j, L_Dev = sum_d f'_d P'_d."""
    t, e = probs.shape
    f = e / (k * t) * chosen.sum(0)
    p = probs.mean(0)
    sets = np.array_split(np.arange(e), devices)
    return (f * p).sum(), sum(f[s].mean() * p[s].sum() for s in sets)


@pytest.mark.parametrize("devices", [2, 3])
def test_deepseek_balance_losses_match_the_papers_equations(devices):
    from sparse_cases import run_layer as run_sparse

    moe = dict(routing="token_choice", router_score="softmax", group_experts=(8,),
               modality_group=(0, 0), top_k=3, top_k_renormalize=False, balance_loss="deepseek",
               balance_devices=devices, lb_loss_weight=0.5, device_lb_loss_weight=0.25)  # fmt: skip
    cfg = sparse_cases.model_cfg(**moe)
    layer = SparseFFN(cfg, rngs=nnx.Rngs(4))
    x, modality, segment = inputs(seed=4)
    aux = jax.jit(lambda x: run_sparse(layer, x, modality, segment)[1])(x)
    router_param = layer.groups[0].router_DxE
    assert router_param is not None
    router = np.asarray(router_param[...], np.float64)
    logits = x.astype(np.float64).reshape(-1, 16) @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    eligible = (segment > 0).reshape(-1)
    top3 = np.argsort(-probs, axis=-1)[:, :3]
    chosen = np.zeros_like(probs, bool)
    np.put_along_axis(chosen, top3, True, axis=-1)
    expert, device = np_deepseek_balance(probs[eligible], chosen[eligible], 3, devices)
    np.testing.assert_allclose(aux["losses"]["moe/text+image/lb_loss"], 0.5 * expert, rtol=1e-5)
    np.testing.assert_allclose(
        aux["losses"]["moe/text+image/device_lb_loss"], 0.25 * device, rtol=1e-5
    )
    # Both are 1 at perfect balance (every expert chosen equally, uniform probs).
    uniform = jnp.full((24, 8), 1 / 8)
    chosen_u = jnp.asarray(np.tile(np.eye(8, dtype=bool), (3, 1)))
    from moma_jax.model.routing import deepseek_balance_losses

    e_u, d_u = deepseek_balance_losses(uniform, chosen_u, jnp.ones(24, bool), 1, devices)
    np.testing.assert_allclose([e_u, d_u], [1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize(
    "keys, match",
    [
        (["model.moe.device_lb_loss_weight=0.1"], "needs model.moe.balance_loss=deepseek"),
        (["model.moe.balance_devices=40"], "balance_devices=40 must be in 1..31"),
        (["model.moe.balance_loss=gshard"], "use switch or deepseek"),
    ],
)
def test_bad_balance_settings_fail_at_config_time(keys, match):
    from moma_jax.config import ConfigError, validate
    from moma_jax.overrides import apply_overrides

    with pytest.raises(ConfigError, match=match):
        validate(apply_overrides(registry.get("deepseek_8x_tiny"), keys))
