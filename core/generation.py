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
(`samplers.guidance.guide`; the dynamic schedule's per-sample switch rides along the ODE
samplers' scan, `samplers.guidance.Carried`) unless the family's sampler guides itself
(`Method.guidance == "sampler"`: then it gets `cfg_scale` and `null_cond`, and only the
constant schedule); `guidance_trace` returns the gap along the path and the switch; the sampler
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
from samplers.guidance import CARRIED_SAMPLERS, Carried, guide

RESERVED = {
    "net", "x_init", "key", "num_steps", "cond", "cfg_scale", "null_cond", "step_noise", "trace",
}  # fmt: skip


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
        check_guidance(experiment)
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
        g = self.experiment.sampling.guidance
        if g.carried and g.guides:
            raise UserError(
                "the dynamic guidance switch follows one whole path from noise; a search "
                "that re-starts the integration mid-path cannot carry it (use another "
                "--cfg-schedule, or the random or zero_order search)"
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


# the type an option's default gives it -> (does a value fit, what to call it); an option
# whose default is None takes more than one type and is the sampler's to check
_KINDS = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def sampler_options(experiment: Experiment) -> dict:
    """The sampler's keyword options (`sampling.options`): a UserError for an option the
    sampler does not take, one of another type than its default's (a number, a flag, a
    string), or one that differs from the loss option it is tied to."""
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
    wrong = [
        f"{k}={v!r} must be {_KINDS[type(accepted[k].default)][1]} (its default is "
        f"{accepted[k].default!r})"
        for k, v in options.items()
        if type(accepted[k].default) in _KINDS and not _KINDS[type(accepted[k].default)][0](v)
    ]
    if wrong:
        raise UserError(f"sampler {s.sampler!r}: option {'; '.join(wrong)} (sample.options)")
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


def _sampler_call(experiment: Experiment, graphdef, *, trace: bool = False):
    """`call(params, x, cond, **keywords)`: the experiment's sampler on the network of
    `params`, with its options and guidance (the wrapper, the carried switch of the ODE
    samplers, or the sampler's own). `trace`: the ODE sampler's guidance trace too."""
    s, method = experiment.sampling, experiment.method
    g, conditioning = s.guidance, experiment.conditioning
    check_guidance(experiment)
    sample = samplers.build(s.sampler)
    options = sampler_options(experiment)
    guided = conditioning.conditional and (g.guides or trace)
    if method.guidance == "sampler":
        null = conditioning.null if conditioning.conditional else None
        options.update(cfg_scale=g.scale, null_cond=null)
    carried = method.guidance == "wrap" and guided and (g.carried or trace)
    if trace:
        if not carried:
            raise UserError(
                "the guidance trace (the gap ||v_cond - v_null|| along the path) needs a "
                f"conditional model sampled by one of {', '.join(CARRIED_SAMPLERS)}"
            )
        options["trace"] = True

    def call(params, x, cond, **keywords):
        net = nnx.merge(graphdef, params)
        if carried:
            net = Carried(net, g, conditioning.null)
        elif guided and method.guidance == "wrap":
            net = guide(net, g, conditioning.null)
        cond = cond if conditioning.conditional else None
        return sample(net, x, None, cond=cond, **options, **keywords)

    return call


def check_guidance(experiment: Experiment) -> None:
    """The guidance fits the model and the sampler: a weight other than 1 needs a
    conditional model, a schedule other than constant a velocity network's sampler (a flow
    guides inside its sampler, at one weight), the dynamic switch an ODE sampler. Each
    misfit is one UserError."""
    s, method = experiment.sampling, experiment.method
    g = s.guidance
    if g.guides and not experiment.conditioning.conditional:
        raise UserError(
            f"guidance weight {g.scale:g} (--cfg / sample.cfg_scale) needs a conditional "
            f"model; this {experiment.network.name!r} has no labels or condition (use 1; "
            "sample.guidance.scale is the same setting)"
        )
    if not g.guides or g.schedule == "constant":
        return
    if method.guidance != "wrap":
        raise UserError(
            f"a {method.name} model guides inside its sampler {s.sampler!r} at one weight: "
            f"guidance schedule {g.schedule!r} is for velocity networks' samplers "
            "(--cfg-schedule constant)"
        )
    if g.carried and s.sampler not in CARRIED_SAMPLERS:
        raise UserError(
            f"the dynamic guidance schedule carries a per-sample switch through the "
            f"sampler's loop, which sampler {s.sampler!r} does not; use one of "
            f"{', '.join(CARRIED_SAMPLERS)} (--sampler)"
        )


def guidance_trace(experiment: Experiment, graphdef, params, noise, cond):
    """`(samples, trace)`: the experiment's ODE sampling of `noise["x_init"]` with its
    guidance's diagnostics (`samplers.ode.integrate`, `trace=True`): per step the time `t`
    `[S]`, the gap `||v_cond - v_null||` and the weight `[S, B]`; per sample the first
    guided step `switch_step` (S where never) and its time `switch_t` (NaN where never).
    Pure and jittable; the samples equal `Generation.generate`'s up to rounding (the
    predictions come from one doubled batch even where the weight is 1)."""
    call = _sampler_call(experiment, graphdef, trace=True)
    return call(params, noise["x_init"], cond, num_steps=experiment.sampling.num_steps)
