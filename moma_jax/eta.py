"""FLOPs-matched comparison: the MoMa paper's eta and the MoT paper's step-matching ratio.

eta = (dense run's total training FLOPs) / (FLOPs the other run needs to reach the dense run's
final loss). eta = 2 means the sparse model reaches dense's final loss with half the compute.

How the crossing is found (`flops_to_reach`): walk the run's evaluation points in FLOPs order;
at the first point whose loss is <= the target, interpolate between it and the point before,
with the loss linear in log(FLOPs) (loss curves are close to straight there, and two runs never
share an evaluation grid); at the very first point the FLOPs of that point are used. A run whose
loss never reaches the target gives None, reported as "not reached", never a number.

Held-out losses are the primary numbers (evaluated on the same held-out batches at every
evaluation). The paper's own eta is on training loss, which is noisy per step: `smooth` takes a
trailing mean over a window of logged steps, and the dense target is the smoothed final value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def flops_to_reach(flops: ArrayLike, loss: ArrayLike, target: float) -> float | None:
    """Training FLOPs at which the curve first reaches `target` (see the module docstring)."""
    pairs = zip(np.asarray(flops).tolist(), np.asarray(loss).tolist(), strict=True)
    points = sorted((f, v) for f, v in pairs if f > 0 and math.isfinite(v))
    previous = None
    for f, v in points:
        if v <= target:
            if previous is None or previous[1] == v:
                return f
            (f0, v0), (f1, v1) = previous, (f, v)
            t = (v0 - target) / (v0 - v1)  # in [0, 1): where the target lies between the points
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
        previous = (f, v)
    return None


def eta(
    dense_flops: ArrayLike,
    dense_loss: ArrayLike,
    flops: ArrayLike,
    loss: ArrayLike,
) -> float | None:
    """Dense total FLOPs / FLOPs the run needs to reach dense's final loss; None: not reached."""
    order = np.argsort(dense_flops)
    total = float(np.asarray(dense_flops)[order][-1])
    target = float(np.asarray(dense_loss)[order][-1])
    needed = flops_to_reach(flops, loss, target)
    return None if needed is None else total / needed


def step_ratio(
    dense_steps: ArrayLike,
    dense_loss: ArrayLike,
    steps: ArrayLike,
    loss: ArrayLike,
) -> float | None:
    """The MoT paper's step matching: fraction of dense's steps the run needs to reach dense's
    final loss (the inverse of eta on a steps axis); None: not reached."""
    ratio = eta(dense_steps, dense_loss, steps, loss)
    return None if ratio is None else 1.0 / ratio


def smooth(values: ArrayLike, window: int) -> np.ndarray:
    """Trailing mean over `window` points (fewer at the start)."""
    x = np.asarray(values, dtype=np.float64)
    cumsum = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, len(x) + 1)
    start = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[start]) / (idx - start)


def mean_spread(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean and spread (min, max, std) over seeds of the reached values; how many reached."""
    reached = [v for v in values if v is not None]
    if not reached:
        return {"mean": None, "min": None, "max": None, "std": None, "reached": 0, "n": len(values)}
    return {
        "mean": float(np.mean(reached)),
        "min": float(np.min(reached)),
        "max": float(np.max(reached)),
        "std": float(np.std(reached)),
        "reached": len(reached),
        "n": len(values),
    }
