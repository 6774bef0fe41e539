"""A stochastic sampler for velocity networks, and renoising along the Gaussian path.

**The SDE.** On the path `x_t = (1-t) x0 + t x1` the probability-flow ODE `dx = v dt` has
marginals `p_t`. So does, for any `g(t) >= 0`,

    dx = [v(x,t) + (g(t)^2 / 2) score(x,t)] dt + g(t) dW,      g(t)^2 = 2 churn (1-t),

because in its Fokker-Planck equation the added drift and the diffusion cancel:
`-div(p (g^2/2) ∇log p) + (g^2/2) Δp = -(g^2/2) div(∇p) + (g^2/2) Δp = 0`, leaving
`∂p/∂t = -div(p v)`, the continuity equation of the ODE.

**Why this g.** With `score = (t v - x)/(1-t)` (`models.views`), `(g^2/2) score =
churn (t v - x)`: the drift stays bounded at both ends (no `1/(1-t)` blow-up near the
data) and the noise fades to zero at t = 1. At t = 0 the added part is `-churn x dt +
sqrt(2 churn) dW`: with churn = 1, unit-rate Langevin on the prior N(0, I).

**churn** scales the Langevin part: 0 is exactly the Euler ODE sampler
(`samplers.ode.sample_euler`); larger values pull errors back to `p_t` faster (on Gaussian
data at 200 steps the variance bias is -1.5 %, -1.0 %, -0.7 % for churn 0, 1, 2), but the
added drift `-churn x` is stiff: keep `churn |h|` well below 1 (Euler-Maruyama is unstable
past 2).

Euler-Maruyama on the uniform grid of `samplers.ode` (`t_i = t_start + i h`, one
`lax.scan`), all randomness explicit: `step_noise` (standard normal, shape
`step_noise_shape(num_steps, x.shape)`) supplies row `i` to step `i`,
`x += h v + |h| (g^2/2) score + g(t_i) sqrt(|h|) step_noise[i]`. With `t_end < t_start`
(data -> noise) the `|h|` makes it the time-reversed SDE with the same marginals
(`drift = v - (g^2/2) score` in reversed time). The score comes from the velocity through
`models.views`, which clips `1 - t` at `t_min`; a forward grid never evaluates t = 1 (a
backward one does, once, where `g = 0` and the clipped Langevin drift is 0 instead of
`-churn eps_hat`: an O(h) error in one step).

`renoise` moves a point of the path at time t back to an earlier t' by the forward noising
kernel (exact in distribution): this is the "path search" move (noise search,
arXiv 2501.09732): integrate to t, renoise back to t' < t, go on with any sampler from
`t_start=t'`.
"""

import jax
import jax.numpy as jnp

from core.errors import UserError
from models.views import from_pair, to_pair


def step_noise_shape(num_steps: int, x_shape) -> tuple:
    """Shape of the standard-normal `step_noise` the caller draws: `(num_steps, *x_shape)`."""
    return (int(num_steps), *tuple(x_shape))


def _concrete(value):
    """`float(value)` when it is known at trace time, else None (a traced value)."""
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def sample_euler_maruyama(
    net,
    x_init: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    cond=None,
    step_noise: jax.Array | None = None,
    churn: float = 1.0,
    t_start: float = 0.0,
    t_end: float = 1.0,
) -> jax.Array:
    """Euler-Maruyama on `dx = [v + churn (t v - x)] dt + sqrt(2 churn (1-t)) dW` (module
    docstring) from `t_start` to `t_end`; returns x at `t_end`. `net(x, t[B], cond=cond)` is a
    velocity network. `step_noise` (shape `step_noise_shape(num_steps, x_init.shape)`,
    standard normal) is the whole randomness; without it it is drawn from `key`."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise UserError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    churn_value = _concrete(churn)
    if churn_value is not None and not churn_value >= 0:
        raise UserError(f"churn must be >= 0, got {churn!r}")
    x_init = jnp.asarray(x_init)
    shape = step_noise_shape(num_steps, x_init.shape)
    if step_noise is None:
        if key is None:
            raise UserError(
                "sample_euler_maruyama needs step_noise (standard normal, shape "
                f"{shape}) or a key to draw it from"
            )
        step_noise = jax.random.normal(key, shape, x_init.dtype)
    step_noise = jnp.asarray(step_noise)
    if tuple(step_noise.shape) != shape:
        raise UserError(
            f"step_noise has shape {tuple(step_noise.shape)}, expected {shape} "
            f"(num_steps={num_steps}, x_init.shape={tuple(x_init.shape)})"
        )
    step_noise = step_noise.astype(x_init.dtype)
    batch = x_init.shape[0]
    h = (t_end - t_start) / num_steps
    abs_h = abs(h)
    sqrt_abs_h = jnp.sqrt(jnp.asarray(abs_h, x_init.dtype))

    def body(x, inputs):
        i, noise = inputs
        t = t_start + i * h
        t_vec = jnp.full((batch,), t, x.dtype)
        v = net(x, t_vec, cond=cond).astype(x.dtype)
        score = from_pair("score", *to_pair("velocity", v, x, t_vec), x, t_vec)
        half_g2 = (churn * jnp.maximum(1.0 - t, 0.0)).astype(x.dtype)  # g(t)^2 / 2
        g = jnp.sqrt(2.0 * half_g2)
        x = x + h * v + (abs_h * half_g2) * score + (g * sqrt_abs_h) * noise
        return x, None

    steps = jnp.arange(num_steps, dtype=x_init.dtype)
    x, _ = jax.lax.scan(body, x_init, (steps, step_noise))
    return x


def renoise(x_t: jax.Array, t, t_new, eps: jax.Array) -> jax.Array:
    """Move `x_t` (a point of the path at time t) back to time `t_new <= t`:

        x_{t'} = (t'/t) x_t + sqrt((1-t')^2 - (t'/t)^2 (1-t)^2) eps,      eps ~ N(0, I).

    Given the data x1, `x_t ~ N(t x1, (1-t)^2 I)` maps to mean `t' x1` and variance
    `(t'/t)^2 (1-t)^2 + (1-t')^2 - (t'/t)^2 (1-t)^2 = (1-t')^2`, i.e. to the law of `x_{t'}`
    given x1, so `p_t -> p_{t'}` exactly (the root's argument is >= 0 iff t' <= t).
    `t' = t` is the identity, `t' = 0` returns `eps`. Python-number times are checked
    (`0 <= t_new <= t <= 1`, `t > 0`); traced ones are used as given, the root's argument
    clipped at 0."""
    t_value, t_new_value = _concrete(t), _concrete(t_new)
    if t_value is not None and not 0.0 < t_value <= 1.0:
        raise UserError(f"renoise needs 0 < t <= 1, got t={t!r}")
    if t_new_value is not None and not t_new_value >= 0.0:
        raise UserError(f"renoise needs t_new >= 0, got t_new={t_new!r}")
    if t_value is not None and t_new_value is not None and t_new_value > t_value:
        raise UserError(f"renoise goes back along the path: t_new={t_new!r} must be <= t={t!r}")
    x_t = jnp.asarray(x_t)
    eps = jnp.asarray(eps)
    if eps.shape != x_t.shape:
        raise UserError(f"eps has shape {eps.shape}, x_t has shape {x_t.shape}; they must match")
    t = jnp.asarray(t, x_t.dtype)
    t_new = jnp.asarray(t_new, x_t.dtype)
    ratio = t_new / t
    sigma = jnp.sqrt(jnp.maximum((1.0 - t_new) ** 2 - (ratio * (1.0 - t)) ** 2, 0.0))
    return ratio * x_t + sigma * eps.astype(x_t.dtype)
