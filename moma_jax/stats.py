"""Intervals for a comparison: over seeds a t-interval, over held-out documents a bootstrap.

Over seeds (3-5 in a suite) a percentile bootstrap under-covers (74% at n = 3 for a
nominal 95%), so per-seed values get Student's t-interval: mean +- t(0.975, n - 1) * sd / sqrt(n).
Differences from dense are paired by seed (run s against the dense run of seed s), so the
interval is a paired t-interval.

Over held-out documents (hundreds in one evaluation; a document split over rows is one unit)
the percentile bootstrap resamples the documents, each with its sum of losses and its count of
targets, so the statistic is the pooled loss (sum / count) as the evaluation computes it. Two
runs scored on the same documents are compared paired: each resample draws the same documents
for both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as scipy_stats

LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean with its interval (low, high are None for a single value: no interval)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    def bounds(self) -> tuple[float, float]:
        """(low, high); a ValueError for a single value, which has no interval."""
        if self.low is None or self.high is None:
            raise ValueError(f"one value ({self.mean}) has no interval")
        return self.low, self.high

    def text(self, digits: int = 3) -> str:
        if self.low is None or self.high is None:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def to_json(self) -> dict[str, float | int | None]:
        return dataclasses.asdict(self)


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Student's t-interval of the mean of independent values (per-seed numbers)."""
    x = np.asarray(values, dtype=np.float64)
    if not len(x):
        raise ValueError("t_interval of no values")
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, None, None, 1)
    half = scipy_stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return Interval(mean, mean - float(half), mean + float(half), len(x))


def paired_t_interval(
    values: Sequence[float], reference: Sequence[float], level: float = LEVEL
) -> Interval:
    """t-interval of values[s] - reference[s] (paired by seed)."""
    if len(values) != len(reference):
        raise ValueError(f"paired values of different lengths: {len(values)}, {len(reference)}")
    diff = np.asarray(values, np.float64) - np.asarray(reference, np.float64)
    return t_interval(diff.tolist(), level)


def bootstrap_pooled(
    sums: ArrayLike,
    counts: ArrayLike,
    reference_sums: ArrayLike | None = None,
    *,
    resamples: int = 2000,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap over units (documents) of the pooled loss sum(sums) / sum(counts);
    with `reference_sums` (another run on the same units, the same counts) of the paired
    difference run - reference. Units with no target are left out."""
    s = np.asarray(sums, np.float64)
    c = np.asarray(counts, np.float64)
    r = None if reference_sums is None else np.asarray(reference_sums, np.float64)
    keep = c > 0
    s, c = s[keep], c[keep]
    if r is not None:
        r = r[keep]
        s = s - r  # the difference of pooled means is the pooled mean of the differences
    if not len(s):
        raise ValueError("bootstrap over no piece with a target")
    mean = float(s.sum() / c.sum())
    if len(s) < 2:
        return Interval(mean, None, None, 1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(s), size=(resamples, len(s)))
    draws = s[idx].sum(axis=1) / c[idx].sum(axis=1)
    low, high = np.quantile(draws, [0.5 - level / 2, 0.5 + level / 2])
    return Interval(mean, float(low), float(high), len(s))


def disjoint_pairs(n: int) -> list[tuple[int, int]]:
    """Disjoint pairs of seeds (0, 1), (2, 3), ...: independent comparisons for a noise floor."""
    return [(i, i + 1) for i in range(0, n - 1, 2)]


def t_pvalue(values: Sequence[float], null: float = 0.0) -> float | None:
    """Two-sided p-value of Student's t-test that the values' mean is `null` (None for fewer
    than 2 values; 0 when they are all equal and differ from `null`)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return None
    se = x.std(ddof=1) / math.sqrt(len(x))
    if se == 0:
        return 1.0 if x.mean() == null else 0.0
    t = (x.mean() - null) / se
    return float(2 * scipy_stats.t.sf(abs(t), len(x) - 1))


def holm(pvalues: Sequence[float | None], alpha: float = 1 - LEVEL) -> list[bool]:
    """Holm's step-down rejections at family-wise error `alpha`: the k-th smallest of the m
    p-values is rejected while every smaller one was and it is <= alpha / (m - k + 1). Rejects
    at least what Bonferroni (each <= alpha / m) rejects, with the same guarantee. A None
    (no test) counts in m and is never rejected."""
    m = len(pvalues)
    order = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out = [False] * m
    for k, (p, i) in enumerate(order):
        if p > alpha / (m - k):
            break
        out[i] = True
    return out
