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

from moma_jax import budgets
from moma_jax import data as data_lib
from moma_jax.analysis import Run, load_run
from moma_jax.commands.compare_stats import (
    eta_curves,
    loss_diff_curve,
    modality_entry,
    noise_floor,
    summarize,
    summarize_etas,
)
from moma_jax.data import content_differences
from moma_jax.eta import Eta, eta
from moma_jax.metric_names import split_expert_load, split_layer_metric
from moma_jax.model.kinds import (
    aux_router_flops_per_token,
    needs_aux_routers,
    train_flops_per_token,
)
from moma_jax.overrides import config_diff
from moma_jax.registry import stage_name
from moma_jax.stats import bootstrap_pooled
from moma_jax.suites import Suite
from moma_jax.train.archive import ArchivedRun, is_archived, open_archived
from moma_jax.train.reuse import MAY_DIFFER

MODALITIES = {"overall": "", "text": "_text", "image": "_image"}
# The keys a seed sets (compare.seed_keys): the only ones the seeds of an experiment differ in.
SEED_KEYS = frozenset({"run.param_seed", "run.routing_seed", "data.seed"})
_SEEDS_MAY_DIFFER = MAY_DIFFER | SEED_KEYS


def run_dir(root: Path, suite: Suite, exp: str, seed: int) -> Path:
    return root / suite.name / exp / f"seed{seed}"


def locate(root: Path, suite: Suite, exp: str, seed: int, archive: Path | None = None) -> Path:
    """The run's folder under `root`; where `root` has none and `archive` holds the run, the
    archived one."""
    here = run_dir(root, suite, exp, seed)
    if archive is None or here.is_dir():
        return here
    there = run_dir(archive, suite, exp, seed)
    return there if is_archived(there) else here


def open_run(path: Path) -> Run | ArchivedRun:
    """The run in `path`: an archived one, or a run folder (`analysis.load_run`)."""
    return open_archived(path) if is_archived(path) else load_run(path)


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
    and eta along the curve; the noise floor (dense seeds against each other); causal losses;
    losses by task with intervals over held-out documents. Runs `root` lacks are read from
    `archive` (listed in the report with their code's commit)."""
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
        out["experiments"][exp] = entry
    out["data"] = data_regime(root, suite, dense, curves[(dense, 0)]["tokens"], archive)
    out["archived"] = archived_runs(root, suite, seeds, archive)
    out["curves"] = {f"{e}/seed{s}": c for (e, s), c in curves.items()}
    return out


def _manifest(run: Run | ArchivedRun) -> dict[str, Any] | None:
    """The data manifest saved with the run's last checkpoint (an archived run's, as archived);
    None where it has none."""
    if isinstance(run, ArchivedRun):
        return run.provenance.get("manifest")
    steps = run.steps
    return run.checkpoints.manifest(steps[-1]) if steps else None


def check_comparable(
    opened: dict[tuple[str, int], Run | ArchivedRun], suite: Suite, seeds: int
) -> None:
    """A ValueError naming the run and what differs where the report would pool runs that are
    not seeds of the same thing: the seeds of an experiment trained with configs that differ
    outside the seed keys (and the keys a copied run may differ in), or any run trained on
    other data (the content of the manifest saved with it) than the dense seed 0's. Runs from
    --root and from an archive are checked alike: seeds trained apart (`--seed`) meet here."""
    for exp in suite.experiments:
        first = opened[(exp, 0)]
        for s in range(1, seeds):
            other = opened[(exp, s)]
            diff = config_diff(first.config, other.config, _SEEDS_MAY_DIFFER.__contains__)
            if diff:
                raise ValueError(
                    f"{other.workdir} was trained with another config than {first.workdir} "
                    f"({'; '.join(diff)}): the report would pool them as seeds. Train it again "
                    "with the suite's config (--restart, or out of the archive), or report them "
                    "in suites of their own"
                )
    reference = opened[(suite.experiments[0], 0)]
    data = _manifest(reference)
    for run in opened.values():
        mine = _manifest(run)
        if data is not None and mine is not None and (differ := content_differences(data, mine)):
            raise ValueError(
                f"{run.workdir} was trained on other data than {reference.workdir} (the "
                f"manifests saved with them differ in {', '.join(differ)}): their losses are not "
                "comparable; train it again on the suite's data"
            )


def same_heldout_set(scored: dict[tuple[str, int], dict[str, Any]]) -> dict[str, int]:
    """The held-out set every run was scored on ({"batches", "targets"}); a ValueError naming
    the runs if they differ (e.g. finished under another run.eval_batches): their losses would
    not be comparable."""
    sets = {(r["batches"], r["tokens"]): key for key, r in scored.items()}
    if len(sets) > 1:
        seen = ", ".join(
            f"{e}/seed{s}: {b} batches, {t:,} targets" for (b, t), (e, s) in sets.items()
        )
        raise ValueError(
            f"the suite's runs were evaluated on different held-out sets ({seen}); give every "
            "run the same run.eval_batches and data.seq_len/batch_size (rerun the odd ones with "
            "--restart, or report them in a suite of their own)"
        )
    (batches, targets), _ = sets.popitem()
    return {"batches": batches, "targets": targets}


def archived_runs(
    root: Path, suite: Suite, seeds: int, archive: Path | None
) -> dict[str, str | None]:
    """{"EXP/seedS": the commit of the code that trained it} for each run read from the
    archive."""
    out: dict[str, str | None] = {}
    for exp in suite.experiments:
        for s in range(seeds):
            run = open_run(locate(root, suite, exp, s, archive))
            if isinstance(run, ArchivedRun):
                out[f"{exp}/seed{s}"] = run.provenance.get("commit")
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


def data_regime(
    root: Path, suite: Suite, dense: str, tokens: float, archive: Path | None = None
) -> dict[str, Any]:
    """Token slots and real (non-padding) tokens trained on per dense-model parameter, and
    epochs of the training split (real tokens / the split's tokens)."""
    run = open_run(locate(root, suite, dense, 0, archive))
    cfg = run.config
    if isinstance(run, ArchivedRun):  # the data it was trained on, wherever this runs
        manifest = run.provenance["manifest"]
    else:
        manifest = data_lib.load_manifest(data_lib.ensure_data(cfg.data.path or None))
    train_tokens = manifest["splits"]["train"]["tokens"]
    n = budgets.dense_params(cfg)
    real = tokens * budgets.real_token_share(cfg)
    return {
        "tokens": tokens,
        "real_tokens": real,
        "dense_params": n,
        "tokens_per_dense_param": tokens / n,
        "real_tokens_per_dense_param": real / n,
        "train_split_tokens": train_tokens,
        "epochs": real / train_tokens,
    }
