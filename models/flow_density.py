"""The density of a normalizing flow (`Flow.forward(x) -> (z, logdet)`) under its standard
normal latent, and the names of the noises a flow's training adds to its data (each gives
a different density: `losses/flow_nll.py`). Shared by the loss, the TarFlow sampler's
Tweedie step and the bits/dim metric."""

import math

import jax
import jax.numpy as jnp

# log s of `x = u / s - 1` for each training noise: minus the log of the width in x of one
# unit of the pixel value u (losses/flow_nll.py says why each)
LOG_SCALE = {"gaussian": math.log(127.5), "uniform": math.log(128.0), "none": math.log(127.5)}
NOISES = tuple(LOG_SCALE)


def gaussian_log_prob(z: jax.Array) -> jax.Array:
    """`log N(z; 0, I)` per example: `[B, ...]` -> `[B]` float32."""
    z = z.astype(jnp.float32).reshape(z.shape[0], -1)
    return -0.5 * jnp.sum(z * z, axis=1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def flow_log_prob(net, x: jax.Array, *, cond: jax.Array | None = None) -> jax.Array:
    """`log p(x) = log N(forward(x); 0, I) + logdet` per example `[B]` (nats)."""
    z, logdet = net.forward(x, cond=cond)
    return gaussian_log_prob(z) + logdet
