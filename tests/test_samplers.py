"""Samplers: convergence order on an exact solution, and classifier-free guidance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samplers
from core.errors import UserError
from samplers.guidance import guidance_schedule, guide

LAM = -1.5


def linear_field(x, t, *, cond=None, dt=None):
    """dx/dt = λ x + t (non-autonomous, so the time grid matters)."""
    return LAM * x + t[:, None]


def exact(x0, t):
    c = x0 + 1.0 / LAM**2
    return c * np.exp(LAM * t) - t / LAM - 1.0 / LAM**2


@pytest.mark.parametrize("name,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_halving_the_step_cuts_the_error_by_two_to_the_order(name, order):
    with jax.enable_x64(True):
        x0 = jnp.array([[1.0], [-0.5]], jnp.float64)
        errors = []
        for n in (8, 16, 32):
            x1 = samplers.build(name)(linear_field, x0, None, num_steps=n)
            errors.append(float(jnp.max(jnp.abs(x1 - exact(np.asarray(x0), 1.0)))))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    for r in ratios:
        assert 2**order * 0.8 < r < 2**order * 1.25, (errors, ratios)


def test_backward_integration_inverts_forward():
    x0 = jax.random.normal(jax.random.key(0), (5, 3))
    fwd = samplers.build("rk4")(linear_field, x0, None, num_steps=64)
    back = samplers.build("rk4")(linear_field, fwd, None, num_steps=64, t_start=1.0, t_end=0.0)
    np.testing.assert_allclose(back, x0, atol=1e-4)


def test_unknown_sampler_lists_choices():
    with pytest.raises(UserError, match="unknown sampler 'ddim'.*euler"):
        samplers.build("ddim")


def cond_field(x, t, *, cond=None, dt=None):
    """v = label-dependent offset, so v_cond - v_null is known."""
    return x * 0 + cond.astype(x.dtype)[:, None] if cond is not None else x * 0


def test_cfg_mixes_conditional_and_null_outputs():
    x = jnp.zeros((3, 2))
    t = jnp.full((3,), 0.5)
    cond = jnp.array([1, 2, 3])
    null = 10
    guided = guide(cond_field, 2.5, null)
    expected = null + 2.5 * (cond - null)
    np.testing.assert_allclose(guided(x, t, cond=cond)[:, 0], expected)
    assert guide(cond_field, 1.0, null) is cond_field
    interval = guide(cond_field, guidance_schedule("interval", 3.0, t_lo=0.6, t_hi=1.0), null)
    np.testing.assert_allclose(interval(x, t, cond=cond)[:, 0], cond)  # w = 1 outside
    t_in = jnp.full((3,), 0.8)
    np.testing.assert_allclose(interval(x, t_in, cond=cond)[:, 0], null + 3.0 * (cond - null))


def test_linear_schedule_has_the_constant_mean():
    t = jnp.linspace(0, 1, 100_001)
    w = guidance_schedule("linear", 4.0)(t)
    np.testing.assert_allclose(float(w.mean()), 4.0, rtol=1e-3)
    assert float(w[0]) == 1.0
