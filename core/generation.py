"""Generation from explicit noise, for every family.

`Generation(experiment, graphdef, example_shape)` gives

- `draw_noise(key, n) -> noise`: the one place where sampling's randomness is drawn, a
  pytree: `{"x_init": [n, ...]}` from the prior and, for a sampler that consumes per-step
  noise (`samplers.STEP_NOISE`), `{"step_noise": [num_steps, n, ...]}`;
- `generate(params, noise, cond, frozen=None) -> samples`: pure and jittable, all its
  randomness in `noise`, so the same noise and condition give the same samples, bit for bit
  (a search can hold the noise fixed, perturb it, or re-noise a partial path);
- `sample(params, key, cond, frozen=None)`: `generate` of `draw_noise(key, len(cond))`;
- `integrate(params, x, cond, t_start=, t_end=)`: the sampler from points at `t_start`
  (a re-noised partial sample, `samplers.sde.renoise`) on to `t_end`.

`cond` holds the labels `[n]` or condition embeddings `[n, E]`; its length is the number of
samples, and an unconditional network ignores it. `frozen` maps the names of
`experiment.frozen` to their parameters (`core.runs.restore_frozen`); a family's own
generation gets them as `<name>_net`.

The default generation is "prior noise -> sampler": guidance wraps the network
(`samplers.guidance.guide`) unless the family's sampler guides itself
(`Method.guidance == "sampler"`: then it gets `cfg_scale` and `null_cond`); the sampler
options are `experiment.sampling.options`, checked against the sampler's keywords and
against the loss options they are tied to (`Method.tied`). A family whose generation is not
this (GIVT: tokens, then a decoder) sets `Method.generation` / `Method.noise`. A family
that generates nothing (`Method.generates` False: a classifier) is a UserError here.
"""

import inspect

import jax
from flax import nnx

import samplers
from core.errors import UserError
from core.experiment import Experiment
from samplers.guidance import guide

RESERVED = {"net", "x_init", "key", "num_steps", "cond", "cfg_scale", "null_cond", "step_noise"}


class Generation:
    def __init__(
        self,
        experiment: Experiment,
        graphdef,
        example_shape,
        frozen_graphdefs: dict | None = None,
    ):
        method = experiment.method
        method.check_generates()  # a classifier: one UserError, before anything else
        self.experiment, self.graphdef = experiment, graphdef
        self.example_shape = tuple(example_shape)
        self.frozen_graphdefs = dict(frozen_graphdefs or {})
        self._call = None  # the sampler with its options and guidance (default families)
        if method.generation is None:
            self._call = _sampler_call(experiment, graphdef)
            self._generate = _sampler_generation(self._call, experiment.sampling.num_steps)
        else:
            self._generate = method.generation(experiment, graphdef, self.frozen_graphdefs)

    def draw_noise(self, key: jax.Array, n: int):
        method = self.experiment.method
        if method.noise is not None:
            return method.noise(self.experiment, key, n, self.example_shape)
        return prior_noise(self.experiment, key, n, self.example_shape)

    def generate(self, params, noise, cond, frozen=None):
        return self._generate(params, noise, cond, frozen or {})

    def sample(self, params, key: jax.Array, cond, frozen=None):
        return self.generate(params, self.draw_noise(key, cond.shape[0]), cond, frozen)

    def integrate(self, params, x, cond, *, t_start, t_end=1.0, num_steps=None, step_noise=None):
        """The experiment's sampler (with its options and guidance) from the points `x` at
        `t_start` to `t_end` in `num_steps` steps (default: the sampling's): how a search
        goes on from a re-noised partial sample (`samplers.sde.renoise`). Pure and jittable;
        for the samplers of `samplers.RESUMABLE`."""
        name = self.experiment.sampling.sampler
        if self._call is None or name not in samplers.RESUMABLE:
            raise UserError(
                f"sampler {name!r} cannot start at t_start (the samplers that can: "
                f"{', '.join(samplers.RESUMABLE)})"
            )
        steps = self.experiment.sampling.num_steps if num_steps is None else num_steps
        extra = {} if step_noise is None else {"step_noise": step_noise}
        return self._call(params, x, cond, num_steps=steps, t_start=t_start, t_end=t_end, **extra)


def prior_noise(experiment: Experiment, key: jax.Array, n: int, example_shape) -> dict:
    """`{"x_init"}` from the prior (from the key's first half) and, for a stochastic sampler,
    `{"step_noise"}` (standard normal, from its second half)."""
    s = experiment.sampling
    prior = samplers.build_prior(s.prior)
    k_prior, k_steps = jax.random.split(key)
    shape = (n, *example_shape)
    noise = {"x_init": prior(k_prior, shape)}
    step_shape = samplers.STEP_NOISE.get(s.sampler)
    if step_shape is not None:
        noise["step_noise"] = jax.random.normal(k_steps, step_shape(s.num_steps, shape))
    return noise


def sampler_options(experiment: Experiment) -> dict:
    """The sampler's keyword options (`sampling.options`): a UserError for an option the
    sampler does not take, or one that differs from the loss option it is tied to."""
    s, method = experiment.sampling, experiment.method
    sample = samplers.build(s.sampler)
    method.check_sampler(s.sampler)
    options = dict(s.options)
    accepted = inspect.signature(sample).parameters
    unknown = sorted(k for k in options if k not in accepted or k in RESERVED)
    if unknown:
        known = ", ".join(k for k in accepted if k not in RESERVED) or "none"
        raise UserError(
            f"sampler {s.sampler!r} has no option(s) {', '.join(unknown)} "
            f"(sample.options); its options: {known}"
        )
    for tied in method.tied:
        trained = experiment.loss.options.get(tied.loss_option)
        if trained is not None and tied.option in options and options[tied.option] != trained:
            raise UserError(
                f"sample option {tied.option}={options[tied.option]} differs from the "
                f"{experiment.loss.name} model's loss.{tied.loss_option}={trained}, which "
                f"fixes {tied.why}: sample with {tied.option}={trained}"
            )
    return options


def _sampler_generation(sample, steps: int):
    """`generate(params, noise, cond, frozen)` of the default family: noise -> `sample`
    (`_sampler_call`) in `steps` steps."""

    def generate(params, noise, cond, frozen):
        del frozen  # the default families use no other run's network
        extra = {"step_noise": noise["step_noise"]} if "step_noise" in noise else {}
        return sample(params, noise["x_init"], cond, num_steps=steps, **extra)

    return generate


def _sampler_call(experiment: Experiment, graphdef):
    """`call(params, x, cond, **keywords)`: the experiment's sampler on the network of
    `params`, with its options and guidance (the wrapper, or the sampler's own)."""
    s, method = experiment.sampling, experiment.method
    conditioning = experiment.conditioning
    if s.cfg_scale != 1.0 and not conditioning.conditional:
        raise UserError(
            f"guidance weight {s.cfg_scale:g} (--cfg / sample.cfg_scale) needs a conditional "
            f"model; this {experiment.network.name!r} has no labels or condition (use 1)"
        )
    sample = samplers.build(s.sampler)
    options = sampler_options(experiment)
    wrap = conditioning.conditional and s.cfg_scale != 1.0 and method.guidance == "wrap"
    if method.guidance == "sampler":
        null = conditioning.null if conditioning.conditional else None
        options.update(cfg_scale=s.cfg_scale, null_cond=null)

    def call(params, x, cond, **keywords):
        net = nnx.merge(graphdef, params)
        if wrap:
            net = guide(net, s.cfg_scale, conditioning.null)
        cond = cond if conditioning.conditional else None
        return sample(net, x, None, cond=cond, **options, **keywords)

    return call
