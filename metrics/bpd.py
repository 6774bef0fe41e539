"""Test-set bits/dim of a normalizing flow (any network with `forward(x, *, cond) -> (z,
logdet)`); the conversion and the noise choices are those of `losses/flow_nll.py`.

    bpd = dataset_bpd(net, batches, key=jax.random.key(0), noise="uniform")

With `noise="uniform"` (the default) the result is an upper bound on the discrete bits/dim
of the 8-bit data (report it for flows trained with uniform dequantization); with
`noise="gaussian"` it is the bits/dim of the σ-noised data, the training objective of a
TarFlow trained with Gaussian noise (pass the `noise_std` it was trained with).
"""

from collections.abc import Iterable

import jax
import numpy as np
from flax import nnx

from losses.flow_nll import flow_bpd


def dataset_bpd(
    net: nnx.Module,
    batches: Iterable[dict],
    *,
    key: jax.Array,
    noise: str = "uniform",
    noise_std: float = 0.05,
    use_labels: bool = True,
    progress: str | None = None,
    total: int | None = None,
) -> float:
    """Mean bits/dim over every example of `batches` (dicts with `"x"` `[b, H, W, C]` in
    [-1, 1] and, optionally, int labels `"cond"` `[b]`, used when `use_labels`: then the
    number is the conditional likelihood `p(x | label)`). Batch i draws its noise from
    `fold_in(key, i)`; batch sizes may differ (the last one is compiled once more).
    `progress`: the label of a progress bar on stderr (of `total` examples, for an
    estimate)."""
    from tqdm import tqdm

    graphdef, state = nnx.split(net)

    @jax.jit
    def per_example(state, x, cond, key):
        bpd, _, _ = flow_bpd(
            nnx.merge(graphdef, state), x, key, cond=cond, noise=noise, noise_std=noise_std
        )
        return bpd

    summed, count = 0.0, 0
    bar = tqdm(total=total, desc=progress, unit="img", disable=progress is None)
    with bar:
        for i, batch in enumerate(batches):
            cond = batch.get("cond") if use_labels else None
            bpd = per_example(state, batch["x"], cond, jax.random.fold_in(key, i))
            values = np.asarray(jax.device_get(bpd), np.float64)
            summed += float(values.sum())
            count += values.size
            bar.update(values.size)
    if count == 0:
        raise ValueError("dataset_bpd got no batches")
    return summed / count
