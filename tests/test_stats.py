"""Intervals: hand-computed cases, and coverage of a known mean at about the nominal rate on
synthetic data (t over 3 seeds; the percentile bootstrap over documents)."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from moma_jax.commands.evaluate import document_sums, target_documents
from moma_jax.stats import bootstrap_pooled, holm, paired_t_interval, t_interval, t_pvalue


def test_t_interval_by_hand():
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.3027
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.bounds()[1] - iv.mean == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
    assert t_interval([5.0]).low is None and "(n=1)" in t_interval([5.0]).text()
    d = paired_t_interval([1.5, 2.5], [1.0, 2.0])  # the same +0.5 on both seeds
    assert d.mean == 0.5 and d.bounds() == (0.5, 0.5)


def test_t_interval_covers_at_its_nominal_rate_over_3_seeds_where_the_bootstrap_does_not():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 0.2, size=(4000, 3))
    mean, sd = x.mean(1), x.std(1, ddof=1)
    half = scipy_stats.t.ppf(0.975, 2) * sd / np.sqrt(3)
    coverage = np.mean(np.abs(mean - 1.0) <= half)
    assert 0.935 < coverage < 0.965
    one = t_interval(x[0].tolist())  # the function agrees with the vectorised formula
    assert one.bounds()[1] == pytest.approx(mean[0] + half[0])
    # A percentile bootstrap over the 3 values: 74% here (why the seeds get a t-interval).
    idx = rng.integers(0, 3, size=(4000, 500, 3))
    draws = np.take_along_axis(x[:, None, :].repeat(500, 1), idx, 2).mean(2)
    low, high = np.quantile(draws, [0.025, 0.975], axis=1)
    assert np.mean((low <= 1.0) & (high >= 1.0)) < 0.85


def test_the_document_bootstrap_covers_a_known_pooled_mean():
    rng = np.random.default_rng(1)
    hits = 0
    for rep in range(300):
        counts = rng.integers(20, 200, 150)  # targets per document piece
        per_token = rng.gamma(4.0, 0.5, 150)  # documents differ: mean 2.0
        sums = counts * per_token + rng.normal(0, 1, 150) * np.sqrt(counts)
        iv = bootstrap_pooled(sums, counts, resamples=400, seed=rep)
        low, high = iv.bounds()
        hits += low <= 2.0 <= high
    assert 0.90 <= hits / 300 <= 0.98


def test_pairing_by_document_removes_the_documents_own_spread():
    rng = np.random.default_rng(2)
    counts = rng.integers(20, 200, 300)
    hardness = rng.gamma(4.0, 0.5, 300) * counts
    ref = hardness + rng.normal(0, 0.5, 300)
    run = hardness - 0.01 * counts + rng.normal(0, 0.5, 300)  # 0.01 nats better everywhere
    low, high = bootstrap_pooled(run, counts, ref).bounds()
    assert high < 0 and low < -0.01 + (high - low) and -0.01 - (high - low) < high
    alone_low, alone_high = bootstrap_pooled(run, counts).bounds()
    assert high - low < (alone_high - alone_low) / 10


def test_document_sums_by_hand():
    # Two rows; row 0 holds pieces 1 and 2, row 1 piece 1. Targets: 2 text, 1 image, 1 text.
    ce = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    valid = np.array([[True, False, True], [True, True, False]])
    mod = np.array([[0, 0, 1], [0, 1, 0]])
    task = np.array([[3, -1, 1], [0, 0, -1]], np.int8)
    piece = np.array([[1, 2, 2], [5, 5, 5]])
    out = document_sums(ce, valid, mod, task, piece)
    cols = out["columns"]
    assert cols[:3] == ["overall", "modality:text", "modality:image"]
    np.testing.assert_array_equal(out["sums"][:, 0], [1.0, 3.0, 9.0])
    np.testing.assert_array_equal(out["counts"][:, 0], [1, 1, 2])
    np.testing.assert_array_equal(out["sums"][:, cols.index("modality:image")], [0.0, 3.0, 5.0])
    np.testing.assert_array_equal(out["sums"][:, cols.index("modality:text")], [1.0, 0.0, 4.0])
    np.testing.assert_array_equal(out["counts"][:, cols.index("task:interleaved")], [0, 0, 2])


def test_a_document_cut_across_rows_is_one_document():
    bos = 9
    tokens = np.array([[9, 1, 2, 9, 3], [4, 5, 6, 7, 8], [1, 2, 0, 0, 0], [9, 1, 0, 0, 0]])
    segments = np.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]])
    docs = target_documents(tokens, segments, bos)  # [R, L-1]: the document of target t+1
    np.testing.assert_array_equal(
        docs, [[0, 0, 1, 1], [1, 1, 1, 1], [1, -1, -1, -1], [2, -1, -1, -1]]
    )


def test_t_pvalue_by_hand():
    # [1, 2, 3]: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 3.4641 at 2 df; at 2 df P(|T| > t) =
    # 1 - t / sqrt(2 + t^2) exactly: 1 - 3.4641 / 3.7417 = 0.07418.
    assert t_pvalue([1.0, 2.0, 3.0]) == pytest.approx(0.07418, abs=1e-4)
    assert t_pvalue([1.0, 2.0, 3.0], null=2.0) == pytest.approx(1.0)
    assert t_pvalue([0.5]) is None


def test_holm_rejects_what_bonferroni_does_and_more_by_hand():
    # m = 4, alpha 0.05: thresholds 0.0125, 0.0167, 0.025, 0.05 in order of p.
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]  # 0.03 > 0.025: stop
    assert holm([0.001, 0.012, 0.02, 0.3]) == [True, True, True, False]  # Bonferroni: 2 of these
    assert holm([0.001, None, 0.02, 0.3]) == [True, False, False, False]  # None counts in m
