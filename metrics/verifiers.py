"""Verifiers of inference-time noise search (arXiv 2501.09732): a score per sample, higher
is better, registry `VERIFIERS`.

A `Verifier` is a pure function and its parameters, `fn(params, samples, cond, noise) ->
[B]` (`noise`: the generation noise of the samples, `core.generation`; jittable: the search
passes `params` as an argument, so no network weight is baked into the compiled program),
with `nfe`, the network evaluations one sample's score costs (counted
apart from the generator's). A builder makes one from a `VerifierContext` (the searched
run's generation and parameters, frozen networks of other runs, the reference dataset):
`VERIFIERS[name](context) -> Verifier`. A score that is NaN is never selected by a search.

- `density`: the log-density of a 2-D toy with a known density (`8gaussians`,
  `checkerboard`; `toy=` option, default the run's dataset).
- `self_consistency`: the paper's self-supervised verifier: minus the squared distance,
  per dimension, between the model's one-step prediction of the data from the start of the
  path (`x1_hat = x0 + v(x0, 0)`, the same noise) and the final sample. It needs the
  searched run's network on the Gaussian path (`Method.output`).
- `likelihood`: the log-density of the sample under a normalizing flow of another run
  (`frozen.verifier`), in nats per dimension.
- `classifier`: the log-probability of the requested class under a classifier run
  (`frozen.verifier`, e.g. `experiments/classifier/mnist_cnn.py`;
  `metrics/classifier_verifier.py`).
- `inception`: the log-density of the sample's Inception feature under the Gaussian of the
  reference data's features (FID's statistics), per feature dimension
  (`metrics/inception_verifier.py`).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from core.errors import UserError, lookup


@dataclasses.dataclass(frozen=True)
class Verifier:
    name: str
    fn: Callable  # fn(params, samples, cond, noise) -> [B] scores
    params: Any = None
    nfe: int = 1  # network evaluations per scored sample (0: closed form)

    def __call__(self, samples, cond, noise=None):
        return self.fn(self.params, samples, cond, noise)


@dataclasses.dataclass
class VerifierContext:
    """What a verifier may need: the searched run's `experiment`, `generation`
    (`core.generation.Generation`) and `params`; `frozen` (`core.runs.FrozenNets`), networks
    of other runs; `dataset`, the reference data (`core.reference.Dataset`) or None;
    `options` of the verifier."""

    experiment: Any
    generation: Any = None
    params: Any = None
    frozen: Any = None
    dataset: Any = None
    options: dict = dataclasses.field(default_factory=dict)


def _gaussians_log_density(x: jax.Array) -> jax.Array:
    from data.toy import GAUSSIANS_RADIUS, GAUSSIANS_STD

    angles = 2 * jnp.pi * jnp.arange(8) / 8
    centers = GAUSSIANS_RADIUS * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1)
    d2 = jnp.sum((x[:, None, :] - centers[None]) ** 2, axis=-1)  # [B, 8]
    log_k = -d2 / (2 * GAUSSIANS_STD**2) - jnp.log(2 * jnp.pi * GAUSSIANS_STD**2)
    return jax.nn.logsumexp(log_k, axis=1) - math.log(8)


def _checkerboard_log_density(x: jax.Array) -> jax.Array:
    inside = jnp.all(jnp.abs(x) <= 2.0, axis=1)
    black = (jnp.floor(x[:, 0]) + jnp.floor(x[:, 1])) % 2 == 0
    return jnp.where(inside & black, -math.log(8.0), -jnp.inf)  # 8 unit cells of mass 1/8


TOY_DENSITIES = {"8gaussians": _gaussians_log_density, "checkerboard": _checkerboard_log_density}


def density(context: VerifierContext) -> Verifier:
    toy = context.options.get("toy") or context.experiment.data.name
    log_density = lookup(TOY_DENSITIES, toy, "toy with a known density")
    return Verifier("density", lambda params, x, cond, noise: log_density(x), None, nfe=0)


def self_consistency(context: VerifierContext) -> Verifier:
    from flax import nnx

    from models.views import to_pair

    method = context.experiment.method
    if method.output is None or method.protocol != "velocity":
        raise UserError(f"self_consistency needs a model on the Gaussian path, not {method.name}")
    graphdef = context.generation.graphdef
    conditional = context.experiment.conditioning.conditional

    def fn(params, x, cond, noise):
        x0 = noise["x_init"]
        net = nnx.merge(graphdef, params)
        t = jnp.zeros((x0.shape[0],), x0.dtype)
        kw = {"dt": t} if method.step_input else {}
        v = net(x0, t, cond=cond if conditional else None, **kw)
        x1_hat, _ = to_pair(method.output, v, x0, t)
        diff = (x1_hat - x).reshape(x.shape[0], -1)
        return -jnp.mean(diff * diff, axis=1)

    return Verifier("self_consistency", fn, context.params, nfe=1)


def likelihood(context: VerifierContext) -> Verifier:
    from flax import nnx

    from models.flow_density import flow_log_prob

    frozen = context.frozen
    if frozen is None or "verifier" not in frozen.graphdefs:
        raise UserError(
            "the likelihood verifier scores with a normalizing flow of another run: set "
            "frozen.verifier.workdir (or --verifier-run) to a flow's run directory"
        )
    graphdef = frozen.graphdefs["verifier"]
    conditional = bool(context.options.get("conditional", False))

    def fn(params, x, cond, noise):
        flow = nnx.merge(graphdef, params)
        lp = flow_log_prob(flow, x, cond=cond if conditional else None)
        return lp / math.prod(x.shape[1:])

    return Verifier("likelihood", fn, frozen.params["verifier"], nfe=1)


def _inception(context: VerifierContext) -> Verifier:
    from metrics.inception_verifier import inception

    return inception(context)


def _classifier(context: VerifierContext) -> Verifier:
    from metrics.classifier_verifier import classifier

    return classifier(context)


VERIFIERS = {
    "classifier": _classifier,
    "density": density,
    "self_consistency": self_consistency,
    "likelihood": likelihood,
    "inception": _inception,
}


def build_verifier(name: str, context: VerifierContext) -> Verifier:
    """The verifier `name` of `VERIFIERS` for `context`; an unknown name is a UserError."""
    return lookup(VERIFIERS, name, "verifier")(context)
