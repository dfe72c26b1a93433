"""FLOPs accounting against XLA's own count, and the describe command."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moma_jax import registry
from moma_jax.commands.describe import describe, main
from moma_jax.flops import paper_params
from moma_jax.model import Transformer
from moma_jax.model.context import Context
from moma_jax.model.kinds import forward_flops_per_token
from moma_jax.runtime import resolve_shares


def xla_forward_flops(cfg, rows: int) -> float:
    """XLA's cost analysis of an unrolled forward pass (a scan body would be counted once)."""
    model_cfg = dataclasses.replace(cfg.model, scan_unroll=cfg.model.n_units)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    shape = jax.ShapeDtypeStruct((rows, cfg.data.seq_len), jnp.int32)

    def forward(state, tokens, segments, positions, modality):
        return nnx.merge(graphdef, state)(tokens, segments, positions, modality)[0]

    compiled = jax.jit(forward).lower(state, shape, shape, shape, shape).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost is not None
    return float(cost["flops"])


@pytest.mark.parametrize("name", ["dense_tiny", "mot_tiny"])
def test_executed_flops_match_xla_cost_analysis(name):
    """XLA counts a loop body once: for MoT, the static program is each modality's first rows
    plus one overflow slab, accounted for here. The sparse FFN's slabs are checked against the
    layer's own count below."""
    cfg = resolve_shares(registry.get(name))
    m = cfg.model
    rows = m.moe.routing_group_tokens // cfg.data.seq_len
    tokens = rows * cfg.data.seq_len
    ours = forward_flops_per_token(m, cfg.data.seq_len, attention="full", executed=True)
    if "mot" in m.layer_pattern:
        # XLA counts the static program: each modality's first rows and one slab, against our
        # ideal count of every token once.
        hk = m.n_heads * m.resolved_head_dim
        per_row = 2 * m.d_model * 4 * hk + 6 * m.d_model * m.resolved_ffn_hidden
        static_rows = sum(
            sum(m.moe.slab_plan(round(tokens * share), tokens, 1))  # first part + one slab
            for share in m.moe.modality_shares
        )
        ours += m.n_layers * (static_rows - tokens) / tokens * per_row
    xla = xla_forward_flops(cfg, rows) / tokens
    assert abs(xla - ours) / ours < 0.05, (name, xla, ours)


@pytest.mark.parametrize(
    "name, paper_total, experts",
    [
        ("moe_8x_90m", 210e6, 8),
        ("moe_8x_435m", 1.9e9, 8),
        ("moe_8x_1.4b", 7.1e9, 8),
        ("moma_4t4i_1.4b", 7.1e9, 8),
        ("moma_1t1i_90m", None, 2),
    ],
)
def test_describe_reports_paper_parameter_counts(name, paper_total, experts):
    info = describe(registry.get(name))
    formula = paper_params(registry.get(name).model, experts)
    assert abs(info["params_total"] - formula) / formula < 0.005
    if paper_total:
        assert abs(info["params_total"] - paper_total) / paper_total < 0.06
    # One expert's worth of FFN per layer: the active count equals the dense model's.
    dense = describe(registry.get("dense_" + name.rsplit("_", 1)[1]))
    assert info["params_active"] == pytest.approx(dense["params_total"], rel=0.005)
    assert info["flops_per_token_ideal"] == pytest.approx(dense["flops_per_token_ideal"], rel=0.005)


def test_describe_json(capsys):
    assert main(["--exp", "moma_4t4i_1.4b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in (
        "params_total",
        "params_active",
        "flops_per_token_ideal",
        "flops_per_token_executed",
    ):
        assert info[key] > 0
    assert info["flops_per_token_executed"] >= info["flops_per_token_ideal"]
    assert main(["--exp", "moma_4t4i_1.4", "--json"]) == 2


@pytest.mark.parametrize("name", ["moma_6t2i_1.4b", "moma_7t1i_90m", "moma_2t2i_435m"])
def test_paper_formula_counts_every_expert_of_asymmetric_splits(name):
    """Table 1's formula with E = all experts of all groups (6t2i: 8, not max * groups = 12)."""
    cfg = registry.get(name)
    info = describe(cfg)
    assert info["params_paper_formula"] == paper_params(cfg.model, cfg.model.moe.n_experts)
    assert abs(info["params_total"] - info["params_paper_formula"]) / info["params_total"] < 0.005


def test_unset_modality_shares_is_one_config_error_everywhere():
    from moma_jax.config import ConfigError
    from moma_jax.flops import active_params
    from moma_jax.train.state import abstract_params

    cfg = registry.get("moma_4t4i_tiny")
    assert not cfg.model.moe.modality_shares
    _, params = abstract_params(cfg)
    for count in (
        lambda: forward_flops_per_token(cfg.model, cfg.data.seq_len),
        lambda: active_params(cfg.model, params),
        lambda: cfg.model.moe.executed_rows,
    ):
        with pytest.raises(ConfigError, match="model.moe.modality_shares is not set"):
            count()
    # describe (and bench, training) take them from the data manifest first.
    assert describe(cfg)["modality_shares"] == list(resolve_shares(cfg).model.moe.modality_shares)


def test_describe_table_is_readable(capsys):
    assert main(["--exp", "moma_6t2i_tiny"]) == 0
    out = capsys.readouterr().out
    assert "text: 6 experts" in out and "image: 2 experts" in out and "token shares" in out
    assert "{" not in out and "0000000" not in out  # no raw dicts, no float noise


@pytest.mark.parametrize(
    "name", ["moe_8x_tiny", "moma_4t4i_tiny", "moma_1t1i_tiny", "moma_7t1i_tiny"]
)
def test_executed_expert_rows_match_what_the_tiles_run(name):
    """On a routing group whose modality mix is the configured shares, the tiles the layer runs
    (its `moe/rows_used_frac` metric) are exactly `SparseConfig.executed_rows`, which flops.py
    counts; and executed / ideal FFN rows stays within 1.1 at the default tile size."""
    from moma_jax.model.moe import SparseFFN

    cfg = resolve_shares(registry.get(name))
    moe = cfg.model.moe
    n, seq = moe.routing_group_tokens, cfg.data.seq_len
    n_text = round(n * moe.modality_shares[0])
    modality = np.random.default_rng(0).permutation(np.arange(n) >= n_text).astype(np.int32)
    layer = SparseFFN(cfg.model, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (n // seq, seq, cfg.model.d_model))
    segment_ids = jnp.ones_like(x[..., 0], jnp.int32)
    ctx = Context(segment_ids, segment_ids, jnp.asarray(modality.reshape(-1, seq)))
    metrics = jax.jit(lambda x: layer(x, ctx)[1]["metrics"])(x)
    assert round(float(metrics["moe/rows_used_frac"]) * moe.static_rows) == moe.executed_rows
    assert moe.executed_rows / (n * 1.0) <= 1.1
