"""The power-law fit across budgets recovers a known law, and its intervals cover the truth at
about their nominal rate on noisy synthetic points; so does the per-seed trend of a gap."""

import numpy as np
import pytest

from moma_jax.scaling import fit_power_law, gap_slopes
from moma_jax.stats import t_interval

FLOPS = np.repeat(np.geomspace(1e12, 2e13, 5), 3)  # 5 budgets x 3 seeds


def law(f):
    return 1.8 + 0.9 * (f / 1e12) ** -0.35


def test_exact_points_give_the_law_back():
    fit = fit_power_law(FLOPS, law(FLOPS))
    assert (fit.e, fit.a, fit.alpha) == pytest.approx((1.8, 0.9, 0.35), rel=1e-4)
    assert fit.rms < 1e-8 and fit.n == 5 and not fit.at_bound
    np.testing.assert_allclose(fit(FLOPS), law(FLOPS), rtol=1e-6)


def test_intervals_cover_the_true_exponent_and_too_few_points_are_refused():
    rng = np.random.default_rng(0)
    hits = total = 0
    for _ in range(200):
        fit = fit_power_law(FLOPS, law(FLOPS) + rng.normal(0, 0.005, len(FLOPS)))
        if fit.intervals["alpha"] is not None:
            low, high = fit.intervals["alpha"]
            hits += low <= 0.35 <= high
            total += 1
    assert total > 190 and 0.88 <= hits / total <= 0.99
    with pytest.raises(ValueError, match="needs >= 3 budgets"):
        fit_power_law([1e12, 1e12, 2e12, 2e12], [3.0, 3.1, 3.0, 2.9])
    three = fit_power_law(FLOPS[:9], law(FLOPS[:9]))  # 3 budgets: no degree of freedom left
    assert three.intervals == {"e": None, "a": None, "alpha": None}


def test_a_fit_that_collapses_to_a_constant_is_at_a_bound_without_intervals():
    """Means that do not fall with FLOPs (repeated data, noise): the least-squares law is a
    constant with A or alpha near 0, flagged, not printed with intervals of +-1e8."""
    fit = fit_power_law([1e12, 4e12, 1e13, 2e13], [3.0, 2.9, 2.95, 3.1])
    assert fit.at_bound and fit.intervals == {"e": None, "a": None, "alpha": None}


TPP = np.array([1.0, 4.0, 10.0, 20.0])


def test_gap_slope_recovers_a_known_trend_whatever_each_seed_adds():
    """gap = c + k * log10(tpp) + (a per-seed offset): every seed's slope is k exactly."""
    k = -0.03
    gaps = 0.02 + k * np.log10(TPP) + np.array([[0.05], [-0.01], [0.0]])
    np.testing.assert_allclose(gap_slopes(TPP, gaps), [k, k, k], rtol=1e-12)
    # By hand for two budgets: the slope is the difference over the decades between them.
    assert gap_slopes([1.0, 4.0], [[0.01, 0.04]])[0] == pytest.approx(0.03 / np.log10(4.0))
    with_missing = np.vstack([gaps, [[0.1, np.nan, 0.0, 0.0]]])  # a seed missing one budget
    assert len(gap_slopes(TPP, with_missing)) == 3
    with pytest.raises(ValueError, match=">= 2 budgets"):
        gap_slopes([4.0], [[0.01]])


def test_the_trend_interval_over_three_seeds_covers_the_true_slope_at_its_nominal_rate():
    rng = np.random.default_rng(1)
    k, hits, trials = 0.02, 0, 2000
    for _ in range(trials):
        offsets = rng.normal(0, 0.02, (3, 1))  # what a seed adds at every budget
        gaps = k * np.log10(TPP) + offsets + rng.normal(0, 0.01, (3, len(TPP)))
        low, high = t_interval(gap_slopes(TPP, gaps).tolist()).bounds()
        hits += low <= k <= high
    assert 0.93 <= hits / trials <= 0.97
