"""Generation from explicit noise (`core.generation`): a path integrated in pieces with
`integrate` equals the whole; `integrate` refuses samplers that cannot start mid-path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import config as config_lib
from core.errors import UserError
from core.experiment import Experiment
from core.generation import Generation
from tests.conftest import ROOT


def _generation(sampler: str, steps: int):
    config = config_lib.load(f"{ROOT}/experiments/quickstart.py:smoke=True")
    experiment = Experiment.from_config(config).with_sampling(sampler=sampler, num_steps=steps)
    graphdef, _ = experiment.network.abstract()
    params = jax.jit(lambda: experiment.network.init(0))()
    return Generation(experiment, graphdef, (2,)), params


@pytest.mark.parametrize("sampler", ["heun", "euler_maruyama"])
def test_a_path_in_two_pieces_is_the_whole_path(sampler):
    generation, params = _generation(sampler, 8)
    cond = jnp.zeros((16,), jnp.int32)
    noise = generation.draw_noise(jax.random.key(0), 16)
    whole = generation.generate(params, noise, cond)
    steps = noise.get("step_noise")
    first, second = (None, None) if steps is None else (steps[:4], steps[4:])
    half = generation.integrate(
        params, noise["x_init"], cond, t_start=0.0, t_end=0.5, num_steps=4, step_noise=first
    )
    rest = generation.integrate(
        params, half, cond, t_start=0.5, t_end=1.0, num_steps=4, step_noise=second
    )
    np.testing.assert_allclose(rest, whole, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(half - whole).max()) > 1e-3  # the pieces are not the whole


def test_integrate_needs_a_sampler_that_can_start_mid_path():
    config = config_lib.load(f"{ROOT}/experiments/shortcut/moons_mlp.py:smoke=True")
    experiment = Experiment.from_config(config)
    graphdef, _ = experiment.network.abstract()
    generation = Generation(experiment, graphdef, (2,))
    with pytest.raises(UserError, match="sampler 'shortcut' cannot start at t_start"):
        generation.integrate({}, jnp.zeros((2, 2)), jnp.zeros((2,), jnp.int32), t_start=0.5)
