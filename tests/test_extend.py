"""The framework extended from outside the library: this file alone defines a layer kind (a
gated MLP with one gate per modality) and a routing method (a sigmoid threshold), registers
both, checks each is refused when incomplete or misspelt at config time, and describes and
trains one model that uses both for two steps. No library file names either."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import pytest
from cli_args import small
from flax import nnx

from moma_jax import routers, sparse_config
from moma_jax.commands.cli import main
from moma_jax.commands.describe import describe
from moma_jax.commands.evaluate import main as evaluate_main
from moma_jax.config import ConfigError, ModelConfig
from moma_jax.modality import MODALITY_NAMES
from moma_jax.model import LayerKind, mod_kind, moe, register_layer_kind, routing
from moma_jax.model.context import Context
from moma_jax.model.kinds import LAYER_KINDS, forward_flops_per_token
from moma_jax.model.layers import param
from moma_jax.routers import GroupRouting, Routed, Router
from moma_jax.runtime import experiment_config
from moma_jax.sharding import LOGICAL_RULES
from moma_jax.train.metrics import read_jsonl

# --- A layer kind --------------------------------------------------------------------------


class ModalityGatedMLP(nnx.Module):
    """x + sigmoid(gate[modality]) * relu(x W_in) W_out: token-local, so it carries no decode
    state, and its gate names a logical axis the library does not know ("toy_gate")."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.resolved_ffn_hidden
        self.w_in_DxF = param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, cfg.param_dtype)
        self.w_out_FxD = param(rngs, (f, d), ("mlp", "embed"), cfg.init_std, cfg.param_dtype)
        m = len(MODALITY_NAMES)
        self.gate_M = param(rngs, (m,), ("toy_gate",), 1.0, cfg.param_dtype)

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> tuple[jax.Array, dict]:
        dt = x_BxLxD.dtype
        h_BxLxF = jax.nn.relu(x_BxLxD @ self.w_in_DxF[...].astype(dt))
        y_BxLxD = h_BxLxF @ self.w_out_FxD[...].astype(dt)
        gate_BxL = jax.nn.sigmoid(self.gate_M[...][ctx.modality]).astype(dt)
        return x_BxLxD + gate_BxL[..., None] * y_BxLxD, {"metrics": {"toy/gate": gate_BxL.mean()}}


def _toy_flops(cfg: ModelConfig, seq_len: int, attention: str) -> tuple[float, float]:
    flops = 2 * 2 * cfg.d_model * cfg.resolved_ffn_hidden
    return flops, flops


TOY_KIND = register_layer_kind(
    "test_gated",
    LayerKind(
        build=ModalityGatedMLP,
        flops=_toy_flops,
        sharding={"embed": LOGICAL_RULES["embed"], "mlp": LOGICAL_RULES["mlp"], "toy_gate": None},
        decode_state="none",
    ),
)

# Mixture-of-Depths around it is derived from its row, registered like any kind.
TOY_MOD_KIND = register_layer_kind("mod_test_gated", mod_kind(TOY_KIND))

# --- A routing method ----------------------------------------------------------------------


class SigmoidThreshold(Router):
    """Each token goes to every expert whose sigmoid score is > 0.5 (a per-token decision, so
    the same both ways and no aux router); N slots per expert, nothing dropped."""

    name = "test_sigmoid_threshold"

    def slots(self, moe, group):
        return moe.routing_group_tokens

    def experts_per_token(self, moe, group):
        return moe.capacity  # what the run expects; the router decides per token

    def route(self, r: GroupRouting) -> Routed:
        scores_GxNxE = routing.router_scores(r.logits_GxNxE, "sigmoid")
        routed = routers.threshold(r, scores_GxNxE > 0.5, scores_GxNxE, scores_GxNxE)
        entropy = jnp.mean(-scores_GxNxE * jnp.log(jnp.maximum(scores_GxNxE, 1e-9)))
        return routed._replace(losses={"entropy_loss": 1e-3 * entropy})

    route_causal = route


TOY_ROUTER = routers.register_router(SigmoidThreshold())

# --- Both in one model ---------------------------------------------------------------------

KEYS = (
    "model.layer_pattern=test_gated,moe",
    "model.moe.routing=test_sigmoid_threshold",
    "model.moe.routing_group_tokens=512",
    "run.log_every=1",
)


def test_a_model_of_both_is_described_with_their_flops():
    cfg = experiment_config("moe_8x_tiny", [*KEYS, "model.moe.modality_shares=0.77,0.23"])
    info = describe(cfg)
    toy, sparse = info["layer_plan"]["unit"]
    assert (toy["kind"], sparse["kind"]) == ("test_gated", "moe")
    assert toy["flops_ideal"] == toy["flops_executed"] == _toy_flops(cfg.model, 0, "causal")[0]
    assert info["flops_per_token_ideal"] == forward_flops_per_token(cfg.model, cfg.data.seq_len)
    assert info["flops_per_token_executed"] >= info["flops_per_token_ideal"] > 0
    assert LOGICAL_RULES["toy_gate"] is None  # registered with the kind


def test_mixture_of_depths_around_the_kind_is_derived_from_its_row():
    cfg = experiment_config("dense_tiny", ["model.layer_pattern=mod_test_gated,dense"])
    (mod, _), full = describe(cfg)["layer_plan"]["unit"], _toy_flops(cfg.model, 0, "causal")[0]
    assert mod["kind"] == "mod_test_gated"
    assert 0 < mod["flops_ideal"] < full  # the capacity's share of the tokens, plus its router
    assert TOY_MOD_KIND.needs_aux_routers(cfg.model)  # a MoD router ranks the routing group


def test_a_model_of_both_trains_two_steps_and_evaluates(tmp_path, data_dir, capsys):
    args = ["--exp", "moe_8x_tiny", "--workdir", str(tmp_path), "--steps", "2", *small(*KEYS)]
    assert main(args) == 0
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["layer_pattern"] == ["test_gated", "moe"]
    assert saved["model"]["moe"]["routing"] == "test_sigmoid_threshold"
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert any(k.endswith("toy/gate") for k in rows[-1])  # the kind's own metric
    assert "moe/text+image/entropy_loss" in rows[-1]  # the router's own loss
    # Evaluated like any run (a command line would name the module: --experiments MODULE).
    capsys.readouterr()
    assert evaluate_main(["--workdir", str(tmp_path), "--batches", "1", "--json"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["loss"])


# --- Refused at config time, never after training starts -------------------------------------


def test_a_kind_without_flops_is_refused_when_the_config_is_built(capsys, monkeypatch):
    # Registered for this test only: test_kinds checks every row of the table is complete.
    monkeypatch.setitem(LAYER_KINDS, "test_no_flops", dataclasses.replace(TOY_KIND, flops=None))
    with pytest.raises(ConfigError, match="test_no_flops.*without flops"):
        experiment_config("dense_tiny", ["model.layer_pattern=test_no_flops,dense"])
    args = ["--exp", "dense_tiny", "--print-config", "--set", "model.layer_pattern=test_no_flops"]
    assert main(args) == 2
    assert "without flops" in capsys.readouterr().err


def test_misspelt_names_are_refused_with_the_close_matches(capsys):
    for key, close in (
        ("model.moe.routing=toke_choice", "token_choice"),
        ("model.layer_pattern=test_gatd,moe", "test_gated"),
    ):
        assert main(["--exp", "moe_8x_tiny", "--print-config", "--set", key]) == 2
        assert f"did you mean {close}" in capsys.readouterr().err, key
    with pytest.raises(ConfigError, match="not a routing method"):
        routers.get_router("nothing_like_it")


def test_taken_names_and_conflicting_axes_are_refused():
    with pytest.raises(ConfigError, match="registered already"):
        routers.register_router(SigmoidThreshold())
    with pytest.raises(ConfigError, match="registered already"):
        register_layer_kind("dense", TOY_KIND)
    bad_axis = dataclasses.replace(TOY_KIND, sharding={"embed": "tensor"})
    with pytest.raises(ConfigError, match="maps logical axis 'embed'"):
        register_layer_kind("test_bad_axis", bad_axis)
    assert "test_bad_axis" not in LAYER_KINDS
    # Config (below the table) runs model.moe's and model.mod's checks, the router's loss
    # controls and the expert mesh checks by name, so the name must say what the row builds.
    for name, row, match in (
        ("test_experts", LAYER_KINDS["moe"], "sparse_ffn=True.*moe or \\*_moe.*name it so"),
        ("test_gated_moe", TOY_KIND, "sparse_ffn=False.*rename it"),
        ("test_skip", mod_kind(TOY_KIND), "depth_routed=True.*mod_\\*.*name it so"),
        ("mod_test_plain", TOY_KIND, "depth_routed=False.*rename it"),
    ):
        with pytest.raises(ConfigError, match=match):
            register_layer_kind(name, row)
        assert name not in LAYER_KINDS


def test_every_routing_row_and_expert_compute_path_is_complete():
    for row in [*routers.ROUTERS.values(), routers.TAKE_ALL]:
        assert row.name and isinstance(row.has_router, bool), row
        assert isinstance(row.needs_aux_router, bool), row
        for method in ("slots", "experts_per_token", "route", "route_causal"):
            assert getattr(type(row), method) is not getattr(Router, method), (row.name, method)
    assert routers.get_router(TOY_ROUTER.name) is TOY_ROUTER
    assert set(moe.EXPERT_COMPUTE) == set(sparse_config.EXPERT_COMPUTE)
