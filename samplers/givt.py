"""Sampling GIVT (arXiv 2312.02116) token by token, with temperatures and distribution-based
classifier-free guidance (DB-CFG), every draw from explicit noise.

One `lax.scan` over the `T` tokens; each step runs the transformer on one token with the
key/value cache (`models.givt.GIVT.decode`), picks a mixture component and draws the token.
Temperatures as big_vision's sampler has them: `temperature` τ scales every component's
standard deviation (its `temp`, 0.95 for ImageNet), `mix_temperature` τ_π divides the mixture
logits (big_vision multiplies them by `temp_probs`, so τ_π = 1 / temp_probs).

DB-CFG at weight `cfg_scale` s (= 1 + w, the paper's w; 1: no guidance) draws each token from
`p_c(x)^s · p_u(x)^(1 - s)` of the conditional and the unconditional (null label) mixture,
with one component, chosen from the conditional weights, for both. With diagonal components
the density factorises over the token's dimensions; per dimension it is
`exp(-a x² / 2 + b x)`, `a = s / σ_c² - (s - 1) / σ_u²`, `b = s μ_c / σ_c² - (s - 1) μ_u / σ_u²`:

- where the precision `a > 0` it is the Gaussian `N(b / a, 1 / a)`, drawn exactly;
- elsewhere (`a <= 0`, or everywhere with `cfg_exact=False`, as big_vision always does) by
  rejection: candidates from the proposal `N(μ_c, ρ²)`, `ρ = 2 max(σ_c, σ_u)` (big_vision's),
  restricted to the window `|x - μ_c| <= CFG_WINDOW ρ`, accepted with probability
  `p(x) / (M q(x))`, `M` the exact maximum of `p / q` on the window (the log-ratio is a
  quadratic). The first accepted of `cfg_tries` candidates is kept; where none is, the token
  falls back to the conditional component's draw (as big_vision does). The accepted draws
  follow the guided density restricted to the window, normalised: where `a <= 0` the density
  grows without bound away from its centre and has no normalisation on the whole line.

Noise (`draw_noise`, all standard normal so that a search may mix it as it mixes Gaussian
noise): `choice [B, T]` (through Φ, a uniform for the component's inverse CDF), `gauss [B, T,
d]` (the exact draw and the fallback) and, when guided, `proposal` and `accept [B, T, R, d]`
(`R = cfg_tries`; the acceptance uniform is Φ of it).
"""

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

from core.errors import UserError

CFG_WINDOW = 2.0  # the rejection path's window, in proposal standard deviations


def noise_shapes(tokens: int, token_dim: int, *, guided: bool, tries: int) -> dict:
    """Per-sample shapes of the noise leaves (without the batch axis)."""
    shapes = {"choice": (tokens,), "gauss": (tokens, token_dim)}
    if guided:
        shapes.update(proposal=(tokens, tries, token_dim), accept=(tokens, tries, token_dim))
    return shapes


def draw_noise(
    key: jax.Array, n: int, tokens: int, token_dim: int, *, guided: bool, tries: int
) -> dict:
    shapes = noise_shapes(tokens, token_dim, guided=guided, tries=tries)
    keys = jax.random.split(key, len(shapes))
    return {
        name: jax.random.normal(k, (n, *shape))
        for k, (name, shape) in zip(keys, sorted(shapes.items()))
    }


def tempered(logits, means, scales, temperature: float = 1.0, mix_temperature: float = 1.0):
    """The mixture with its logits divided by `mix_temperature` and its scales times
    `temperature`."""
    return logits / mix_temperature, means, scales * temperature


def choose(logits: jax.Array, u_normal: jax.Array) -> jax.Array:
    """Component index `[...]` of mixture `logits [..., k]` by the inverse CDF at
    `Φ(u_normal)`."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    u = ndtr(u_normal)[..., None]
    return jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1)


def pick(values: jax.Array, index: jax.Array) -> jax.Array:
    """`values [..., k, d]` at component `index [...]` -> `[..., d]`."""
    return jnp.take_along_axis(values, index[..., None, None], axis=-2)[..., 0, :]


def guided_draw(mu_c, s_c, mu_u, s_u, scale, gauss, proposal, accept, *, exact: bool = True):
    """One DB-CFG draw per dimension (see the top): `mu_*, s_*, gauss [..., d]`, `proposal,
    accept [..., R, d]` -> `(x, rejected, accepted)`, `rejected` where the rejection path
    was taken, `accepted` where it found a candidate within the `R` tries."""
    a = scale / s_c**2 - (scale - 1.0) / s_u**2
    b = scale * mu_c / s_c**2 - (scale - 1.0) * mu_u / s_u**2
    gaussian = a > 0
    safe_a = jnp.where(gaussian, a, 1.0)
    x_exact = b / safe_a + gauss / jnp.sqrt(safe_a)
    # rejection in y = x - μ_c: log p(y) - log q(y) = -A y² / 2 + β y + const
    rho = 2.0 * jnp.maximum(s_c, s_u)
    big_a = a - 1.0 / rho**2
    beta = (scale - 1.0) * (mu_c - mu_u) / s_u**2
    half = CFG_WINDOW * rho
    log_ratio = lambda y: -0.5 * big_a[..., None, :] * y * y + beta[..., None, :] * y  # noqa: E731
    concave = big_a > 0
    vertex = jnp.clip(beta / jnp.where(concave, big_a, 1.0), -half, half)
    ends = jnp.stack([-half, half, jnp.where(concave, vertex, -half)], axis=-2)
    top = jnp.max(log_ratio(ends), axis=-2)
    y = rho[..., None, :] * proposal
    inside = jnp.abs(y) <= half[..., None, :]
    ok = inside & (log_ndtr(accept) <= log_ratio(y) - top[..., None, :])
    first = jnp.argmax(ok, axis=-2)
    found = jnp.any(ok, axis=-2)
    y_first = jnp.take_along_axis(y, first[..., None, :], axis=-2)[..., 0, :]
    x_reject = jnp.where(found, mu_c + y_first, mu_c + s_c * gauss)
    rejected = ~gaussian if exact else jnp.ones_like(gaussian)
    return jnp.where(rejected, x_reject, x_exact), rejected, rejected & found


def _sample(
    net,
    noise,
    cond,
    *,
    cfg_scale,
    null_cond,
    temperature,
    mix_temperature,
    cfg_exact,
    collect: bool,
):
    """Tokens `[B, T, d]` and the scan's per-token outputs (see `sample_givt_stats`)."""
    guided = cfg_scale != 1.0
    b = noise["choice"].shape[0]
    if guided and (cond is None or null_cond is None):
        raise UserError(f"guidance weight {cfg_scale:g} needs a class-conditional GIVT")
    if guided and "proposal" not in noise:
        raise UserError("guided GIVT sampling needs the rejection noise (draw it guided)")
    c = net.embed_cond(cond, b)
    if guided:
        c = jnp.concatenate([c, net.embed_cond(jnp.full_like(cond, null_cond), b)])
    d = net.token_dim
    caches = net.init_caches(c.shape[0])
    time_major = lambda a: jnp.swapaxes(a, 0, 1)  # noqa: E731
    xs = {k: time_major(v) for k, v in noise.items()}

    def step(carry, inputs):
        prev, caches = carry
        i, n = inputs
        (logits, means, scales), caches = net.decode(prev, i, c, caches)
        raw = (logits[:b], means[:b], scales[:b])
        logits, means, scales = tempered(logits, means, scales, temperature, mix_temperature)
        index = choose(logits[:b], n["choice"])
        mu_c, s_c = pick(means[:b], index), pick(scales[:b], index)
        if guided:
            mu_u, s_u = pick(means[b:], index), pick(scales[b:], index)
            x, rejected, accepted = guided_draw(
                mu_c,
                s_c,
                mu_u,
                s_u,
                cfg_scale,
                n["gauss"],
                n["proposal"],
                n["accept"],
                exact=cfg_exact,
            )
        else:
            x = mu_c + s_c * n["gauss"]
            rejected = accepted = jnp.zeros(x.shape, bool)
        out = {"rejected": jnp.sum(rejected), "accepted": jnp.sum(accepted)}
        if collect:
            out["mixture"] = raw
        nxt = jnp.concatenate([x, x]) if guided else x
        return (nxt, caches), (x, out)

    prev = jnp.zeros((c.shape[0], d), jnp.float32)
    steps = jnp.arange(net.tokens)
    _, (tokens, outs) = jax.lax.scan(step, (prev, caches), (steps, xs))
    return time_major(tokens), outs


def sample_givt(
    net,
    x_init: dict,
    key: jax.Array | None = None,
    *,
    num_steps: int = 0,
    cond: jax.Array | None = None,
    cfg_scale: float = 1.0,
    null_cond: int | None = None,
    temperature: float = 1.0,
    mix_temperature: float = 1.0,
    cfg_exact: bool = True,
    cfg_tries: int = 16,
) -> jax.Array:
    """Token sequences `[B, T, d]` from a GIVT; `x_init` is the noise pytree of
    `draw_noise` (the sampler's whole randomness). `num_steps` and `key` are unused (one
    step per token). `cfg_tries` is the number of rejection candidates the noise holds
    (`core.generation` draws them; here it is only checked)."""
    del key, num_steps
    _check(temperature, mix_temperature, cfg_tries)
    tokens, _ = _sample(
        net,
        x_init,
        cond,
        cfg_scale=cfg_scale,
        null_cond=null_cond,
        temperature=temperature,
        mix_temperature=mix_temperature,
        cfg_exact=cfg_exact,
        collect=False,
    )
    return tokens


def sample_givt_stats(
    net,
    noise: dict,
    *,
    cond=None,
    cfg_scale: float = 1.0,
    null_cond=None,
    temperature: float = 1.0,
    mix_temperature: float = 1.0,
    cfg_exact: bool = True,
) -> tuple[jax.Array, dict]:
    """`sample_givt` with what it did: `(tokens, stats)`, `stats["mixture"]` the conditional
    model's untempered `(logits [B, T, k], means, scales [B, T, k, d])` at every step (the
    cache's predictions), `rejection_fraction` (the share of token dimensions drawn by
    rejection) and `acceptance_rate` (the share of those that found a candidate: the rest
    fell back to the conditional draw; NaN where none was rejected)."""
    tokens, outs = _sample(
        net,
        noise,
        cond,
        cfg_scale=cfg_scale,
        null_cond=null_cond,
        temperature=temperature,
        mix_temperature=mix_temperature,
        cfg_exact=cfg_exact,
        collect=True,
    )
    rejected, accepted = jnp.sum(outs["rejected"]), jnp.sum(outs["accepted"])
    stats = {
        "mixture": tuple(jnp.swapaxes(a, 0, 1) for a in outs["mixture"]),
        "rejection_fraction": rejected / tokens.size,
        "acceptance_rate": jnp.where(rejected > 0, accepted / jnp.maximum(rejected, 1), jnp.nan),
    }
    return tokens, stats


def _check(temperature: float, mix_temperature: float, tries: int) -> None:
    if not (temperature > 0 and mix_temperature > 0):
        raise UserError(
            f"temperature={temperature} and mix_temperature={mix_temperature} must be > 0"
        )
    if not (isinstance(tries, int) and tries >= 1):
        raise UserError(f"cfg_tries={tries!r} must be an integer >= 1")


# --- the family's generation (core.methods.METHODS["givt"]: Method.generation, .noise) ---


def _guided(experiment) -> bool:
    return experiment.conditioning.conditional and experiment.sampling.cfg_scale != 1.0


def generation_noise(experiment, key: jax.Array, n: int, example_shape=None) -> dict:
    """The noise of `n` samples of a GIVT experiment (its latent shape from the network)."""
    del example_shape  # images through the VAE, or the sequences themselves
    options = experiment.network.options
    tries = experiment.sampling.options.get("cfg_tries", 16)
    _check(1.0, 1.0, tries)
    return draw_noise(
        key,
        n,
        int(options["tokens"]),
        int(options["token_dim"]),
        guided=_guided(experiment),
        tries=tries,
    )


def make_generation(experiment, graphdef, frozen_graphdefs: dict):
    """`generate(params, noise, cond, frozen)`: tokens by `sample_givt` with the
    experiment's sampling options and guidance, decoded by the frozen VAE (`frozen["vae"]`)
    when the experiment names one, else the token sequences themselves."""
    from flax import nnx

    from core.generation import sampler_options

    options = sampler_options(experiment)
    conditioning = experiment.conditioning
    null = conditioning.null if conditioning.conditional else None
    scale = experiment.sampling.cfg_scale
    uses_vae = any(f.name == "vae" for f in experiment.frozen)
    if uses_vae and "vae" not in frozen_graphdefs:
        raise UserError(
            "this GIVT decodes through its frozen VAE (frozen.vae): restore it "
            "(core.runs.restore_frozen) and hand it to the generation"
        )
    vae_graphdef = frozen_graphdefs.get("vae") if uses_vae else None

    def generate(params, noise, cond, frozen):
        net = nnx.merge(graphdef, params)
        z = sample_givt(
            net,
            noise,
            cond=cond if conditioning.conditional else None,
            cfg_scale=scale,
            null_cond=null,
            **options,
        )
        if vae_graphdef is None:
            return z
        return nnx.merge(vae_graphdef, frozen["vae"]).decode(z)

    return generate
