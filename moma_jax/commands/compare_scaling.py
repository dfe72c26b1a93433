"""A budget suite's scaling report (`Suite.tokens_per_param`): per architecture a power-law fit
of the final held-out loss against training FLOPs across budgets (`moma_jax.scaling`), and the
gap from dense against tokens per parameter, paired by seed, with its trend (the per-seed slope
against log10 tokens per parameter, `scaling.gap_slopes`, t-interval over seeds); scaling.md,
scaling.json and scaling.png beside the per-budget reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moma_jax.commands.compare_markdown import eta_cell, interval
from moma_jax.safe_io import write_atomic
from moma_jax.scaling import alpha_differences, fit_power_law, gap_slopes, seed_fits
from moma_jax.stats import t_interval
from moma_jax.suites import Suite


def scaling(
    suite: Suite, reports: list[dict[str, Any]], budgets: list[float] | None = None
) -> dict[str, Any]:
    """Fits and gaps from the per-budget reports, one per budget of `budgets` (default: all of
    suite.tokens_per_param, in order); budgets left out are listed as `missing`."""
    budgets = list(suite.tokens_per_param) if budgets is None else budgets
    out: dict[str, Any] = {"suite": suite.name, "dense": suite.experiments[0], "budgets": []}
    out["missing"] = [b for b in suite.tokens_per_param if b not in budgets]
    points: dict[str, tuple[list[float], list[float]]] = {e: ([], []) for e in suite.experiments}
    for budget, rep in zip(budgets, reports, strict=True):
        row: dict[str, Any] = {"tokens_per_param": budget, "epochs": rep["data"]["epochs"]}
        for exp, entry in rep["experiments"].items():
            finals = [v for v in entry["overall"]["final_heldout_loss"]["per_seed"] if v]
            points[exp][0].extend([entry["total_flops"]] * len(finals))
            points[exp][1].extend(finals)
            row[exp] = {
                "total_flops": entry["total_flops"],
                "final": entry["overall"]["final_heldout_loss"],
                "diff_vs_dense": entry["overall"]["loss_diff_vs_dense"],
                "eta": entry["overall"]["eta_heldout"],
            }
        out["budgets"].append(row)
    out["fits"] = {}
    for exp, (flops, losses) in points.items():
        try:
            out["fits"][exp] = fit_power_law(flops, losses).to_json()
        except (ValueError, RuntimeError) as e:  # too few points, or no convergence
            out["fits"][exp] = {"error": str(e)}
    out["points"] = points
    out["seed_fits"] = _seed_fits(out["dense"], budgets, reports)
    out["trends"] = _trends(out["dense"], budgets, reports)
    return out


def _by_seed(per_budget: list[list[float]]) -> list[list[float]]:
    """A row per seed (the seeds every budget has), a column per budget."""
    seeds = min(len(values) for values in per_budget)
    return [[values[s] for values in per_budget] for s in range(seeds)]


def _seed_fits(dense: str, budgets: list[float], reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per architecture, the law through each seed's own budgets (`scaling.seed_fits`; the
    seeds every budget has) and, beside dense's, its exponent minus dense's paired by seed
    (`alpha_minus_dense`, `scaling.alpha_differences`); none below 3 budgets."""
    if len(budgets) < 3:
        return {}
    out: dict[str, Any] = {}
    for exp in reports[0]["experiments"]:
        if any(exp not in r["experiments"] for r in reports):
            continue
        entries = [r["experiments"][exp] for r in reports]
        losses_SxB = _by_seed([e["overall"]["final_heldout_loss"]["per_seed"] for e in entries])
        try:
            out[exp] = seed_fits([e["total_flops"] for e in entries], losses_SxB)
        except (ValueError, RuntimeError) as err:  # no convergence
            out[exp] = {"error": str(err)}
    reference = out.get(dense, {})
    for exp, sf in out.items():
        if exp != dense and "error" not in sf and "per_seed" in reference:
            sf["alpha_minus_dense"] = alpha_differences(sf, reference)
    return out


TREND_MODALITIES = ("overall", "image")


def _trends(
    dense: str, budgets: list[float], reports: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per sparse model and modality, the gap's slope per tenfold tokens per parameter: each
    seed's own slope across the budgets (the seeds every budget has), mean [95% t over seeds]."""
    if len(budgets) < 2:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for exp in reports[0]["experiments"]:
        if exp == dense or any(exp not in r["experiments"] for r in reports):
            continue
        out[exp] = {}
        for m in TREND_MODALITIES:
            gaps_SxB = _by_seed(
                [r["experiments"][exp][m]["loss_diff_vs_dense"]["per_seed"] for r in reports]
            )
            slopes = gap_slopes(budgets, gaps_SxB).tolist()
            out[exp][m] = {"per_seed": slopes, **t_interval(slopes).to_json()}
    return out


def _range(fit: dict[str, Any], key: str, digits: int) -> str:
    iv = fit["intervals"][key]
    text = f"{fit[key]:.{digits}f}"
    return text + ("" if iv is None else f" [{iv[0]:.{digits}f}, {iv[1]:.{digits}f}]")


def markdown(sc: dict[str, Any]) -> str:
    exps = list(sc["fits"])
    lines = [
        f"# Scaling: {sc['suite']}",
        "",
        "Final held-out loss (overall) against training FLOPs, each budget its own runs with its "
        "own schedule: L(F) = E + A (F / F0)^-alpha, least squares through the mean over seeds "
        "at each budget; 95% intervals from the fit's covariance with (budgets - 3) degrees of "
        "freedom (none with 3 budgets; flagged fits ended on a bound of the search).",
        "",
        *(
            [
                f"Not reported (runs missing or unfinished): tokens per parameter "
                f"{', '.join(f'{b:g}' for b in sc['missing'])}.",
                "",
            ]
            if sc.get("missing")
            else []
        ),  # fmt: skip
        "| experiment | E | A | alpha | budgets | rms residual |",
        "|---|---|---|---|---|---|",
    ]
    for exp, fit in sc["fits"].items():
        if "error" in fit:
            lines.append(f"| {exp} | no fit: {fit['error']} | | | | |")
            continue
        lines.append(
            f"| {exp} | {_range(fit, 'e', 3)} | {_range(fit, 'a', 3)} "
            f"| {_range(fit, 'alpha', 3)}{' (at a bound)' if fit['at_bound'] else ''} "
            f"| {fit['n']} | {fit['rms']:.4f} |"
        )
    if sc.get("seed_fits"):
        lines += [
            "",
            "The same law through each seed's own budgets (a seed's offset, shared by its "
            "budgets, stays in its fit): mean [95% t-interval over the seeds' parameters, "
            "seeds - 1 degrees of freedom]; fits that ended on a bound are counted, not averaged; "
            "alpha minus dense pairs each seed's exponent with dense's of the same seed:",
            "",
            "| experiment | E | A | alpha | alpha per seed | at a bound | alpha minus dense |",
            "|---|---|---|---|---|---|---|",
        ]
        for exp, sf in sc["seed_fits"].items():
            if "error" in sf:
                lines.append(f"| {exp} | no fit: {sf['error']} | | | | | |")
                continue
            alphas = ", ".join(
                f"{f['alpha']:.3f}" + (" (bound)" if f["at_bound"] else "") for f in sf["per_seed"]
            )
            diff = sf.get("alpha_minus_dense")
            paired = (
                "-"
                if diff is None
                else f"{interval(diff, 3)}; " + ", ".join(f"{v:+.3f}" for v in diff["per_seed"])
            )
            lines.append(
                f"| {exp} | {interval(sf['e'], 3)} | {interval(sf['a'], 3)} "
                f"| {interval(sf['alpha'], 3)} | {alphas} | {sf['at_bound']} | {paired} |"
            )
    lines += [
        "",
        "The gap from dense at each budget (final held-out loss minus dense's, paired by seed, "
        "mean [95% t-interval]; eta as in the per-budget reports):",
        "",
        "| tokens per parameter | epochs | " + " | ".join(exps[1:]) + " |",
        "|---|---|" + "---|" * len(exps[1:]),
    ]
    for row in sc["budgets"]:
        cells = [
            f"{interval(row[e]['diff_vs_dense'], 4)}; eta {eta_cell(row[e]['eta'])}"
            for e in exps[1:]
        ]
        head = f"| {row['tokens_per_param']:g} | {row['epochs']:.2f} | "
        lines.append(head + " | ".join(cells) + " |")
    if sc.get("trends"):
        lines += [
            "",
            "The gap's trend: each seed's least-squares slope of its gap against log10 tokens per "
            "parameter (nats per tenfold more tokens; negative: the model gains on dense as "
            "budgets grow), mean [95% t-interval over seeds]; per seed:",
            "",
            "| experiment | " + " | ".join(TREND_MODALITIES) + " |",
            "|---|" + "---|" * len(TREND_MODALITIES),
        ]
        for exp, by_m in sc["trends"].items():
            cells = [
                f"{interval(by_m[m], 4)}; {', '.join(f'{v:+.4f}' for v in by_m[m]['per_seed'])}"
                for m in TREND_MODALITIES
            ]
            lines.append(f"| {exp} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(sc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for exp, (flops, losses) in sc["points"].items():
        (line,) = left.plot(flops, losses, "o", ms=4, label=exp)
        fit = sc["fits"][exp]
        if flops and "error" not in fit:
            grid = np.geomspace(min(flops), max(flops), 50)
            model = fit["e"] + fit["a"] * (grid / fit["f0"]) ** -fit["alpha"]
            left.plot(grid, model, color=line.get_color(), lw=1)
        if exp == sc["dense"]:
            continue
        x = [row["tokens_per_param"] for row in sc["budgets"]]
        d = [row[exp]["diff_vs_dense"] for row in sc["budgets"]]
        mean = np.asarray([v["mean"] for v in d])
        low = np.asarray([v["mean"] if v["low"] is None else v["low"] for v in d])
        high = np.asarray([v["mean"] if v["high"] is None else v["high"] for v in d])
        right.errorbar(x, mean, yerr=[mean - low, high - mean], fmt="o-", capsize=3, label=exp)
    left.set_xscale("log")
    left.set_xlabel("training FLOPs")
    left.set_ylabel("final held-out loss (overall)")
    left.legend(fontsize=8)
    right.axhline(0.0, color="k", lw=0.8)
    right.set_xscale("log")
    right.set_xlabel("real training tokens per dense parameter")
    right.set_ylabel("final loss minus dense (paired, 95% t)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_scaling(
    suite: Suite, reports: list[dict[str, Any]], root: Path, budgets: list[float] | None = None
) -> list[Path]:
    sc = scaling(suite, reports, budgets)
    out = root / suite.name
    write_atomic(out / "scaling.json", json.dumps(sc, indent=1) + "\n")
    write_atomic(out / "scaling.md", markdown(sc))
    return [out / "scaling.md", plot(sc, out / "scaling.png")]
