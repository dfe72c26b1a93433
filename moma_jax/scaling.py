"""Scaling fits on final losses of runs trained to different budgets (each its own schedule,
not points along one schedule): L(F) = E + A * F^-alpha per architecture.

The fit is least squares on every (budget, seed) final loss, with FLOPs scaled by the smallest
budget's for conditioning; the intervals are 95% t-intervals from the fit's covariance with
n - 3 degrees of freedom. Few budgets leave E and alpha poorly determined: the interval says so,
and it is only as good as the power-law form is for these points.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize
from scipy import stats as scipy_stats


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L(F) = e + a * (F / f0)^-alpha, with 95% intervals of e, a and alpha (None when the fit
    has no degree of freedom left or its covariance is not finite)."""

    e: float
    a: float
    alpha: float
    f0: float
    intervals: dict[str, tuple[float, float] | None]
    n: int
    rms: float  # root-mean-square residual of the fit

    def __call__(self, flops: ArrayLike) -> np.ndarray:
        return self.e + self.a * (np.asarray(flops, np.float64) / self.f0) ** -self.alpha

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _law(x: np.ndarray, e: float, a: float, alpha: float) -> np.ndarray:
    return e + a * x**-alpha


def fit_power_law(flops: ArrayLike, loss: ArrayLike) -> PowerLaw:
    """Least-squares L = E + A F^-alpha through the points (at least 3, at 2 distinct FLOPs)."""
    f = np.asarray(flops, np.float64)
    v = np.asarray(loss, np.float64)
    if len(f) < 3 or len(np.unique(f)) < 2:
        raise ValueError(f"a power-law fit needs >= 3 points at >= 2 budgets, got {len(f)}")
    f0 = float(f.min())
    x = f / f0
    start = (0.9 * float(v.min()), max(float(v.max() - 0.9 * v.min()), 1e-3), 0.3)
    with warnings.catch_warnings():  # no covariance (no degree of freedom): intervals None
        warnings.simplefilter("ignore", optimize.OptimizeWarning)
        params, cov = optimize.curve_fit(
            _law,
            x,
            v,
            p0=start,
            bounds=([0.0, 0.0, 0.0], [np.inf, np.inf, 5.0]),
            maxfev=20_000,
        )
    residual = v - _law(x, *params)
    dof = len(v) - 3
    intervals: dict[str, tuple[float, float] | None] = {}
    for i, name in enumerate(("e", "a", "alpha")):
        sd = math.sqrt(cov[i, i]) if dof > 0 and np.isfinite(cov[i, i]) else None
        if sd is None:
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
    )
