"""Sparse upcycling: expert stacks copied from the seed run, routers fresh, data position kept."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from cli_args import SMALL_KEYS, sets
from flax import nnx

from moma_jax import registry
from moma_jax.commands.cli import main
from moma_jax.config import ConfigError
from moma_jax.overrides import apply_overrides
from moma_jax.train.metrics import read_jsonl
from moma_jax.train.state import build_model
from moma_jax.train.upcycle import upcycle_params

UPCYCLED = "upcycled_moma_4t4i_tiny"
SMALL = [
    *SMALL_KEYS,
    "model.moe.routing_group_tokens=1024",
    "optim.total_steps=20",
    "run.eval_batches=1",
    "run.checkpoint_every=3",
]


def small(name):
    return apply_overrides(registry.get(name), SMALL)


def test_upcycle_params_copies_and_expands():
    seed = nnx.state(build_model(small("moma_1t1i_tiny")))
    fresh = nnx.state(build_model(apply_overrides(small(UPCYCLED), ["run.param_seed=7"])))
    out = dict(nnx.to_flat_state(upcycle_params(seed, fresh)))
    src, new = dict(nnx.to_flat_state(seed)), dict(nnx.to_flat_state(fresh))
    assert set(out) == set(new)
    for path, var in out.items():
        name = "/".join(map(str, path))
        if "router" in name:  # the seed has no routers: fresh initialisation kept
            np.testing.assert_array_equal(var[...], new[path][...])
        elif "group_" in name:  # [U, 1, ...] seed expert copied into each of the 4 experts
            assert var.shape[1] == 4
            for e in range(4):
                np.testing.assert_array_equal(var[...][:, e], src[path][...][:, 0])
        else:
            np.testing.assert_array_equal(var[...], src[path][...])


def train(exp: str, workdir, *extra: str) -> int:
    return main(["--exp", exp, "--workdir", str(workdir), *sets(*SMALL), *extra])


def test_upcycled_run_continues_the_seed_runs_data(tmp_path, data_dir):
    seed_dir, up_dir = tmp_path / "seed", tmp_path / "up"
    assert train("moma_1t1i_tiny", seed_dir, "--steps", "3") == 0
    assert train(UPCYCLED, up_dir, "--steps", "3", "--init-from", str(seed_dir)) == 0

    def data_index(workdir):
        (state,) = (workdir / "checkpoints" / "3" / "data").glob("*.json")
        return json.loads(state.read_text())["parent"]["next_index"]

    # The upcycled run read 3 more steps' documents after the seed run's 3.
    assert data_index(up_dir) > data_index(seed_dir) > 0
    # Its tokens and FLOPs start at the seed run's (compare.py plots it against FLOPs).
    seed_last = read_jsonl(seed_dir / "metrics.jsonl")[-1]
    up = {r["step"]: r for r in read_jsonl(up_dir / "metrics.jsonl")}
    assert up[0]["tokens"] == seed_last["tokens"] and up[0]["flops"] == seed_last["flops"]
    assert up[3]["tokens"] == 2 * seed_last["tokens"]
    assert up[3]["flops"] > 2 * seed_last["flops"]  # the sparse steps cost more than the seed's
    last = read_jsonl(up_dir / "metrics.jsonl")[-1]
    for key in (
        "loss_text",
        "loss_image",
        "moe/text/load_3",
        "moe/image/dropped_frac",
        "moe/image/wasted_frac",
        "moe/text/score_entropy",
        "flops_executed",
    ):
        assert np.isfinite(last[key]), key
    assert last["flops_executed"] > last["flops"]
    saved = json.loads((up_dir / "config.json").read_text())
    assert saved["run"]["init_from"] == str(seed_dir.absolute())
    assert saved["model"]["moe"]["router_noise"] == "gumbel"


def test_upcycling_refuses_mismatched_or_missing_sources(tmp_path, data_dir, capsys):
    seed_dir = tmp_path / "seed"
    assert train("moma_1t1i_tiny", seed_dir, "--steps", "1") == 0
    wider = ["--init-from", str(seed_dir), "--set", "model.d_model=64"]
    assert train(UPCYCLED, tmp_path / "a", *wider) == 2
    assert "model.d_model: 32 -> 64" in capsys.readouterr().err
    assert train(UPCYCLED, tmp_path / "b", "--init-from", str(tmp_path / "nothing")) == 2
    assert "no run there" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="cannot upcycle"):
        src = nnx.state(build_model(small("moma_2t2i_tiny")))
        dst = nnx.state(build_model(small("moma_4t4i_tiny")))
        upcycle_params(src, dst)


def test_a_dense_run_seeds_every_expert_and_a_one_expert_group_computes_it_exactly():
    """Upcycling from dense (Llama 3 meets MoE): each expert of each group starts as the dense
    FFN, routers fresh; moma_1t1i (one expert per group, gate 1) then computes the dense model."""
    dense = build_model(small("dense_tiny"))
    seed = nnx.state(dense)
    fresh = nnx.state(build_model(apply_overrides(small(UPCYCLED), ["run.param_seed=7"])))
    out = dict(nnx.to_flat_state(upcycle_params(seed, fresh)))
    src, new = dict(nnx.to_flat_state(seed)), dict(nnx.to_flat_state(fresh))
    assert set(out) == set(new)
    copied = 0
    for path, var in out.items():
        name = "/".join(map(str, path))
        if "router" in name:
            np.testing.assert_array_equal(var[...], new[path][...])
        elif "group_" in name:  # units/block_0/ffn/group_g/w_gate_ExDxF <- .../ffn/w_gate_DxF
            dense_name = {"w_gate_ExDxF": "w_gate_DxF", "w_up_ExDxF": "w_up_DxF"}.get(
                str(path[-1]), "w_down_FxD"
            )
            source = src[(*path[:-2], dense_name)][...]
            for e in range(var.shape[1]):
                np.testing.assert_array_equal(var[...][:, e], source)
            copied += 1
        else:
            np.testing.assert_array_equal(var[...], src[path][...])
    assert copied == 6  # 3 weights x 2 groups

    untied = build_model(
        apply_overrides(small("moma_1t1i_tiny"), ["model.moe.modality_shares=0.7,0.3"])
    )
    nnx.update(untied, upcycle_params(seed, nnx.state(untied)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 24, (16, 64))  # one routing group of 1,024 tokens
    modality = (rng.random((16, 64)) < 0.3).astype(np.int32)
    segments, positions = np.ones_like(tokens), np.broadcast_to(np.arange(64), (16, 64))
    t, s, p, m = (jnp.asarray(a) for a in (tokens, segments, positions, modality))
    np.testing.assert_allclose(untied(t, s, p, m)[0], dense(t, s, p, m)[0], atol=2e-5, rtol=1e-5)


def test_upcycling_from_dense_runs_and_refuses_other_layer_changes(tmp_path, data_dir, capsys):
    dense_dir = tmp_path / "dense"
    assert train("dense_tiny", dense_dir, "--steps", "1") == 0
    assert train(UPCYCLED, tmp_path / "up", "--steps", "2", "--init-from", str(dense_dir)) == 0
    assert "upcycled" in capsys.readouterr().out
    assert train("mot_tiny", tmp_path / "mot", "--init-from", str(dense_dir)) == 2
    err = capsys.readouterr().err
    assert "model.layer_pattern: ('dense',) -> ('mot',)" in err
    assert "upcycling may turn the source's dense layers into moe layers" in err


def test_a_source_saved_under_another_scan_or_attention_kernel_is_accepted(tmp_path):
    """How the source's step was compiled (model.scan_unroll, model.attention) need not match:
    an aux stage or an upcycling from a run saved under the earlier default (1) goes ahead;
    a real model difference is still refused."""
    from moma_jax.train.upcycle import load_source
    from moma_jax.train.workdir import Workdir

    base = registry.get("moma_4t4i_tiny")
    source = Workdir(tmp_path / "src")
    source.path.mkdir()
    source.write_config(apply_overrides(base, ["model.scan_unroll=1", "model.attention=pallas"]))
    for target in ("moma_4t4i_aux_tiny", "upcycled_moma_4t4i_tiny"):
        load_source(source, registry.get(target))
    with pytest.raises(ConfigError, match="model.d_model"):
        load_source(
            source, apply_overrides(registry.get("moma_4t4i_aux_tiny"), ["model.d_model=64"])
        )
