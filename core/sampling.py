"""Sampling from a run directory: restore weights, generate in sharded batches, write files.

Shared by `scripts.sample` and the evaluator. Samples are written in the ADM `.npz` layout:
`arr_0` uint8 NHWC images (float32 arrays for non-image data), `arr_1` labels when the model
is conditional.
"""

import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from core import experiment, plots, sharding
from core.checkpoint import open_for_reading
from core.config import from_json
from core.errors import UserError


def load_run(workdir: str) -> tuple[ConfigDict, dict]:
    """(config, data spec) of a run directory written by the trainer."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"no config.json in {workdir}: not a driftlab run directory")
    with open(path) as f:
        config = from_json(f.read())
    return config, experiment.read_data_spec(workdir)


def restore_network(
    workdir: str, config: ConfigDict, mesh, *, step: int | None = None, ema: bool = True
):
    """(graphdef, params placed on `mesh`, step) from the newest or the given checkpoint."""
    ckpt = open_for_reading(workdir)
    graphdef, abstract = experiment.abstract_network(experiment.network_factory(config))
    shardings = sharding.state_shardings(mesh, abstract, config.mesh.get("fsdp_min_size", 2**18))
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    try:
        step, params = ckpt.restore_weights(target, step=step, ema=ema)
    finally:
        ckpt.close()
    return graphdef, params, step


class Generator:
    """`num` samples of a run's network in batches, the sampling program compiled once:
    `gen(params, key) -> (samples float32 on the host, labels or None)`; batch `i` draws
    its noise from `fold_in(key, i)`. Call it again with new params (e.g. during training)
    without recompiling.

    Labels cycle through the classes, or are all `label`; `conds` gives one condition per
    sample instead (labels `[num]` or embeddings `[num, E]`, e.g. a test split's), and
    then the labels returned are None."""

    def __init__(
        self,
        graphdef,
        config: ConfigDict,
        spec: dict,
        mesh,
        *,
        num: int,
        batch_size: int,
        sampler: str | None = None,
        num_steps: int | None = None,
        cfg_scale: float | None = None,
        label: int | None = None,
        conds: np.ndarray | None = None,
    ):
        sharding.check_batch_size(mesh, batch_size)
        if num < 1:
            raise UserError(f"the number of samples must be >= 1, got {num}")
        classes = spec["num_classes"] if experiment.null_cond(config) is not None else 0
        if label is not None and not (classes and 0 <= label < classes):
            raise UserError(
                f"label {label} is not a class of this model"
                + (f" (0 .. {classes - 1})" if classes else " (it is unconditional)")
            )
        if conds is not None and len(conds) != num:
            raise UserError(f"generate: {len(conds)} conditions for {num} samples")
        fn = experiment.make_sample_fn(
            graphdef,
            config,
            tuple(spec["example_shape"]),
            sampler=sampler,
            num_steps=num_steps,
            cfg_scale=cfg_scale,
        )
        data_sharding = sharding.batch_sharding(mesh)
        self.fn = jax.jit(fn, out_shardings=data_sharding)
        self.num, self.returns_labels = num, bool(classes) and conds is None
        self.labels = []
        for i in range(math.ceil(num / batch_size)):
            if conds is not None:
                part = np.asarray(conds[i * batch_size : (i + 1) * batch_size])
                labels = np.concatenate([part, np.repeat(part[:1], batch_size - len(part), 0)])
            elif label is None:
                labels = experiment.sample_labels(batch_size, classes, offset=i * batch_size)
            else:
                labels = np.full((batch_size,), label, np.int32)
            self.labels.append(jax.device_put(labels, data_sharding))

    def __call__(self, params, key: jax.Array) -> tuple[np.ndarray, np.ndarray | None]:
        xs, ys = [], []
        for i, labels in enumerate(self.labels):
            xs.append(to_host(self.fn(params, jax.random.fold_in(key, i), labels)))
            if self.returns_labels:
                ys.append(to_host(labels))
        x = np.concatenate(xs)[: self.num]
        return x, (np.concatenate(ys)[: self.num] if self.returns_labels else None)


def generate(
    graphdef,
    params,
    config: ConfigDict,
    spec: dict,
    mesh,
    *,
    num: int,
    batch_size: int,
    seed: int = 0,
    **options,
) -> tuple[np.ndarray, np.ndarray | None]:
    """`num` samples (float32, on the host) and their labels (None if unconditional) from
    `key(seed)`; `options` as `Generator`'s (sampler, num_steps, cfg_scale, label, conds)."""
    gen = Generator(graphdef, config, spec, mesh, num=num, batch_size=batch_size, **options)
    return gen(params, jax.random.key(seed))


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array as numpy on every process (gathered across hosts when needed)."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def write_samples(path: str, x: np.ndarray, labels: np.ndarray | None) -> str:
    """ADM layout npz plus a PNG preview beside it; returns the PNG path."""
    is_image = x.ndim == 4
    arrays = {"arr_0": plots.to_uint8(x) if is_image else x.astype(np.float32)}
    if labels is not None:
        arrays["arr_1"] = labels.astype(np.int64)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **arrays)
    png = os.path.splitext(path)[0] + ".png"
    if is_image:
        plots.save_image_grid(arrays["arr_0"][:100], png)
    else:
        plots.save_scatter(x[:5000], None, png)
    return png
