"""`scripts/compare.py`: train a named suite (what is missing; a killed suite resumes where it
stopped), then report it at equal FLOPs.

    python scripts/compare.py --suite paper_tiny [--seeds N] [--root DIR] [--set key=value ...]
    python scripts/compare.py --suite paper_tiny --report-only

Runs live in ROOT/SUITE/EXPERIMENT/seedS (default ROOT: runs/suites). The report goes to
ROOT/SUITE/report.md, report.json and PNG plots (docs/comparison.md explains every number).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from moma_jax import host_memory
from moma_jax.config import ConfigError
from moma_jax.eta import eta, mean_spread, smooth, step_ratio
from moma_jax.experiments.suites import Suite, get_suite
from moma_jax.runtime import (
    add_experiments_module_arg,
    add_set_arg,
    enable_compilation_cache,
    experiment_config,
    load_experiment_modules,
)

MODALITIES = {"overall": "", "text": "_text", "image": "_image"}
TRAIN_WINDOW = 20  # logged steps in the trailing mean of the training loss (the paper's eta)


def seed_keys(seed: int) -> list[str]:
    return [f"run.param_seed={seed}", f"run.routing_seed={seed}", f"data.seed={seed}"]


def run_dir(root: Path, suite: Suite, exp: str, seed: int) -> Path:
    return root / suite.name / exp / f"seed{seed}"


def train_suite(suite: Suite, seeds: int, root: Path, overrides: list[str]) -> None:
    """Trains every (experiment, seed) of the suite to its schedule's end; finished runs are
    skipped and partial ones resume from their checkpoints."""
    from moma_jax.train import train

    for seed in range(seeds):
        for exp in suite.experiments:
            cfg = experiment_config(exp, [*suite.overrides, *overrides, *seed_keys(seed)])
            workdir = run_dir(root, suite, exp, seed)
            print(f"[compare] {exp} seed {seed} -> {workdir}", file=sys.stderr, flush=True)
            train(cfg, workdir)


def _curves(workdir: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    trains = [r for r in records if "loss" in r]
    out: dict[str, Any] = {"steps": int(max(r["step"] for r in records))}
    for m, suffix in MODALITIES.items():
        out[f"eval_{m}"] = (
            [r["flops"] for r in evals],
            [r[f"eval_loss{suffix}"] for r in evals],
            [r["step"] for r in evals],
        )
        loss = smooth([r[f"loss{suffix}"] for r in trains], TRAIN_WINDOW)
        out[f"train_{m}"] = ([r["flops"] for r in trains], list(loss), [r["step"] for r in trains])
    last = trains[-1]
    out["step_time_s"] = _step_time(trains)
    out["layer_load"] = _layer_load(trains[-1])
    out["tokens_per_step"] = last["tokens"] / last["step"]
    out["flops_per_token"] = last["flops"] / last["tokens"]
    out["flops_per_token_executed"] = last.get("flops_executed", last["flops"]) / last["tokens"]
    return out


def _layer_load(record: dict[str, Any]) -> dict[str, list[list[float]]]:
    """{group: [layers][experts]} share of the group's tokens each expert took, per layer, from
    a metrics record's layer_{i}/moe/{group}/load_{e} keys ({} for runs logged without them)."""
    found: dict[str, dict[int, dict[int, float]]] = {}
    for key, value in record.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0].startswith("layer_") and parts[3].startswith("load_"):
            layer, group, expert = int(parts[0][6:]), parts[2], int(parts[3][5:])
            found.setdefault(group, {}).setdefault(layer, {})[expert] = float(value)
    return {
        g: [[layers[i][e] for e in sorted(layers[i])] for i in sorted(layers)]
        for g, layers in found.items()
    }


def _step_time(trains: list[dict[str, Any]]) -> float | None:
    """Median seconds per step between consecutive logged training records of one process
    (records with an evaluation, and pairs across a restart, left out)."""
    rates = [
        (b["time_s"] - a["time_s"]) / (b["step"] - a["step"])
        for a, b in zip(trains, trains[1:], strict=False)
        if "time_s" in a and "time_s" in b and "eval_loss" not in b and b["time_s"] > a["time_s"]
    ]
    return float(np.median(rates)) if rates else None


def report(suite: Suite, seeds: int, root: Path) -> dict[str, Any]:
    """Per experiment and modality: final held-out loss, eta (held-out and training loss) and
    the step-matching ratio against the dense run of the same seed, mean and spread over seeds."""
    dense = suite.experiments[0]
    curves = {
        (exp, s): _curves(run_dir(root, suite, exp, s))
        for exp in suite.experiments
        for s in range(seeds)
    }
    out: dict[str, Any] = {"suite": suite.name, "seeds": seeds, "dense": dense, "experiments": {}}
    for exp in suite.experiments:
        entry: dict[str, Any] = {}
        for m in MODALITIES:
            finals, etas, train_etas, ratios = [], [], [], []
            for s in range(seeds):
                c, d = curves[(exp, s)], curves[(dense, s)]
                finals.append(c[f"eval_{m}"][1][-1])
                etas.append(eta(d[f"eval_{m}"][0], d[f"eval_{m}"][1], *c[f"eval_{m}"][:2]))
                train_etas.append(eta(d[f"train_{m}"][0], d[f"train_{m}"][1], *c[f"train_{m}"][:2]))
                de, ce = d[f"eval_{m}"], c[f"eval_{m}"]
                ratios.append(step_ratio(de[2], de[1], ce[2], ce[1]))
            entry[m] = {
                "final_heldout_loss": mean_spread(finals),
                "eta_heldout": mean_spread(etas),
                "eta_train_loss": mean_spread(train_etas),
                "step_ratio_heldout": mean_spread(ratios),
                "per_seed": {"eta_heldout": etas, "final_heldout_loss": finals},
            }
        c0 = curves[(exp, 0)]
        entry["flops_per_token"] = c0["flops_per_token"]
        entry["flops_per_token_executed"] = c0["flops_per_token_executed"]
        entry["steps"] = c0["steps"]
        times = [curves[(exp, s)]["step_time_s"] for s in range(seeds)]
        entry["step_time_s"] = mean_spread(times)
        entry["tokens_per_s"] = (
            c0["tokens_per_step"] / entry["step_time_s"]["mean"]
            if entry["step_time_s"]["mean"]
            else None
        )
        out["experiments"][exp] = entry
    out["curves"] = {f"{e}/seed{s}": c for (e, s), c in curves.items()}
    return out


def _fmt(stat: dict[str, Any], digits: int = 3) -> str:
    if stat["mean"] is None:
        return "not reached"
    text = f"{stat['mean']:.{digits}f}"
    if stat["n"] > 1:
        text += f" ± {(stat['max'] - stat['min']) / 2:.{digits}f}"
    if stat["reached"] < stat["n"]:
        text += f" ({stat['n'] - stat['reached']} of {stat['n']} not reached)"
    return text


def markdown(rep: dict[str, Any]) -> str:
    lines = [
        f"# Suite {rep['suite']}: {rep['seeds']} seed(s), against {rep['dense']}",
        "",
        "eta = dense total training FLOPs / FLOPs to reach dense's final loss (held-out loss, "
        "interpolated in log-FLOPs between evaluations; > 1: better than dense at equal FLOPs). "
        f"Training-loss eta uses a trailing mean over {TRAIN_WINDOW} logged steps. Values are "
        "mean ± half the range over seeds.",
        "",
        "| experiment | modality | final held-out loss | eta (held-out) | eta (training loss) "
        "| dense steps needed |",
        "|---|---|---|---|---|---|",
    ]
    for exp, entry in rep["experiments"].items():
        for m in MODALITIES:
            e = entry[m]
            lines.append(
                f"| {exp} | {m} | {_fmt(e['final_heldout_loss'])} | {_fmt(e['eta_heldout'], 2)} "
                f"| {_fmt(e['eta_train_loss'], 2)} | {_fmt(e['step_ratio_heldout'], 2)} |"
            )
    lines += [
        "",
        "| experiment | steps | FLOPs/token ideal | executed | step time (s) | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for exp, entry in rep["experiments"].items():
        tps = entry["tokens_per_s"]
        lines.append(
            f"| {exp} | {entry['steps']} | {entry['flops_per_token']:.4g} "
            f"| {entry['flops_per_token_executed']:.4g} "
            f"| {'-' if entry['step_time_s']['mean'] is None else _fmt(entry['step_time_s'])} "
            f"| {'-' if tps is None else f'{tps:,.0f}'} |"
        )
    return "\n".join(lines) + "\n"


def plots(rep: dict[str, Any], out_dir: Path, seeds: int) -> list[Path]:
    """loss_vs_flops.png (held-out loss per modality, seeds as a band) and eta.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, m in zip(axes, MODALITIES, strict=True):
        for exp in rep["experiments"]:
            runs = [rep["curves"][f"{exp}/seed{s}"][f"eval_{m}"] for s in range(seeds)]
            flops = np.asarray(runs[0][0])
            n = min(len(r[1]) for r in runs)
            losses = np.asarray([r[1][:n] for r in runs])
            keep = flops[:n] > 0
            (line,) = ax.plot(flops[:n][keep], losses.mean(0)[keep], label=exp)
            if seeds > 1:
                ax.fill_between(
                    flops[:n][keep],
                    losses.min(0)[keep],
                    losses.max(0)[keep],
                    color=line.get_color(),
                    alpha=0.2,
                )
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(f"held-out loss ({m})")
        ax.set_title(m)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "loss_vs_flops.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    exps = [e for e in rep["experiments"] if e != rep["dense"]]
    width = 0.25
    for i, m in enumerate(MODALITIES):
        stats = [rep["experiments"][e][m]["eta_heldout"] for e in exps]
        means = [s["mean"] or 0.0 for s in stats]
        err = [
            [(s["mean"] or 0) - (s["min"] or 0) for s in stats],
            [(s["max"] or 0) - (s["mean"] or 0) for s in stats],
        ]
        ax.bar(np.arange(len(exps)) + (i - 1) * width, means, width, yerr=err, label=m)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(exps)), exps, rotation=20)
    ax.set_ylabel("eta (held-out), 0 = not reached")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "eta.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    loads = [
        (exp, group, np.asarray(matrix))
        for exp in rep["experiments"]
        for group, matrix in rep["curves"][f"{exp}/seed0"]["layer_load"].items()
        if matrix
    ]
    if loads:
        fig, axes = plt.subplots(1, len(loads), figsize=(3.2 * len(loads), 3), squeeze=False)
        for ax, (exp, group, matrix) in zip(axes[0], loads, strict=True):
            im = ax.imshow(matrix, vmin=0, aspect="auto", cmap="viridis")
            ax.set_title(f"{exp}\n{group}", fontsize=8)
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, fraction=0.05)
        fig.suptitle("share of each group's tokens per expert, last logged step, seed 0")
        fig.tight_layout()
        paths.append(out_dir / "expert_load.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def write_report(suite: Suite, seeds: int, root: Path) -> dict[str, Any]:
    rep = report(suite, seeds, root)
    out_dir = root / suite.name
    (out_dir / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
    (out_dir / "report.md").write_text(markdown(rep))
    rep["plots"] = [str(p) for p in plots(rep, out_dir, seeds)]
    return rep


def main(argv: list[str] | None = None) -> int:
    host_memory.keep_freed_memory()
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__)
    p.add_argument("--suite", required=True, help="a named suite (moma_jax/experiments/suites.py)")
    p.add_argument("--seeds", type=int, help="seeds per experiment (default: the suite's)")
    p.add_argument("--root", default=os.path.join("runs", "suites"), help="where runs live")
    p.add_argument("--report-only", action="store_true", help="report the runs as they are")
    add_set_arg(p, "change every run of the suite (e.g. optim.total_steps=100)")
    add_experiments_module_arg(p)
    args = p.parse_args(argv)
    try:
        load_experiment_modules(args)
        suite = get_suite(args.suite)
        seeds = args.seeds or suite.seeds
        root = Path(args.root)
        if not args.report_only:
            enable_compilation_cache()
            train_suite(suite, seeds, root, list(args.overrides))
        rep = write_report(suite, seeds, root)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(rep))
    print(f"report: {root / suite.name / 'report.md'}; plots: {', '.join(rep['plots'])}")
    return 0
