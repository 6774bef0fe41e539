"""Shortcut-model sampler (Frans et al. 2024, arXiv 2410.12557): `k` uniform steps of size
`d = 1/k`, each `x <- x + d · s(x, t, d)`, where `s` is a velocity network that also takes
the step size. One network samples in 1, 2, 4, ..., `max_steps` steps; the step size reaches
the network through `models.step_size` (the mapping the loss uses too).
"""

import jax
import jax.numpy as jnp

from models.step_size import steps_dt


def sample_shortcut(
    net,
    x_init: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    cond: jax.Array | None = None,
    max_steps: int = 128,
) -> jax.Array:
    """`num_steps` uniform shortcut steps from noise (`t = 0`) to data (`t = 1`).

    `x_init` `[B, ...]` is the noise, `cond` `[B]` / `[B, E]` or None; `key` is unused (the
    sampler is deterministic). `max_steps` must be the loss's (it fixes the `dt` mapping).
    Guidance wraps `net` (`samplers.guidance.guide`). Returns `x` at `t = 1`, shaped like `x_init`.
    """
    del key
    dt_in = steps_dt(num_steps, max_steps)
    x_init = jnp.asarray(x_init)
    batch = x_init.shape[0]
    d = 1.0 / num_steps
    dt = jnp.full((batch,), dt_in, x_init.dtype)

    def body(x, i):
        t = jnp.full((batch,), i * d, x.dtype)
        return x + d * net(x, t, cond=cond, dt=dt).astype(x.dtype), None

    x, _ = jax.lax.scan(body, x_init, jnp.arange(num_steps, dtype=x_init.dtype))
    return x
