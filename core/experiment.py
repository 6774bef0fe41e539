"""From a ConfigDict to the objects of an experiment: network, loss, data, sampler.

With `core/trainer.py` and `scripts/`, the only reader of ConfigDicts: everything below
(models, losses, samplers, data) takes typed keyword arguments.
"""

import inspect
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

import data as data_lib
import losses
import models
import samplers
from core.errors import UserError
from samplers.guidance import cfg

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config: ConfigDict):
    if config.compute_dtype not in DTYPES:
        raise UserError(
            f"unknown compute_dtype {config.compute_dtype!r}; known: {', '.join(DTYPES)}"
        )
    return DTYPES[config.compute_dtype]


def _plain(value):
    """ConfigDict / tuples -> plain python containers for constructor kwargs."""
    if isinstance(value, ConfigDict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def network_factory(config: ConfigDict) -> Callable[[nnx.Rngs], nnx.Module]:
    kwargs = _plain(config.model)
    name = kwargs.pop("name")
    dtype = compute_dtype(config)
    return lambda rngs: models.build(name, rngs=rngs, dtype=dtype, **kwargs)


def abstract_network(factory, seed: int = 0):
    """(graphdef, abstract params as a pure dict) without allocating anything."""
    abstract = nnx.eval_shape(lambda: factory(nnx.Rngs(seed)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise TypeError(
            f"network {type(abstract).__name__} holds non-Param state; "
            "networks must hold nnx.Param only"
        )
    return graphdef, nnx.to_pure_dict(params)


def init_params(factory, seed: int):
    """Concrete params as a pure dict (call under jit with out_shardings to shard)."""
    return nnx.to_pure_dict(nnx.split(factory(nnx.Rngs(seed)), nnx.Param)[1])


def build_loss(config: ConfigDict):
    kwargs = _plain(config.loss)
    return losses.build(kwargs.pop("name"), **kwargs)


def build_source(config: ConfigDict, split: str | None = None):
    d = config.data
    options = _plain(d.options) if "options" in d else {}
    for key in ("data_dir", "path", "image_size"):
        if d.get(key) is not None:
            options[key] = d[key]
    if d.use_labels:
        options["use_labels"] = True
    split = split or d.split
    if d.name == "npz" and split != d.split and "{split}" not in (d.get("path") or ""):
        raise UserError(
            f"split {split!r} asked of npz data {d.path!r}, which is the {d.split!r} split "
            "only; name one file per split with {split} in data.path (data/x_{split}.npz)"
        )
    return data_lib.build_source(d.name, split=split, **options)


def data_spec(source) -> dict:
    return {"example_shape": list(source.example_shape), "num_classes": int(source.num_classes)}


def write_data_spec(workdir: str, spec: dict) -> None:
    with open(os.path.join(workdir, "data_spec.json"), "w") as f:
        json.dump(spec, f)


def read_data_spec(workdir: str) -> dict:
    path = os.path.join(workdir, "data_spec.json")
    if not os.path.exists(path):
        raise UserError(f"{path} not found: is {workdir} a driftlab run directory?")
    with open(path) as f:
        return json.load(f)


def null_cond(config: ConfigDict) -> int | None:
    """The network's null label (its num_classes), or None for unconditional models."""
    return int(config.model.get("num_classes", 0)) or None


def check_classes(config: ConfigDict, spec: dict) -> None:
    """A label-conditional network needs labelled data with at most its `num_classes`
    classes (a larger label would index past its label table: NaN, not an error)."""
    model, data = null_cond(config), int(spec.get("num_classes", 0))
    if model is None:
        return
    if data == 0:
        raise UserError(
            f"model.num_classes={model} but data {config.data.name!r} gives no labels "
            "(set data.use_labels=True, or model.num_classes=0 for an unconditional model)"
        )
    if data > model:
        raise UserError(
            f"data {config.data.name!r} has {data} classes but model.num_classes={model}: "
            f"set model.num_classes={data}"
        )


def sampling_setup(
    config: ConfigDict,
    *,
    sampler: str | None = None,
    num_steps: int | None = None,
    cfg_scale: float | None = None,
) -> dict:
    """How `make_sample_fn` samples: the given `sampler`, `num_steps` and `cfg_scale`, else
    the config's (`config.sample`), and `config.sample.options` -> `{"sampler",
    "sampling_steps", "cfg", "sample_options"}` (what an evaluation records beside its
    numbers)."""
    s = config.sample
    steps = int(s.num_steps if num_steps is None else num_steps)
    if steps < 1:
        raise UserError(f"the number of sampling steps must be >= 1, got {steps}")
    return {
        "sampler": sampler or s.sampler,
        "sampling_steps": steps,
        "cfg": float(s.cfg_scale if cfg_scale is None else cfg_scale),
        "sample_options": _plain(s.get("options", ConfigDict())),
    }


def make_sample_fn(
    graphdef,
    config: ConfigDict,
    example_shape,
    *,
    sampler: str | None = None,
    num_steps: int | None = None,
    cfg_scale: float | None = None,
):
    """`fn(params, key, cond) -> samples`: prior noise -> sampler, with guidance.

    `cond` holds the labels `[n]` or condition embeddings `[n, E]` (its length is the number
    of samples; ignored for unconditional models). Guidance wraps the network
    (`samplers.guidance.cfg`), unless the sampler takes `cfg_scale` itself (flows guide
    their affine parameters, not a velocity): then it gets `cfg_scale` and `null_cond`.
    `config.sample.options` are passed to the sampler as keyword arguments.
    """
    setup = sampling_setup(config, sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale)
    sample = samplers.build(setup["sampler"])
    prior = samplers.build_prior(config.sample.prior)
    steps, scale = setup["sampling_steps"], setup["cfg"]
    # label models: null label = num_classes; embedding models: the null is the zero vector
    null = null_cond(config)
    conditional = null is not None or int(config.model.get("cond_dim", 0)) > 0
    null = 0 if null is None else null
    options = dict(setup["sample_options"])
    accepted = inspect.signature(sample).parameters
    own_guidance = "cfg_scale" in accepted
    reserved = {"net", "x_init", "key", "num_steps", "cond", "cfg_scale", "null_cond"}
    unknown = sorted(k for k in options if k not in accepted or k in reserved)
    if unknown:
        known = ", ".join(k for k in accepted if k not in reserved) or "none"
        raise UserError(
            f"sampler {setup['sampler']!r} has no option(s) {', '.join(unknown)} "
            f"(sample.options); its options: {known}"
        )
    if scale != 1.0 and not conditional:
        raise UserError(
            f"guidance weight {scale:g} (--cfg / sample.cfg_scale) needs a conditional model; "
            f"this {config.model.name!r} has no labels or condition (use 1)"
        )
    _check_tied_options(config, options)
    if own_guidance:
        options.update(cfg_scale=scale, null_cond=null if conditional else None)

    def fn(params, key, cond):
        net = nnx.merge(graphdef, params)
        if conditional and scale != 1.0 and not own_guidance:
            net = cfg(net, scale, null)
        k_prior, k_sample = jax.random.split(key)
        x_init = prior(k_prior, (cond.shape[0], *example_shape))
        cond = cond if conditional else None
        return sample(net, x_init, k_sample, num_steps=steps, cond=cond, **options)

    return fn


# Sampler options that must equal a loss setting of the trained model: (loss, option).
TIED_OPTIONS = {("shortcut", "max_steps"): "the dt input's mapping of step sizes"}


def _check_tied_options(config: ConfigDict, options: dict) -> None:
    """A UserError when a sampler option differs from the loss setting it must equal (the
    config's FieldReference ties them; a run's config.json or `--sample-option` does not)."""
    for (loss, key), why in TIED_OPTIONS.items():
        trained = config.loss.get(key) if config.loss.get("name") == loss else None
        if trained is not None and key in options and options[key] != trained:
            raise UserError(
                f"sample option {key}={options[key]} differs from the {loss} model's "
                f"loss.{key}={trained}, which fixes {why}: sample with {key}={trained}"
            )


def sample_labels(n: int, num_classes: int | None, offset: int = 0) -> jax.Array:
    """Labels 0..num_classes-1 cycled (or zeros, ignored, for unconditional models)."""
    if not num_classes:
        return jnp.zeros((n,), jnp.int32)
    return (jnp.arange(n, dtype=jnp.int32) + offset) % num_classes
