"""What an experiment is, without running it: parameters, FLOPs per token, the layer plan."""

from __future__ import annotations

import argparse
import json
import sys

from moma_jax.commands import aot
from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.flops import active_params, count_params, paper_params
from moma_jax.modality import MODALITY_NAMES
from moma_jax.model.kinds import (
    aux_router_flops_per_token,
    forward_flops_per_token,
    layer_flops,
    layer_kind,
)
from moma_jax.runtime import (
    add_experiment_args,
    experiment_config,
    load_experiment_modules,
    resolve_shares,
)
from moma_jax.train.state import abstract_params
from moma_jax.units import byte_size

_PLAN_KEYS = ("kind", "flops_ideal", "flops_executed")  # every layer plan entry has these


def describe(cfg: ExperimentConfig) -> dict:
    """Numbers from the built model's abstract shapes and the analytic FLOPs model (modality
    shares from the data manifest when the config sets none, as training does)."""
    cfg = resolve_shares(cfg)
    m, seq, moe = cfg.model, cfg.data.seq_len, cfg.model.moe
    _, params = abstract_params(cfg)
    plan = []
    for kind in m.layer_pattern:
        ideal, executed = layer_flops(m, kind, seq)
        entry = {"kind": kind, "flops_ideal": ideal, "flops_executed": executed}
        entry.update(layer_kind(kind).describe(m))  # the kind's own fields (expert groups)
        plan.append(entry)
    # Table 1's formula counts every expert of every group: E = sum of the groups' experts, in
    # units of a full FFN (fine-grained and shared experts: experts / granularity).
    experts = (moe.n_experts + moe.shared_experts * moe.n_groups) / moe.granularity
    experts = experts if m.has_experts else 1
    ideal = forward_flops_per_token(m, seq)
    executed = forward_flops_per_token(m, seq, executed=True)
    aux_routers, aux_flops = aux_router_flops_per_token(m)
    return {
        "name": cfg.name,
        "params_total": count_params(params),
        "params_active": active_params(m, params),
        "params_paper_formula": (
            # MoMa Table 1's formula: attention and (expert) FFN layers only.
            paper_params(m, experts) if set(m.base_kinds) <= {"dense", "moe"} else None
        ),
        "flops_per_token_ideal": ideal,
        "flops_per_token_executed": executed,
        "executed_over_ideal": executed / ideal,
        "train_flops_per_token_ideal": 3 * ideal,
        "aux_routers_per_token": aux_routers,
        "aux_router_flops_per_token": aux_flops,
        "aux_routers_trained": m.aux_routers,
        "seq_len": seq,
        "layers": m.n_layers,
        "d_model": m.d_model,
        "layer_plan": {"repeats": m.n_units, "unit": plan},
        "modality_shares": list(moe.modality_shares) if m.has_experts else None,
    }


def human(x: float) -> str:
    """3 significant digits with a K/M/B/T suffix: 117456896.00000001 -> '117M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def table(info: dict) -> str:
    """The describe report as aligned text."""
    plan = info["layer_plan"]
    paper = info["params_paper_formula"]
    lines = [
        f"{info['name']}: {info['layers']} layers x d={info['d_model']}, seq {info['seq_len']}",
        f"  parameters      total {human(info['params_total'])}, active per token "
        f"{human(info['params_active'])}"
        + (f", MoMa Table 1 formula {human(paper)}" if paper else ""),
        f"  FLOPs / token   forward ideal {human(info['flops_per_token_ideal'])}, executed "
        f"{human(info['flops_per_token_executed'])} ({info['executed_over_ideal']:.3f}x); "
        f"training ideal {human(info['train_flops_per_token_ideal'])}",
    ]
    if info["aux_routers_per_token"]:
        aux = info["aux_router_flops_per_token"]
        lines.append(
            f"  aux routers     {info['aux_routers_per_token']:.3g} per token for causal "
            f"inference, forward {human(aux)} ({aux / info['flops_per_token_ideal']:.3f}x "
            f"ideal; with them {human(aux + info['flops_per_token_ideal'])}); trained here: "
            f"{info['aux_routers_trained']}"
        )
    if info["modality_shares"]:
        shares = zip(MODALITY_NAMES, info["modality_shares"], strict=True)
        lines.append("  token shares    " + ", ".join(f"{n} {s:.3f}" for n, s in shares))
    lines.append(f"  layer plan: this unit repeated {plan['repeats']}x")
    lines.append(f"    {'#':>2}  {'kind':6} {'ideal':>8} {'executed':>9}  routing")
    for i, entry in enumerate(plan["unit"]):
        routing = ""
        if "groups" in entry:
            groups = "; ".join(
                f"{g['name']}: {g['experts']} experts x {g['slots']} slots, "
                f"{g['experts_per_token']:g} per token (ideal), "
                f"{g['first_slots']} always run, then slabs of {g['slab_slots']}"
                for g in entry["groups"]
            )
            routing = (
                f"{entry['routing']}, c={entry['capacity']:g}, groups of "
                f"{entry['routing_group_tokens']} tokens ({groups})"
            )
        else:  # another kind's own fields (attention experts: heads, experts, top_k)
            routing = ", ".join(f"{k}={v}" for k, v in entry.items() if k not in _PLAN_KEYS)
        lines.append(
            f"    {i:>2}  {entry['kind']:6} {human(entry['flops_ideal']):>8} "
            f"{human(entry['flops_executed']):>9}  {routing}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="describe.py", description=__doc__)
    add_experiment_args(p, exp_required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--mesh", help="with --aot: the mesh to compile for, e.g. data=8,fsdp=8,expert=1,tensor=1"
    )
    p.add_argument(
        "--aot",
        action="store_true",
        help="compile the train step for --mesh on simulated CPU devices (in a subprocess) and "
        "report per-device memory and collectives, without running it",
    )
    p.add_argument(
        "--device-memory",
        type=byte_size,
        help="with --aot: a device's memory (e.g. 80GB); micro_batches doubles until it fits",
    )
    args = p.parse_args(argv)
    try:
        load_experiment_modules(args)
        info = describe(experiment_config(args.exp, args.overrides))
        if args.aot:
            if not args.mesh:
                raise ConfigError("--aot needs --mesh, e.g. --mesh data=8,fsdp=8")
            info["aot"] = aot.run_in_subprocess(
                args.exp,
                list(args.overrides),
                aot.parse_mesh(args.mesh),
                args.device_memory,
                list(getattr(args, "experiments", None) or []),
            )
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info) if args.json else table(info) + aot_table(info.get("aot")))
    return 0


def aot_table(report: dict | None) -> str:
    """The --aot report as text lines ('' without one)."""
    if not report:
        return ""
    gib = 2**30
    mesh = ",".join(f"{k}={v}" for k, v in report["mesh"].items())
    lines = [
        f"\n  AOT on a simulated mesh {mesh} ({report['note']}):",
        f"    per device: {report['memory_per_device_bytes'] / gib:.2f} GiB peak = params "
        f"{report['params_per_device_bytes'] / gib:.2f} + optimizer "
        f"{report['optimizer_per_device_bytes'] / gib:.2f} + activations/temporaries "
        f"{report['temp_per_device_bytes'] / gib:.2f} (+ batch and outputs)",
        f"    micro_batches {report['micro_batches']}, remat {report['remat']}; compiled in "
        f"{report['compile_s']} s, peak RSS {report['peak_rss_bytes'] / gib:.1f} GiB",
        "    collectives: " + ", ".join(f"{k} {v}" for k, v in report["collectives"].items()),
    ]
    if "fits" in report:
        tried = ", ".join(
            f"{t['micro_batches']}: {t['memory_per_device_bytes'] / gib:.1f} GiB"
            for t in report["trials"]
        )
        verdict = "fits" if report["fits"] else "does NOT fit"
        lines.append(
            f"    {verdict} in {report['device_memory_bytes'] / gib:.1f} GiB (micro_batches "
            f"tried: {tried})"
        )
    return "\n".join(lines)
