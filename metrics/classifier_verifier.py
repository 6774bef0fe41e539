"""The `classifier` verifier of noise search (arXiv 2501.09732): the log-probability of the
requested class under an image classifier of another run (the `classifier` family,
`experiments/classifier/mnist_cnn.py`), `frozen.verifier.workdir` (or `--verifier-run`).

Samples arrive as float images `[B, H, W, C]` (what the generators produce, about
[-1, 1]) and are clipped to [-1, 1], the classifier's input range. The score of a sample
whose condition is a class label `c` is `log p(c | x)`; for unconditional samples (`cond`
None) and for a label that is not one of the classifier's classes (e.g. the null label of
guidance) it is `max_c log p(c | x)`, the log-probability of the most likely class.
"""

import jax
import jax.numpy as jnp

from core.errors import UserError
from metrics.verifiers import Verifier, VerifierContext

NAME = "verifier"  # the frozen network's name: frozen.verifier.workdir (--verifier-run)


def _missing() -> UserError:
    return UserError(
        "the classifier verifier scores with a classifier of another run: set "
        "frozen.verifier.workdir (or --verifier-run) to a run of the classifier family "
        "(experiments/classifier/mnist_cnn.py)"
    )


def class_log_prob(logits: jax.Array, cond: jax.Array | None) -> jax.Array:
    """`log_softmax(logits)[cond]` per row `[B]`; the largest log-probability where `cond`
    is None or not a class index."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    best = jnp.max(log_p, axis=-1)
    if cond is None:
        return best
    if cond.ndim != 1 or not jnp.issubdtype(cond.dtype, jnp.integer):
        raise UserError(
            "the classifier verifier scores class labels [B] (int), not condition embeddings "
            f"of shape {list(cond.shape)} ({cond.dtype})"
        )
    k = log_p.shape[-1]
    valid = (cond >= 0) & (cond < k)
    picked = jnp.take_along_axis(log_p, jnp.clip(cond, 0, k - 1)[:, None], axis=-1)[:, 0]
    return jnp.where(valid, picked, best)


def classifier(context: VerifierContext) -> Verifier:
    from flax import nnx

    from models.classifier import Classifier

    frozen = context.frozen
    if frozen is None or NAME not in getattr(frozen, "graphdefs", {}):
        raise _missing()
    graphdef, params = frozen.graphdefs[NAME], frozen.params[NAME]
    if not isinstance(nnx.merge(graphdef, params), Classifier):
        raise UserError(
            f"frozen.{NAME}.workdir names a run whose network is not a classifier: name a run "
            "of the classifier family (experiments/classifier/mnist_cnn.py)"
        )

    def fn(params, x, cond, noise):
        del noise
        net = nnx.merge(graphdef, params)
        logits = net(jnp.clip(x.astype(jnp.float32), -1.0, 1.0))
        return class_log_prob(logits, cond)

    return Verifier("classifier", fn, params, nfe=1)


def classify_samples(workdir: str, x, labels, *, batch_size: int = 500) -> dict:
    """A classifier run's verdict on samples `x` (float images in [-1, 1] or uint8) drawn
    for `labels`: the fraction classified as their label (`accuracy`) and the mean
    log-probability of the label (`mean_log_p`), with the run's EMA weights."""
    import numpy as np
    from flax import nnx

    from core import runs, sharding

    x, labels = np.asarray(x), np.asarray(labels)
    if labels.shape != (len(x),):
        raise UserError(f"{len(x)} samples need one label each, got labels of shape {labels.shape}")
    experiment, spec = runs.load_run(workdir)
    if tuple(x.shape[1:]) != tuple(spec["example_shape"]):
        raise UserError(
            f"the classifier {workdir} takes examples of shape {tuple(spec['example_shape'])}; "
            f"the samples are {x.dtype} of shape {x.shape}"
        )
    graphdef, params, step = runs.restore_network(workdir, experiment, sharding.make_mesh())
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 127.5 - 1.0

    @jax.jit
    def verdict(params, x, y):
        logits = nnx.merge(graphdef, params)(jnp.clip(x, -1.0, 1.0))
        return jnp.argmax(logits, axis=-1) == y, class_log_prob(logits, y)

    hits, log_p = [], []
    for i in range(0, len(x), batch_size):
        h, lp = verdict(
            params, jnp.asarray(x[i : i + batch_size]), jnp.asarray(labels[i : i + batch_size])
        )
        hits.append(np.asarray(h))
        log_p.append(np.asarray(lp))
    hits, log_p = np.concatenate(hits), np.concatenate(log_p)
    return {"accuracy": float(hits.mean()), "mean_log_p": float(log_p.mean()),
            "num": int(len(hits)), "classifier": workdir, "classifier_step": int(step)}  # fmt: skip
