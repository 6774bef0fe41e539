"""Each model family named once: `METHODS`, one entry per family.

An entry is data that the rest of the code asks (the trainer, generation, the evaluator),
never the name of a loss or the signature of a function:

- `loss`: the family's loss in `losses.LOSSES` (a config names the loss; its family is the
  entry that owns it, `method_for_loss`);
- `protocol`: the network protocol of `models` it trains (`velocity`: `net(x, t, *, cond,
  dt)`; `flow`: `forward` / `inverse`; `classifier`: `net(x) -> logits`; `autoencoder`:
  `encode` / `decode`; `autoregressive`: per-token Gaussian mixtures, GIVT);
- `sampler`, `samplers`: the default sampler and every sampler of `samplers.SAMPLERS`
  that draws from the family; None and `()` for a family that generates nothing (a
  classifier: `generates` is False, so no generation, sample grid or sample metric);
- `prior`: the default prior (`samplers.PRIORS`) of the initial noise (None: no sampler);
- `guidance`: how classifier-free guidance reaches the model: `wrap` (the network is
  wrapped by `samplers.guidance.guide`, so every sampler gets it) or `sampler` (the
  sampler takes `cfg_scale` and `null_cond` itself: a flow mixes affine parameters);
- `output`: what the network outputs on the Gaussian path (a `models.views` kind), which
  gives its score view; None off that path (the sphere) or for a density model;
- `step_input`: the network also takes the shortcut step size `dt`; its score view is the
  finest level (`dt = 0`, the flow-matching velocity);
- `likelihood`: `ode` (the probability-flow ODE, `metrics.likelihood`, on `manifold`),
  `flow` (the exact change of variables, `metrics.bpd`), `autoregressive` (GIVT's exact
  NLL of latents and the ELBO bound through its VAE) or None;
- `tied`: sampler options that must equal a loss option of the trained model;
- `generation`, `noise`: for a family whose generation is not "prior noise -> sampler",
  its own `make(experiment, graphdef, frozen_graphdefs) -> generate` and
  `draw(experiment, key, n) -> noise pytree` (None: `core.generation`'s defaults).

Adding a family is one entry here (plus its network, loss, sampler and a config).
"""

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

from core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Tied:
    """A sampler option that must equal the loss option `loss_option` (`why`: what it fixes)."""

    option: str
    loss_option: str
    why: str


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    loss: str
    protocol: str
    sampler: str | None = None
    samplers: tuple[str, ...] = ()
    prior: str | None = None
    guidance: str = "wrap"
    output: str | None = None
    step_input: bool = False
    likelihood: str | None = None
    manifold: str = "euclidean"
    tied: tuple[Tied, ...] = ()
    generation: Callable | None = None
    noise: Callable | None = None

    def score_view(self, net):
        """`score(x, t, cond=None)` of `net` on the Gaussian path; a UserError for a family
        that has none."""
        if self.output is None:
            raise UserError(
                f"a {self.name} model has no score view (it is not a denoiser on the Gaussian path)"
            )
        from metrics.effective_dim import score_view

        if self.step_input:  # the finest level: the flow-matching velocity
            base = net

            def net(x, t, *, cond=None, dt=None):
                return base(x, t, cond=cond, dt=jnp.zeros_like(t))

        return score_view(net, self.output)

    @property
    def generates(self) -> bool:
        """Whether the family draws samples (a sampler, or its own generation)."""
        return bool(self.samplers) or self.generation is not None

    def check_generates(self) -> None:
        if not self.generates:
            raise UserError(f"a {self.name} model does not generate samples")

    def check_sampler(self, sampler: str | None) -> None:
        if not self.samplers:
            raise UserError(
                f"a {self.name} model does not generate samples: leave sample.sampler "
                f"(--sampler) unset, got {sampler!r}"
            )
        if sampler not in self.samplers:
            raise UserError(
                f"sampler {sampler!r} cannot draw from a {self.name} model (loss "
                f"{self.loss!r}); its samplers: {', '.join(self.samplers)}"
            )


def _givt_generation(experiment, graphdef, frozen_graphdefs):
    from samplers.givt import make_generation

    return make_generation(experiment, graphdef, frozen_graphdefs)


def _givt_noise(experiment, key, n, example_shape=None):
    from samplers.givt import generation_noise

    return generation_noise(experiment, key, n, example_shape)


_ODE = ("euler", "midpoint", "heun", "rk4")
_GAUSSIAN_PATH = (*_ODE, "euler_maruyama")

METHODS = {
    m.name: m
    for m in (
        Method(
            name="flow_matching",
            loss="flow_matching",
            protocol="velocity",
            sampler="heun",
            samplers=_GAUSSIAN_PATH,
            prior="gaussian",
            output="velocity",
            likelihood="ode",
        ),
        Method(
            name="shortcut",
            loss="shortcut",
            protocol="velocity",
            sampler="shortcut",
            samplers=("shortcut", *_GAUSSIAN_PATH),
            prior="gaussian",
            output="velocity",
            step_input=True,
            tied=(Tied("max_steps", "max_steps", "the dt input's mapping of step sizes"),),
        ),
        Method(
            name="sphere_flow_matching",
            loss="sphere_fm",
            protocol="velocity",
            sampler="sphere_rk4",
            samplers=("sphere_euler", "sphere_midpoint", "sphere_rk4"),
            prior="sphere_uniform",
            likelihood="ode",
            manifold="sphere",
        ),
        Method(
            name="normalizing_flow",
            loss="flow_nll",
            protocol="flow",
            sampler="tarflow",
            samplers=("tarflow",),
            prior="gaussian",
            guidance="sampler",
            likelihood="flow",
            tied=(
                Tied("noise", "noise", "the training noise the Tweedie step removes"),
                Tied("noise_std", "noise_std", "the training noise the Tweedie step removes"),
            ),
        ),
        Method(  # an image classifier: no sampler, no prior (the noise-search verifier)
            name="classifier",
            loss="cross_entropy",
            protocol="classifier",
        ),
        Method(  # GIVT's first stage: images <-> latent tokens (models/vae.py); no sampler
            name="vae",
            loss="vae",
            protocol="autoencoder",
        ),
        Method(  # GIVT: latent tokens one by one from Gaussian mixtures, then the frozen VAE
            name="givt",
            loss="givt",
            protocol="autoregressive",
            sampler="givt",
            samplers=("givt",),
            prior="gaussian",
            guidance="sampler",
            likelihood="autoregressive",
            generation=_givt_generation,
            noise=_givt_noise,
        ),
    )
}


def method_for_loss(loss: str) -> Method:
    """The family whose loss is `loss`; a UserError listing the known losses otherwise."""
    for method in METHODS.values():
        if method.loss == loss:
            return method
    known = ", ".join(m.loss for m in METHODS.values())
    raise UserError(f"unknown loss {loss!r}; known: {known}")
