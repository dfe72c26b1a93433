"""The sparse FFN against a loop-over-experts oracle; MoMa special cases; routing-group
invariance; sparse config errors."""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moma_jax import registry
from moma_jax.config import ConfigError, ModelConfig, SparseConfig, validate
from moma_jax.model.context import Context
from moma_jax.model.moe import SparseFFN
from moma_jax.overrides import apply_overrides

SHARES = (0.75, 0.25)


def model_cfg(**moe) -> ModelConfig:
    moe = {"tile_rows": 8, **moe}  # several slabs per expert, with padding
    sparse = SparseConfig(routing_group_tokens=32, modality_shares=SHARES, **moe)
    return ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, moe=sparse)


def inputs(seed=0, groups=2, n=32, image_share=0.3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(groups, n, 16)).astype(np.float32)
    modality = (rng.random((groups, n)) < image_share).astype(np.int32)
    segment = np.ones((groups, n), np.int32)
    segment[:, -3:] = 0  # padding at the end of each group
    return x, modality, segment


def swiglu(x, wg, wu, wd):
    return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd


def oracle(layer: SparseFFN, cfg: ModelConfig, x, modality, segment, concrete=None):
    """Loop over routing groups, expert groups and experts: each expert runs densely on all
    tokens; a [N, E] gate matrix from a NumPy expert-choice selection (the paper's: each expert
    its top k_e = floor(b_M * c / E_M) eligible tokens, no buffer) weights its output.

    The selection is made in NumPy from `concrete` (the layer itself by default); the gate
    values come from `layer`, which may be traced for a gradient.
    """
    moe = cfg.moe
    concrete = concrete or layer
    outs = []
    for xg, mg, sg in zip(x, modality, segment, strict=True):
        y = jnp.zeros_like(xg)
        for g, experts in enumerate(moe.group_experts):
            grp, fixed = getattr(layer, f"group_{g}"), getattr(concrete, f"group_{g}")
            eligible = np.isin(mg, [m for m, gg in enumerate(moe.modality_group) if gg == g])
            eligible &= sg > 0
            count = int(eligible.sum())
            if experts == 1:
                scores = np.ones((len(xg), 1), np.float32)
                k = count
            else:
                logits = np.asarray(xg) @ np.asarray(fixed.router_DxE[...])
                scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
                traced_scores = jax.nn.sigmoid(xg @ grp.router_DxE[...])
                k = int(np.floor(np.float32(count) * np.float32(moe.capacity / experts)))
            selected = np.zeros((len(xg), experts), np.float32)
            for e in range(experts):
                ranked = [t for t in np.argsort(-scores[:, e], kind="stable") if eligible[t]]
                selected[ranked[:k], e] = 1.0
            gates = selected if experts == 1 else traced_scores * selected
            for e in range(experts):
                w = [
                    getattr(grp, n)[...][e] for n in ("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD")
                ]
                y = y + gates[:, e : e + 1] * swiglu(xg, *w)
        outs.append(y)
    return jnp.stack(outs)


def run_layer(layer, x, modality, segment):
    segment = jnp.asarray(segment)  # the sparse FFN reads no positions
    ctx = Context(positions=segment, segment_ids=segment, modality=jnp.asarray(modality))
    return layer(jnp.asarray(x), ctx)[0]


@pytest.mark.parametrize(
    "moe, image_share",
    [
        (dict(group_experts=(4, 4)), 0.3),
        (dict(group_experts=(8,), modality_group=(0, 0)), 0.3),
        (dict(group_experts=(2, 1)), 0.3),
        (dict(group_experts=(4, 2), capacity=2.0), 0.3),
        (dict(group_experts=(4, 4)), 0.9),  # image-heavy: far above the manifest share
        (dict(group_experts=(4, 4)), 1.0),  # only image tokens
        (dict(group_experts=(4, 4)), 0.0),  # only text tokens
        (dict(group_experts=(6, 2), tile_rows=256), 0.5),  # one slab per expert
    ],
)
def test_sparse_ffn_matches_loop_over_experts_oracle(moe, image_share):
    cfg = model_cfg(**moe)
    layer = SparseFFN(cfg, rngs=nnx.Rngs(0))
    x, modality, segment = inputs(image_share=image_share)
    got = jax.jit(lambda x: run_layer(layer, x, modality, segment))(x)
    np.testing.assert_allclose(got, oracle(layer, cfg, x, modality, segment), rtol=1e-5, atol=1e-5)


def test_sparse_ffn_gradient_matches_oracle():
    cfg = model_cfg(group_experts=(4, 4))
    layer = SparseFFN(cfg, rngs=nnx.Rngs(1))
    x, modality, segment = inputs(seed=1)
    graphdef, params = nnx.split(layer)

    def loss(fn, p):
        return jnp.sum(jnp.sin(fn(nnx.merge(graphdef, p))))

    grad_layer = jax.jit(jax.grad(lambda p: loss(lambda m: run_layer(m, x, modality, segment), p)))
    grad_oracle = jax.grad(
        lambda p: loss(lambda m: oracle(m, cfg, x, modality, segment, concrete=layer), p)
    )
    got, want = grad_layer(params), grad_oracle(params)
    # The router only reaches the loss through the gates, so its gradient is checked too.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5), got, want)


def test_moma_1t1i_is_a_modality_untied_dense_ffn():
    cfg = model_cfg(group_experts=(1, 1))
    layer: Any = SparseFFN(cfg, rngs=nnx.Rngs(2))  # expert groups are attributes set by name
    x, modality, segment = inputs(seed=2, image_share=0.8)  # far above the 0.25 share
    got = jax.jit(lambda x: run_layer(layer, x, modality, segment))(x)
    w = [
        [
            getattr(getattr(layer, f"group_{g}"), n)[...][0]
            for n in ("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD")
        ]
        for g in (0, 1)
    ]
    want = (
        jnp.where(
            jnp.asarray(modality)[..., None] == 1,
            swiglu(jnp.asarray(x), *w[1]),
            swiglu(jnp.asarray(x), *w[0]),
        )
        * jnp.asarray(segment > 0)[..., None]
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert layer.group_0.router_DxE is None


@pytest.mark.parametrize("name", ["moe_8x_tiny", "moma_4t4i_tiny"])
def test_routing_group_output_independent_of_batch(name):
    cfg = registry.get(name)
    cfg = apply_overrides(cfg, ["model.moe.modality_shares=0.77,0.23"])
    layer = SparseFFN(cfg.model, rngs=nnx.Rngs(3))
    n = cfg.model.moe.routing_group_tokens
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, n, cfg.model.d_model)).astype(np.float32)
    modality = (rng.random((4, n)) < 0.23).astype(np.int32)
    segment = np.ones((4, n), np.int32)
    rows = lambda a: a.reshape(-1, cfg.data.seq_len, *a.shape[2:])  # noqa: E731
    batch = jax.jit(lambda x: run_layer(layer, rows(x), rows(modality), rows(segment)))(x)
    alone = jax.jit(
        lambda x: run_layer(layer, rows(x[1:2]), rows(modality[1:2]), rows(segment[1:2]))
    )(x)
    # Same routing decisions; values equal up to float summation order of XLA's batched matmuls
    # (a different routing decision would change outputs by ~1e-3).
    np.testing.assert_allclose(
        np.asarray(batch).reshape(4, n, -1)[1],
        np.asarray(alone).reshape(n, -1),
        rtol=1e-5,
        atol=1e-7,
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.moe.group_experts=4,0", "expert group 1 has 0 experts"),
        ("model.moe.modality_group=0", "must name a group for each"),
        ("model.moe.modality_group=0,2", "'image' has no expert group"),
        ("model.moe.capacity=0", "capacity must be positive"),
        ("model.moe.capacity=-1", "capacity must be positive"),
        ("model.moe.routing_group_tokens=2", "smaller than the number of experts"),
        ("model.moe.routing_group_tokens=100", "multiple or a divisor"),
        ("model.moe.routing=random", "not a routing method"),
        ("model.moe.routing=expert_chioce", "did you mean expert_choice"),
        ("model.moe.top_k=5", "top_k"),
        ("model.moe.modality_shares=0.5,0.7", "sum to 1"),
    ],
)
def test_bad_sparse_configs_fail_at_config_time(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(registry.get("moma_4t4i_tiny"), [override]))


def test_slots_hold_every_selection_the_paper_makes():
    """Expert choice: C = floor(N * c / E), the most k_e can be; one-expert groups: N; token
    choice keeps the method's capacity (its drops are the algorithm's)."""
    moe = model_cfg(group_experts=(4, 1), capacity=1.0).moe
    assert moe.group_slots(0) == 32 // 4 and moe.group_slots(1) == 32
    assert dataclasses.replace(moe, capacity=2.0).group_slots(0) == 16
    tc = dataclasses.replace(model_cfg(group_experts=(4, 4)).moe, routing="token_choice")
    tc = dataclasses.replace(tc, capacity=1.25, top_k=2)
    assert tc.group_slots(0) == math.ceil(1.25 * 32 * 0.75 * 2 / 4)


@pytest.mark.parametrize("group_experts", [(4, 4), (7, 1), (1, 1), (2, 6)])
@pytest.mark.parametrize("capacity", [1.0, 2.0])
def test_no_modality_mix_overflows_the_slots(group_experts, capacity):
    """For every count of image tokens b in 0..N (text N - b), k_e of every expert fits its
    slots (nothing is ever dropped), and the rows run stay within the static rows."""
    moe = model_cfg(group_experts=group_experts, capacity=capacity, tile_rows=8).moe
    n = moe.routing_group_tokens
    for b_image in range(n + 1):
        rows = 0
        for g, experts in enumerate(moe.group_experts):
            b = b_image if g == 1 else n - b_image
            k = b if experts == 1 else int(np.floor(np.float32(b) * np.float32(capacity / experts)))
            assert k <= moe.group_slots(g) and k == moe.routed_slots(g, b)
            t = moe.slab_slots(g)
            rows += experts * -(-k // t) * t
        assert rows <= moe.static_rows


@pytest.mark.parametrize("image_share", [0.3, 1.0])
def test_ragged_dot_path_equals_the_tile_path(image_share):
    """The ragged path (one ragged_dot per projection, no padding) computes the same layer as
    the slabs, forward and gradient."""
    cfg = model_cfg(group_experts=(4, 2))
    ragged = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, expert_compute="ragged_dot"))
    x, modality, segment = inputs(seed=5, image_share=image_share)
    slabs_layer, ragged_layer = (
        SparseFFN(cfg, rngs=nnx.Rngs(5)),
        SparseFFN(ragged, rngs=nnx.Rngs(5)),
    )
    out = {}
    for name, layer in (("slabs", slabs_layer), ("ragged", ragged_layer)):
        graphdef, params = nnx.split(layer)

        def loss(p, x, graphdef=graphdef):
            return jnp.sum(jnp.sin(run_layer(nnx.merge(graphdef, p), x, modality, segment)))

        out[name] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        out["slabs"],
        out["ragged"],
    )


def test_expert_groups_keep_their_checkpoint_paths():
    """Checkpoints name expert group g's parameters `group_{g}/...` (kept, so old runs
    restore); the layer reads them through `groups`, flops through `expert_group` metadata."""
    layer = SparseFFN(model_cfg(group_experts=(4, 1)), rngs=nnx.Rngs(0))
    params = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(layer))}
    assert {"group_0/router_DxE", "group_0/w_gate_ExDxF", "group_1/w_down_ExFxD"} <= set(params)
    assert "group_1/router_DxE" not in params  # a one-expert group has no router
    for path, var in params.items():
        assert var.get_metadata()["expert_group"] == int(path.split("/")[0].removeprefix("group_"))
    assert [g.n_experts for g in layer.groups] == [4, 1]
