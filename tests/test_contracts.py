"""Contract tests over every registry entry (the networks' own are in tests/test_models.py):

- every family of `core.methods.METHODS` has a smoke config that builds into an Experiment
  of that family, and its loss, default sampler and prior are registered (a family that
  generates nothing, a classifier, has none);
- every loss of `losses.LOSSES`: the signature `loss(net, batch, key, *, ...)`, jit, a
  per-example `[B]` loss, finite values and gradients;
- every sampler of `samplers.SAMPLERS`, through the generation of a family that lists it:
  jit, the sample shape, finite samples, the same explicit noise giving the same samples
  bit for bit and other noise other samples, and the key-based path equal to `generate`
  of the noise drawn from that key.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import losses
import samplers
from core import config as config_lib
from core.experiment import Experiment
from core.generation import Generation
from core.methods import METHODS
from tests.conftest import ROOT

# one smoke config per family, and the example shape of its data
FAMILY_CONFIGS = {
    "flow_matching": ("experiments/quickstart.py:smoke=True", (2,)),
    "shortcut": ("experiments/shortcut/moons_mlp.py:smoke=True", (2,)),
    "sphere_flow_matching": ("experiments/sphere/earth_volcano.py:smoke=True", (3,)),
    "normalizing_flow": ("experiments/nf/mnist_tarflow.py:smoke=True,cond=True", (28, 28, 1)),
    "classifier": ("experiments/classifier/mnist_cnn.py:smoke=True", (28, 28, 1)),
    "vae": ("experiments/givt/mnist_vae.py:smoke=True", (28, 28, 1)),
    # GIVT without its frozen VAE models the latent token sequences [T, d] themselves
    "givt": ("experiments/givt/mnist_givt.py:smoke=True", (49, 4)),
}
B = 8
jit0 = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.cache
def family(name: str):
    """(experiment, graphdef, params, example shape) of the family's smoke config."""
    spec, shape = FAMILY_CONFIGS[name]
    path, _, variant = spec.partition(":")
    experiment = Experiment.from_config(config_lib.load(f"{ROOT}/{path}:{variant}"))
    graphdef, _ = experiment.network.abstract()
    params = jit0(lambda: experiment.network.init(0))()
    return experiment, graphdef, params, shape


def batch_of(experiment: Experiment, shape, key) -> dict:
    x = jax.random.normal(key, (B, *shape))
    if experiment.method.manifold == "sphere":
        x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    elif len(shape) == 3:
        x = jnp.clip(x, -1.0, 1.0)
    batch = {"x": x}
    conditioning = experiment.conditioning
    if conditioning.labels:
        batch["cond"] = jnp.arange(B, dtype=jnp.int32) % conditioning.num_classes
    elif conditioning.cond_dim:
        batch["cond"] = jax.random.normal(jax.random.key(7), (B, conditioning.cond_dim))
    return batch


def test_every_family_has_a_config_and_registered_parts():
    assert set(FAMILY_CONFIGS) == set(METHODS), "a new family needs a smoke config here"
    assert {m.loss for m in METHODS.values()} == set(losses.LOSSES)
    for name, method in METHODS.items():
        experiment = family(name)[0]
        assert experiment.method is method
        if not method.generates:  # a classifier: no sampler, no prior
            assert (method.sampler, method.samplers, method.prior) == (None, (), None), name
            continue
        assert method.sampler in method.samplers
        assert set(method.samplers) <= set(samplers.SAMPLERS), name
        assert method.prior in samplers.PRIORS


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_contract(name):
    experiment, graphdef, params, shape = family(name)
    loss_fn = experiment.loss.fn
    fn = loss_fn.func
    args = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in args[:3]] == ["net", "batch", "key"]
    assert all(p.kind == p.KEYWORD_ONLY for p in args[3:]), fn.__name__
    extras = [  # the trainer's frozen networks the loss takes (a teacher EMA only if kept)
        k for k in losses.frozen_nets(loss_fn)
        if k != "teacher_ema_net" or experiment.keeps_teacher_ema
    ]  # fmt: skip
    batch = batch_of(experiment, shape, jax.random.key(1))

    def objective(p):
        nets = {k: nnx.merge(graphdef, p) for k in extras}
        per_example, metrics = loss_fn(nnx.merge(graphdef, p), batch, jax.random.key(2), **nets)
        return jnp.mean(per_example), (per_example, metrics)

    (value, (per_example, metrics)), grads = jit0(jax.value_and_grad(objective, has_aux=True))(
        params
    )
    assert per_example.shape == (B,)
    assert bool(jnp.isfinite(value)) and all(bool(jnp.isfinite(m).all()) for m in metrics.values())
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


def _method_of_sampler(sampler: str) -> str:
    for name, method in METHODS.items():
        if sampler in method.samplers:
            return name
    raise AssertionError(f"sampler {sampler!r} draws from no family of METHODS")


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
def test_sampler_contract(sampler):
    experiment, graphdef, params, shape = family(_method_of_sampler(sampler))
    steps = 1 if sampler in ("shortcut", "tarflow") else 2
    experiment = experiment.with_sampling(sampler=sampler, num_steps=steps)
    generation = Generation(experiment, graphdef, shape)
    n = 4
    cond = jnp.arange(n, dtype=jnp.int32) % max(experiment.conditioning.num_classes, 1)
    key = jax.random.key(3)
    noise = generation.draw_noise(key, n)
    again = generation.draw_noise(key, n)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), noise, again))
    generate = jit0(generation.generate)
    x = generate(params, noise, cond)
    assert x.shape == (n, *shape) and bool(jnp.isfinite(x).all())
    np.testing.assert_array_equal(np.asarray(generate(params, noise, cond)), np.asarray(x))
    other = jax.tree.map(lambda a: -a, noise)  # other noise (a valid draw of each prior)
    assert float(jnp.abs(generate(params, other, cond) - x).max()) > 1e-6
    # the key-based path is generate() of the noise drawn from that key (another program:
    # equal up to XLA's fusion choices)
    sampled = jit0(generation.sample)(params, key, cond)
    np.testing.assert_allclose(np.asarray(sampled), np.asarray(x), rtol=1e-5, atol=1e-6)
    if sampler in samplers.STEP_NOISE:
        assert noise["step_noise"].shape == samplers.STEP_NOISE[sampler](steps, (n, *shape))
