"""Classifier-free guidance as a network wrapper, so every sampler gets it.

`v = v_null + w(t) · (v_cond - v_null)`: `w = 1` is the plain conditional model, `w = 0` the
unconditional one, `w > 1` guides. One network call on the doubled batch per evaluation.
`scale` is a number or a schedule `w(t)` built by `guidance_schedule`:

- `constant`: `w(t) = w`.
- `interval`: `w` for `t` in `[t_lo, t_hi]`, else 1 (guidance in a limited interval,
  Kynkäänniemi et al. 2024; in this codebase's time, t=0 noise and t=1 data).
- `linear`: `w(t) = 1 + 2 (w - 1) t`, rising from 1 at noise, with the same mean as `w`
  over [0, 1] (the increasing linear schedule of Wang et al. 2024, "Analysis of
  Classifier-Free Guidance Weight Schedulers").
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from core.errors import UserError
from models.conditioning import null_like


def guidance_schedule(
    name: str, scale: float, *, t_lo: float = 0.0, t_hi: float = 1.0
) -> Callable[[jax.Array], jax.Array]:
    if name == "constant":
        return lambda t: jnp.full_like(t, scale)
    if name == "interval":
        return lambda t: jnp.where((t >= t_lo) & (t <= t_hi), scale, 1.0).astype(t.dtype)
    if name == "linear":
        return lambda t: 1.0 + 2.0 * (scale - 1.0) * t
    raise UserError(f"unknown guidance schedule {name!r}; known: constant, interval, linear")


def guide(net, scale, null_cond: int):
    """Wrap `net(x, t, *, cond, dt)` with classifier-free guidance of weight `scale`."""
    if not callable(scale) and float(scale) == 1.0:
        return net

    def guided(x, t, *, cond=None, dt=None):
        if cond is None:
            return net(x, t, cond=None, dt=dt)
        double = lambda a: None if a is None else jnp.concatenate([a, a])
        both = net(
            double(x),
            double(t),
            cond=jnp.concatenate([cond, null_like(cond, null_cond)]),
            dt=double(dt),
        )
        v_cond, v_null = jnp.split(both, 2)
        w = scale(t) if callable(scale) else jnp.full_like(t, scale)
        w = w.reshape(w.shape + (1,) * (x.ndim - 1)).astype(v_cond.dtype)
        return v_null + w * (v_cond - v_null)

    return guided
