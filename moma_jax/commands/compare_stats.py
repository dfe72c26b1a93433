"""The statistics of a suite's report, from the runs' curves (`compare_report._curves`).

Every number over seeds is per seed, then a mean with a 95% t-interval (`moma_jax.stats`);
differences from dense pair run s with dense seed s. Each table also carries a noise floor: the
dense runs of different seeds compared with each other by the same statistics. `family` reads
the comparisons with dense together: the same intervals widened so that all hold at once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from moma_jax.eta import Eta, curve, eta, eta_vs_flops, step_ratio
from moma_jax.stats import LEVEL, disjoint_pairs, holm, paired_t_interval, t_interval, t_pvalue

Curves = dict[tuple[str, int], dict[str, Any]]


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Per-seed values, their mean and t-interval (None where no seed has a value)."""
    known = [v for v in values if v is not None]
    out: dict[str, Any] = {"per_seed": list(values)}
    out.update(t_interval(known).to_json() if known else {"mean": None, "n": 0})
    return out


def summarize_etas(etas: Sequence[Eta | None], level: float = LEVEL) -> dict[str, Any] | None:
    """Per-seed eta (value, kind, bound), the geometric mean with the t-interval taken on
    log(eta), how many of each kind, and what a bound among the seeds makes of the mean:
    "lower" or "upper" if every bound points that way (the mean is then such a bound too),
    "none" if they point both ways or one is undetermined. eta is a ratio, so seeds at 2 and
    0.5 average to 1 (an arithmetic mean of identical models' etas sits above 1: 1.08 on the
    synthetic pairs of test_eta)."""
    known = [e for e in etas if e is not None]
    if not known:
        return None
    iv = t_interval([math.log(e.value) for e in known], level)
    bounds = {e.bound for e in known if e.kind == "capped"}
    return {
        "per_seed": [None if e is None else e.to_json() for e in etas],
        "mean": math.exp(iv.mean),
        "low": None if iv.low is None else math.exp(iv.low),
        "high": None if iv.high is None else math.exp(iv.high),
        "n": iv.n,
        "kinds": {k: sum(e.kind == k for e in known) for k in ("reached", "reverse", "capped")},
        "bound": None
        if not bounds
        else (bounds.pop() if bounds in ({"lower"}, {"upper"}) else "none"),
    }


def _seed_etas(
    curves: Curves, exp: str, dense: str, seeds: int, key: str, dense_key: str | None = None
) -> list[Eta | None]:
    out: list[Eta | None] = []
    for s in range(seeds):
        c, d = curves[(exp, s)].get(key), curves[(dense, s)].get(dense_key or key)
        out.append(None if c is None or d is None else eta(d[0], d[1], c[0], c[1]))
    return out


def modality_entry(curves: Curves, exp: str, dense: str, seeds: int, m: str) -> dict[str, Any]:
    """Final held-out loss, its paired difference from dense, eta on held-out loss, on the
    training loss and on measured time, and the step-matching ratio, for one modality."""
    finals = [curves[(exp, s)][f"eval_{m}"][1][-1] for s in range(seeds)]
    dense_finals = [curves[(dense, s)][f"eval_{m}"][1][-1] for s in range(seeds)]
    ratios = [
        step_ratio(d[2], d[1], c[2], c[1])
        for c, d in (
            (curves[(exp, s)][f"eval_{m}"], curves[(dense, s)][f"eval_{m}"]) for s in range(seeds)
        )
    ]
    at_equal = [equal_flops_diff(curves, exp, dense, s, m) for s in range(seeds)]
    return {
        "final_heldout_loss": summarize(finals),
        "loss_diff_at_equal_flops": {"per_seed": at_equal, **t_interval(at_equal).to_json()},
        "loss_diff_vs_dense": {
            "per_seed": [a - b for a, b in zip(finals, dense_finals, strict=True)],
            **paired_t_interval(finals, dense_finals).to_json(),
        },
        "eta_heldout": summarize_etas(_seed_etas(curves, exp, dense, seeds, f"eval_{m}")),
        "eta_train_loss": summarize_etas(_seed_etas(curves, exp, dense, seeds, f"train_{m}")),
        "eta_time": summarize_etas(_seed_etas(curves, exp, dense, seeds, f"time_{m}")),
        "step_ratio_heldout": summarize_etas(ratios),
    }


def equal_flops_diff(curves: Curves, exp: str, dense: str, seed: int, m: str) -> float:
    """The run's best held-out loss minus dense's at the end of the shorter curve (equal FLOPs;
    interpolated in log FLOPs), for one seed."""
    c, d = curves[(exp, seed)][f"eval_{m}"], curves[(dense, seed)][f"eval_{m}"]
    end = np.asarray([min(curve(c[0], c[1])[0][-1], curve(d[0], d[1])[0][-1])])
    return float((_interpolate(end, c[:2]) - _interpolate(end, d[:2]))[0])


def noise_floor(curves: Curves, dense: str, seeds: int, m: str) -> dict[str, Any] | None:
    """How far runs of one model differ by chance: the dense runs of different seeds against
    each other. eta over every pair, both ways round, as a symmetric range [1/M, M] (with how
    many of those values are bounds), and over disjoint pairs (0, 1), (2, 3), ... the same
    geometric mean and t-interval as a sparse model gets; the per-run sd of the final loss and
    the largest difference of two.
    (Dense seeds differ in initialisation and data order, as a sparse run and the dense run of
    its seed differ in initialisation only: a conservative floor.) None with one seed."""
    if seeds < 2:
        return None
    pairs = list(itertools.combinations(range(seeds), 2))
    finals = [curves[(dense, s)][f"eval_{m}"][1][-1] for s in range(seeds)]

    def pair_eta(i: int, j: int) -> Eta:
        a, b = curves[(dense, i)][f"eval_{m}"], curves[(dense, j)][f"eval_{m}"]
        return eta(a[0], a[1], b[0], b[1])

    both_ways = [pair_eta(*p) for i, j in pairs for p in ((i, j), (j, i))]
    spread = max(abs(math.log(e.value)) for e in both_ways)
    return {
        "pairs": pairs,
        "eta_range": [math.exp(-spread), math.exp(spread)],
        "eta_range_capped": sum(e.kind == "capped" for e in both_ways),
        "eta_disjoint_pairs": summarize_etas([pair_eta(i, j) for i, j in disjoint_pairs(seeds)]),
        "loss_sd": float(np.std(finals, ddof=1)),
        "loss_diff_max_abs": max(abs(finals[j] - finals[i]) for i, j in pairs),
    }


def _interpolate(flops: np.ndarray, points: tuple[Sequence, Sequence]) -> np.ndarray:
    """The curve's running-minimum loss at `flops`, linear in log FLOPs; NaN outside its range."""
    f, v = curve(*points)
    x = np.log(flops)
    out = np.interp(x, np.log(f), v)
    out[(x < np.log(f[0])) | (x > np.log(f[-1]))] = np.nan
    return out


def loss_diff_curve(
    curves: Curves, exp: str, dense: str, seeds: int, m: str, points: int = 24
) -> dict[str, list[float | None]]:
    """The loss difference from dense (paired by seed) at equal FLOPs along the whole curve:
    mean and t-interval over seeds on a log-spaced grid inside both runs' evaluations."""
    pairs = [(curves[(exp, s)][f"eval_{m}"], curves[(dense, s)][f"eval_{m}"]) for s in range(seeds)]
    lo = max(max(curve(c[0], c[1])[0][0], curve(d[0], d[1])[0][0]) for c, d in pairs)
    hi = min(min(curve(c[0], c[1])[0][-1], curve(d[0], d[1])[0][-1]) for c, d in pairs)
    grid = np.geomspace(lo, hi, points) if hi > lo else np.asarray([hi])
    diffs = np.asarray([_interpolate(grid, c[:2]) - _interpolate(grid, d[:2]) for c, d in pairs])
    means, lows, highs = [], [], []
    for column in diffs.T:
        ok = column[np.isfinite(column)]
        iv = t_interval(ok.tolist()) if len(ok) else None
        means.append(None if iv is None else iv.mean)
        lows.append(None if iv is None else iv.low)
        highs.append(None if iv is None else iv.high)
    return {"flops": grid.tolist(), "mean": means, "low": lows, "high": highs}


def eta_curves(curves: Curves, exp: str, dense: str, seeds: int, m: str) -> list[list[Any]]:
    """Per seed, eta along the run's curve: [[flops], [eta or None where undefined]]."""
    out = []
    for s in range(seeds):
        d, c = curves[(dense, s)][f"eval_{m}"], curves[(exp, s)][f"eval_{m}"]
        f, e = eta_vs_flops(d[0], d[1], c[0], c[1])
        out.append([f.tolist(), [None if np.isnan(x) else float(x) for x in e]])
    return out


def family(experiments: dict[str, dict[str, Any]], dense: str, level: float = 0.95) -> dict | None:
    """The report's comparisons with dense read together: per (experiment, modality) the
    interval of eta (on log eta) and of the loss difference at equal FLOPs, each counted as its
    own test (they are two readings that can disagree), every one at 1 - (1 - level) / m over
    the m intervals (Bonferroni), so that all of them hold at once with `level`. Each interval
    stands alone: a reading with fewer than 2 seeds is None (still counted in m). An eta whose
    seeds hold a bound is resolved only in the bound's direction (a lower bound below 1 says
    nothing). Beside the intervals, Holm's step-down over the same m t-tests (`*_holm`): the
    same family-wise guarantee, never fewer rejections. None where no interval has 2 seeds."""
    rows = [(e, m) for e in experiments if e != dense for m in ("overall", "text", "image")]
    if not rows:
        return None
    m_tests = 2 * len(rows)
    each = 1 - (1 - level) / m_tests
    out: dict[str, Any] = {"comparisons": m_tests, "level": level, "each": each, "rows": {}}
    for exp, m in rows:
        entry = experiments[exp][m]
        seeds = [Eta(**e) for e in (entry["eta_heldout"] or {}).get("per_seed", []) if e]
        eta_iv = summarize_etas(seeds, each) if len(seeds) > 1 else None
        diffs = [d for d in entry["loss_diff_at_equal_flops"]["per_seed"] if d is not None]
        diff_iv = t_interval(diffs, each) if len(diffs) > 1 else None
        if eta_iv is None and diff_iv is None:
            continue
        out["rows"][f"{exp}/{m}"] = {
            "eta": eta_iv,
            "loss_diff": None if diff_iv is None else diff_iv.to_json(),
            "eta_resolved": eta_iv is not None and _eta_resolved(eta_iv),
            "loss_resolved": diff_iv is not None and not _holds(diff_iv.bounds(), 0.0),
            "p_eta": t_pvalue([math.log(e.value) for e in seeds]) if eta_iv else None,
            "p_loss": t_pvalue(diffs) if diff_iv else None,
        }
    if not out["rows"]:
        return None
    # Holm's step-down over the same m tests: rejects at least what the intervals resolve.
    keys = list(out["rows"])
    tests = [out["rows"][k][f"p_{r}"] for k in keys for r in ("eta", "loss")]
    tests += [None] * (m_tests - len(tests))  # comparisons without two seeds
    rejected = holm(tests, 1 - level)
    for i, key in enumerate(keys):
        row = out["rows"][key]
        eta_iv = row["eta"]
        row["eta_holm"] = rejected[2 * i] and _eta_direction_allowed(eta_iv)
        row["loss_holm"] = rejected[2 * i + 1]
    return out


def _eta_resolved(iv: dict[str, Any]) -> bool:
    """The interval excludes 1 on a side its seeds' bounds allow (`_eta_direction_allowed`)."""
    return (iv["low"] > 1 or iv["high"] < 1) and _eta_direction_allowed(iv)


def _holds(bounds: tuple[float, float], value: float) -> bool:
    return bounds[0] <= value <= bounds[1]


def _eta_direction_allowed(iv: dict[str, Any] | None) -> bool:
    """The eta's side of 1 is one its seeds' bounds allow (above with no bound or lower bounds,
    below with no bound or upper bounds)."""
    if iv is None:
        return False
    bound = iv["bound"]
    return bound in (None, "lower") if iv["mean"] > 1 else bound in (None, "upper")
