"""The β-VAE loss (GIVT's first stage, arXiv 2312.02116; big_vision's VAE trainer):
`½ ||decode(z) - x||² + β KL(q(z | x) || N(0, I))` per image, `z = mean + σ ε` drawn by
reparameterization. The squared error is that of a unit-variance Gaussian decoder, so the
loss is the negative ELBO of a decoder of variance β, scaled by β: a small β keeps more
information in the latents (sharper reconstructions, latents harder to model).

The decoder standard deviation of a likelihood bound (`models.vae.VAE.decoder_log_std`) is fitted
here as the maximum-likelihood σ of the reconstructions, which are held fixed for it: its
term enters the gradient but not the loss's value (`term - stop_gradient(term)`), so the
β-VAE objective and its logged loss are unchanged.
"""

import math

import jax
import jax.numpy as jnp

from core.errors import UserError


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """`KL(N(mean, e^logvar) || N(0, 1))` elementwise (closed form)."""
    return 0.5 * (mean * mean + jnp.exp(logvar) - 1.0 - logvar)


def gaussian_nll(x: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
    """`-log N(x; mean, e^(2 log_scale))` summed over all but the batch axis `[B]`."""
    z = (x - mean) * jnp.exp(-log_scale)
    per = 0.5 * z * z + log_scale + 0.5 * math.log(2.0 * math.pi)
    return jnp.sum(per.reshape(per.shape[0], -1), axis=1)


def loss_vae(net, batch: dict, key: jax.Array, *, beta: float = 1e-2):
    """Per-example `½ ||x_hat - x||² + β KL` (nats); metrics: `recon_mse` (per pixel, on
    the [-1, 1] scale), `kl_per_token` (nats per latent token), `decoder_std` (σ)."""
    if beta < 0:
        raise UserError(f"loss.beta={beta} must be >= 0")
    x = batch["x"].astype(jnp.float32)
    if x.ndim != 4:
        raise UserError(f"the vae loss needs images [B, H, W, C], got shape {list(x.shape)}")
    mean, logvar = net.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    x_hat = net.decode(z)
    squared = jnp.sum(((x_hat - x) ** 2).reshape(x.shape[0], -1), axis=1)
    kl = jnp.sum(kl_to_standard_normal(mean, logvar), axis=(1, 2))
    dims = math.prod(x.shape[1:])
    # the decoder's σ: its per-pixel Gaussian NLL with the reconstructions held fixed
    log_std = net.decoder_log_std()
    fit = gaussian_nll(x, jax.lax.stop_gradient(x_hat), log_std) / dims
    per_example = 0.5 * squared + beta * kl + (fit - jax.lax.stop_gradient(fit))
    metrics = {
        "recon_mse": jnp.mean(squared) / dims,
        "kl_per_token": jnp.mean(kl) / mean.shape[1],
        "decoder_std": jnp.exp(log_std),
    }
    return per_example, metrics
