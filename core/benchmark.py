"""Throughput of the real train step and sampler on synthetic data, with analytic FLOPs.

FLOPs are counted from the network's jaxpr (`models.flops.count_flops`: every matmul and
convolution, attention included, `2·M·N·K` per matmul) for one forward pass on one example;
a training step is `3 ×` forward (backward = input and weight gradients). Achieved TFLOP/s
= 3 · forward FLOPs · images/s; MFU = achieved / peak. XLA's `cost_analysis()` is not used:
on GPU it does not see inside cuBLAS/cuDNN custom calls and undercounts.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core import sharding
from core.experiment import Experiment, sample_labels
from core.generation import Generation
from core.trainer import TrainSetup
from models.flops import TRAIN_FACTOR, count_flops


def forward_flops(experiment: Experiment, example_shape: tuple[int, ...]) -> int:
    """Matrix FLOPs of one forward pass on one example (batch 1, the experiment's
    conditioning): `net(x, t)` of a velocity network, `net.forward(x)` (data -> latent) of a
    flow."""
    graphdef, abstract = experiment.network.abstract()
    x = jax.ShapeDtypeStruct((1, *example_shape), jnp.float32)
    kwargs = {}
    if experiment.conditioning.labels:
        kwargs["cond"] = jax.ShapeDtypeStruct((1,), jnp.int32)
    if experiment.method.protocol == "flow":
        return count_flops(
            lambda p, x, **kw: nnx.merge(graphdef, p).forward(x, **kw), abstract, x, **kwargs
        )
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    if experiment.network.options.get("use_dt", False):
        kwargs["dt"] = jax.ShapeDtypeStruct((1,), jnp.float32)
    return count_flops(
        lambda p, x, t, **kw: nnx.merge(graphdef, p)(x, t, **kw), abstract, x, t, **kwargs
    )


def _synthetic_batch(experiment: Experiment, example_shape, batch: int, mesh) -> dict:
    rng = np.random.default_rng(0)
    host = {"x": rng.uniform(-1, 1, (batch, *example_shape)).astype(np.float32)}
    if experiment.data.use_labels:
        classes = experiment.conditioning.num_classes
        host["cond"] = rng.integers(0, classes, (batch,)).astype(np.int32)
    return jax.device_put(host, sharding.batch_sharding(mesh))


def _timed(fn, n: int) -> float:
    """Seconds per call of `fn()` (which returns something to block on), over `n` calls."""
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def bench_train(experiment: Experiment, example_shape, *, steps: int, warmup: int) -> dict:
    """Images/s of the trainer's own jitted step (`core.trainer.TrainSetup`: the same loss,
    optimizer, EMA and its warm-up, state and batch shardings) on synthetic data."""
    from core import runs

    mesh = experiment.mesh.make()
    setup = TrainSetup(experiment, mesh, runs.restore_frozen(experiment, mesh))
    step = setup.jit_step()
    batch = _synthetic_batch(experiment, example_shape, experiment.training.batch_size, mesh)
    holder = {"state": setup.fresh_state()}

    def one():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    t0 = time.perf_counter()
    jax.block_until_ready(one())
    compile_s = time.perf_counter() - t0
    _timed(one, warmup)
    sec = _timed(one, steps)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(setup.abstract_params))
    batch_size = experiment.training.batch_size
    return {
        "step_ms": 1e3 * sec,
        "images_per_sec": batch_size / sec,
        "compile_s": compile_s,
        "params": n_params,
    }


def bench_sampling(
    experiment: Experiment, example_shape, *, batch: int, num_steps: int, sampler: str,
    repeats: int,
) -> dict:  # fmt: skip
    """Images/s of `sampler` in `num_steps` steps (fresh weights: speed does not depend on
    them), through the experiment's generation."""
    experiment = experiment.with_sampling(sampler=sampler, num_steps=num_steps)
    mesh = experiment.mesh.make()
    seed = experiment.training.seed
    graphdef, _ = experiment.network.abstract(seed)
    params = jax.jit(lambda: experiment.network.init(seed))()
    generation = Generation(experiment, graphdef, example_shape)
    fn = jax.jit(generation.sample, out_shardings=sharding.batch_sharding(mesh))
    labels = jax.device_put(
        sample_labels(batch, experiment.conditioning.num_classes), sharding.batch_sharding(mesh)
    )
    key = jax.random.key(0)
    jax.block_until_ready(fn(params, key, labels))
    sec = _timed(lambda: fn(params, key, labels), repeats)
    return {
        "sample_batch": batch,
        "sample_steps": num_steps,
        "sampler": sampler,
        "sample_images_per_sec": batch / sec,
    }


def mfu(forward: int, images_per_sec: float, peak_tflops: float) -> dict:
    achieved = TRAIN_FACTOR * forward * images_per_sec / 1e12
    return {
        "forward_gflops_per_image": forward / 1e9,
        "train_tflops": achieved,
        "mfu": achieved / peak_tflops,
        "peak_tflops": peak_tflops,
    }


def bench_run_sampling(workdir: str, *, batch: int, repeats: int, **sampling) -> dict:
    """Images/s of a trained run's own sampling program, as `scripts.sample` draws: the
    checkpoint's weights and frozen networks (GIVT's VAE decoder is inside the timed
    program), the run's sampler and options unless `sampling` (`core.runs.sample_run`'s
    keywords) overrides them, one batch of `batch` per call, on all devices.

    The first call compiles and is reported apart (`compile_s`); the mean over `repeats`
    later calls, each with fresh noise and the copy of the images to the host included,
    gives `images_per_sec`. Unlike `bench_sampling` the weights are trained ones: a sampler
    whose work depends on them (rejection sampling in GIVT's guidance, Jacobi inverses that
    stop at a tolerance) is timed as it runs on this model."""
    from core import runs
    from core.sampling import Generator

    mesh = sharding.make_mesh()
    seed = sampling.pop("seed", 0)
    sampling.pop("batch_size", None)
    run = runs.sample_run(workdir, mesh=mesh, **sampling)  # no `num`: the weights only
    experiment = run.experiment
    generator = Generator(
        experiment, run.graphdef, run.spec, mesh, num=batch,
        batch_size=sharding.sample_batch(mesh, batch, batch),
        frozen=runs.restore_frozen(experiment, mesh),
    )  # fmt: skip
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    generator(run.params, key)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(repeats):
        generator(run.params, jax.random.fold_in(key, i + 1))  # returns host arrays: blocks
    sec = (time.perf_counter() - t0) / repeats
    s = experiment.sampling
    return {
        "workdir": workdir,
        "step": run.step,
        "family": experiment.method.name,
        "network": experiment.network.name,
        "params": count(run.params),
        "frozen_params": {name: count(p) for name, p in generator.frozen.params.items()},
        "sampler": s.sampler,
        "sampling_steps": s.num_steps,
        "cfg": s.cfg_scale,
        "cfg_schedule": s.guidance.schedule,
        "sample_options": s.options,
        "batch": batch,
        "repeats": repeats,
        "compile_s": compile_s,
        "sec_per_batch": sec,
        "images_per_sec": batch / sec,
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
    }
