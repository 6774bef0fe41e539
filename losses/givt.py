"""GIVT's loss (arXiv 2312.02116): the exact negative log-likelihood of token sequences under
the transformer's Gaussian mixtures, in nats per dimension.

With a frozen VAE (`vae_net`, `frozen.vae.workdir`) the sequences are the latents of the
batch's images, drawn from the posterior `z ~ q(z | x)` by reparameterization as big_vision's
GIVT trainer does (`posterior="mean"` takes its mean instead), without normalization (the
KL term keeps them near unit scale). Without a VAE the batch's `x` are the sequences
`[B, T, d]` themselves. Label dropout (`cond_drop_prob`, the null label `null_cond`) trains
the unconditional model of classifier-free guidance.
"""

import jax
import jax.numpy as jnp

from core.errors import UserError
from losses.flow_matching import drop_cond
from models.givt import gmm_log_prob

POSTERIORS = ("sample", "mean")


def latents(vae_net, x: jax.Array, key: jax.Array, posterior: str = "sample") -> jax.Array:
    """The token sequences `[B, T, d]` GIVT models for images `x` (see the top)."""
    if posterior not in POSTERIORS:
        raise UserError(f"loss.posterior={posterior!r}; known: {', '.join(POSTERIORS)}")
    mean, logvar = vae_net.encode(x)
    if posterior == "mean":
        return jax.lax.stop_gradient(mean)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    return jax.lax.stop_gradient(z)


def check_tokens(net, z_shape: tuple, where: str) -> None:
    """A UserError unless sequences of shape `[B, T, d]` fit the network's tokens."""
    want = (net.tokens, net.token_dim)
    if len(z_shape) != 3 or tuple(z_shape[1:]) != want:
        raise UserError(
            f"{where} gives token sequences of shape {tuple(z_shape[1:])} but the GIVT "
            f"models model.tokens={want[0]} tokens of model.token_dim={want[1]} channels: "
            "set them to the VAE's latent shape"
        )


def sequence_log_prob(net, z: jax.Array, cond: jax.Array | None) -> jax.Array:
    """`log p(z_i | z_<i, cond)` per token `[B, T]` (nats)."""
    logits, means, scales = net(z, cond=cond)
    return gmm_log_prob(logits, means, scales, z)


def loss_givt(
    net,
    batch: dict,
    key: jax.Array,
    *,
    vae_net=None,
    posterior: str = "sample",
    cond_drop_prob: float = 0.0,
    null_cond: int | None = None,
):
    """Per-example NLL in nats per dimension; metrics `nll_per_token` (nats) and
    `bits_per_dim` of the latents."""
    k_z, k_drop = jax.random.split(key)
    x = batch["x"]
    if vae_net is None:
        if x.ndim != 3:
            raise UserError(
                f"the givt loss models token sequences [B, T, d]; data of example shape "
                f"{tuple(x.shape[1:])} needs the frozen VAE that encodes it: set "
                "frozen.vae.workdir to the VAE's run (--config.frozen.vae.workdir=RUN)"
            )
        z = x.astype(jnp.float32)
        check_tokens(net, z.shape, "the data")
    else:
        z = latents(vae_net, x, k_z, posterior)
        check_tokens(net, z.shape, "the frozen VAE (frozen.vae)")
    cond = drop_cond(k_drop, batch.get("cond"), cond_drop_prob, null_cond)
    log_p = sequence_log_prob(net, z, cond if net.num_classes else None)
    dims = z.shape[1] * z.shape[2]
    per_example = -jnp.sum(log_p, axis=1) / dims
    nll_token = -jnp.mean(log_p)
    return per_example, {
        "nll_per_token": nll_token,
        "bits_per_dim": jnp.mean(per_example) / jnp.log(2.0),
    }


def heldout_terms(net, vae_net, x: jax.Array, cond: jax.Array | None, key: jax.Array) -> dict:
    """Per example, for held-out data: `latent_nll`, the exact `-log p(z | cond)` (nats) of
    the latents GIVT is trained on (`z ~ q(z | x)`, or the sequences `x` themselves without
    a VAE) and, with a VAE, `elbo_nll`: minus the ELBO of the uniformly dequantized images
    `u = x + U[0, 1/127.5)` with GIVT as the prior, `-log N(u; decode(z), σ²) - log p(z) +
    log q(z | u)` at one `z ~ q(z | u)` (an unbiased estimate of an upper bound on
    `-log p(u)`; `σ` is the VAE's fitted decoder scale)."""
    import math

    from losses.vae import gaussian_nll

    if vae_net is None:
        return {"latent_nll": -jnp.sum(sequence_log_prob(net, x, cond), axis=1)}
    k_z, k_deq, k_u = jax.random.split(key, 3)
    z = latents(vae_net, x, k_z)
    out = {"latent_nll": -jnp.sum(sequence_log_prob(net, z, cond), axis=1)}
    u = x + jax.random.uniform(k_deq, x.shape, maxval=1.0 / 127.5)
    mean, logvar = vae_net.encode(u)
    eps = jax.random.normal(k_u, mean.shape)
    z_u = mean + jnp.exp(0.5 * logvar) * eps
    log_q = -0.5 * jnp.sum(eps * eps + logvar + math.log(2.0 * math.pi), axis=(1, 2))
    log_prior = jnp.sum(sequence_log_prob(net, z_u, cond), axis=1)
    nll_x = gaussian_nll(u, vae_net.decode(z_u), vae_net.decoder_log_std())
    out["elbo_nll"] = nll_x + log_q - log_prior
    return out
