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
from ml_collections import ConfigDict

import models
from core import experiment, sharding
from core.train_state import init_state, make_optimizer
from core.trainer import make_train_step, wants_teacher_ema
from models.flops import TRAIN_FACTOR, count_flops


def forward_flops(config: ConfigDict, example_shape: tuple[int, ...]) -> int:
    """Matrix FLOPs of one forward pass on one example (batch 1, the config's conditioning):
    `net(x, t)` of a velocity network, `net.forward(x)` (data -> latent) of a flow."""
    graphdef, abstract = experiment.abstract_network(experiment.network_factory(config))
    x = jax.ShapeDtypeStruct((1, *example_shape), jnp.float32)
    kwargs = {}
    if config.model.get("num_classes", 0):
        kwargs["cond"] = jax.ShapeDtypeStruct((1,), jnp.int32)
    if models.is_flow(config.model.name):
        return count_flops(
            lambda p, x, **kw: nnx.merge(graphdef, p).forward(x, **kw), abstract, x, **kwargs
        )
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    if config.model.get("use_dt", False):
        kwargs["dt"] = jax.ShapeDtypeStruct((1,), jnp.float32)
    return count_flops(
        lambda p, x, t, **kw: nnx.merge(graphdef, p)(x, t, **kw), abstract, x, t, **kwargs
    )


def _synthetic_batch(config: ConfigDict, example_shape, batch: int, mesh) -> dict:
    rng = np.random.default_rng(0)
    host = {"x": rng.uniform(-1, 1, (batch, *example_shape)).astype(np.float32)}
    if config.data.use_labels:
        host["cond"] = rng.integers(0, config.model.num_classes, (batch,)).astype(np.int32)
    return jax.device_put(host, sharding.batch_sharding(mesh))


def _timed(fn, n: int) -> float:
    """Seconds per call of `fn()` (which returns something to block on), over `n` calls."""
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def bench_train(config: ConfigDict, example_shape, *, steps: int, warmup: int) -> dict:
    """Images/s of the trainer's own jitted step (same loss, optimizer, EMA, shardings)."""
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    factory = experiment.network_factory(config)
    graphdef, abstract = experiment.abstract_network(factory, config.seed)
    tx = make_optimizer(**config.optim, total_steps=config.total_steps)
    loss_fn = experiment.build_loss(config)
    teacher_ema = wants_teacher_ema(config, loss_fn)
    start = lambda p: init_state(p, tx, teacher_ema=teacher_ema)
    abstract_state = jax.eval_shape(start, abstract)
    shardings = sharding.state_shardings(mesh, abstract_state, config.mesh.fsdp_min_size)
    init = lambda: start(experiment.init_params(factory, config.seed))
    state = jax.jit(init, out_shardings=shardings)()
    step = make_train_step(
        graphdef,
        loss_fn,
        tx,
        ema_decay=config.ema_decay,
        teacher_ema_decay=config.get("teacher_ema_decay", 0.0),
        seed=config.seed,
    )
    step = jax.jit(step, donate_argnums=0, out_shardings=(shardings, sharding.replicated(mesh)))
    batch = _synthetic_batch(config, example_shape, config.batch_size, mesh)
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    t0 = time.perf_counter()
    jax.block_until_ready(one())
    compile_s = time.perf_counter() - t0
    _timed(one, warmup)
    sec = _timed(one, steps)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
    return {
        "step_ms": 1e3 * sec,
        "images_per_sec": config.batch_size / sec,
        "compile_s": compile_s,
        "params": n_params,
    }


def bench_sampling(
    config: ConfigDict, example_shape, *, batch: int, num_steps: int, sampler: str, repeats: int
) -> dict:
    """Images/s of the config's sampler (fresh weights: speed does not depend on them)."""
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    factory = experiment.network_factory(config)
    graphdef, _ = experiment.abstract_network(factory, config.seed)
    params = jax.jit(lambda: experiment.init_params(factory, config.seed))()
    fn = experiment.make_sample_fn(
        graphdef, config, tuple(example_shape), sampler=sampler, num_steps=num_steps
    )
    fn = jax.jit(fn, out_shardings=sharding.batch_sharding(mesh))
    labels = jax.device_put(
        experiment.sample_labels(batch, config.model.get("num_classes", 0)),
        sharding.batch_sharding(mesh),
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
