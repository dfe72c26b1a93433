"""The power-law fit across budgets recovers a known law, and its intervals cover the truth at
about their nominal rate on noisy synthetic points; so does the per-seed trend of a gap."""

import numpy as np
import pytest

from moma_jax.commands.compare_scaling import markdown, scaling
from moma_jax.scaling import alpha_differences, fit_power_law, gap_slopes, seed_fits
from moma_jax.stats import t_interval
from moma_jax.suites import Suite

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


def test_seed_fits_give_each_seed_its_law_and_an_interval_over_seeds():
    flops = np.geomspace(1e12, 2e13, 4)
    offsets = np.array([0.03, -0.02, 0.0])  # what each seed adds at every budget
    losses = law(flops)[None, :] + offsets[:, None]
    fits = seed_fits(flops, losses)
    assert [f["alpha"] for f in fits["per_seed"]] == pytest.approx([0.35] * 3, rel=1e-4)
    assert fits["e"]["mean"] == pytest.approx(1.8 + offsets.mean(), rel=1e-4)
    assert fits["alpha"]["low"] == pytest.approx(0.35, abs=1e-4) and fits["at_bound"] == 0
    flat = seed_fits(flops, [law(flops), [3.0, 2.9, 2.95, 3.1]])  # a seed whose fit collapses
    assert flat["at_bound"] == 1 and flat["alpha"]["n"] == 1


def test_seed_fit_intervals_cover_the_true_exponent_over_three_seeds():
    rng = np.random.default_rng(2)
    flops = np.geomspace(1e12, 2e13, 4)
    hits = total = 0
    for _ in range(300):
        losses = law(flops) + rng.normal(0, 0.02, (3, 1)) + rng.normal(0, 0.002, (3, 4))
        fits = seed_fits(flops, losses)
        if fits["at_bound"] == 0:
            hits += fits["alpha"]["low"] <= 0.35 <= fits["alpha"]["high"]
            total += 1
    assert total > 280 and 0.88 <= hits / total <= 0.99


def test_alpha_differences_pair_each_seed_with_the_references():
    """Exponents 0.35 + d_s against 0.35 + r_s, seed by seed: the differences d_s - r_s come
    back exactly, whatever each seed adds to its losses; a seed whose fit ends on a bound (on
    either side) is dropped from the pairs and counted."""
    flops = np.geomspace(1e12, 2e13, 4)

    def fits(alphas, offsets):
        rows = [
            1.8 + 0.6 * (flops / flops[0]) ** -a + o for a, o in zip(alphas, offsets, strict=True)
        ]
        return seed_fits(flops, rows)

    ref = fits([0.33, 0.35, 0.37], [0.02, -0.01, 0.0])
    model = fits([0.30, 0.34, 0.31], [-0.03, 0.01, 0.02])
    diff = alpha_differences(model, ref)
    assert diff is not None
    assert diff["per_seed"] == pytest.approx([-0.03, -0.01, -0.06], abs=2e-4)
    assert diff["mean"] == pytest.approx(-0.1 / 3, abs=2e-4) and diff["dropped"] == 0
    want = t_interval([-0.03, -0.01, -0.06]).bounds()  # 3 seeds: t(2) wide, it includes 0
    assert (diff["low"], diff["high"]) == pytest.approx(want, abs=1e-3)
    # seed 0 fits (alpha 0.30); seed 1 collapses onto a bound; seed 2 is missing
    collapsed = seed_fits(flops, [1.8 + 0.6 * (flops / flops[0]) ** -0.3, [3.0, 2.9, 2.95, 3.1]])
    one = alpha_differences(collapsed, ref)
    assert one is not None
    assert one["dropped"] == 1 and one["per_seed"] == pytest.approx([0.3 - 0.33], abs=2e-4)
    assert alpha_differences(seed_fits(flops, [[3.0, 2.9, 2.95, 3.1]]), ref) is None


def _report(flops, finals_by_exp, epochs):
    """A per-budget report.json as compare_scaling reads it (finals per seed, paired diffs)."""
    dense = finals_by_exp["dense"]
    eta = {"mean": 1.0, "low": 0.9, "high": 1.1, "n": 3, "kinds": {"reached": 3}}
    exps = {}
    for exp, finals in finals_by_exp.items():
        diff = [a - b for a, b in zip(finals, dense, strict=True)]
        stat = {"per_seed": diff, **t_interval(diff).to_json()}
        exps[exp] = {
            "total_flops": flops,
            "overall": {
                "final_heldout_loss": {"per_seed": list(finals)},
                "loss_diff_vs_dense": stat,
                "eta_heldout": eta,
            },
            "image": {"loss_diff_vs_dense": stat},
        }
    return {"data": {"epochs": epochs}, "experiments": exps}


def test_the_scaling_report_fits_each_seed_and_the_gap_trend_from_budget_reports():
    tpp = [1.0, 4.0, 10.0, 20.0]
    flops = [1e12 * b for b in tpp]
    seed_offset = np.array([0.01, -0.01, 0.0])
    reports = []
    for b, f in zip(tpp, flops, strict=True):
        dense = law(f) + seed_offset
        sparse = dense + 0.02 - 0.01 * np.log10(b)  # gains 0.01 per tenfold tokens
        reports.append(_report(f, {"dense": dense, "sparse": sparse}, 0.01 * b))
    sc = scaling(Suite("s", ("dense", "sparse"), 3, tokens_per_param=tuple(tpp)), reports)
    for s in range(3):
        assert sc["seed_fits"]["dense"]["per_seed"][s]["alpha"] == pytest.approx(0.35, rel=1e-4)
    assert sc["trends"]["sparse"]["overall"]["per_seed"] == pytest.approx([-0.01] * 3)
    paired = sc["seed_fits"]["sparse"]["alpha_minus_dense"]
    want = [
        sc["seed_fits"]["sparse"]["per_seed"][s]["alpha"]
        - sc["seed_fits"]["dense"]["per_seed"][s]["alpha"]
        for s in range(3)
    ]
    assert (
        paired["per_seed"] == pytest.approx(want)
        and "alpha_minus_dense" not in (sc["seed_fits"]["dense"])
    )
    text = markdown(sc)
    assert "each seed's own budgets" in text and "The gap's trend" in text
    assert "alpha minus dense" in text
    assert "| sparse | -0.0100 [-0.0100, -0.0100]" in text
