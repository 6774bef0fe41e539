"""Cross-entropy of an image classifier (the `classifier` family, `models/classifier.py`)."""

import jax
import jax.numpy as jnp

from core.errors import UserError


def loss_cross_entropy(net, batch: dict, key: jax.Array, *, label_smoothing: float = 0.0):
    """Per-example cross-entropy of `net(batch["x"])` against the labels `batch["cond"]`
    (`[B]` ints), the one-hot targets smoothed by `label_smoothing` (0: none); metrics: the
    batch's top-1 `accuracy`. Deterministic (`key` is unused)."""
    del key
    if "cond" not in batch:
        raise UserError("the cross_entropy loss needs labels: set data.use_labels=True")
    if not 0.0 <= label_smoothing < 1.0:
        raise UserError(f"loss.label_smoothing={label_smoothing} must be in [0, 1)")
    labels = batch["cond"]
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise UserError(
            f"the cross_entropy loss needs int labels [B], got {labels.dtype} {list(labels.shape)}"
        )
    logits = net(batch["x"])
    num_classes = logits.shape[-1]
    log_p = jax.nn.log_softmax(logits, axis=-1)
    target = jax.nn.one_hot(labels, num_classes, dtype=log_p.dtype)
    if label_smoothing:
        target = (1.0 - label_smoothing) * target + label_smoothing / num_classes
    per_example = -jnp.sum(target * log_p, axis=-1)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return per_example, {"accuracy": accuracy}
