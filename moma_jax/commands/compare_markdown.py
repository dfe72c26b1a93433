"""report.md: a suite's report (compare_report.report) as tables a reader can check, each number
with its interval and how many seeds it rests on (docs/comparison.md explains every number)."""

from __future__ import annotations

from typing import Any

from moma_jax.commands.compare_report import MODALITIES
from moma_jax.eta import Eta

LEGEND = (
    "eta: FLOPs dense needs to first reach its best held-out loss / FLOPs the run needs to first "
    "reach it (both curves as running minima, interpolated in log FLOPs; > 1: better than dense "
    "at equal FLOPs). A run that never reaches it gets the reverse ratio, marked (r): dense's "
    "FLOPs to reach the run's best loss / the run's total FLOPs (below 1 when the run trained "
    "at least dense's FLOPs). >= / <= mark a bound: a crossing lies before a curve's "
    "first evaluation; ? marks a value bounded neither way. Every interval is 95%: over seeds a "
    "t-interval (paired by seed for differences from dense; for eta the geometric mean and the "
    "t-interval of log eta), over held-out documents a bootstrap. n=1: one seed, no interval. "
    "'minus dense' is the difference of the best held-out losses at equal FLOPs (the end of the "
    "shorter of the two curves), paired by seed."
)


def interval(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if stat is None or stat.get("mean") is None:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    if stat.get("low") is None:
        return text + " (n=1)"
    return text + f" [{stat['low']:.{digits}f}, {stat['high']:.{digits}f}]"


def eta_cell(stat: dict[str, Any] | None) -> str:
    """Geometric mean [interval] of the per-seed values, marked as a bound where a seed's value
    is one, and the kinds that are not "reached"."""
    if stat is None:
        return "-"
    text = interval(stat, 2)
    text = {"lower": ">=", "upper": "<=", "none": "?"}.get(stat.get("bound") or "", "") + text
    notes = [f"{n} {k}" for k, n in stat["kinds"].items() if n and k != "reached"]
    return text + (f" ({', '.join(notes)})" if notes else "")


def per_seed(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "-"
    etas = [None if e is None else Eta(e["value"], e["kind"], e["bound"]) for e in stat["per_seed"]]
    return ", ".join("-" if e is None else e.text() for e in etas)


def markdown(rep: dict[str, Any]) -> str:
    seeds = rep["seeds"]
    lines = [
        f"# Suite {rep['suite']}: {seeds} seed(s), against {rep['dense']}",
        "",
        LEGEND,
        "",
        "| experiment | modality | FLOPs / dense | final held-out loss | minus dense "
        "| eta (held-out) | per seed | dense steps needed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    dense_flops = rep["experiments"][rep["dense"]]["total_flops"]
    for exp, entry in rep["experiments"].items():
        for m in MODALITIES:
            e = entry[m]
            lines.append(
                f"| {exp} | {m} | {entry['total_flops'] / dense_flops:.2f} "
                f"| {interval(e['final_heldout_loss'])} "
                f"| {interval(e['loss_diff_at_equal_flops'])} | {eta_cell(e['eta_heldout'])} "
                f"| {per_seed(e['eta_heldout'])} | {eta_cell(e['step_ratio_heldout'])} |"
            )
    lines += ["", *noise_floor_lines(rep)]
    lines += ["", *family_lines(rep)] if rep.get("family") else []
    lines += ["", *time_lines(rep), "", *compute_lines(rep), *routing_lines(rep)]
    data = rep["data"]
    lines += [
        "",
        f"Data regime: {data['real_tokens']:,.0f} real training tokens per dense run "
        f"({data['tokens']:,.0f} slots with padding) = {data['real_tokens_per_dense_param']:.2f} "
        f"per dense parameter ({data['dense_params']:,}), {data['epochs']:.2f} epochs of the "
        f"training split ({data['train_split_tokens']:,} tokens). Held-out: "
        f"{rep['heldout']['batches']} batches, {rep['heldout']['targets']:,} target tokens, the "
        "same for every run.",
        "",
        *causal_lines(rep),
        "",
        *task_lines(rep),
        *archive_lines(rep),
    ]
    return "\n".join(lines) + "\n"


def archive_lines(rep: dict[str, Any]) -> list[str]:
    """The runs read from an archive (no checkpoint: their held-out scores are the ones saved
    when they were archived), with the commits of the code that trained them."""
    archived = rep.get("archived") or {}
    if not archived:
        return []
    commits = sorted({str(c or "unknown")[:12] for c in archived.values()})
    return [
        "",
        f"Read from the archive (config, metrics and held-out score, no checkpoint): "
        f"{len(archived)} run(s), {', '.join(sorted(archived))}; trained by commit(s) "
        f"{', '.join(commits)}.",
    ]


def noise_floor_lines(rep: dict[str, Any]) -> list[str]:
    floor = rep["noise_floor"]
    if floor["overall"] is None:
        return ["Noise floor: one seed, none measured; no difference here can be told from chance."]
    lines = [
        f"Noise floor: the dense runs of different seeds against each other "
        f"({len(floor['overall']['pairs'])} pairs; disjoint pairs for the mean). A difference "
        "inside this range is not evidence.",
        "",
        "| modality | eta, dense vs dense, every pair | disjoint pairs | per-run sd of the final "
        "loss | largest difference of two |",
        "|---|---|---|---|---|",
    ]
    for m in MODALITIES:
        f = floor[m]
        lines.append(
            f"| {m} | {f['eta_range'][0]:.2f} to {f['eta_range'][1]:.2f}{_capped(f)} "
            f"| {eta_cell(f['eta_disjoint_pairs'])} | {f['loss_sd']:.4f} "
            f"| {f['loss_diff_max_abs']:.4f} |"
        )
    return lines


def _capped(floor: dict[str, Any]) -> str:
    """How many of the range's values are bounds (a crossing before a first evaluation)."""
    n = floor.get("eta_range_capped", 0)
    return f" ({n} of {2 * len(floor['pairs'])} capped)" if n else ""


def time_lines(rep: dict[str, Any]) -> list[str]:
    lines = [
        "FLOPs savings and time savings side by side (time: steps x the run's median measured "
        "step time on this machine; training-loss eta: the mean loss of each logging window, "
        "placed at its middle):",
        "",
        "| experiment | modality | eta (held-out) | eta (measured time) | eta (training loss) |",
        "|---|---|---|---|---|",
    ]
    for exp, entry in rep["experiments"].items():
        for m in MODALITIES:
            e = entry[m]
            lines.append(
                f"| {exp} | {m} | {eta_cell(e['eta_heldout'])} | {eta_cell(e['eta_time'])} "
                f"| {eta_cell(e['eta_train_loss'])} |"
            )
    if all(entry["overall"]["eta_train_loss"] is None for entry in rep["experiments"].values()):
        lines += ["", "Training-loss eta: these runs did not log window means (loss_mean)."]
    return lines


def compute_lines(rep: dict[str, Any]) -> list[str]:
    lines = [
        "| experiment | steps | total FLOPs | FLOPs/token ideal | executed | aux routers "
        "| step time (s) | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for exp, entry in rep["experiments"].items():
        tps = entry["tokens_per_s"]
        lines.append(
            f"| {exp} | {entry['steps']} | {entry['total_flops']:.3g} "
            f"| {entry['flops_per_token']:.4g} | {entry['flops_per_token_executed']:.4g} "
            f"| {entry['aux_router_charge']:+.1%} | {interval(entry['step_time_s'])} "
            f"| {'-' if tps is None else f'{tps:,.0f}'} |"
        )
    return lines


def routing_lines(rep: dict[str, Any]) -> list[str]:
    """Routing over the last tenth of training per experiment and group (`compare_routing`)."""
    rows = [
        (e, entry["routing"]) for e, entry in rep["experiments"].items() if entry.get("routing")
    ]
    if not rows:
        return []
    lines = [
        "",
        "Routing as trained (the last tenth of the logged steps; mean over seeds [95% interval]): "
        "experts per token against the count the ideal FLOPs assume, the shares of tokens no "
        "expert took and more than one took, dropped assignments, and the training FLOPs per "
        "token the measured counts imply over the ideal (- where a layer pattern does not allow "
        "it, e.g. Mixture-of-Depths blocks).",
        "",
        "| experiment | group | experts per token | assumed | untaken | more than one | dropped "
        "| FLOPs measured / ideal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for exp, routing in rows:
        ratio = interval(routing["flops_measured_over_ideal"])
        for name, g in routing["groups"].items():
            assumed = "-" if g["assumed"] is None else f"{g['assumed']:.3g}"
            lines.append(
                f"| {exp} | {name} | {interval(g['experts_per_token'])} | {assumed} "
                f"| {interval(g['untaken_frac'])} | {interval(g['multi_expert_frac'])} "
                f"| {interval(g['dropped_frac'])} | {ratio} |"
            )
    return lines


def causal_lines(rep: dict[str, Any]) -> list[str]:
    lines = [
        "Causal held-out loss: every token routed alone (aux routers where a router ranks whole "
        "routing groups; docs/sparsity.md). Source: same = no such router (the run's last "
        "checkpoint with causal routing: the held-out loss above unless its causal forward "
        "differs, as Mixture of Tokens' group of one does), joint = the run's own aux routers "
        "(causal eta against dense's held-out curve, the aux routers' training FLOPs charged), "
        "posthoc = its `*_aux_*` stage (final value only), missing = none trained.",
        "",
        "| experiment | source | overall | text | image | causal eta overall | text | image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for exp, entry in rep["experiments"].items():
        c = entry["causal"]
        finals = [interval(c[m]["final"]) for m in MODALITIES]
        etas = [eta_cell(c[m]["eta"]) for m in MODALITIES]
        lines.append(f"| {exp} | {c['source']} | " + " | ".join(finals + etas) + " |")
    return lines


def task_lines(rep: dict[str, Any]) -> list[str]:
    lines = [
        "Held-out loss by task and modality at the last checkpoint (the MoMa paper's causal "
        "evaluation; text: all of a text-only document; text_to_image: the image codes after a "
        "caption; image_to_text: the caption after an image; interleaved: anything else). Over "
        "seeds: mean [t-interval]; docs: the widest per-seed bootstrap interval over held-out "
        "documents of the difference from dense.",
        "",
        "| experiment | routing | part | loss | minus dense | docs interval (minus dense) |",
        "|---|---|---|---|---|---|",
    ]
    for exp, entry in rep["experiments"].items():
        t = entry["tasks"]
        for part, value in t.items():
            if part == "routing" or value is None:
                continue
            widths = [
                (p["diff_vs_dense"]["low"], p["diff_vs_dense"]["high"])
                for p in value["per_seed"]
                if p is not None and p["diff_vs_dense"]["low"] is not None
            ]
            docs = "-"
            if widths and exp != rep["dense"]:
                low, high = max(widths, key=lambda w: w[1] - w[0])
                docs = f"[{low:+.4f}, {high:+.4f}]"
            lines.append(
                f"| {exp} | {t['routing']} | {part} | {interval(value['loss'])} "
                f"| {interval(value['diff_vs_dense'], 4)} | {docs} |"
            )
    return lines


def family_lines(rep: dict[str, Any]) -> list[str]:
    """The comparisons with dense read together (compare_stats.family): the intervals that hold
    for all of them at once, and which of them still exclude no difference from dense."""
    fam = rep.get("family")
    if not fam:
        return []
    level = 100 * fam["level"]
    lines = [
        f"Read together: the eta and loss-difference intervals of the main table, "
        f"{fam['comparisons']} in all, each at {100 * fam['each']:.2f}% (Bonferroni) so that all "
        f"of them hold at once with {level:.0f}%; at {level:.0f}% each, about "
        f"{(1 - fam['level']) * fam['comparisons']:.1f} of them would exclude the no-difference "
        "value by chance if no model differed from dense. resolved: the interval excludes it "
        "(eta 1, in the direction a bound allows; loss difference 0). Holm: rejected by Holm's "
        "step-down over the same tests (t-test p-values; the same family-wise guarantee, never "
        "fewer than the intervals resolve, no interval of its own).",
        "",
        "| experiment | modality | eta (held-out) | minus dense | resolved | Holm |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in fam["rows"].items():
        exp, m = key.rsplit("/", 1)
        lines.append(
            f"| {exp} | {m} | {eta_cell(row['eta'])} | {interval(row['loss_diff'])} "
            f"| {_which(row['eta_resolved'], row['loss_resolved'])} "
            f"| {_which(row['eta_holm'], row['loss_holm'])} |"
        )
    return lines


def _which(eta: bool, loss: bool) -> str:
    return ", ".join(n for n, r in (("eta", eta), ("loss", loss)) if r) or "-"
