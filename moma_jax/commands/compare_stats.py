"""The statistics of a suite's report, from the runs' curves (`compare_report._curves`).

Every number over seeds is per seed, then a mean with a 95% t-interval (`moma_jax.stats`);
differences from dense pair run s with dense seed s. Each table also carries a noise floor: the
dense runs of different seeds compared with each other by the same statistics.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from moma_jax.eta import Eta, curve, eta, eta_vs_flops, step_ratio
from moma_jax.stats import paired_t_interval, t_interval

Curves = dict[tuple[str, int], dict[str, Any]]


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Per-seed values, their mean and t-interval (None where no seed has a value)."""
    known = [v for v in values if v is not None]
    out: dict[str, Any] = {"per_seed": list(values)}
    out.update(t_interval(known).to_json() if known else {"mean": None, "n": 0})
    return out


def summarize_etas(etas: Sequence[Eta | None]) -> dict[str, Any] | None:
    """Per-seed eta (value, kind, bound), the geometric mean with the t-interval taken on
    log(eta), and how many of each kind. eta is a ratio, so seeds at 2 and 0.5 average to 1 (an
    arithmetic mean of identical models' etas sits above 1: 1.08 on the synthetic pairs of
    test_eta). A mean over seeds that includes a bound is itself a bound and says so."""
    known = [e for e in etas if e is not None]
    if not known:
        return None
    iv = t_interval([math.log(e.value) for e in known])
    out: dict[str, Any] = {
        "per_seed": [None if e is None else e.to_json() for e in etas],
        "mean": math.exp(iv.mean),
        "low": None if iv.low is None else math.exp(iv.low),
        "high": None if iv.high is None else math.exp(iv.high),
        "n": iv.n,
        "kinds": {k: sum(e.kind == k for e in known) for k in ("reached", "reverse", "capped")},
    }
    return out


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
    return {
        "final_heldout_loss": summarize(finals),
        "loss_diff_vs_dense": {
            "per_seed": [a - b for a, b in zip(finals, dense_finals, strict=True)],
            **paired_t_interval(finals, dense_finals).to_json(),
        },
        "eta_heldout": summarize_etas(_seed_etas(curves, exp, dense, seeds, f"eval_{m}")),
        "eta_train_loss": summarize_etas(_seed_etas(curves, exp, dense, seeds, f"train_{m}")),
        "eta_time": summarize_etas(_seed_etas(curves, exp, dense, seeds, f"time_{m}")),
        "step_ratio_heldout": summarize_etas(ratios),
    }


def noise_floor(curves: Curves, dense: str, seeds: int, m: str) -> dict[str, Any] | None:
    """Dense seed j against dense seed i (i < j), by eta and final-loss difference: how far two
    runs of one model differ by chance. None with one seed."""
    if seeds < 2:
        return None
    pairs = list(itertools.combinations(range(seeds), 2))
    etas, diffs = [], []
    for i, j in pairs:
        a, b = curves[(dense, i)][f"eval_{m}"], curves[(dense, j)][f"eval_{m}"]
        etas.append(eta(a[0], a[1], b[0], b[1]))
        diffs.append(b[1][-1] - a[1][-1])
    values = [e.value for e in etas]
    return {
        "pairs": pairs,
        "eta": [e.to_json() for e in etas],
        "eta_range": [min(values), max(values)],
        "loss_diff": diffs,
        "loss_diff_max_abs": max(abs(d) for d in diffs),
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


def eta_curves(curves: Curves, exp: str, dense: str, seeds: int, m: str) -> list[list[list[float]]]:
    """Per seed, eta along the run's curve ([flops], [eta], NaN as None-free floats)."""
    out = []
    for s in range(seeds):
        d, c = curves[(dense, s)][f"eval_{m}"], curves[(exp, s)][f"eval_{m}"]
        f, e = eta_vs_flops(d[0], d[1], c[0], c[1])
        out.append([f.tolist(), e.tolist()])
    return out
