"""A suite's statistics on synthetic curves of known answer, 3 seeds: per-seed eta and its
t-interval, the paired loss difference along the curve, and the noise floor."""

import numpy as np
import pytest

from moma_jax.commands.compare_stats import (
    family,
    loss_diff_curve,
    modality_entry,
    noise_floor,
    summarize_etas,
)
from moma_jax.eta import Eta
from moma_jax.stats import t_pvalue

F = np.geomspace(1e12, 1e15, 20)


def law(f, offset=0.0):
    return 2.0 + 10.0 * np.asarray(f) ** -0.1 + offset


def curves_for(offsets, speedup):
    """Per seed: dense with a seed offset; the other model reaches every loss `speedup` x
    sooner, with the same seed offset (a paired design)."""
    out: dict = {}
    for s, off in enumerate(offsets):
        for exp, gain in (("dense", 1.0), ("sparse", speedup)):
            points = (F.tolist(), law(gain * F, off).tolist(), (F / 1e12).tolist())
            run: dict = {f"eval_{m}": points for m in ("overall", "text", "image")}
            run.update(
                {f"{k}_{m}": None for k in ("train", "time") for m in ("overall", "text", "image")}
            )
            out[(exp, s)] = run
    return out


def test_a_paired_speedup_is_recovered_with_an_interval():
    curves = curves_for([0.0, 0.02, -0.01], speedup=1.5)
    entry = modality_entry(curves, "sparse", "dense", 3, "overall")
    eta = entry["eta_heldout"]
    assert [e["kind"] for e in eta["per_seed"]] == ["reached"] * 3
    assert eta["mean"] == pytest.approx(1.5, rel=0.01) and eta["n"] == 3
    assert eta["low"] <= eta["mean"] <= eta["high"]
    # The seed offsets cancel in the paired difference: the same at every seed.
    diff = entry["loss_diff_vs_dense"]
    expected = law(1.5 * F[-1]) - law(F[-1])
    assert diff["mean"] == pytest.approx(expected) and diff["high"] - diff["low"] < 1e-9
    assert entry["eta_train_loss"] is None and entry["eta_time"] is None  # not logged
    assert entry["step_ratio_heldout"]["mean"] == pytest.approx(1 / 1.5, rel=0.02)


def test_loss_difference_along_the_curve_and_the_noise_floor():
    curves = curves_for([0.0, 0.02, -0.01], speedup=2.0)
    d = loss_diff_curve(curves, "sparse", "dense", 3, "overall", points=5)
    f = np.asarray(d["flops"])
    assert f[0] == F[0] and f[-1] == pytest.approx(F[-1])
    truth = law(2 * f) - law(f)
    # Linear interpolation in log FLOPs between 20 points: close to the true difference.
    np.testing.assert_allclose(np.asarray(d["mean"], float), truth, atol=2e-3)
    floor = noise_floor(curves, "dense", 3, "overall")
    assert floor is not None
    assert floor["pairs"] == [(0, 1), (0, 2), (1, 2)]
    assert floor["loss_diff_max_abs"] == pytest.approx(0.03)
    assert floor["loss_sd"] == pytest.approx(np.std([0.0, 0.02, -0.01], ddof=1))
    low, high = floor["eta_range"]
    assert low == pytest.approx(1 / high) and high > 1  # symmetric by construction
    assert floor["eta_disjoint_pairs"]["n"] == 1  # (0, 1) only, with 3 seeds
    assert noise_floor(curves, "dense", 1, "overall") is None


def test_kinds_are_counted_and_missing_seeds_kept_in_place():
    s = summarize_etas(
        [Eta(1.2, "reached"), None, Eta(0.8, "reverse"), Eta(3.0, "capped", "lower")]
    )
    assert s is not None
    assert s["kinds"] == {"reached": 1, "reverse": 1, "capped": 1} and s["bound"] == "lower"
    assert s["per_seed"][1] is None and s["n"] == 3
    assert s["mean"] == pytest.approx((1.2 * 0.8 * 3.0) ** (1 / 3))  # geometric
    pair = summarize_etas([Eta(2.0, "reached"), Eta(0.5, "reverse")])
    assert pair is not None and pair["mean"] == pytest.approx(1)
    assert summarize_etas([None]) is None


def test_a_training_window_sits_at_the_middle_of_the_parameters_it_saw():
    """Steps 1-10 compute their losses on the parameters of 0-9 updates: the window's mean
    belongs at 4.5 steps of training (an evaluation at step 10 sees 10)."""
    from moma_jax.commands.compare_report import _window_points

    p = 3.0  # FLOPs per step
    trains = [
        {"step": s, "flops": s * p, "loss_mean": 2.0, "loss_mean_steps": 10} for s in (10, 20)
    ]
    points = _window_points(trains, "")
    assert points is not None
    flops, _, mids = points
    assert mids == [4.5, 14.5] and flops == [4.5 * p, 14.5 * p]


def test_step_time_leaves_out_pairs_across_a_restart():
    """A resumed process starts its clock again: a pair spanning the restart is no rate, even
    when the new clock already reads more than the old one (compilation)."""
    from moma_jax.commands.compare_report import _step_time

    first = [{"step": 10, "time_s": 1.0, "process_started": 1.0}]
    second = [{"step": s, "time_s": 48.0 + 0.1 * s, "process_started": 2.0} for s in (20, 30)]
    assert _step_time(first + second) == pytest.approx(0.1)  # (49.0 - 1.0) / 10 left out


def _entry(etas, diffs, kind="reached", bound=None):
    return {
        "eta_heldout": {
            "per_seed": [
                None if v is None else {"value": v, "kind": kind, "bound": bound} for v in etas
            ]
        },
        "loss_diff_at_equal_flops": {"per_seed": diffs},
    }


def test_read_together_widens_each_interval_to_hold_for_the_family():
    """Bonferroni over every interval (eta and loss difference of each experiment x modality),
    from t tables: t(1 - 0.05 / 12, 4) = 4.8510 for one model (6 intervals), t(1 - 0.05 / 60, 4)
    = 7.5287 for five (30)."""
    etas, diffs = [1.10, 1.20, 1.15, 1.30, 1.25], [-0.02, -0.03, -0.01, -0.05, -0.04]
    log = np.log(etas)
    sd_log, sd_diff = log.std(ddof=1) / np.sqrt(5), np.std(diffs, ddof=1) / np.sqrt(5)
    one = {m: _entry(etas, diffs) for m in ("overall", "text", "image")}
    fam = family({"dense": {}, **{f"m{i}": one for i in range(5)}}, "dense")
    assert fam is not None
    assert fam["comparisons"] == 30 and fam["each"] == pytest.approx(1 - 0.05 / 30)
    row = fam["rows"]["m0/image"]
    assert row["eta"]["low"] == pytest.approx(np.exp(log.mean() - 7.5287 * sd_log), rel=1e-4)
    assert row["loss_diff"]["high"] == pytest.approx(np.mean(diffs) + 7.5287 * sd_diff, abs=1e-5)
    assert not row["eta_resolved"] and not row["loss_resolved"]  # both include no difference
    alone = family({"dense": {}, "m0": one}, "dense")
    assert alone is not None and alone["comparisons"] == 6
    row = alone["rows"]["m0/overall"]
    assert row["eta"]["low"] == pytest.approx(np.exp(log.mean() - 4.8510 * sd_log), rel=1e-4)
    assert row["eta"]["low"] > 1 and row["eta_resolved"]
    assert row["loss_diff"]["high"] > 0 and not row["loss_resolved"]
    # Holm: the three etas (p = 0.0036 each, t = 6.12 at 4 df) fall first, below 0.05/6, 0.05/5
    # and 0.05/4; then each loss difference (p = 0.0132, t = -4.24) is below 0.05/3: rejected,
    # where its Bonferroni interval (p below 0.05/6 needed) is not.
    assert row["eta_holm"] and row["loss_holm"]
    # One seed: no interval, nothing to read together.
    assert family({"dense": {}, "m0": {m: _entry([1.2], [0.0]) for m in one}}, "dense") is None


def test_read_together_respects_bounds_and_missing_seeds():
    """A lower bound below 1 says nothing about being behind dense; an upper bound below 1
    does. A reading with one seed is left out without hiding the other."""
    low = [0.50, 0.48, 0.52, 0.49, 0.51]
    exps = {
        "dense": {},
        "lower": {
            m: _entry(low, [0.0] * 5, "capped", "lower") for m in ("overall", "text", "image")
        },
        "upper": {
            m: _entry(low, [0.0] * 5, "capped", "upper") for m in ("overall", "text", "image")
        },
        "few": {
            m: _entry([1.3, None, None, None, None], [-0.20, -0.21, -0.19, -0.22, -0.20])
            for m in ("overall", "text", "image")
        },
    }
    fam = family(exps, "dense")
    assert fam is not None
    assert fam["rows"]["lower/overall"]["eta"]["high"] < 1
    assert not fam["rows"]["lower/overall"]["eta_resolved"]
    assert fam["rows"]["upper/overall"]["eta_resolved"]
    assert not fam["rows"]["lower/overall"]["eta_holm"]  # below 1, but a lower bound
    few = fam["rows"]["few/text"]
    assert few["eta"] is None and not few["eta_resolved"]
    assert few["loss_diff"]["n"] == 5 and few["loss_resolved"]


def _series(t, sd=0.05):
    """5 values whose one-sample t statistic is `t` (mean t * sd / sqrt 5, sd `sd`)."""
    z = np.array([-2.0, -1.0, 0.0, 1.0, 2.0]) / np.sqrt(2.5)  # mean 0, sd 1
    return (t * sd / np.sqrt(5) + sd * z).tolist()


def test_holm_over_the_family_row_by_row():
    """18 tests (3 models x 3 modalities x eta and loss), 6 of them without 2 seeds. p-values
    from t at 4 df: t = 15.54 -> 1e-4, 6.435 -> 0.0030, 6.221 -> 0.0034, 5.762 -> 0.0045,
    0.134 -> 0.90. Holm's thresholds 0.05/18, /17, /16 take a's three etas, 0.05/15 = 0.00333
    b's overall loss, 0.05/14 = 0.00357 b's image eta, and 0.05/13 = 0.00385 stops at b's text
    loss; Bonferroni (0.05/18 = 0.00278) resolves a's etas only."""
    null, etas = _series(0.134), np.exp(_series(15.544)).tolist()
    assert t_pvalue(_series(5.7624)) == pytest.approx(0.0045, rel=1e-3)
    a = {m: _entry(etas, null) for m in ("overall", "text", "image")}
    b = {
        "overall": _entry(np.exp(null).tolist(), _series(6.4348)),
        "image": _entry(np.exp(_series(6.2206)).tolist(), null),
        "text": _entry(np.exp(null).tolist(), _series(5.7624)),
    }
    c = {m: _entry([1.2], [0.0]) for m in ("overall", "text", "image")}
    fam = family({"dense": {}, "a": a, "b": b, "c": c}, "dense")
    assert fam is not None and fam["comparisons"] == 18 and "c/overall" not in fam["rows"]
    holm_rows = {k: (r["eta_holm"], r["loss_holm"]) for k, r in fam["rows"].items()}
    assert holm_rows == {
        "a/overall": (True, False),
        "a/text": (True, False),
        "a/image": (True, False),
        "b/overall": (False, True),
        "b/text": (False, False),
        "b/image": (True, False),
    }
    bonferroni = {k: (r["eta_resolved"], r["loss_resolved"]) for k, r in fam["rows"].items()}
    assert bonferroni == {k: (k.startswith("a/"), False) for k in holm_rows}
