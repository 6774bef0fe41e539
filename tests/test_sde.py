"""The Euler-Maruyama sampler and `renoise` (samplers/sde.py) against Gaussian oracles.

For Gaussian data N(MU, diag(S^2)) the optimal velocity is linear in x (tests/gaussian.py),
so the Euler-Maruyama chain is a linear Gaussian recursion: its exact output law has the
moments of `em_moments` (per dimension, float64). Each Monte-Carlo check compares sample
moments with the exact ones to Z standard errors (N samples: mean s/sqrt(N), variance
V sqrt(2/(N-1))), and the exact EM moments with the data law to the EM bias, O(h).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import UserError
from samplers.ode import sample_euler, sample_heun
from samplers.sde import renoise, sample_euler_maruyama, step_noise_shape
from tests.gaussian import optimal_velocity

MU = np.array([1.0, -2.0])
S = np.array([0.5, 2.0])
N = 40_000  # samples per Monte-Carlo check
STEPS = 200
Z = 4.5  # standard errors allowed (all checks together: false-alarm odds well under 1e-3)
V_STAR = optimal_velocity(jnp.asarray(MU, jnp.float32), jnp.diag(jnp.asarray(S**2, jnp.float32)))


def em_moments(churn, num_steps, t_start=0.0, t_end=1.0, mean=0.0, var=1.0):
    """Exact mean and variance of the EM chain on the Gaussian-data velocity, per dimension.
    A step adds `h v + |h| churn (t v - x) + sqrt(2 churn (1-t) |h|) z`, affine in x since
    `v = MU + gain (x - t MU)`. The Langevin drift is 0 where `1 - t < t_min` (views' clip:
    only t = 1 exactly, the first step of a backward run, where g = 0 too)."""
    lam = S**2
    h = (t_end - t_start) / num_steps
    m, v = np.full(2, mean, np.float64), np.full(2, var, np.float64)
    for i in range(num_steps):
        t = t_start + i * h
        gain = (t * lam - (1 - t)) / ((1 - t) ** 2 + t**2 * lam)
        c = churn if 1 - t >= 1e-5 else 0.0
        k = h + abs(h) * c * t  # coefficient of v
        a = 1 + k * gain - abs(h) * c
        b = k * (MU - gain * t * MU)
        m, v = a * m + b, a * a * v + 2 * churn * max(1 - t, 0.0) * abs(h)
    return m, v


def assert_moments(x, mean, var, what, var_bias=0.0):
    """Sample mean and variance of `x` [n, d] within Z standard errors (+ `var_bias`, a bound
    on a known bias of the variance) of `mean`, `var`."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    mean_err = np.abs(x.mean(0) - mean) / np.sqrt(var / n)
    var_err = (np.abs(x.var(0, ddof=1) - var) - var_bias) / (var * np.sqrt(2 / (n - 1)))
    assert np.all(mean_err < Z) and np.all(var_err < Z), (what, mean_err, var_err)


@jax.jit
def em_gauss(x_init, step_noise, churn):
    return sample_euler_maruyama(
        V_STAR, x_init, num_steps=STEPS, step_noise=step_noise, churn=churn
    )


def gauss_inputs(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x_init = jax.random.normal(k1, (N, 2))
    return x_init, jax.random.normal(k2, step_noise_shape(STEPS, x_init.shape))


def mlp(x, t, *, cond=None, dt=None):
    """A fixed nonlinear velocity field on x of shape [B, 3, 2]."""
    w = jnp.linspace(-1.5, 1.2, 6).reshape(1, 3, 2)
    return jnp.tanh(w * x + jnp.sin(3.0 * t)[:, None, None]) - 0.3 * x[:, ::-1, :]


def test_churn_zero_is_the_euler_ode_sampler():
    x_init = jax.random.normal(jax.random.key(0), (8, 3, 2))
    noise = 5.0 * jax.random.normal(jax.random.key(1), step_noise_shape(16, x_init.shape))
    ode = sample_euler(mlp, x_init, num_steps=16, t_start=0.1, t_end=0.9)
    sde = sample_euler_maruyama(
        mlp, x_init, num_steps=16, step_noise=noise, churn=0.0, t_start=0.1, t_end=0.9
    )
    np.testing.assert_allclose(sde, ode, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("churn", [1.0, 2.0])
def test_gaussian_data_is_reached(churn):
    x = em_gauss(*gauss_inputs(int(churn)), jnp.float32(churn))
    mean, var = em_moments(churn, STEPS)
    # the samples have the exact law of the scheme ...
    assert_moments(x, mean, var, f"EM churn={churn} vs exact EM law")
    # ... whose bias is zero in the mean and O(h) in the variance (-0.040 and -0.027 on
    # S^2 = 4 at 200 steps for churn 1 and 2, halving with h)
    np.testing.assert_allclose(mean, MU, atol=1e-9)
    bias = 0.015 * S**2
    assert np.all(np.abs(var - S**2) < bias), var
    assert_moments(x, MU, S**2, f"EM churn={churn} vs data", var_bias=bias)


def test_em_moments_of_the_oracle_converge_at_order_one():
    biases = [em_moments(1.0, n)[1][1] - S[1] ** 2 for n in (100, 200, 400)]
    assert 1.8 < biases[0] / biases[1] < 2.2 and 1.8 < biases[1] / biases[2] < 2.2, biases


def test_backward_runs_data_to_noise():
    x1 = jnp.asarray(MU, jnp.float32)[None, :] + jnp.asarray(S, jnp.float32)[
        None, :
    ] * jax.random.normal(jax.random.key(5), (N, 2))
    x0 = sample_euler_maruyama(
        V_STAR, x1, jax.random.key(6), num_steps=STEPS, churn=1.0, t_start=1.0, t_end=0.0
    )
    mean, var = em_moments(1.0, STEPS, 1.0, 0.0, MU, S**2)
    assert_moments(x0, mean, var, "backward EM vs exact EM law")
    np.testing.assert_allclose(mean, 0.0, atol=1e-9)
    assert np.all(np.abs(var - 1.0) < 0.015), var
    assert_moments(x0, np.zeros(2), np.ones(2), "backward EM vs N(0, I)", var_bias=0.015)


def test_same_step_noise_same_samples_other_noise_other_samples():
    x_init, noise = gauss_inputs(7)
    a = em_gauss(x_init, noise, jnp.float32(1.0))
    b = em_gauss(x_init, noise, jnp.float32(1.0))
    np.testing.assert_array_equal(a, b)
    c = em_gauss(x_init, -noise, jnp.float32(1.0))
    assert float(jnp.min(jnp.max(jnp.abs(a - c), axis=1))) > 1e-3
    # the key is only a convenience: it draws the step noise
    key = jax.random.key(8)
    drawn = jax.random.normal(key, step_noise_shape(4, (5, 3, 2)))
    x5 = x_init[:5, None, :] * jnp.ones((1, 3, 1))
    by_key = sample_euler_maruyama(mlp, x5, key, num_steps=4)
    by_noise = sample_euler_maruyama(mlp, x5, num_steps=4, step_noise=drawn)
    np.testing.assert_array_equal(by_key, by_noise)


def exact_path_samples(t, seed):
    k0, k1 = jax.random.split(jax.random.key(seed))
    x0 = jax.random.normal(k0, (N, 2))
    x1 = jnp.asarray(MU, jnp.float32)[None, :] + jnp.asarray(S, jnp.float32)[
        None, :
    ] * jax.random.normal(k1, (N, 2))
    return x1, (1 - t) * x0 + t * x1


def test_renoise_keeps_the_path_marginals_and_the_ode_then_reaches_the_data():
    t, t_new = 0.7, 0.3
    x1, x_t = exact_path_samples(t, 10)
    eps = jax.random.normal(jax.random.key(11), x_t.shape)
    x_new = renoise(x_t, t, t_new, eps)
    assert_moments(x_new, t_new * MU, (1 - t_new) ** 2 + t_new**2 * S**2, "renoised marginal")
    # conditionally on the data: x_new - t' x1 ~ N(0, (1-t')^2), uncorrelated with x1
    resid = np.asarray(x_new - t_new * x1, np.float64)
    assert_moments(resid, np.zeros(2), np.full(2, (1 - t_new) ** 2), "renoised given x1")
    corr = [np.corrcoef(resid[:, d], np.asarray(x1)[:, d])[0, 1] for d in range(2)]
    assert np.all(np.abs(corr) < Z / np.sqrt(N)), corr
    # traced times take the same arithmetic
    np.testing.assert_allclose(jax.jit(renoise)(x_t, t, t_new, eps), x_new, atol=1e-6)
    # then the ODE from t' (Heun, 50 steps: its bias is far below the tolerance)
    x_end = sample_heun(V_STAR, x_new, num_steps=50, t_start=t_new)
    assert_moments(x_end, MU, S**2, "ODE after renoise")


def test_renoise_end_points():
    _, x_t = exact_path_samples(0.6, 12)
    eps = jax.random.normal(jax.random.key(13), x_t.shape)
    np.testing.assert_array_equal(renoise(x_t, 0.6, 0.6, eps), x_t)
    np.testing.assert_array_equal(renoise(x_t, 0.6, 0.0, eps), eps)
    np.testing.assert_array_equal(renoise(x_t, jnp.float32(0.6), jnp.float32(0.6), eps), x_t)


def test_errors_are_one_line_user_errors():
    x = jnp.zeros((4, 2))
    with pytest.raises(UserError, match=r"step_noise .*\(3, 4, 2\).* or a key") as info:
        sample_euler_maruyama(mlp, x, num_steps=3)
    assert "\n" not in str(info.value)
    wrong = jnp.zeros((3, 2, 4))
    with pytest.raises(UserError, match=re.escape("shape (3, 2, 4), expected (3, 4, 2)")):
        sample_euler_maruyama(mlp, x, num_steps=3, step_noise=wrong)
    with pytest.raises(UserError, match="churn must be >= 0"):
        sample_euler_maruyama(mlp, x, jax.random.key(0), num_steps=3, churn=-0.5)
    with pytest.raises(UserError, match="num_steps"):
        sample_euler_maruyama(mlp, x, jax.random.key(0), num_steps=0)
    with pytest.raises(UserError, match=r"t_new=0\.8 must be <= t=0\.5"):
        renoise(x, 0.5, 0.8, x)
    with pytest.raises(UserError, match="0 < t"):
        renoise(x, 0.0, 0.0, x)
