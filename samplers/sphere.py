"""ODE samplers on the sphere: every update is an exponential map, so samples stay on S^{D-1}.

All integrate `dx/dt = v(x, t)` from `t = 0` (uniform noise `x_init` `[B, D]`) to `t = 1`
with `num_steps` equal steps on `lax.scan`, and project the network output onto the tangent
space first. `key` is unused (the ODE is deterministic) and kept for the sampler signature.

- `sample_sphere_euler`: `x ← exp_x(h v(x, t))`. Order 1, 1 evaluation per step.
- `sample_sphere_midpoint`: `x ← exp_x(h P_x v(exp_x(h/2 v(x, t)), t + h/2))`, the
  midpoint velocity brought back to `T_x` by orthogonal projection instead of parallel
  transport (they differ by O(h²), so the local error stays O(h³)). Order 2, 2 evaluations.
- `sample_sphere_rk4`: classical RK4 in exponential normal coordinates at the current point
  (a Runge-Kutta-Munthe-Kaas-type scheme): with `y ∈ T_x`, `dy/ds = d(log_x)_{exp_x y} v`,
  integrated from `y = 0` by RK4, then `x ← exp_x(y)`. The chart `log_x` is smooth for
  `|y| < π`, so this is order 4; 4 evaluations per step.

Guidance composes by wrapping the network: `sample(cfg_tangent(net, scale), x0, key, ...)`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from manifolds.sphere import exp_map, log_map, to_tangent


def _field(net, cond: jax.Array | None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`(x [B, D], t scalar) -> tangent v [B, D]` from `net(x, t [B], *, cond)`."""

    def v(x: jax.Array, t: jax.Array) -> jax.Array:
        t_b = jnp.full(x.shape[:1], t, jnp.float32)
        return to_tangent(x, net(x, t_b, cond=cond).astype(x.dtype))

    return v


def _integrate(step: Callable, x_init: jax.Array, num_steps: int) -> jax.Array:
    """Apply `step(x, t, h)` at `t = i h`, `i = 0 .. num_steps - 1`, on `lax.scan`."""
    h = 1.0 / num_steps

    def body(x, i):
        return step(x, i * h, h), None

    x, _ = jax.lax.scan(body, x_init, jnp.arange(num_steps, dtype=jnp.float32))
    return x


def sample_sphere_euler(
    net, x_init: jax.Array, key: jax.Array, *, num_steps: int, cond: jax.Array | None = None
) -> jax.Array:
    """Riemannian Euler: `x ← exp_x(h v(x, t))`; `x_init` `[B, D]` -> samples `[B, D]`."""
    del key
    v = _field(net, cond)
    return _integrate(lambda x, t, h: exp_map(x, h * v(x, t)), x_init, num_steps)


def sample_sphere_midpoint(
    net, x_init: jax.Array, key: jax.Array, *, num_steps: int, cond: jax.Array | None = None
) -> jax.Array:
    """Riemannian explicit midpoint with projection (order 2); see the module docstring."""
    del key
    v = _field(net, cond)

    def step(x, t, h):
        x_mid = exp_map(x, 0.5 * h * v(x, t))
        return exp_map(x, h * to_tangent(x, v(x_mid, t + 0.5 * h)))

    return _integrate(step, x_init, num_steps)


def sample_sphere_rk4(
    net, x_init: jax.Array, key: jax.Array, *, num_steps: int, cond: jax.Array | None = None
) -> jax.Array:
    """RK4 in exponential normal coordinates (order 4); see the module docstring."""
    del key
    v = _field(net, cond)

    def step(x, t, h):
        def chart_velocity(y, s):  # dy/ds in T_x for the chart point exp_x(y)
            p = exp_map(x, y)
            return jax.jvp(lambda q: log_map(x, q), (p,), (v(p, s),))[1]

        k1 = v(x, t)
        k2 = chart_velocity(0.5 * h * k1, t + 0.5 * h)
        k3 = chart_velocity(0.5 * h * k2, t + 0.5 * h)
        k4 = chart_velocity(h * k3, t + h)
        return exp_map(x, to_tangent(x, h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)))

    return _integrate(step, x_init, num_steps)


def cfg_tangent(net, scale: float, null_cond: int | jax.Array | None = None):
    """Classifier-free guidance on the sphere: a callable with the network's signature.

    `v = P_x(v_null + scale (v_cond - v_null))`: `scale = 1` is the conditional net, `0` the
    unconditional one. The null call passes `cond=null_cond` (an int label, an embedding
    broadcast to `cond`'s shape), or `cond=None` — the protocol's "null" — when it is None.
    """

    def guided(
        x: jax.Array, t: jax.Array, *, cond: jax.Array | None = None, dt: jax.Array | None = None
    ) -> jax.Array:
        kw = {} if dt is None else {"dt": dt}
        v_cond = net(x, t, cond=cond, **kw)
        null = None
        if null_cond is not None and cond is not None:
            null = jnp.broadcast_to(jnp.asarray(null_cond, cond.dtype), cond.shape)
        v_null = net(x, t, cond=null, **kw)
        return to_tangent(x, v_null + scale * (v_cond - v_null))

    return guided
