"""The lost-dimensions study: the closed-form empirical score and its Jacobian against the
mixture's log-density, and the retained dimensions at the two ends (N large: the manifold
dimension, block by block; N = 1: none)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import UserError
from data import build_source
from data.linear_blocks import LinearBlocks
from metrics import lost_dimensions as ld


def test_empirical_score_and_jacobian_are_the_mixtures_by_finite_differences():
    rng = np.random.default_rng(0)
    train, x = rng.normal(size=(7, 3)), rng.normal(size=(3,))
    sigma, h = 0.7, 1e-5
    with jax.enable_x64():
        train, x = jnp.asarray(train, jnp.float64), jnp.asarray(x, jnp.float64)
        logp = lambda v: ld.empirical_log_density(v, train, sigma)
        fd = np.array([(logp(x + h * e) - logp(x - h * e)) / (2 * h) for e in np.eye(3)])
        np.testing.assert_allclose(ld.empirical_score(x, train, sigma), fd, rtol=1e-6)
        score = lambda v: ld.empirical_score(v, train, sigma)
        fd_jac = np.stack([(score(x + h * e) - score(x - h * e)) / (2 * h) for e in np.eye(3)], 1)
        np.testing.assert_allclose(ld.empirical_jacobian(x, train, sigma), fd_jac, rtol=1e-6)
        # the density itself: a normalised mixture (a 1-point set is one Gaussian)
        one = train[:1]
        gauss = -0.5 * jnp.sum((x - one[0]) ** 2) / sigma**2 - 1.5 * jnp.log(2 * jnp.pi * sigma**2)
        np.testing.assert_allclose(ld.empirical_log_density(x, one, sigma), gauss, rtol=1e-12)


def test_retained_dimensions_are_the_manifold_with_many_points_and_none_with_one():
    spec = LinearBlocks(ambient_dim=6, block_dims=(1, 1), block_vars=(1.0, 0.25), basis_seed=3)
    sigma = 0.2
    pool = spec.sample(6000, np.random.default_rng(0))
    pts = ld.noisy_points(spec, 32, sigma, seed=1)
    many = ld.empirical_retained(spec, pool, sigma, pts)
    np.testing.assert_allclose(many[0], [1.0, 1.0])  # each block, at every test point
    np.testing.assert_allclose(many[1], [1.0, 1.0], atol=0.1)  # the population's variance
    one = ld.empirical_retained(spec, pool[:1], sigma, pts)
    np.testing.assert_allclose(one, [[0.0, 0.0], [0.0, 0.0]], atol=1e-6)
    # off the manifold nothing is retained: the whole-space count is the blocks' sum
    eye = [np.eye(6)]
    jac = ld.empirical_jacobian(jnp.asarray(pts[0]), jnp.asarray(pool), sigma)
    assert ld.retained_per_block(np.asarray(jac), eye, sigma).tolist() == [2]


def test_population_score_retains_a_direction_exactly_when_its_variance_exceeds_sigma_squared():
    sigma, bases = 0.3, [np.eye(3)[:, :1], np.eye(3)[:, 1:2], np.eye(3)[:, 2:]]
    variances = np.array([0.5, 0.05, 0.1])  # > sigma^2 = 0.09, <, >
    jac = -np.diag(1.0 / (variances + sigma**2))  # a Gaussian's score Jacobian
    assert ld.retained_per_block(jac, bases, sigma).tolist() == [1, 0, 1]
    np.testing.assert_allclose(ld.kept_per_block(jac, bases, sigma, variances), 1.0)
    frozen = -np.eye(3) / sigma**2  # every direction pulled back: nothing kept
    np.testing.assert_allclose(ld.kept_per_block(frozen, bases, sigma, variances), 0.0, atol=1e-12)


def test_linear_blocks_source_and_its_errors():
    src = build_source("linear_blocks", num_examples=50, ambient_dim=5, block_dims=(2, 1),
                       block_vars=(4.0, 0.01))  # fmt: skip
    assert src.x.shape == (50, 5) and src.example_shape == (5,)
    u = src.spec.basis()
    np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-12)
    z = src.x @ u  # coordinates in the manifold
    np.testing.assert_allclose(src.x, z @ u.T, atol=1e-5)  # on the subspace
    big = build_source("linear_blocks", num_examples=20000, ambient_dim=5, block_dims=(2, 1),
                       block_vars=(4.0, 0.01))  # fmt: skip
    np.testing.assert_allclose(np.var(big.x @ u, axis=0), [4.0, 4.0, 0.01], rtol=0.05)
    test = build_source("linear_blocks", split="test", num_examples=50, ambient_dim=5,
                        block_dims=(2, 1), block_vars=(4.0, 0.01))  # fmt: skip
    assert not np.allclose(test.x, src.x)
    with pytest.raises(UserError, match=r"exceed ambient_dim=2"):
        build_source("linear_blocks", ambient_dim=2, block_dims=(2, 1), block_vars=(1, 1))
    with pytest.raises(UserError, match=r"same length"):
        build_source("linear_blocks", block_dims=(2,), block_vars=(1.0, 0.1))
