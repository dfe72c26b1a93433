"""The layer kind table: every row is complete, and what each row says of its kind is true of
the layer it builds (FLOPs, logical axes, decode state)."""

import dataclasses

import jax
import pytest
from flax import nnx

from moma_jax import registry
from moma_jax.model.kinds import LAYER_KINDS, needs_aux_routers, uses_modality_shares
from moma_jax.sharding import LOGICAL_RULES

BUILT_IN = ("dense", "moe", "mot", "mod_dense", "mod_moe", "mod_mot")


def _model_config():
    cfg = registry.get("moma_4t4i_tiny").model
    moe = dataclasses.replace(cfg.moe, modality_shares=(0.5, 0.5))
    return dataclasses.replace(cfg, moe=moe, aux_routers="joint")


def test_the_built_in_kinds_keep_their_names():
    assert set(BUILT_IN) <= set(LAYER_KINDS)


@pytest.mark.parametrize("kind", sorted(LAYER_KINDS))
def test_every_row_is_complete_and_true_of_its_layer(kind):
    row, cfg = LAYER_KINDS[kind], _model_config()
    assert row.missing() == []
    build, flops, rules = row.build, row.flops, row.sharding
    assert build is not None and flops is not None and rules is not None
    ideal, executed = flops(cfg, 256, "causal")
    assert ideal > 0 and executed > 0
    layer = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
    axes = {
        a
        for _, var in nnx.to_flat_state(nnx.state(layer, nnx.Param))
        for a in var.get_metadata().get("out_sharding") or ()
        if a
    }
    assert axes <= set(rules), f"{kind}: parameters name {axes - set(rules)}"
    assert all(LOGICAL_RULES[a] == t for a, t in rules.items())
    if row.decode_state != "none":
        assert callable(row.decode_state)
        state = row.decode_state(cfg, 2, 8)
        assert all(isinstance(v, jax.Array) for v in state.values())
    assert isinstance(row.describe(cfg), dict)


def test_the_rows_answer_what_the_config_properties_did():
    cfg = _model_config()
    pattern = {
        ("dense",): (False, False),
        ("mot",): (True, False),
        ("moe",): (True, True),  # expert choice, groups of 4 experts
        ("mod_dense", "dense"): (False, True),
    }
    for kinds, (shares, aux) in pattern.items():
        m = dataclasses.replace(cfg, layer_pattern=kinds)
        assert (uses_modality_shares(m), needs_aux_routers(m)) == (shares, aux), kinds
    token_choice = dataclasses.replace(cfg.moe, routing="token_choice")
    m = dataclasses.replace(cfg, layer_pattern=("moe",), moe=token_choice)
    assert not needs_aux_routers(m)
