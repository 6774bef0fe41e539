"""Exact maximum likelihood for normalizing flows (`Flow.forward(x) -> (z, logdet)`), in
bits per dimension.

`log p(x) = log N(z; 0, I) + logdet`, a density on the data space of the batch: 8-bit images
scaled to [-1, 1] as `x = u / 127.5 - 1` (`data/arrays.py`), `D = H · W · C` dimensions.

Bits/dim is `-log2` of the density in pixel units `u`, per dimension: with `x = u / s - 1`
the density of `u` is `p_u(u) = p(x) · s^-D`, so

    bpd = -log2 p_u(u) / D = (-log p(x) / D + log s) / log 2 = -log2 p(x) / D + log2 s,

and the constant `log2 s` depends on how the flow's input was made (`noise=`, `LOG_SCALE`):
- `"uniform"` (dequantization, as ml-tarflow and the likelihood papers):
  `x = (u_int + U[0, 1)) / 128 - 1` with `u_int = round(127.5 (x_data + 1))`: the 256 levels
  are bins of width 1 in `u = 128 (x + 1)`, `s = 128`, `+7` bits/dim. `E[bpd]` is then an
  upper bound on the discrete bits/dim of the 8-bit data (Jensen:
  `-log P(u_int) = -log ∫ p_u ≤ E_U[-log p_u]`): the number RealNVP (1.06 on MNIST), Glow,
  FFJORD report, and the only one here comparable with them (`COMPARABLE`).
- `"gaussian"` (TarFlow's training, `noise_std` σ, the paper uses 0.05 on ImageNet-64):
  `x_data + σ ε` on the `u / 127.5 - 1` scale, `s = 127.5`, `+log2 127.5 = 6.9944` bits/dim
  (as the ODE likelihood of `metrics/likelihood.py`). The number is the bits/dim of the *noisy*
  data's density, not a bound on the 8-bit likelihood: a continuous density of data blurred
  by σ costs at least the noise's own entropy, `log2(127.5 σ √(2πe))` bits/dim (~5.7 for
  σ = 0.1), so it is not comparable with published bits/dim.
- `"none"`: the data as given, `s = 127.5`. On 8-bit data a continuous density can grow
  without bound on the 256 points, so its bits/dim means nothing there (`scripts.evaluate
  --metrics bpd` refuses it); for continuous data it is the plain density.
"""

import math

import jax
import jax.numpy as jnp

from losses.flow_matching import drop_cond
from models.flow_density import LOG_SCALE, NOISES, gaussian_log_prob

COMPARABLE = ("uniform",)  # bits/dim comparable with the published (dequantized) numbers


def bits_per_dim(log_px: jax.Array, num_dims: int, *, noise: str) -> jax.Array:
    """Bits/dim of 8-bit data from `log p(x)` (nats) of its [-1, 1] scaling, `x` made with
    `noise` (the constant `LOG_SCALE[noise]`, see the top)."""
    if noise not in NOISES:
        raise ValueError(f"unknown noise {noise!r}; known: {', '.join(NOISES)}")
    return (-log_px / num_dims + LOG_SCALE[noise]) / math.log(2.0)


def add_noise(key: jax.Array, x: jax.Array, noise: str, noise_std: float = 0.05) -> jax.Array:
    """Noise augmentation or dequantization of images in [-1, 1] (see the top)."""
    x = x.astype(jnp.float32)
    if noise == "gaussian":
        return x + noise_std * jax.random.normal(key, x.shape)
    if noise == "uniform":
        levels = jnp.clip(jnp.round(127.5 * (x + 1.0)), 0.0, 255.0)
        return (levels + jax.random.uniform(key, x.shape)) / 128.0 - 1.0
    if noise == "none":
        return x
    raise ValueError(f"unknown noise {noise!r}; known: {', '.join(NOISES)}")


def flow_bpd(
    net,
    x: jax.Array,
    key: jax.Array,
    *,
    cond: jax.Array | None = None,
    noise: str = "gaussian",
    noise_std: float = 0.05,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(bpd [B], z, logdet [B])` of the batch `x` after `add_noise`."""
    x = add_noise(key, x, noise, noise_std)
    z, logdet = net.forward(x, cond=cond)
    num_dims = math.prod(x.shape[1:])
    bpd = bits_per_dim(gaussian_log_prob(z) + logdet, num_dims, noise=noise)
    return bpd, z, logdet


def loss_flow_nll(
    net,
    batch: dict,
    key: jax.Array,
    *,
    noise: str = "gaussian",
    noise_std: float = 0.05,
    cond_drop_prob: float = 0.0,
    null_cond: int | None = None,
):
    """Per-example bits/dim `[B]` of the noised batch (the trainer's mean is the NLL up to
    the constant `log2 s` of `noise` and the factor `1 / (D log 2)`); metrics: `mean(z²)`
    (1 for a fitted flow) and the mean log-determinant per dimension. Labels are dropped to
    the null label with `cond_drop_prob` (for classifier-free guidance)."""
    k_noise, k_drop = jax.random.split(key)
    cond = drop_cond(k_drop, batch.get("cond"), cond_drop_prob, null_cond)
    bpd, z, logdet = flow_bpd(net, batch["x"], k_noise, cond=cond, noise=noise, noise_std=noise_std)
    num_dims = math.prod(batch["x"].shape[1:])
    metrics = {"z_sq": jnp.mean(jnp.square(z)), "logdet_per_dim": jnp.mean(logdet) / num_dims}
    return bpd, metrics
