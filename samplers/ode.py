"""Fixed-step ODE samplers for a velocity network: Euler (order 1), midpoint (2), Heun (2),
RK4 (4). `dx/dt = v(x, t)` is integrated from `t_start` (default 0, noise) to `t_end`
(default 1, data) on a uniform grid, in one `lax.scan`. `t_start=1, t_end=0` runs the flow
backwards (data -> noise). The number of network evaluations is `num_steps` × the order's
stages (1, 2, 2, 4).

Guidance whose weight carries state across steps (`samplers.guidance.Carried`: the dynamic
switch) is carried through the scan: each step's first stage `k1 = v(x_k, t_k)` updates the
switch, and the step's later stages use it. `trace=True` (with a `Carried` network) also
returns, per step, the time, the gap `||v_cond - v_null||` and the weight per sample, and
per sample the first step whose guidance is on (`num_steps` where it never is) and its time
(NaN where it never is).
"""

import jax
import jax.numpy as jnp

from samplers.guidance import Carried


# each step takes its first stage `k1 = f(x, t)` from the caller
def _euler(f, x, t, h, k1):
    return x + h * k1


def _midpoint(f, x, t, h, k1):
    return x + h * f(x + 0.5 * h * k1, t + 0.5 * h)


def _heun(f, x, t, h, k1):
    k2 = f(x + h * k1, t + h)
    return x + 0.5 * h * (k1 + k2)


def _rk4(f, x, t, h, k1):
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
    trace: bool = False,
):
    """Integrate the velocity field of `net` with a fixed-step method from `STEPS`; `net`
    may be a `Carried` guidance (then its state rides along the scan). `trace=True` (a
    `Carried` net only) returns `(x, trace)`."""
    step, _ = STEPS[method]
    x_init = jnp.asarray(x_init)
    batch = x_init.shape[0]
    h = (t_end - t_start) / num_steps
    times = lambda t: jnp.full((batch,), t, x_init.dtype)
    steps = jnp.arange(num_steps, dtype=x_init.dtype)

    if not isinstance(net, Carried):
        if trace:
            raise ValueError("trace=True needs a Carried guidance network")

        def f(x, t):
            return net(x, times(t), cond=cond).astype(x.dtype)

        def body(x, i):
            t = t_start + i * h
            return step(f, x, t, h, f(x, t)), None

        x, _ = jax.lax.scan(body, x_init, steps)
        return x

    def carried_body(carry, i):
        x, state = carry
        t = t_start + i * h
        k1, state, info = net.begin(state, x, times(t), cond)
        f = lambda y, s: net.velocity(state, y, times(s), cond).astype(y.dtype)
        return (step(f, x, t, h, k1.astype(x.dtype)), state), info

    (x, _), info = jax.lax.scan(carried_body, (x_init, net.init(batch)), steps)
    if not trace:
        return x
    t = t_start + steps * h
    on = info["on"]  # [steps, B]
    first = jnp.where(on.any(axis=0), jnp.argmax(on, axis=0), num_steps)
    switch_t = jnp.where(first < num_steps, t_start + first.astype(t.dtype) * h, jnp.nan)
    return x, {"t": t, "gap": info["gap"], "weight": info["weight"],
               "switch_step": first, "switch_t": switch_t}  # fmt: skip


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
        trace: bool = False,
    ):
        return integrate(
            method, net, x_init, num_steps=num_steps, cond=cond, t_start=t_start,
            t_end=t_end, trace=trace,
        )  # fmt: skip

    sample.__name__ = f"sample_{method}"
    sample.__doc__ = (
        f"{method} ODE sampler (order {STEPS[method][1]}); `key` is unused "
        "(deterministic). Returns x at t_end (and the guidance trace with `trace=True`)."
    )
    return sample


sample_euler = _make("euler")
sample_midpoint = _make("midpoint")
sample_heun = _make("heun")
sample_rk4 = _make("rk4")
