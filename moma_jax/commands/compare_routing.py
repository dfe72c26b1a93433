"""Routing as trained, in a suite's report: per experiment and routing group, what the routers did
over the last tenth of training (from the metrics every MoE layer logs, `model/moe.py`): experts
per token against the count its ideal FLOPs assume, tokens no expert took, tokens with more than
one, dropped assignments; and the training FLOPs per token those measured counts imply against
the ideal count. Per-token routers (top-p, top-any, ReMoE, null experts) are FLOP-matched at an
assumed count and use what they learn, so their measured value is the one to read beside their
losses (docs/comparison.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from moma_jax.commands.compare_stats import summarize
from moma_jax.flops import ffn_flops_per_token, moe_routed_config
from moma_jax.metric_names import split_layer_metric
from moma_jax.model.kinds import train_flops_per_token

STATS = ("experts_per_token", "untaken_frac", "multi_expert_frac", "dropped_frac")
TAIL = 0.1  # the share of the logged training steps, at the end, that is averaged


def _tail(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training records of the last TAIL of the run's steps (at least the last one)."""
    trains = [r for r in records if "loss" in r]
    if not trains:
        return []
    last = trains[-1]["step"]
    return [r for r in trains if r["step"] >= last * (1 - TAIL)] or trains[-1:]


def measured(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{group: {stat: mean over the tail, "layers": {layer: experts per token}}} from the
    records' "moe/{group}/{stat}" (the mean over layers) and "layer_{i}/moe/{group}/
    experts_per_token" keys; {} for a run without MoE layers."""
    tail = _tail(records)
    out: dict[str, dict[str, Any]] = {}
    for key in tail[-1] if tail else ():
        per_layer = split_layer_metric(key)
        parts = (per_layer[1] if per_layer else key).split("/")
        if len(parts) != 3 or parts[0] != "moe" or parts[2] not in STATS:
            continue
        values = [float(r[key]) for r in tail if key in r]
        group = out.setdefault(parts[1], {"layers": {}})
        if per_layer is None:
            group[parts[2]] = float(np.mean(values))
        elif parts[2] == "experts_per_token":
            group["layers"][per_layer[0]] = float(np.mean(values))
    return out


def flops_ratio(cfg: Any, groups: dict[str, dict[str, Any]]) -> float | None:
    """Training FLOPs per token with each layer's measured experts per token in place of the
    ideal count, over the ideal (1.0 where they agree). None where it cannot be read so: a layer
    pattern with other kinds than "moe" and "dense" (in a Mixture-of-Depths block, say, a group's
    metrics count the tokens its block took, not the group's), or a routing group or MoE layer
    without its per-layer metric."""
    model = cfg.model
    if not set(model.layer_pattern) <= {"moe", "dense"} or "moe" not in model.layer_pattern:
        return None
    moe = model.moe
    names = {moe.group_name(g): g for g in range(moe.n_groups)}
    layers = model.n_units * model.layer_pattern.count("moe")
    if set(groups) != set(names) or any(len(g["layers"]) != layers for g in groups.values()):
        return None  # a group or layer not measured is not assumed ideal
    ffn = ffn_flops_per_token(moe_routed_config(model))
    extra = 0.0
    for name, group in groups.items():
        g = names[name]
        assumed = moe.experts_per_token(g)
        extra += sum(moe.group_share(g) * (m - assumed) * ffn for m in group["layers"].values())
    ideal = train_flops_per_token(model, cfg.data.seq_len)
    return (ideal + 3 * extra) / ideal


def routing_entry(runs: list[Any]) -> dict[str, Any] | None:
    """Over a suite experiment's seeds (opened runs: `.records`, `.config`): per group, each
    stat's per-seed values, mean and t-interval, the count the ideal FLOPs assume, and the
    measured/ideal FLOPs ratio; None for an experiment without MoE layers."""
    per_seed = [measured(run.records) for run in runs]
    if not any(per_seed):
        return None
    moe = runs[0].config.model.moe
    names = {moe.group_name(g): g for g in range(moe.n_groups)}
    groups: dict[str, Any] = {}
    for name in sorted({n for seed in per_seed for n in seed}):
        entry: dict[str, Any] = {
            s: summarize([seed.get(name, {}).get(s) for seed in per_seed]) for s in STATS
        }
        entry["assumed"] = moe.experts_per_token(names[name]) if name in names else None
        groups[name] = entry
    ratios = [flops_ratio(run.config, seed) for run, seed in zip(runs, per_seed, strict=True)]
    return {"groups": groups, "flops_measured_over_ideal": summarize(ratios)}
