"""FLOPs-matched comparison: the MoMa paper's eta and the MoT paper's step-matching ratio.

eta compares a run with the dense run at the loss dense ends on, and gives every run a number:

- Both curves are first replaced by their running minimum (a held-out curve that rises at the
  end, from overfitting or noise, keeps its best value), and the target is dense's final
  running-minimum loss, i.e. the best loss dense reached.
- "reached": the run gets to the target. eta = FLOPs dense needs to first reach the target /
  FLOPs the run needs to first reach it. Dense against itself is exactly 1; eta = 2 means the
  run gets there with half the compute.
- "reverse": the run never gets to the target. eta = FLOPs dense needs to first reach the
  run's own best loss / the run's total FLOPs (its last evaluation's), on the same scale (0.7:
  the run is worth 70% of its compute in dense FLOPs). A run that stalls early is charged for
  the compute it spent after, so the value is at most dense's total FLOPs / the run's: below 1
  when the run trained at least dense's FLOPs; a run with a smaller budget (MoD at the same
  steps) can end above dense's loss and still read above 1.
- "capped": a crossing lies before a curve's first evaluation, so the interpolation has no
  point before it and the FLOPs of that first evaluation stand in. Then the number is a bound,
  not a value: `bound` "lower" if the run was already at the target at its first evaluation,
  "upper" if dense was, "both" if both were (no bound either way); tables print >=, <=, or ?.

How a crossing is found (`flops_to_reach`): walk the points in FLOPs order; at the first point
whose loss is <= the target, interpolate between it and the point before, with the loss linear
in log(FLOPs) (curves are close to straight there, and two runs never share an evaluation grid).

Held-out losses are the primary numbers (the same held-out batches at every evaluation). The
paper's own eta is on training loss; the loop logs the mean training loss over every step since
the previous log (`loss_mean*`), which the report places at the window's middle.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

Kind = Literal["reached", "reverse", "capped"]


@dataclasses.dataclass(frozen=True)
class Eta:
    """One comparison's eta: a value, and how it was obtained (see the module docstring)."""

    value: float
    kind: Kind
    # Only for kind "capped": "lower" (the run's crossing is before its first evaluation),
    # "upper" (dense's is), "both" (no bound either way).
    bound: Literal["lower", "upper", "both"] | None = None

    def __float__(self) -> float:
        return self.value

    def text(self, digits: int = 2) -> str:
        """As tables print it: 1.24, 0.87 (r) for reverse, >=3.10 or <=0.40 for a bound, 1.00?
        when both crossings lie before the first evaluations (no bound)."""
        number = f"{self.value:.{digits}f}"
        if self.kind == "capped":
            return (
                {"lower": ">=", "upper": "<="}.get(self.bound or "", "")
                + number
                + ("?" if self.bound == "both" else "")
            )
        return number + (" (r)" if self.kind == "reverse" else "")

    def to_json(self) -> dict[str, object]:
        return {"value": self.value, "kind": self.kind, "bound": self.bound}


def curve(flops: ArrayLike, loss: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The points with positive FLOPs and finite loss, in FLOPs order, the loss replaced by its
    running minimum."""
    f = np.asarray(flops, dtype=np.float64)
    v = np.asarray(loss, dtype=np.float64)
    keep = (f > 0) & np.isfinite(v)
    order = np.argsort(f[keep], kind="stable")
    f, v = f[keep][order], v[keep][order]
    if not len(f):
        raise ValueError("a curve has no point with positive FLOPs and a finite loss")
    return f, np.minimum.accumulate(v)


def flops_to_reach(flops: ArrayLike, loss: ArrayLike, target: float) -> float | None:
    """Training FLOPs at which the curve first reaches `target` (see the module docstring);
    None if it never does. At the very first point, that point's FLOPs."""
    pairs = zip(np.asarray(flops).tolist(), np.asarray(loss).tolist(), strict=True)
    points = sorted((f, v) for f, v in pairs if f > 0 and math.isfinite(v))
    previous = None
    for f, v in points:
        if v <= target:
            if previous is None or previous[1] == v:
                return f
            (f0, v0), (f1, v1) = previous, (f, v)
            t = (v0 - target) / (v0 - v1)  # in (0, 1]: where the target lies between the points
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
        previous = (f, v)
    return None


def eta(
    dense_flops: ArrayLike,
    dense_loss: ArrayLike,
    flops: ArrayLike,
    loss: ArrayLike,
) -> Eta:
    """The run's eta against dense (module docstring): reached, reverse or capped."""
    df, dl = curve(dense_flops, dense_loss)
    f, v = curve(flops, loss)
    target = float(dl[-1])
    if v[-1] > target:  # never reached: compare at the run's own best loss instead
        target = float(v[-1])
    dense_needs = flops_to_reach(df, dl, target)
    needs = flops_to_reach(f, v, target)
    assert dense_needs is not None and needs is not None  # both curves reach the target
    kind: Kind = "reached" if v[-1] <= dl[-1] else "reverse"
    if kind == "reverse":
        needs = float(f[-1])  # the run's whole compute, spent to end at that loss
    # A curve at the target already at its first evaluation needed at most those FLOPs (a
    # reverse run's FLOPs are its total, exact).
    run_capped = kind == "reached" and bool(v[0] <= target)
    dense_capped = bool(dl[0] <= target)
    if run_capped or dense_capped:
        bound = "both" if run_capped and dense_capped else ("lower" if run_capped else "upper")
        return Eta(dense_needs / needs, "capped", bound)  # type: ignore[arg-type]
    return Eta(dense_needs / needs, kind)


def step_ratio(
    dense_steps: ArrayLike,
    dense_loss: ArrayLike,
    steps: ArrayLike,
    loss: ArrayLike,
) -> Eta:
    """The MoT paper's step matching: the fraction of dense's steps the run needs to reach
    dense's best loss, i.e. 1 / eta on a steps axis (a lower bound on eta is an upper bound
    here)."""
    e = eta(dense_steps, dense_loss, steps, loss)
    flipped = {"lower": "upper", "upper": "lower", "both": "both", None: None}[e.bound]
    return Eta(1.0 / e.value, e.kind, flipped)  # type: ignore[arg-type]


def eta_vs_flops(
    dense_flops: ArrayLike, dense_loss: ArrayLike, flops: ArrayLike, loss: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """eta along the run's curve: at each of its evaluations (FLOPs F, best loss so far L), the
    FLOPs dense needs to first reach L / F. NaN where dense never gets to L (the run is ahead
    of dense's whole curve) or where L was reached before dense's first evaluation."""
    df, dl = curve(dense_flops, dense_loss)
    f, v = curve(flops, loss)
    out = np.full(len(f), np.nan)
    for i, (fi, vi) in enumerate(zip(f, v, strict=True)):
        needs = flops_to_reach(df, dl, float(vi))
        if needs is not None and dl[0] > vi:
            out[i] = needs / fi
    return f, out
