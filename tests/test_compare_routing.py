"""Routing as trained in a suite's report (commands/compare_routing.py), on hand-written metrics
records whose answers are computed here by hand."""

from types import SimpleNamespace

import pytest

from moma_jax.commands.compare_markdown import routing_lines
from moma_jax.commands.compare_routing import flops_ratio, measured, routing_entry
from moma_jax.model.kinds import train_flops_per_token
from moma_jax.runtime import experiment_config

SHARES = ["model.moe.modality_shares=0.75,0.25"]


def _records(text_layers: list[float], image: float = 1.0, steps: int = 100) -> list[dict]:
    """Training records every 10 steps (and one evaluation record): experts per token rises
    from 0 at step 10 to text_layers at the last step, so only the tail's values count."""
    out = []
    for step in range(10, steps + 1, 10):
        at = step / steps if step < steps else 1.0
        r = {"step": step, "loss": 2.0, "moe/image/experts_per_token": image}
        r["moe/text/experts_per_token"] = at * sum(text_layers) / len(text_layers)
        r["moe/text/untaken_frac"] = 0.1 if step >= 90 else 0.5
        for i, v in enumerate(text_layers):
            r[f"layer_{i}/moe/text/experts_per_token"] = at * v
            r[f"layer_{i}/moe/image/experts_per_token"] = image
        r["layer_0/moe/text/load_1"] = 0.3  # an expert's load: not a routing stat here
        out.append(r)
    out.append({"step": steps, "eval_loss": 2.0})
    return out


def test_the_tail_is_the_last_tenth_of_the_logged_steps():
    got = measured(_records([1.5, 1.5, 2.5, 2.5]))
    # Steps 90 and 100 (>= 100 * 0.9): text 0.9 x 2 and 2 -> 1.9; layer 0: 0.9 x 1.5, 1.5.
    assert got["text"]["experts_per_token"] == pytest.approx(1.9)
    assert got["text"]["untaken_frac"] == pytest.approx(0.1)
    assert got["text"]["layers"] == pytest.approx({0: 1.425, 1: 1.425, 2: 2.375, 3: 2.375})
    assert got["image"]["layers"] == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
    assert measured([{"step": 10, "loss": 1.0}]) == {}  # a dense run: no MoE metrics


def test_measured_flops_put_each_layers_experts_per_token_in_place_of_the_assumed_count():
    cfg = experiment_config("moma_4t4i_topp_tiny", SHARES)  # top-p assumes 1 expert per token
    d, hidden = cfg.model.d_model, cfg.model.resolved_ffn_hidden
    ffn = 2 * 3 * d * hidden  # one expert's SwiGLU, forward (granularity 1)
    layers = [1.5, 1.5, 2.5, 2.5]
    groups = {"text": {"layers": dict(enumerate(layers))}, "image": {"layers": {0: 0.5}}}
    groups["image"]["layers"].update({1: 1.0, 2: 1.0, 3: 1.0})
    extra = 0.75 * sum(v - 1 for v in layers) * ffn + 0.25 * (0.5 - 1) * ffn
    ideal = train_flops_per_token(cfg.model, cfg.data.seq_len)
    assert flops_ratio(cfg, groups) == pytest.approx((ideal + 3 * extra) / ideal)
    every = {k: {"layers": dict.fromkeys(range(4), 1.0)} for k in groups}
    assert flops_ratio(cfg, every) == pytest.approx(1.0)
    assert flops_ratio(cfg, {"text+image": {"layers": {0: 1.0}}}) is None  # not its group
    assert flops_ratio(cfg, {"text": every["text"]}) is None  # a group not measured
    assert flops_ratio(cfg, {**every, "image": {"layers": {0: 1.0}}}) is None  # a layer missing
    mod = experiment_config("mod_moma_4t4i_tiny", SHARES)
    assert flops_ratio(mod, {"text": {"layers": {0: 1.0}}}) is None  # MoD blocks: not read


def test_the_entry_summarizes_seeds_and_the_markdown_shows_each_group():
    cfg = experiment_config("moma_4t4i_topp_tiny", SHARES)
    runs = [SimpleNamespace(records=_records([v] * 4), config=cfg) for v in (1.0, 2.0, 3.0)]
    entry = routing_entry(runs)
    assert entry is not None
    text = entry["groups"]["text"]["experts_per_token"]
    # Per seed: (0.9 v + v) / 2 = 0.95 v.
    assert text["per_seed"] == pytest.approx([0.95, 1.9, 2.85]) and text["n"] == 3
    assert text["mean"] == pytest.approx(1.9) and text["low"] < 1.9 < text["high"]
    assert entry["groups"]["text"]["assumed"] == 1.0
    assert entry["groups"]["text"]["dropped_frac"]["mean"] is None  # not logged here
    assert entry["flops_measured_over_ideal"]["n"] == 3
    dense = experiment_config("dense_tiny")
    assert routing_entry([SimpleNamespace(records=[{"step": 1, "loss": 1}], config=dense)]) is None
    rep = {"experiments": {"dense_tiny": {"routing": None}, "topp": {"routing": entry}}}
    lines = routing_lines(rep)
    rows = [line for line in lines if line.startswith("| topp |")]
    assert [r.split(" | ")[1] for r in rows] == ["image", "text"]
    assert "| 1.900 [" in rows[1] and "| 1 |" in rows[1]
    assert routing_lines({"experiments": {"dense_tiny": {"routing": None}}}) == []


@pytest.mark.parametrize("name", ["moma_fine8_shared_tiny", "moma_4t4i_tiny"])
def test_every_layer_at_the_assumed_count_plus_delta_is_the_model_at_that_capacity(name):
    """An oracle by another path: expert choice assumes `capacity` experts per token, so every
    layer measured at capacity + 0.5 costs what the model built at that capacity costs
    (`flops.sparse_layer_flops`, fine-grained and shared experts included)."""
    cfg = experiment_config(name, SHARES)
    more = experiment_config(name, [*SHARES, f"model.moe.capacity={cfg.model.moe.capacity + 0.5}"])
    layers = cfg.model.n_units * cfg.model.layer_pattern.count("moe")
    at = cfg.model.moe.capacity + 0.5
    groups = {n: {"layers": dict.fromkeys(range(layers), at)} for n in ("text", "image")}
    seq = cfg.data.seq_len
    want = train_flops_per_token(more.model, seq) / train_flops_per_token(cfg.model, seq)
    assert want > 1.01 and flops_ratio(cfg, groups) == pytest.approx(want, rel=1e-9)
