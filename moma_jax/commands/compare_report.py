"""A suite's report: curves read from each run's metrics, eta and step matching against the dense
run of the same seed, causal losses, losses by task, the data regime; report.json and report.md
(docs/comparison.md explains every number).

Every run is opened as the notebook API opens it (`analysis.load_run`: read-only, its checkpoints
verified by `train.checkpoint.RunCheckpoints`), never by reading its files here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moma_jax import data as data_lib
from moma_jax.analysis import Run, load_run
from moma_jax.eta import eta, mean_spread, smooth, step_ratio
from moma_jax.flops import count_params
from moma_jax.metric_names import split_expert_load, split_layer_metric
from moma_jax.model.kinds import needs_aux_routers
from moma_jax.registry import stage_name
from moma_jax.suites import Suite
from moma_jax.tasks import TASKS
from moma_jax.train.state import abstract_params

MODALITIES = {"overall": "", "text": "_text", "image": "_image"}
TRAIN_WINDOW = 20  # logged steps in the trailing mean of the training loss (the paper's eta)


def run_dir(root: Path, suite: Suite, exp: str, seed: int) -> Path:
    return root / suite.name / exp / f"seed{seed}"


def _curves(run: Run) -> dict[str, Any]:
    records = run.records  # a torn last line: skipped, with a warning
    if not records:
        raise ValueError(f"{run.workdir} has no metrics yet (metrics.jsonl)")
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
        causal = [r for r in evals if f"eval_causal_loss{suffix}" in r]
        if causal:  # a run with jointly trained aux routers
            out[f"causal_{m}"] = (
                [r["flops"] for r in causal],
                [r[f"eval_causal_loss{suffix}"] for r in causal],
                [r["step"] for r in causal],
            )
    last = trains[-1]
    out["tokens"] = last["tokens"]
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
        per_layer = split_layer_metric(key)
        load = split_expert_load(per_layer[1]) if per_layer else None
        if per_layer and load:
            (layer, _), (group, expert) = per_layer, load
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
        (exp, s): _curves(load_run(run_dir(root, suite, exp, s)))
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
        entry["causal"] = causal_entry(root, suite, exp, seeds, curves, dense)
        entry["tasks"] = task_entry(root, suite, exp, seeds)
        out["experiments"][exp] = entry
    out["data"] = data_regime(root, suite, dense, curves[(dense, 0)]["tokens"])
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
    data = rep["data"]
    lines += [
        "",
        f"Data regime: {data['tokens']:,.0f} tokens per run = {data['tokens_per_dense_param']:.1f} "
        f"tokens per dense parameter ({data['dense_params']:,}), {data['epochs']:.2f} epochs of "
        f"the training split ({data['train_split_tokens']:,} tokens).",
        "",
        "Causal held-out loss: every token routed alone (aux routers where a router ranks whole "
        "routing groups; docs/sparsity.md). Source: same = no such router (equals the held-out "
        "loss above), joint = the run's own aux routers (causal eta against dense's held-out "
        "curve), posthoc = its `*_aux_*` stage (final value only), missing = none trained.",
        "",
        "| experiment | source | overall | text | image | causal eta overall | text | image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for exp, entry in rep["experiments"].items():
        c = entry["causal"]
        finals = [_fmt(c[m]["final"]) if c[m]["final"] else "-" for m in MODALITIES]
        etas = [_fmt(c[m]["eta"], 2) if c[m]["eta"] else "-" for m in MODALITIES]
        lines.append(f"| {exp} | {c['source']} | " + " | ".join(finals + etas) + " |")
    lines += [
        "",
        "Held-out loss by task (the MoMa paper's causal evaluation; text: all of a text-only "
        "document; text_to_image: the image codes after a caption; image_to_text: the caption "
        "after an image; interleaved: anything else), mean over seeds:",
        "",
        "| experiment | routing | " + " | ".join(TASKS) + " |",
        "|---|---|" + "---|" * len(TASKS),
    ]
    for exp, entry in rep["experiments"].items():
        t = entry["tasks"]
        cells = [f"{t[k]:.3f}" if t[k] is not None else "n/a" for k in TASKS]
        lines.append(f"| {exp} | {t['routing']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def causal_source(root: Path, suite: Suite, exp: str, seed: int) -> tuple[Path, str]:
    """Where the causal numbers of a run come from, and how: "joint" (its own aux routers),
    "posthoc" (its aux stage's run), "same" (no router ranks a group: causal = teacher forced)
    or "missing" (it needs aux routers and has none)."""
    workdir = run_dir(root, suite, exp, seed)
    cfg = load_run(workdir).config
    if not needs_aux_routers(cfg.model):
        return workdir, "same"
    if cfg.model.aux_routers != "none":
        return workdir, "joint"
    stage = run_dir(root, suite, stage_name(exp), seed)
    return (stage, "posthoc") if (stage / "metrics.jsonl").exists() else (workdir, "missing")


def causal_entry(
    root: Path, suite: Suite, exp: str, seeds: int, curves: dict, dense: str
) -> dict[str, Any]:
    """Final causal held-out loss per modality (mean and spread over seeds) and, for runs with
    jointly trained aux routers, causal eta against the dense run's held-out curve."""
    sources = [causal_source(root, suite, exp, s) for s in range(seeds)]
    how = {h for _, h in sources}
    out: dict[str, Any] = {"source": "/".join(sorted(how))}
    for m, suffix in MODALITIES.items():
        finals: list[float | None] = []
        etas: list[float | None] = []
        for s, (path, kind) in enumerate(sources):
            c, d = curves[(exp, s)], curves[(dense, s)]
            if kind == "same":
                finals.append(c[f"eval_{m}"][1][-1])
            elif kind == "joint":
                finals.append(c[f"causal_{m}"][1][-1])
                etas.append(eta(d[f"eval_{m}"][0], d[f"eval_{m}"][1], *c[f"causal_{m}"][:2]))
            elif kind == "posthoc":
                last = load_run(path).records
                last = [r for r in last if f"eval_causal_loss{suffix}" in r]
                finals.append(last[-1][f"eval_causal_loss{suffix}"] if last else None)
            else:
                finals.append(None)
        known = [f for f in finals if f is not None]
        out[m] = {
            "final": mean_spread(known) if known else None,
            "eta": mean_spread(etas) if etas else None,
        }
    return out


def task_entry(root: Path, suite: Suite, exp: str, seeds: int) -> dict[str, Any]:
    """Held-out loss by task (tasks.py) at each run's last checkpoint, routed causally where the
    run can be (its own or its aux stage's aux routers, or no group-ranking router), else
    teacher forced; mean over seeds."""
    from moma_jax.commands.evaluate import evaluate

    per_task: dict[str, list[float]] = {t: [] for t in TASKS}
    routings = set()
    for s in range(seeds):
        path, kind = causal_source(root, suite, exp, s)
        routing = "teacher_forced" if kind in ("same", "missing") else "causal"
        routings.add("causal" if kind != "missing" else "teacher_forced")
        rep = evaluate(load_run(path), routing)
        for t in TASKS:
            if rep["tasks"][t]["tokens"]:
                per_task[t].append(rep["tasks"][t]["loss"])
    out: dict[str, Any] = {t: float(np.mean(v)) if v else None for t, v in per_task.items()}
    out["routing"] = "/".join(sorted(routings))
    return out


def data_regime(root: Path, suite: Suite, dense: str, tokens: float) -> dict[str, Any]:
    """Tokens trained on per dense-model parameter, and epochs of the training split."""
    cfg = load_run(run_dir(root, suite, dense, 0)).config
    _, params = abstract_params(cfg)
    manifest = data_lib.load_manifest(data_lib.ensure_data(cfg.data.path or None))
    train_tokens = manifest["splits"]["train"]["tokens"]
    n = count_params(params)
    return {
        "tokens": tokens,
        "dense_params": n,
        "tokens_per_dense_param": tokens / n,
        "train_split_tokens": train_tokens,
        "epochs": tokens / train_tokens,
    }
