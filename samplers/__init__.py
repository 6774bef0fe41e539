"""Pure, jittable samplers, chosen by name.

`sample(net, x_init, key, *, num_steps, cond=None, **hparams) -> x`, looped with
`lax.scan`. Guidance wraps the network (`samplers.guidance.guide`), so every sampler gets it.
A prior draws `x_init`: `prior(key, shape) -> x`. Randomness is explicit: a sampler that
consumes noise along the way takes it as `step_noise` (its shape from `STEP_NOISE[name]
(num_steps, x_shape)`), drawn with the initial noise in one place (`core.generation`);
the others are deterministic and ignore `key`.
"""

import jax

from core.errors import lookup
from manifolds.sphere import uniform as sphere_uniform
from samplers.givt import sample_givt
from samplers.ode import sample_euler, sample_heun, sample_midpoint, sample_rk4
from samplers.sde import sample_euler_maruyama, step_noise_shape
from samplers.shortcut import sample_shortcut
from samplers.sphere import sample_sphere_euler, sample_sphere_midpoint, sample_sphere_rk4
from samplers.tarflow import sample_tarflow

SAMPLERS = {
    "euler": sample_euler,
    "midpoint": sample_midpoint,
    "heun": sample_heun,
    "rk4": sample_rk4,
    "euler_maruyama": sample_euler_maruyama,
    "sphere_euler": sample_sphere_euler,
    "sphere_midpoint": sample_sphere_midpoint,
    "sphere_rk4": sample_sphere_rk4,
    "shortcut": sample_shortcut,
    "tarflow": sample_tarflow,
    "givt": sample_givt,
}


# samplers that integrate from any `t_start` to any `t_end` (a search re-noises a partial
# sample back to t' and goes on from there)
RESUMABLE = ("euler", "midpoint", "heun", "rk4", "euler_maruyama")
# samplers that consume per-step noise: name -> its shape given (num_steps, x_init's shape)
STEP_NOISE = {"euler_maruyama": step_noise_shape}


# network evaluations per step of each sampler (a TarFlow inverse, and GIVT's token-by-token
# pass with its cache, are counted as one evaluation per sample, whatever their steps)
EVALS_PER_STEP = {
    "euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "euler_maruyama": 1,
    "sphere_euler": 1, "sphere_midpoint": 2, "sphere_rk4": 4, "shortcut": 1,
}  # fmt: skip


def nfe(sampler: str, num_steps: int) -> int:
    """Network evaluations to draw one sample with `sampler` in `num_steps` steps."""
    if sampler in ("tarflow", "givt"):
        return 1
    return EVALS_PER_STEP[sampler] * int(num_steps)


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
