"""Shortcut-model sampler (Frans et al. 2024, arXiv 2410.12557): `k` uniform steps of size
`d = 1/k`, each `x <- x + d · s(x, t, d)`, where `s` is a velocity network that also takes
the step size. One network samples in 1, 2, 4, ..., `max_steps` steps.

The step size enters the network through one mapping, shared with `losses/shortcut.py`.
With `J = log2(max_steps)`, the step sizes are the levels `d = 2^l / max_steps`, `l = 0..J`,
and the network sees the normalised level

    dt = l / J = 1 + log2(d) / J          (d = 1 -> 1, d = 1/max_steps -> 0)

The finest level `d = 1/max_steps` is the flow-matching velocity (`dt = 0`, the network's
"flow-matching limit"), as in the paper, which queries `d = 0` at the smallest step; so
`max_steps` steps are the Euler method on the flow-matching velocity. Each coarser level is
one more bit of `log2 d`, spread evenly over [0, 1] for the network's `t`-style embedding
(the official code fed the raw integer `log2(1/d)` in 0..7 to an embedder built for [0, 1],
its issue #11).
"""

import math

import jax
import jax.numpy as jnp

from core.errors import UserError


def num_levels(max_steps: int) -> int:
    """`J = log2(max_steps)`: the number of shortcut levels above the flow-matching one."""
    if isinstance(max_steps, bool) or int(max_steps) != max_steps or max_steps < 2:
        raise UserError(f"max_steps must be a power of two >= 2, got {max_steps!r}")
    levels = int(max_steps).bit_length() - 1
    if 2**levels != max_steps:
        raise UserError(f"max_steps must be a power of two >= 2, got {max_steps}")
    return levels


def level_dt(level, max_steps: int):
    """The network's `dt` input for the level(s) `l` (`d = 2^l / max_steps`): `l / J`.

    Works on python ints, numpy arrays (static, for the loss) and jax arrays."""
    return level / num_levels(max_steps)


def steps_dt(num_steps: int, max_steps: int) -> float:
    """The network's `dt` input when sampling in `num_steps` steps (`d = 1 / num_steps`).

    `num_steps` must be a power of two <= `max_steps` (the levels the network was trained on).
    """
    levels = num_levels(max_steps)
    ok = not isinstance(num_steps, bool) and int(num_steps) == num_steps and num_steps >= 1
    if not ok or (int(num_steps) & (int(num_steps) - 1)) or num_steps > max_steps:
        choices = ", ".join(str(2**i) for i in range(levels + 1))
        raise UserError(
            f"shortcut sampling needs num_steps a power of two <= max_steps={max_steps} "
            f"(the step sizes the network was trained on): one of {choices}; got {num_steps!r}"
        )
    return level_dt(levels - int(math.log2(num_steps)), max_steps)


def step_counts(max_steps: int) -> list[int]:
    """Every number of steps the network samples in: `[1, 2, 4, ..., max_steps]`."""
    return [2**i for i in range(num_levels(max_steps) + 1)]


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
    Guidance wraps `net` (`samplers.guidance.cfg`). Returns `x` at `t = 1`, shaped like `x_init`.
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
