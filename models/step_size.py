"""The step-size input `dt` of a shortcut network (Frans et al. 2024, arXiv 2410.12557):
one mapping from step sizes to the network's `dt`, shared by the loss and the sampler.

With `J = log2(max_steps)`, the step sizes are the levels `d = 2^l / max_steps`, `l = 0..J`,
and the network sees the normalised level

    dt = l / J = 1 + log2(d) / J          (d = 1 -> 1, d = 1/max_steps -> 0)

The finest level `d = 1/max_steps` is the flow-matching velocity (`dt = 0`, the network's
flow-matching limit), as in the paper, which queries `d = 0` at the smallest step; so
`max_steps` steps are the Euler method on the flow-matching velocity. Each coarser level is
one more bit of `log2 d`, spread evenly over [0, 1] for the network's `t`-style embedding
(an embedder built for [0, 1] never sees a raw integer `log2(1/d)`).
"""

import math

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
