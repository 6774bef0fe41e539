"""The sliced Wasserstein distance against exact values."""

import numpy as np
import pytest

from core.errors import UserError
from metrics.two_sample import directions, sliced_wasserstein


def test_zero_for_the_same_set_and_symmetric():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(500, 3)), rng.normal(size=(700, 3)) + 0.3
    assert sliced_wasserstein(x, x[rng.permutation(500)]) == 0.0  # order does not matter
    assert sliced_wasserstein(x, y) == pytest.approx(sliced_wasserstein(y, x), rel=1e-12)
    with pytest.raises(UserError, match=r"\[n, D\] and \[m, D\]"):
        sliced_wasserstein(x, y[:, :2])


def test_a_shifted_copy_is_exact_and_matches_the_sliced_average():
    # y = x + c: along θ every sorted value moves by θ·c, so SW_2² = mean_θ (θ·c)² for the
    # drawn directions exactly, and -> |c|² / D for many directions (E[θθᵀ] = I / D).
    rng = np.random.default_rng(1)
    x, c = rng.normal(size=(400, 4)), np.array([1.0, -2.0, 0.5, 0.0])
    theta = directions(4, 64, seed=3)
    exact = np.sqrt(np.mean((theta @ c) ** 2))
    assert sliced_wasserstein(x, x + c, num_projections=64, seed=3) == pytest.approx(exact)
    many = sliced_wasserstein(x, x + c, num_projections=20_000, seed=3)
    assert many == pytest.approx(np.linalg.norm(c) / 2.0, rel=0.02)


def test_unequal_sizes_use_quantiles():
    # 1-D: two samples of the same uniform law, 1000 vs 250 points, sit at W_2 ~ 1/n apart;
    # a shift by 0.5 of the second gives 0.5 up to that error.
    x = (np.arange(1000) + 0.5)[:, None] / 1000
    y = (np.arange(250) + 0.5)[:, None] / 250
    assert sliced_wasserstein(x, y, num_projections=1) < 2e-3
    assert sliced_wasserstein(x, y + 0.5, num_projections=1) == pytest.approx(0.5, abs=2e-3)
