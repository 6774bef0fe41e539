"""Fixed-step ODE samplers for a velocity network: Euler (order 1), midpoint (2), Heun (2),
RK4 (4). `dx/dt = v(x, t)` is integrated from `t_start` (default 0, noise) to `t_end`
(default 1, data) on a uniform grid, in one `lax.scan`. `t_start=1, t_end=0` runs the flow
backwards (data -> noise). The number of network evaluations is `num_steps` × the order's
stages (1, 2, 2, 4).
"""

import jax
import jax.numpy as jnp


def _euler(f, x, t, h):
    return x + h * f(x, t)


def _midpoint(f, x, t, h):
    return x + h * f(x + 0.5 * h * f(x, t), t + 0.5 * h)


def _heun(f, x, t, h):
    k1 = f(x, t)
    k2 = f(x + h * k1, t + h)
    return x + 0.5 * h * (k1 + k2)


def _rk4(f, x, t, h):
    k1 = f(x, t)
    k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
    k4 = f(x + h * k3, t + h)
    return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


STEPS = {"euler": (_euler, 1), "midpoint": (_midpoint, 2), "heun": (_heun, 2), "rk4": (_rk4, 4)}


def integrate(
    method: str,
    net,
    x_init: jax.Array,
    *,
    num_steps: int,
    cond=None,
    t_start: float = 0.0,
    t_end: float = 1.0,
) -> jax.Array:
    """Integrate the velocity field of `net` with a fixed-step method from `STEPS`."""
    step, _ = STEPS[method]
    x_init = jnp.asarray(x_init)
    batch = x_init.shape[0]
    h = (t_end - t_start) / num_steps

    def f(x, t):
        return net(x, jnp.full((batch,), t, x.dtype), cond=cond).astype(x.dtype)

    def body(x, i):
        return step(f, x, t_start + i * h, h), None

    x, _ = jax.lax.scan(body, x_init, jnp.arange(num_steps, dtype=x_init.dtype))
    return x


def _make(method: str):
    def sample(
        net,
        x_init,
        key=None,
        *,
        num_steps: int,
        cond=None,
        t_start: float = 0.0,
        t_end: float = 1.0,
    ):
        return integrate(
            method, net, x_init, num_steps=num_steps, cond=cond, t_start=t_start, t_end=t_end
        )

    sample.__name__ = f"sample_{method}"
    sample.__doc__ = (
        f"{method} ODE sampler (order {STEPS[method][1]}); `key` is unused "
        "(deterministic). Returns x at t_end."
    )
    return sample


sample_euler = _make("euler")
sample_midpoint = _make("midpoint")
sample_heun = _make("heun")
sample_rk4 = _make("rk4")
