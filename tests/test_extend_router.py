"""A routing method added from outside the library: one row, registered by this file alone,
is checked at config time, described, and trained; and every registered row is complete."""

import json

import jax
import jax.numpy as jnp
import pytest
from cli_args import small

from moma_jax import routers, sparse_config
from moma_jax.commands.cli import main as train_main
from moma_jax.commands.describe import main as describe_main
from moma_jax.config import ConfigError
from moma_jax.model import moe, routing
from moma_jax.routers import GroupRouting, Routed, Router


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


ROW = routers.register_router(SigmoidThreshold())
KEYS = (
    "model.moe.routing=test_sigmoid_threshold",
    "model.moe.routing_group_tokens=512",
    "run.log_every=1",
)


def test_every_registered_row_is_complete():
    for row in [*routers.ROUTERS.values(), routers.TAKE_ALL]:
        assert row.name and isinstance(row.has_router, bool), row
        assert isinstance(row.needs_aux_router, bool), row
        for method in ("slots", "experts_per_token", "route", "route_causal"):
            assert getattr(type(row), method) is not getattr(Router, method), (row.name, method)
    assert routers.get_router(ROW.name) is ROW


def test_unknown_router_fails_with_close_matches(capsys):
    args = ["--exp", "moe_8x_tiny", "--print-config", "--set", "model.moe.routing=toke_choice"]
    assert train_main(args) == 2
    assert "did you mean token_choice" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a routing method"):
        routers.get_router("nothing_like_it")
    with pytest.raises(ValueError, match="registered already"):
        routers.register_router(SigmoidThreshold())


def test_the_registered_router_describes_and_trains(tmp_path, data_dir, capsys):
    assert describe_main(["--exp", "moe_8x_tiny", *small(*KEYS), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["flops_per_token_executed"] >= info["flops_per_token_ideal"] > 0
    workdir = tmp_path / "run"
    args = ["--exp", "moe_8x_tiny", "--workdir", str(workdir), "--steps", "2", *small(*KEYS)]
    assert train_main(args) == 0
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in lines if "moe/text+image/entropy_loss" in m]
    assert trained, lines[-1].keys()
    assert all(jax.numpy.isfinite(m["loss"]) for m in trained)


def test_every_expert_compute_path_has_a_row():
    assert set(moe.EXPERT_COMPUTE) == set(sparse_config.EXPERT_COMPUTE)
