"""Scaling fits on final losses of runs trained to different budgets (each its own schedule,
not points along one schedule): L(F) = E + A * F^-alpha per architecture, the same law through
each seed's own budgets with intervals over the seeds (`seed_fits`) and its exponent against
dense's paired by seed (`alpha_differences`), and the trend of a model's gap from dense across
budgets (`gap_slopes`).

The fit is least squares on the mean final loss of each budget (seeds share their data order
across budgets, so they are not independent points), with FLOPs scaled by the smallest budget's
for conditioning. The intervals are 95% t-intervals from the fit's covariance with (budgets - 3)
degrees of freedom: none with 3 budgets (the law then passes through every mean and nothing
tests its form), very wide with 4. A fit that ends on a bound of its search (E = 0, A = 0 or
alpha = 5) is flagged and gets no interval.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize
from scipy import stats as scipy_stats

from moma_jax.stats import t_interval


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L(F) = e + a * (F / f0)^-alpha, with 95% intervals of e, a and alpha (None when the fit
    has no degree of freedom left or its covariance is not finite)."""

    e: float
    a: float
    alpha: float
    f0: float
    intervals: dict[str, tuple[float, float] | None]
    n: int  # budgets (distinct FLOPs) fitted
    rms: float  # root-mean-square residual of the fit to the budget means
    at_bound: bool = False  # the fit ended on a bound of its search: no interval

    def __call__(self, flops: ArrayLike) -> np.ndarray:
        return self.e + self.a * (np.asarray(flops, np.float64) / self.f0) ** -self.alpha

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _law(x: np.ndarray, e: float, a: float, alpha: float) -> np.ndarray:
    return e + a * x**-alpha


def fit_power_law(flops: ArrayLike, loss: ArrayLike) -> PowerLaw:
    """Least-squares L = E + A F^-alpha through the mean loss at each distinct FLOPs (at least 3
    budgets); `n` counts the budgets."""
    f_all = np.asarray(flops, np.float64)
    v_all = np.asarray(loss, np.float64)
    f = np.unique(f_all)
    if len(f) < 3:
        raise ValueError(f"a power-law fit needs >= 3 budgets, got {len(f)}")
    v = np.asarray([v_all[f_all == x].mean() for x in f])
    f0 = float(f.min())
    x = f / f0
    start = (0.9 * float(v.min()), max(float(v.max() - 0.9 * v.min()), 1e-3), 0.3)
    upper = (np.inf, np.inf, 5.0)
    with warnings.catch_warnings():  # no covariance (no degree of freedom): intervals None
        warnings.simplefilter("ignore", optimize.OptimizeWarning)
        params, cov = optimize.curve_fit(
            _law, x, v, p0=start, bounds=([0.0, 0.0, 0.0], upper), maxfev=20_000
        )
    residual = v - _law(x, *params)
    # A fit that collapsed to a constant (A or alpha driven to ~0: the law barely moves across
    # the budgets, against the spread of the means) sits at a bound too, in relative terms.
    change = params[1] * (1.0 - float(x.max()) ** -params[2])
    flat = change < 1e-3 * max(float(v.max() - v.min()), 1e-12)
    at_bound = bool(np.any(params <= 1e-9) or params[2] >= upper[2] - 1e-6 or flat)
    dof = len(v) - 3
    intervals: dict[str, tuple[float, float] | None] = {}
    for i, name in enumerate(("e", "a", "alpha")):
        sd = math.sqrt(cov[i, i]) if dof > 0 and np.isfinite(cov[i, i]) else None
        if sd is None or at_bound:
            intervals[name] = None
        else:
            half = float(scipy_stats.t.ppf(0.975, dof)) * sd
            intervals[name] = (float(params[i] - half), float(params[i] + half))
    return PowerLaw(
        e=float(params[0]),
        a=float(params[1]),
        alpha=float(params[2]),
        f0=f0,
        intervals=intervals,
        n=len(v),
        rms=float(np.sqrt(np.mean(residual**2))),
        at_bound=at_bound,
    )


def gap_slopes(tokens_per_param: ArrayLike, gaps_SxB: ArrayLike) -> np.ndarray:
    """Per seed (row of `gaps_SxB`, a model's final loss minus dense's at each budget), the
    least-squares slope of the gap against log10(tokens per parameter): nats per tenfold more
    training tokens. A seed's budgets share its data order and initialisation, so its own slope
    cancels what the seed adds at every budget; the slopes of different seeds are independent,
    and `stats.t_interval` over them is the trend's interval. Rows with a missing value (NaN)
    are left out; at least 2 budgets."""
    x = np.log10(np.asarray(tokens_per_param, np.float64))
    gaps = np.atleast_2d(np.asarray(gaps_SxB, np.float64))
    if gaps.shape[1] != len(x) or len(np.unique(x)) < 2:
        raise ValueError(f"a gap trend needs >= 2 budgets, one gap per budget; got {gaps.shape}")
    gaps = gaps[~np.isnan(gaps).any(axis=1)]
    xc = x - x.mean()
    return (gaps - gaps.mean(axis=1, keepdims=True)) @ xc / float(xc @ xc)


def seed_fits(flops_B: ArrayLike, losses_SxB: ArrayLike) -> dict[str, Any]:
    """`fit_power_law` through each seed's own final losses (a row of `losses_SxB`, one per
    budget), and for e, a and alpha the mean with a 95% t-interval over the seeds whose fit
    did not end on a bound (those are counted in `at_bound`, not averaged). Each seed's fit
    keeps what that seed adds at every budget (its data order and initialisation are shared
    across budgets), so the spread of the seeds' parameters is the fit's seed noise: an
    interval with (seeds - 1) degrees of freedom where the fit through the means has
    (budgets - 3). It does not measure whether the law's form is right (`rms` per seed)."""
    flops = np.asarray(flops_B, np.float64)
    losses = np.atleast_2d(np.asarray(losses_SxB, np.float64))
    fits = [fit_power_law(flops, row) for row in losses]
    kept = [f for f in fits if not f.at_bound]
    out: dict[str, Any] = {
        "per_seed": [f.to_json() for f in fits],
        "at_bound": len(fits) - len(kept),
    }
    for name in ("e", "a", "alpha"):
        values = [getattr(f, name) for f in kept]
        out[name] = t_interval(values).to_json() if values else None
    return out


def alpha_differences(fits: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any] | None:
    """Each seed's exponent minus the reference's of the same seed (two `seed_fits` results,
    seeds paired by index: same data order and initialisation seed), mean with a 95%
    t-interval over the seeds where neither fit ended on a bound (the others are counted in
    `dropped`); None when no seed pair is left. Positive: the model's loss falls faster with
    FLOPs than the reference's over these budgets."""
    pairs = list(zip(fits["per_seed"], reference["per_seed"], strict=False))
    kept = [m["alpha"] - r["alpha"] for m, r in pairs if not (m["at_bound"] or r["at_bound"])]
    if not kept:
        return None
    return {"per_seed": kept, "dropped": len(pairs) - len(kept), **t_interval(kept).to_json()}
