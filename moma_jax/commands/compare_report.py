"""A suite's report: curves read from each run's metrics, eta and step matching against the dense
run of the same seed, causal losses, losses by task, the data regime; report.json and report.md
(docs/comparison.md explains every number).

Every run is opened as the notebook API opens it (`analysis.load_run`: read-only, its checkpoints
verified by `train.checkpoint.RunCheckpoints`), never by reading its files here; a run the root
does not hold is read from the archive, when one is given (`train.archive`: its config, metrics
and the held-out score saved when it was archived)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from moma_jax.analysis import Run, load_run
from moma_jax.commands.compare_routing import routing_entry
from moma_jax.commands.compare_runs import (
    archived_runs,
    check_comparable,
    data_regime,
    locate,
    open_run,
    same_heldout_set,
)
from moma_jax.commands.compare_stats import (
    eta_curves,
    family,
    loss_diff_curve,
    modality_entry,
    noise_floor,
    summarize,
    summarize_etas,
)
from moma_jax.eta import Eta, eta
from moma_jax.metric_names import split_expert_load, split_layer_metric
from moma_jax.model.kinds import (
    aux_router_flops_per_token,
    needs_aux_routers,
    train_flops_per_token,
)
from moma_jax.registry import stage_name
from moma_jax.stats import bootstrap_pooled
from moma_jax.suites import Suite
from moma_jax.train.archive import ArchivedRun, is_archived

MODALITIES = {"overall": "", "text": "_text", "image": "_image"}


def _points(records: list[dict[str, Any]], key: str) -> tuple[list, list, list] | None:
    """(flops, values, steps) of the records that have `key`; None if none has it."""
    rows = [r for r in records if key in r]
    if not rows:
        return None
    return [r["flops"] for r in rows], [r[key] for r in rows], [r["step"] for r in rows]


def _window_points(trains: list[dict[str, Any]], suffix: str) -> tuple[list, list, list] | None:
    """The mean training loss over each logging window (`loss_mean*`, every step since the
    previous log), placed at the window's middle step and FLOPs; None for runs logged before
    the loop wrote it (their single-batch losses are not comparable across models)."""
    rows = [r for r in trains if f"loss_mean{suffix}" in r and "loss_mean_steps" in r]
    if not rows or len(rows) < len(trains) - 1:
        return None
    first, last = trains[0], trains[-1]
    per_step = (last["flops"] - first["flops"]) / max(last["step"] - first["step"], 1)
    # Steps back to the window's middle, plus one: step j's loss is computed before its update,
    # on the parameters of j - 1 steps of training (an evaluation at step j sees j).
    back = [(r["loss_mean_steps"] + 1) / 2 for r in rows]
    flops = [r["flops"] - b * per_step for r, b in zip(rows, back, strict=True)]
    mids = [r["step"] - b for r, b in zip(rows, back, strict=True)]
    return flops, [r[f"loss_mean{suffix}"] for r in rows], mids


def _curves(run: Run | ArchivedRun) -> dict[str, Any]:
    records = run.records  # a torn last line: skipped, with a warning
    if not records:
        raise ValueError(f"{run.workdir} has no metrics yet (metrics.jsonl)")
    trains = [r for r in records if "loss" in r]
    out: dict[str, Any] = {"steps": int(max(r["step"] for r in records))}
    out["step_time_s"] = _step_time(trains)
    extra = aux_router_charge(run.config)
    for m, suffix in MODALITIES.items():
        evals = _points(records, f"eval_loss{suffix}")
        if evals is None or not any(
            f > 0 and math.isfinite(v) for f, v in zip(evals[0], evals[1], strict=True)
        ):
            raise ValueError(
                f"{run.workdir} has no held-out evaluation after training started "
                f"(eval_loss{suffix} at a step > 0, finite): train it further, or report "
                "without it"
            )
        out[f"eval_{m}"] = evals
        out[f"train_{m}"] = _window_points(trains, suffix)
        time = out["step_time_s"]
        out[f"time_{m}"] = (
            None if time is None else ([s * time for s in evals[2]], evals[1], evals[2])
        )
        causal = _points(records, f"eval_causal_loss{suffix}")
        if causal is not None:  # jointly trained aux routers: charged their training FLOPs
            out[f"causal_{m}"] = ([f * (1 + extra) for f in causal[0]], *causal[1:])
    out["aux_router_charge"] = extra
    last = trains[-1]
    out["tokens"] = last["tokens"]
    out["layer_load"] = _layer_load(trains[-1])
    out["tokens_per_step"] = last["tokens"] / last["step"]
    out["flops_per_token"] = last["flops"] / last["tokens"]
    out["flops_per_token_executed"] = last.get("flops_executed", last["flops"]) / last["tokens"]
    return out


def aux_router_charge(cfg: Any) -> float:
    """The aux routers' training FLOPs as a share of the model's: their forward and the gradient
    of their weights (their input is stop-gradient, so no input gradient): 2 x their forward
    FLOPs per token; 0 for a run without them."""
    if cfg.model.aux_routers == "none":
        return 0.0
    _, forward = aux_router_flops_per_token(cfg.model)
    return 2 * forward / train_flops_per_token(cfg.model, cfg.data.seq_len)


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
    (records with an evaluation, and pairs across a restart, left out: `process_started` names
    the process; runs logged before it had only the clock going back to tell)."""
    rates = [
        (b["time_s"] - a["time_s"]) / (b["step"] - a["step"])
        for a, b in zip(trains, trains[1:], strict=False)
        if "time_s" in a
        and "time_s" in b
        and "eval_loss" not in b
        and b["time_s"] > a["time_s"]
        and a.get("process_started") == b.get("process_started")
    ]
    return float(np.median(rates)) if rates else None


def report(suite: Suite, seeds: int, root: Path, archive: Path | None = None) -> dict[str, Any]:
    """Per experiment and modality, against the dense run of the same seed: the final held-out
    loss and its difference from dense, eta (held-out, training loss, measured time) and the
    step-matching ratio, each per seed with the mean and a 95% t-interval; the loss difference
    and eta along the curve; the noise floor (dense seeds against each other); the comparisons
    read together (`family`: intervals that hold at once); causal losses; routing as trained
    (`compare_routing`: experts per token and what it implies for the FLOPs); losses by task
    with intervals over held-out documents. Runs `root` lacks are read from `archive` (listed
    in the report with their code's commit)."""
    dense = suite.experiments[0]
    opened = {
        (exp, s): open_run(locate(root, suite, exp, s, archive))
        for exp in suite.experiments
        for s in range(seeds)
    }
    check_comparable(opened, suite, seeds)
    curves = {key: _curves(run) for key, run in opened.items()}
    out: dict[str, Any] = {"suite": suite.name, "seeds": seeds, "dense": dense, "experiments": {}}
    out["noise_floor"] = {m: noise_floor(curves, dense, seeds, m) for m in MODALITIES}
    scored = {  # each run's last checkpoint on the held-out set, as causally as it can be
        (exp, s): score(root, suite, exp, s, archive)
        for exp in suite.experiments
        for s in range(seeds)
    }
    out["heldout"] = same_heldout_set(scored)
    for exp in suite.experiments:
        entry: dict[str, Any] = {}
        for m in MODALITIES:
            entry[m] = modality_entry(curves, exp, dense, seeds, m)
            entry[m]["loss_diff_curve"] = loss_diff_curve(curves, exp, dense, seeds, m)
            entry[m]["eta_curves"] = eta_curves(curves, exp, dense, seeds, m)
        c0 = curves[(exp, 0)]
        entry["flops_per_token"] = c0["flops_per_token"]
        entry["flops_per_token_executed"] = c0["flops_per_token_executed"]
        entry["steps"] = c0["steps"]
        entry["total_flops"] = c0["eval_overall"][0][-1]
        entry["aux_router_charge"] = c0["aux_router_charge"]
        entry["step_time_s"] = summarize([curves[(exp, s)]["step_time_s"] for s in range(seeds)])
        mean_time = entry["step_time_s"]["mean"]
        entry["tokens_per_s"] = c0["tokens_per_step"] / mean_time if mean_time else None
        entry["causal"] = causal_entry(root, suite, exp, seeds, curves, dense, scored, archive)
        entry["tasks"] = task_entry(scored, exp, dense, seeds)
        entry["routing"] = routing_entry([opened[(exp, s)] for s in range(seeds)])
        out["experiments"][exp] = entry
    out["family"] = family(out["experiments"], dense)
    out["data"] = data_regime(root, suite, dense, curves[(dense, 0)]["tokens"], archive)
    out["archived"] = archived_runs(root, suite, seeds, archive)
    out["curves"] = {f"{e}/seed{s}": c for (e, s), c in curves.items()}
    return out


def causal_source(
    root: Path, suite: Suite, exp: str, seed: int, archive: Path | None = None
) -> tuple[Path, str]:
    """Where the causal numbers of a run come from, and how: "joint" (its own aux routers),
    "posthoc" (its aux stage's run), "same" (no router ranks a group: the run itself, evaluated
    with causal routing at its last checkpoint; that equals teacher forcing unless its causal
    forward differs, as Mixture of Tokens' group of one does) or "missing" (it needs aux routers
    and has none)."""
    workdir = locate(root, suite, exp, seed, archive)
    cfg = open_run(workdir).config
    if not needs_aux_routers(cfg.model):
        return workdir, "same"
    if cfg.model.aux_routers != "none":
        return workdir, "joint"
    stage = locate(root, suite, stage_name(exp), seed, archive)
    found = (stage / "metrics.jsonl").exists() or is_archived(stage)
    return (stage, "posthoc") if found else (workdir, "missing")


def causal_entry(
    root: Path,
    suite: Suite,
    exp: str,
    seeds: int,
    curves: dict,
    dense: str,
    scored: dict[tuple[str, int], dict[str, Any]],
    archive: Path | None = None,
) -> dict[str, Any]:
    """Final causal held-out loss per modality (per seed, mean, t-interval) and, for runs with
    jointly trained aux routers, causal eta against the dense run's held-out curve, the aux
    routers' training FLOPs charged to the run. `scored`: each run's last checkpoint evaluated
    as `score` does (causally for "same")."""
    sources = [causal_source(root, suite, exp, s, archive) for s in range(seeds)]
    how = {h for _, h in sources}
    out: dict[str, Any] = {"source": "/".join(sorted(how))}
    for m, suffix in MODALITIES.items():
        finals: list[float | None] = []
        etas: list[Eta | None] = []
        for s, (path, kind) in enumerate(sources):
            c, d = curves[(exp, s)], curves[(dense, s)]
            etas.append(None)
            if kind == "same":
                finals.append(scored[(exp, s)][f"loss{suffix}"])
            elif kind == "joint":
                finals.append(c[f"causal_{m}"][1][-1])
                etas[-1] = eta(d[f"eval_{m}"][0], d[f"eval_{m}"][1], *c[f"causal_{m}"][:2])
            elif kind == "posthoc":
                last = open_run(path).records
                last = [r for r in last if f"eval_causal_loss{suffix}" in r]
                finals.append(last[-1][f"eval_causal_loss{suffix}"] if last else None)
            else:
                finals.append(None)
        out[m] = {
            "final": summarize(finals) if any(f is not None for f in finals) else None,
            "eta": summarize_etas(etas),
        }
    return out


def score(
    root: Path, suite: Suite, exp: str, seed: int, archive: Path | None = None
) -> dict[str, Any]:
    """The run's last checkpoint on the held-out set (`evaluate`), per document, routed
    causally where the run can be (its own or its aux stage's aux routers, or no group-ranking
    router), else teacher forced; an archived run's, as it was scored when archived."""
    from moma_jax.commands.evaluate import evaluate

    run = open_run(locate(root, suite, exp, seed, archive))
    if isinstance(run, ArchivedRun):
        if run.score is None:
            raise ValueError(f"{run.workdir} was archived without its held-out score")
        return run.score
    path, kind = causal_source(root, suite, exp, seed, archive)
    if is_archived(path):
        raise ValueError(
            f"{run.workdir} is under --root but its aux stage only in the archive ({path}, no "
            "checkpoint to score it causally): restore the stage's folder under --root, or move "
            f"{run.workdir} out of --root to read both from the archive"
        )
    rep = evaluate(load_run(path), "teacher_forced" if kind == "missing" else "causal")
    rep["routing"] = "teacher_forced" if kind == "missing" else "causal"
    return rep


def task_entry(scored: dict, exp: str, dense: str, seeds: int) -> dict[str, Any]:
    """Held-out loss by task (tasks.py) and modality at each run's last checkpoint: per seed a
    bootstrap interval over held-out documents of the loss and of its paired difference from
    dense's; over seeds the mean and t-interval."""
    routings = {scored[(exp, s)]["routing"] for s in range(seeds)}
    out: dict[str, Any] = {"routing": "/".join(sorted(routings))}
    columns = scored[(exp, 0)]["documents"]["columns"]
    for i, name in enumerate(columns):
        losses: list[float] = []
        diffs: list[float] = []
        per_seed: list[dict[str, Any] | None] = []
        for s in range(seeds):
            mine, ref = scored[(exp, s)]["documents"], scored[(dense, s)]["documents"]
            counts = mine["counts"][:, i]
            if not counts.sum():
                per_seed.append(None)
                continue
            loss = bootstrap_pooled(mine["sums"][:, i], counts, seed=s)
            diff = bootstrap_pooled(mine["sums"][:, i], counts, ref["sums"][:, i], seed=s)
            losses.append(loss.mean)
            diffs.append(diff.mean)
            per_seed.append({"loss": loss.to_json(), "diff_vs_dense": diff.to_json()})
        out[name] = (
            {"loss": summarize(losses), "diff_vs_dense": summarize(diffs), "per_seed": per_seed}
            if losses
            else None
        )
    return out
