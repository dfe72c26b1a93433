"""eta and the step-matching ratio on synthetic curves with known answers."""

import numpy as np
import pytest

from moma_jax.eta import eta, flops_to_reach, mean_spread, smooth, step_ratio


def power_law(flops):
    return 2.0 + 10.0 * np.asarray(flops, dtype=np.float64) ** -0.1


def test_a_curve_compressed_2x_in_flops_gives_eta_2():
    dense_f = np.geomspace(1e12, 1e15, 40)
    sparse_f = np.geomspace(1e12, 1e15, 37)  # another, unequal evaluation grid
    sparse_loss = power_law(2 * sparse_f)  # reaches every loss with half the FLOPs
    value = eta(dense_f, power_law(dense_f), sparse_f, sparse_loss)
    assert value == pytest.approx(2.0, rel=0.01)


def test_never_reaching_the_dense_loss_is_not_a_number():
    f = np.geomspace(1e12, 1e15, 20)
    assert eta(f, power_law(f), f, power_law(f) + 0.01) is None
    assert mean_spread([None, None])["mean"] is None


def test_equal_curves_give_1_and_interpolation_is_in_log_flops():
    f = np.geomspace(1e12, 1e15, 10)
    assert eta(f, power_law(f), f, power_law(f)) == pytest.approx(1.0)
    # Target 1.5 halfway (in loss) between points at 1e2 and 1e4: reached at 1e3.
    assert flops_to_reach([1e2, 1e4], [2.0, 1.0], 1.5) == pytest.approx(1e3)
    assert flops_to_reach([1e2, 1e4], [1.0, 0.5], 1.5) == pytest.approx(1e2)  # first point


def test_step_ratio_is_the_fraction_of_dense_steps():
    steps = np.arange(1, 101, dtype=float)
    loss = 5.0 / steps
    faster = 5.0 / (4 * steps)  # 4x fewer steps to any loss
    assert step_ratio(steps, loss, steps, faster) == pytest.approx(0.25, rel=0.02)


def test_smooth_and_spread():
    np.testing.assert_allclose(smooth([1, 2, 3, 4], 2), [1.0, 1.5, 2.5, 3.5])
    s = mean_spread([1.0, 3.0, None])
    assert (s["mean"], s["min"], s["max"], s["reached"], s["n"]) == (2.0, 1.0, 3.0, 2, 3)
