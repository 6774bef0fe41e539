"""Sampling a normalizing flow as TarFlow does: `z ~ N(0, τ² I)`, `x = inverse(z)`, then one
Tweedie denoising step with the flow's own score.

A flow trained on `x + σ ε` models the noisy density `p_σ`; Tweedie's formula gives the
posterior mean of the clean image, `E[x_clean | x] = x + σ² ∇x log p_σ(x)`, and the score
comes from the flow by autodiff: `∇x [log N(forward(x); 0, I) + logdet(x)]`.

Guidance (`cfg_scale` w, `null_cond`) mixes the affine parameters of the conditional and the
null label inside the flow's inverse (`TarFlow.inverse`), optionally annealed over the
tokens; the denoising step uses the conditional density without guidance.

The denoising step belongs to the training noise: the sampler options `noise` and
`noise_std` are the loss's (`experiments/nf/*.py` tie them to `loss.noise` and
`loss.noise_std`), and the step runs only for Gaussian noise (`denoise=False` turns it off).
"""

import inspect
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from core.errors import UserError
from models.flow_density import NOISES, flow_log_prob
from models.tarflow import check_inverse_args


def tweedie_denoise(log_prob, x: jax.Array, noise_std: float) -> jax.Array:
    """`x + σ² ∇x log p(x)`; `log_prob(x) -> [B]` must treat examples independently."""
    score = jax.grad(lambda v: jnp.sum(log_prob(v)))(x)
    return x + noise_std**2 * score


def guidance_options(
    cfg_scale: float, *, conditional: bool, null_cond: int | None = None, anneal: bool = False
) -> dict:
    """The keyword arguments of `TarFlow.inverse` for guidance weight `cfg_scale`: none
    when the weight is 1; a UserError for another weight on an unconditional flow (nothing
    to guide; `core.experiment.make_sample_fn` says the same for every family)."""
    if cfg_scale == 1.0:
        return {}
    if not conditional:
        raise UserError(f"guidance weight {cfg_scale:g} needs a conditional flow (use 1)")
    options = dict(cfg_scale=cfg_scale, anneal=bool(anneal))
    if null_cond is not None:
        options["null_cond"] = null_cond
    return options


# how the sampler options are spelled (for check_inverse_args' messages)
SAMPLER_NAMES = ("inverse", "jacobi_tol", "jacobi_max_iters", "jacobi_segment")


def _inverse_options(net, **options) -> dict:
    """The non-default inverse options, checked against what `net.inverse` accepts."""
    accepted = inspect.signature(net.inverse).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ValueError(
            f"{type(net).__name__}.inverse does not support {', '.join(unknown)} "
            "(guidance and Jacobi inversion need a TarFlow)"
        )
    return options


def inverse_setup(
    *,
    conditional: bool,
    cfg_scale: float = 1.0,
    null_cond: int | None = None,
    temperature: float = 1.0,
    guidance_anneal: bool = False,
    inverse: str = "sequential",
    jacobi_tol: float = 1e-5,
    jacobi_max_iters: int | None = None,
    jacobi_segment: int | Sequence[int] | None = None,
) -> tuple[float, dict]:
    """How the sampler inverts a flow, from its options (those of `sample_tarflow`, same
    names and defaults): the latent scale τ (`z = τ x_init`) and the keyword arguments of
    `TarFlow.inverse` (guidance, and the Jacobi method unless `inverse` is "sequential").
    `conditional`: whether labels are given. A bad method, tolerance, cap or segment, or
    guidance without labels, is a UserError. `sample_tarflow` and `scripts.flow_inverse`
    both ask this function, so the script inverts the latents the sampler would."""
    check_inverse_args(
        inverse, jacobi_tol, jacobi_max_iters, jacobi_segment, names=SAMPLER_NAMES, zero_tol=False
    )
    options = guidance_options(
        cfg_scale, conditional=conditional, null_cond=null_cond, anneal=guidance_anneal
    )
    if inverse != "sequential":
        options.update(method=inverse, tol=jacobi_tol, max_iters=jacobi_max_iters)
        if jacobi_segment is not None:
            options["segment"] = jacobi_segment
    return temperature, options


def sample_tarflow(
    net,
    x_init: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int = 0,
    cond: jax.Array | None = None,
    cfg_scale: float = 1.0,
    null_cond: int | None = None,
    temperature: float = 1.0,
    denoise: bool = True,
    noise: str = "gaussian",
    noise_std: float = 0.05,
    inverse: str = "sequential",
    jacobi_tol: float = 1e-5,
    jacobi_max_iters: int | None = None,
    jacobi_segment: int | Sequence[int] | None = None,
    guidance_anneal: bool = False,
) -> jax.Array:
    """Samples `[B, H, W, C]` from a flow; `x_init` is standard normal (prior "gaussian").

    `num_steps` and `key` are unused (the flow is inverted exactly and deterministically;
    the Jacobi passes are bounded by `jacobi_max_iters` per segment, default the segment's
    size, exact). `temperature` τ scales the latent. `inverse`: "sequential" (KV cache) or
    "jacobi" (stops at `max |Δx| <= jacobi_tol`, `jacobi_tol > 0`; `jacobi_segment` tokens
    per segment, solved one segment after another as GS-Jacobi does, an int for every block
    or one per block in inverse order; unset or 0: the whole sequence; a bad method,
    tolerance, cap or segment is a UserError). `denoise` applies the Tweedie step for the
    training noise: only when `noise` is "gaussian", with its `noise_std` (flows trained
    with uniform dequantization or no noise are not denoised).
    `cfg_scale` w: 1 is the plain conditional flow; `guidance_anneal` ramps the weight from
    1 to w over each block's tokens (the paper's annealed guidance).
    """
    del num_steps, key
    scale, options = inverse_setup(
        conditional=cond is not None,
        cfg_scale=cfg_scale,
        null_cond=null_cond,
        temperature=temperature,
        guidance_anneal=guidance_anneal,
        inverse=inverse,
        jacobi_tol=jacobi_tol,
        jacobi_max_iters=jacobi_max_iters,
        jacobi_segment=jacobi_segment,
    )
    if noise not in NOISES:
        raise UserError(f"noise={noise!r} is not a training noise; known: {', '.join(NOISES)}")
    z = scale * jnp.asarray(x_init, jnp.float32)
    x = net.inverse(z, cond=cond, **_inverse_options(net, **options))
    if denoise and noise == "gaussian" and noise_std > 0:
        x = tweedie_denoise(lambda v: flow_log_prob(net, v, cond=cond), x, noise_std)
    return x
