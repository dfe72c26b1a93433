"""`scripts/evaluate.py`: one run's held-out loss, teacher forced or causal, by modality and task.

    python scripts/evaluate.py --workdir runs/moma_4t4i_aux_tiny --routing causal
    python scripts/evaluate.py --workdir runs/moma_4t4i_tiny --routing teacher_forced --leak

`--routing teacher_forced`: the training routers, which rank whole routing groups (future tokens
included) -- the number training reports as eval_loss. `--routing causal`: every token decides
alone (aux routers for expert choice and Mixture-of-Depths, `model/aux_router.py`; nothing is
dropped for capacity), the number a model that generates would get. Dense, moma_1t1i, MoT and
token choice give the same number both ways (token choice: without its capacity drops).

`--leak`: how much the outputs at positions <= t move when only the tokens after t change
(`causality_leak`): zero in causal mode for every architecture, and a measured number in
teacher-forced mode for expert choice and MoD.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moma_jax import data as data_lib
from moma_jax import tasks
from moma_jax.analysis import Run, load_run
from moma_jax.commands import hints
from moma_jax.config import ConfigError
from moma_jax.losses import target_mask_np
from moma_jax.metric_names import split_layer_metric
from moma_jax.modality import MODALITY_NAMES
from moma_jax.model import aux_router, kinds
from moma_jax.runtime import (
    add_experiments_module_arg,
    enable_compilation_cache,
    load_experiment_modules,
)
from moma_jax.train.state import abstract_params

ROUTINGS = ("teacher_forced", "causal")
FIELDS = ("tokens", "segment_ids", "positions", "modality")


def _log_probs_fn(graphdef: nnx.GraphDef, routing: str):
    @jax.jit
    def log_probs(state, batch):
        model = nnx.merge(graphdef, state)
        logits, aux = model(*(batch[k] for k in FIELDS), routing=routing)
        counts = {k: v for k, v in aux["metrics"].items() if aux_router.is_count(k)}
        return jax.nn.log_softmax(logits, axis=-1), counts

    return log_probs


def _ce(log_probs_BxLxV: np.ndarray, tokens_BxL: np.ndarray) -> np.ndarray:
    """[B, L-1] cross-entropy of each next token."""
    picked = np.take_along_axis(log_probs_BxLxV[:, :-1], tokens_BxL[:, 1:, None], axis=-1)
    return -picked[..., 0].astype(np.float64)


def evaluate(
    run: Run, routing: str, step: int | None = None, batches: int | None = None
) -> dict[str, Any]:
    """Held-out loss overall, per modality and per task (`tasks.py`), and with aux routers their
    agreement with the training routers per layer and group (teacher-forced only)."""
    cfg = run.config
    if routing not in ROUTINGS:
        raise ConfigError(f"--routing {routing!r} is not one of {ROUTINGS}")
    if routing == "causal":
        kinds.require_for_causal(cfg, run.workdir)
    if batches is not None and batches < 1:
        raise ConfigError(f"--batches {batches}: must be >= 1 (default: run.eval_batches)")
    step, params = run.restore(step)
    data_dir = data_lib.ensure_data(cfg.data.path or None)
    vocab = data_lib.Vocab.from_dict(data_lib.load_manifest(data_dir)["vocab"])
    held_out = data_lib.eval_batches(
        data_dir,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        num_batches=batches or cfg.run.eval_batches,
    )
    graphdef, state = nnx.split(nnx.merge(abstract_params(cfg)[0], params))
    log_probs = _log_probs_fn(graphdef, routing)
    ce, valid, target_mod, task, counts = [], [], [], [], []
    for batch in held_out:
        lp, c = log_probs(state, {k: jnp.asarray(batch[k]) for k in FIELDS})
        ce.append(_ce(np.asarray(lp), batch["tokens"]))
        valid.append(target_mask_np(batch["segment_ids"]))
        target_mod.append(batch["modality"][:, 1:])
        task.append(tasks.target_tasks(batch, vocab.bos, vocab.eos))
        counts.append(jax.device_get(c))
    ce_all, valid_all = np.concatenate(ce), np.concatenate(valid)
    mod_all = np.concatenate(target_mod)
    report: dict[str, Any] = {
        "workdir": str(run.workdir),
        "experiment": cfg.name,
        "step": step,
        "routing": routing,
        "batches": len(held_out),
        "loss": float(ce_all[valid_all].mean()),
        "tokens": int(valid_all.sum()),
    }
    for m, name in enumerate(MODALITY_NAMES):
        mask = valid_all & (mod_all == m)
        report[f"loss_{name}"] = float(ce_all[mask].mean()) if mask.any() else float("nan")
    task_all = np.concatenate(task)
    report["tasks"] = tasks.task_losses(ce_all, task_all)
    documents = target_documents(
        np.concatenate([b["tokens"] for b in held_out]),
        np.concatenate([b["segment_ids"] for b in held_out]),
        vocab.bos,
    )
    report["documents"] = document_sums(ce_all, valid_all, mod_all, task_all, documents)
    if counts and counts[0]:
        total = {k: float(sum(c[k] for c in counts)) for k in counts[0]}
        report["aux_routers"] = {k: float(v) for k, v in aux_router.with_rates(total).items()}
    return report


def target_documents(tokens_RxL: np.ndarray, segments_RxL: np.ndarray, bos: int) -> np.ndarray:
    """[R, L-1]: the held-out document each target belongs to (-1: padding), over the rows in
    packing order. A document longer than a row fills whole rows (packing.RowPacker), so a
    piece that starts a row without BOS continues the previous row's last document."""
    rows, length = tokens_RxL.shape
    out = np.full((rows, length), -1, np.int64)
    doc = -1
    for r in range(rows):
        for s in np.unique(segments_RxL[r][segments_RxL[r] > 0]):
            where = segments_RxL[r] == s
            continues = (
                where[0] and tokens_RxL[r, 0] != bos and r > 0 and segments_RxL[r - 1, -1] > 0
            )
            doc += 0 if continues and doc >= 0 else 1
            out[r, where] = doc
    return out[:, 1:]  # the target at t + 1 is scored at t and counts in its own document


def document_sums(
    ce_BxT: np.ndarray,
    valid_BxT: np.ndarray,
    target_mod_BxT: np.ndarray,
    task_BxT: np.ndarray,
    document_BxT: np.ndarray,
) -> dict[str, Any]:
    """Per held-out document: the sum of target losses and the count of targets, overall, per
    target modality and per task, for intervals over documents (`stats.bootstrap_pooled`).
    {"columns", "sums" [D, C], "counts" [D, C]}."""
    columns = ["overall", *(f"modality:{m}" for m in MODALITY_NAMES)]
    columns += [f"task:{t}" for t in tasks.TASKS]
    masks = [valid_BxT] + [valid_BxT & (target_mod_BxT == m) for m in range(len(MODALITY_NAMES))]
    masks += [task_BxT == i for i in range(len(tasks.TASKS))]
    ids, index = np.unique(document_BxT[valid_BxT], return_inverse=True)
    sums = np.zeros((len(ids), len(columns)))
    counts = np.zeros((len(ids), len(columns)))
    for c, mask in enumerate(masks):
        inside = mask[valid_BxT]
        np.add.at(sums[:, c], index[inside], ce_BxT[valid_BxT][inside])
        np.add.at(counts[:, c], index[inside], 1)
    return {"columns": columns, "sums": sums, "counts": counts}


def causality_leak(
    run: Run, routing: str, step: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Changes only the tokens after position t = L/2 of every row of the first held-out batch
    (each to a random token of the same modality; specials kept) and measures the change of the
    log-probabilities at positions <= t: the largest, the mean per position of the largest, the
    share of positions that moved by more than 1e-6, and the change of the loss on targets <= t."""
    cfg = run.config
    if routing == "causal":
        kinds.require_for_causal(cfg, run.workdir)
    data_dir = data_lib.ensure_data(cfg.data.path or None)
    vocab = data_lib.Vocab.from_dict(data_lib.load_manifest(data_dir)["vocab"])
    batch = data_lib.eval_batches(
        data_dir, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, num_batches=1
    )[0]
    t = cfg.data.seq_len // 2
    changed = perturb_after(batch["tokens"], t, vocab, np.random.default_rng(seed))
    graphdef, state = nnx.split(run.model(step))
    log_probs = _log_probs_fn(graphdef, routing)
    outs = []
    for tokens in (batch["tokens"], changed):
        b = {**{k: jnp.asarray(batch[k]) for k in FIELDS}, "tokens": jnp.asarray(tokens)}
        outs.append(np.asarray(log_probs(state, b)[0], np.float64))
    real = batch["segment_ids"][:, : t + 1] > 0
    delta = np.abs(outs[0][:, : t + 1] - outs[1][:, : t + 1]).max(axis=-1)[real]
    valid = target_mask_np(batch["segment_ids"])[:, :t]
    ce0, ce1 = (_ce(o, batch["tokens"])[:, :t][valid] for o in outs)
    return {
        "routing": routing,
        "t": t,
        "max_abs_logprob_change": float(delta.max()),
        "mean_max_abs_logprob_change": float(delta.mean()),
        "changed_share": float(np.mean(delta > 1e-6)),
        "loss_change": float(abs(ce1.mean() - ce0.mean())),
    }


def perturb_after(tokens_BxL: np.ndarray, t: int, vocab, rng: np.random.Generator) -> np.ndarray:
    """Tokens after position t replaced by random ones of the same kind (text ids, image codes);
    special tokens (BOS, EOS, BOI, EOI, padding) kept, so segments and modalities are unchanged."""
    out = tokens_BxL.copy()
    tail = out[:, t + 1 :]
    text = tail < vocab.n_text
    image = (tail >= vocab.image_offset) & (tail < vocab.bos)
    tail[text] = rng.integers(0, vocab.n_text, text.sum())
    tail[image] = rng.integers(vocab.image_offset, vocab.bos, image.sum())
    return out


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"{report['workdir']} ({report['experiment']}) step {report['step']}, "
        f"routing {report['routing']}, {report['batches']} held-out batches, "
        f"{report['tokens']:,} target tokens",
        f"  loss {report['loss']:.4f}  text {report['loss_text']:.4f}  "
        f"image {report['loss_image']:.4f}",
        "  by task: "
        + ", ".join(
            f"{name} {v['loss']:.4f} ({v['tokens']:,} tokens)" if v["tokens"] else f"{name} n/a"
            for name, v in report["tasks"].items()
        ),
    ]
    rates = report.get("aux_routers", {})
    per_layer = sorted(k for k in rates if split_layer_metric(k) and "balanced" in k)
    if per_layer:
        lines.append("  aux routers vs training routers (balanced accuracy, precision, recall):")
        for key in per_layer:
            prefix = key[: -len("balanced_accuracy")]
            lines.append(
                f"    {prefix[:-5]:24s} {rates[key]:.3f}  {rates[prefix + 'precision']:.3f}  "
                f"{rates[prefix + 'recall']:.3f}"
            )
    if "leak" in report:
        leak = report["leak"]
        lines.append(
            f"  leak (tokens after t={leak['t']} changed): log-prob change at positions <= t "
            f"max {leak['max_abs_logprob_change']:.3g}, "
            f"mean {leak['mean_max_abs_logprob_change']:.3g}"
            f", {leak['changed_share']:.1%} of positions moved; loss change "
            f"{leak['loss_change']:.3g}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py", description="Held-out loss of a run, teacher forced or causal."
    )
    p.add_argument("--workdir", required=True, help="the run's directory")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    add_experiments_module_arg(p)  # the modules that registered the run's kinds or routers
    p.add_argument("--routing", choices=ROUTINGS, default="teacher_forced")
    p.add_argument("--batches", type=int, help="held-out batches (default: run.eval_batches)")
    p.add_argument("--leak", action="store_true", help="also measure the causality leak")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        enable_compilation_cache()
        load_experiment_modules(args)
        run = load_run(args.workdir)
        if not run.steps:
            raise ConfigError(f"{args.workdir} has no checkpoint yet")
        if args.step is not None and args.step not in run.steps:
            raise ConfigError(f"--step {args.step}: the checkpoints are at steps {run.steps}")
        report = evaluate(run, args.routing, args.step, args.batches)
        report.pop("documents")  # per-document sums, for compare.py's intervals
        if args.leak:  # the step evaluated (a damaged newer one was skipped with a warning)
            report["leak"] = causality_leak(run, args.routing, report["step"])
    except aux_router.NoAuxRoutersError as e:
        print(f"error: {e}\n{hints.train_aux_routers(e)}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
