import os
import sys
import tempfile

# CPU compile time dominates this suite: XLA's LLVM at -O0 compiles the tiny test networks
# several times faster (runtime matters little for a few steps), and a persistent cache
# shares compiled programs between tests and the CLI subprocesses they start.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"driftlab-test-jax-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip_gpu = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture
def shared_data():
    """Path of ../shared/data (real datasets and weights); skips where it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"{SHARED_DATA} not found")
    return SHARED_DATA


@pytest.fixture
def python_env():
    """Environment for subprocess CLIs: repo root on the path, CPU only."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


PYTHON = sys.executable


def run_python(args: list[str], env: dict, *, devices: int = 1, timeout: float = 300):
    """`python ARGS` at the repository root, in `env`, with `devices` simulated CPU devices;
    the finished `subprocess.CompletedProcess` (text output captured)."""
    import subprocess

    flags = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    return subprocess.run(
        [PYTHON, *args],
        cwd=ROOT,
        env=dict(env, XLA_FLAGS=flags),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sample_fn(graphdef, config, example_shape, **sampling):
    """`fn(params, key, cond) -> samples`: the experiment of `config`, its sampling with
    `sampling` (sampler, num_steps, cfg_scale) replaced, generating from a key."""
    from core.experiment import Experiment
    from core.generation import Generation

    experiment = Experiment.from_config(config).with_sampling(**sampling)
    return Generation(experiment, graphdef, example_shape).sample


def train(config, workdir, **kwargs):
    """`core.trainer.train` of the experiment a ConfigDict describes."""
    from core.experiment import Experiment
    from core.trainer import train as train_experiment

    return train_experiment(Experiment.from_config(config), workdir, **kwargs)
