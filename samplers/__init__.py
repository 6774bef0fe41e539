"""Pure, jittable samplers, chosen by name.

`sample(net, x_init, key, *, num_steps, cond=None, **hparams) -> x`, looped with
`lax.scan`. Guidance wraps the network (`samplers.guidance.cfg`), so every sampler gets it.
A prior draws `x_init`: `prior(key, shape) -> x`.
"""

import jax

from core.errors import lookup
from manifolds.sphere import uniform as sphere_uniform
from samplers.ode import sample_euler, sample_heun, sample_midpoint, sample_rk4
from samplers.shortcut import sample_shortcut
from samplers.sphere import sample_sphere_euler, sample_sphere_midpoint, sample_sphere_rk4
from samplers.tarflow import sample_tarflow

SAMPLERS = {
    "euler": sample_euler,
    "midpoint": sample_midpoint,
    "heun": sample_heun,
    "rk4": sample_rk4,
    "sphere_euler": sample_sphere_euler,
    "sphere_midpoint": sample_sphere_midpoint,
    "sphere_rk4": sample_sphere_rk4,
    "shortcut": sample_shortcut,
    "tarflow": sample_tarflow,
}


def gaussian_prior(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, shape)


def sphere_uniform_prior(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform on the unit sphere of the last axis."""
    return sphere_uniform(key, shape[:-1], shape[-1])


PRIORS = {"gaussian": gaussian_prior, "sphere_uniform": sphere_uniform_prior}


def build(name: str):
    return lookup(SAMPLERS, name, "sampler")


def build_prior(name: str):
    return lookup(PRIORS, name, "prior")
