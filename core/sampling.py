"""Drawing many samples of a run's network in sharded batches, and writing them.

Shared by `core.runs.sample_run` (the CLIs), the trainer's sample grids and the evaluator.
Samples are written in the ADM `.npz` layout: `arr_0` uint8 NHWC images (float32 arrays for
non-image data), `arr_1` labels when the model is conditional.
"""

import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from core import plots, sharding
from core.errors import UserError
from core.experiment import Experiment, sample_labels
from core.generation import Generation


class Generator:
    """`num` samples of an experiment's network in batches, the sampling program compiled
    once: `gen(params, key) -> (samples float32 on the host, labels or None)`; batch `i`
    draws its noise from `fold_in(key, i)` (`Generation.draw_noise`). Call it again with new
    params (e.g. during training) without recompiling.

    Labels cycle through the classes, or are all `label`; `conds` gives one condition per
    sample instead (labels `[num]` or embeddings `[num, E]`, e.g. a test split's), and
    then the labels returned are None. `frozen` (`core.runs.FrozenNets`) are the frozen
    networks generation gets."""

    def __init__(
        self,
        experiment: Experiment,
        graphdef,
        spec: dict,
        mesh,
        *,
        num: int,
        batch_size: int,
        label: int | None = None,
        conds: np.ndarray | None = None,
        frozen=None,
    ):
        from core.runs import NO_FROZEN

        sharding.check_batch_size(mesh, batch_size)
        if num < 1:
            raise UserError(f"the number of samples must be >= 1, got {num}")
        classes = spec["num_classes"] if experiment.conditioning.labels else 0
        if label is not None and not (classes and 0 <= label < classes):
            raise UserError(
                f"label {label} is not a class of this model"
                + (f" (0 .. {classes - 1})" if classes else " (it is unconditional)")
            )
        if conds is not None and len(conds) != num:
            raise UserError(f"generate: {len(conds)} conditions for {num} samples")
        self.frozen = frozen or NO_FROZEN
        generation = Generation(experiment, graphdef, spec["example_shape"], self.frozen.graphdefs)
        data_sharding = sharding.batch_sharding(mesh)
        self.fn = jax.jit(generation.sample, out_shardings=data_sharding)
        self.num, self.returns_labels = num, bool(classes) and conds is None
        self.labels = []
        for i in range(math.ceil(num / batch_size)):
            if conds is not None:
                part = np.asarray(conds[i * batch_size : (i + 1) * batch_size])
                labels = np.concatenate([part, np.repeat(part[:1], batch_size - len(part), 0)])
            elif label is None:
                labels = sample_labels(batch_size, classes, offset=i * batch_size)
            else:
                labels = np.full((batch_size,), label, np.int32)
            self.labels.append(jax.device_put(labels, data_sharding))

    def __call__(self, params, key: jax.Array) -> tuple[np.ndarray, np.ndarray | None]:
        xs, ys = [], []
        for i, labels in enumerate(self.labels):
            x = self.fn(params, jax.random.fold_in(key, i), labels, self.frozen.params)
            xs.append(to_host(x))
            if self.returns_labels:
                ys.append(to_host(labels))
        x = np.concatenate(xs)[: self.num]
        return x, (np.concatenate(ys)[: self.num] if self.returns_labels else None)


def draw_samples(
    experiment: Experiment,
    graphdef,
    params,
    spec: dict,
    mesh,
    *,
    num: int,
    batch_size: int,
    seed: int = 0,
    **options,
) -> tuple[np.ndarray, np.ndarray | None]:
    """`num` samples (float32, on the host) and their labels (None if unconditional) from
    `key(seed)`; `options` as `Generator`'s (label, conds, frozen)."""
    gen = Generator(experiment, graphdef, spec, mesh, num=num, batch_size=batch_size, **options)
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
