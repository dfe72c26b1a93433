"""What an experiment is, without running it: parameters, FLOPs per token, the layer plan."""

from __future__ import annotations

import argparse
import json
import sys

from moma_jax import registry
from moma_jax.config import ConfigError, ExperimentConfig, validate
from moma_jax.flops import (
    LAYER_FLOPS,
    active_params,
    count_params,
    forward_flops_per_token,
    paper_params,
)
from moma_jax.overrides import apply_overrides
from moma_jax.train.state import abstract_params


def resolve_shares(cfg: ExperimentConfig) -> ExperimentConfig:
    """Modality shares from the experiment's data manifest (the bundled data by default)."""
    if cfg.model.moe.modality_shares or "moe" not in cfg.model.layer_pattern:
        return cfg
    from moma_jax import data
    from moma_jax.train.workdir import with_data_shares

    return with_data_shares(cfg, data.load_manifest(data.ensure_data(cfg.data.path or None)))


def describe(cfg: ExperimentConfig) -> dict:
    """Numbers from the built model's abstract shapes and the analytic FLOPs model."""
    cfg = resolve_shares(cfg)
    m, seq = cfg.model, cfg.data.seq_len
    _, params = abstract_params(cfg)
    moe = m.moe
    plan = []
    for kind in m.layer_pattern:
        ideal, executed = LAYER_FLOPS[kind](m, seq, "causal")
        entry = {"kind": kind, "flops_ideal": ideal, "flops_executed": executed}
        if kind == "moe":
            entry.update(
                group_experts=list(moe.group_experts),
                modality_group=list(moe.modality_group),
                routing=moe.routing,
                capacity=moe.capacity,
                routing_group_tokens=moe.routing_group_tokens,
            )
        plan.append(entry)
    experts = max(moe.group_experts) * len(moe.group_experts) if "moe" in m.layer_pattern else 1
    ideal = forward_flops_per_token(m, seq)
    executed = forward_flops_per_token(m, seq, executed=True)
    return {
        "name": cfg.name,
        "params_total": count_params(params),
        "params_active": active_params(m, params),
        "params_paper_formula": paper_params(m, experts) if "mot" not in m.layer_pattern else None,
        "flops_per_token_ideal": ideal,
        "flops_per_token_executed": executed,
        "executed_over_ideal": executed / ideal,
        "train_flops_per_token_ideal": 3 * ideal,
        "seq_len": seq,
        "layers": m.n_layers,
        "d_model": m.d_model,
        "layer_plan": {"repeats": m.n_units, "unit": plan},
        "modality_shares": list(moe.modality_shares) if "moe" in m.layer_pattern else None,
    }


def _human(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="describe.py", description=__doc__)
    p.add_argument("--exp", required=True, help="experiment name (train.py --list)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        info = describe(validate(apply_overrides(registry.get(args.exp), args.overrides)))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['name']}: {info['layers']} layers x d={info['d_model']}, seq {info['seq_len']}")
    print(
        f"  params total   {_human(info['params_total'])}  active {_human(info['params_active'])}"
    )
    print(
        f"  forward FLOPs/token  ideal {_human(info['flops_per_token_ideal'])}  executed "
        f"{_human(info['flops_per_token_executed'])} ({info['executed_over_ideal']:.3f}x)"
    )
    print(f"  layer plan: {info['layer_plan']['repeats']} x {info['layer_plan']['unit']}")
    return 0
