"""A layer kind added from outside the library: this file alone defines a toy kind (a gated MLP
with one gate per modality), registers it, describes a model using it and trains that model two
steps; a kind registered without FLOPs is refused when the config is built."""

import dataclasses
import json
import math

import jax
import pytest
from cli_args import small
from flax import nnx

from moma_jax.commands.cli import main
from moma_jax.commands.describe import describe
from moma_jax.config import ConfigError, ModelConfig
from moma_jax.modality import MODALITY_NAMES
from moma_jax.model import LayerKind, register_layer_kind
from moma_jax.model.context import Context
from moma_jax.model.kinds import LAYER_KINDS, forward_flops_per_token
from moma_jax.model.layers import param
from moma_jax.runtime import experiment_config
from moma_jax.sharding import LOGICAL_RULES
from moma_jax.train.metrics import read_jsonl


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


TOY = LayerKind(
    build=lambda cfg, rngs: ModalityGatedMLP(cfg, rngs),
    flops=_toy_flops,
    sharding={"embed": LOGICAL_RULES["embed"], "mlp": LOGICAL_RULES["mlp"], "toy_gate": None},
    decode_state="none",
)
if "toy_gated" not in LAYER_KINDS:
    register_layer_kind("toy_gated", TOY)

KEYS = small("model.layer_pattern=toy_gated,dense", "run.log_every=1", "model.n_layers=4")


def test_the_toy_kind_is_described_with_its_flops():
    cfg = experiment_config("dense_tiny", ["model.layer_pattern=toy_gated,dense"])
    info = describe(cfg)
    toy, dense = info["layer_plan"]["unit"]
    assert toy["kind"] == "toy_gated"
    assert toy["flops_ideal"] == toy["flops_executed"] == _toy_flops(cfg.model, 0, "causal")[0]
    assert info["flops_per_token_ideal"] == forward_flops_per_token(cfg.model, cfg.data.seq_len)
    assert LOGICAL_RULES["toy_gate"] is None  # registered with the kind


def test_the_toy_kind_trains_two_steps(tmp_path, data_dir):
    args = ["--exp", "dense_tiny", "--workdir", str(tmp_path), "--steps", "2", *KEYS]
    assert main(args) == 0
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["layer_pattern"] == ["toy_gated", "dense"]
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert any(k.endswith("toy/gate") for k in rows[-1])  # the kind's own metric is logged


def test_a_kind_without_flops_is_refused_when_the_config_is_built(capsys, monkeypatch):
    # Registered for this test only: the table's other tests check every row is complete.
    monkeypatch.setitem(LAYER_KINDS, "toy_no_flops", dataclasses.replace(TOY, flops=None))
    with pytest.raises(ConfigError, match="toy_no_flops.*without flops"):
        experiment_config("dense_tiny", ["model.layer_pattern=toy_no_flops,dense"])
    args = ["--exp", "dense_tiny", "--print-config", "--set", "model.layer_pattern=toy_no_flops"]
    assert main(args) == 2
    assert "without flops" in capsys.readouterr().err


def test_a_taken_name_or_a_conflicting_axis_is_refused():
    with pytest.raises(ConfigError, match="already registered"):
        register_layer_kind("dense", TOY)
    with pytest.raises(ConfigError, match="maps logical axis 'embed'"):
        register_layer_kind("toy_bad_axis", dataclasses.replace(TOY, sharding={"embed": "tensor"}))
    assert "toy_bad_axis" not in LAYER_KINDS
