"""Metrics of the run's network on held-out data, `fn(ev: Evaluator) -> dict of numbers`:
the negative log-likelihood (`nll`, and bits/dim: `bpd`; the exact ODE likelihood of
`metrics.likelihood` for flow-matching models, `metrics.bpd` for normalizing flows),
geolocation (`geo`, `metrics.geo`) and a classifier's top-1 `accuracy`. They need the
run's network and a data split, not samples."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

import numpy as np

from core.errors import UserError

if TYPE_CHECKING:
    from core.evaluation.evaluator import Evaluator


def _nll(ev: Evaluator) -> dict:
    """Mean negative log-likelihood of the held-out split: in nats through the ODE
    (`metrics.likelihood`; exact divergence up to 16 dimensions, else Hutchinson) for
    flow-matching models, plus bits/dim for 8-bit images (uniformly dequantized, so an
    upper bound on the discrete bits/dim); bits/dim directly for normalizing flows."""
    import jax

    from metrics import likelihood

    network = ev._need_network("nll")
    experiment = network.experiment
    route = experiment.method.likelihood
    if route is None:
        raise UserError(f"a {experiment.method.name} model has no likelihood (nll / bpd)")
    o, data = ev.options, ev.heldout
    key = jax.random.key(o.seed)
    conditional = experiment.conditioning.conditional
    cond = data.get("cond") if "cond" in data and conditional else None
    if route == "flow":
        from metrics.bpd import dataset_bpd

        n, b = len(data["x"]), o.batch
        batches = ({k: v[i : i + b] for k, v in data.items()} for i in range(0, n, b))
        from losses.flow_nll import COMPARABLE, loss_flow_nll

        defaults = {k: p.default for k, p in inspect.signature(loss_flow_nll).parameters.items()}
        options = experiment.loss.options
        noise = options.get("noise", defaults["noise"])  # the run's own noise
        std = options.get("noise_std", defaults["noise_std"])
        if noise == "none" and np.ndim(data["x"]) == 4:  # 8-bit images
            raise UserError("bpd of a flow trained with noise='none' on 8-bit images is "
                            "meaningless (a density on 256 levels is unbounded); train with "
                            "loss.noise=uniform")  # fmt: skip
        bpd = dataset_bpd(network.module(), batches, key=key, noise=noise, noise_std=std,
                          use_labels=cond is not None)  # fmt: skip
        # what the number is: the density of the data with the training noise (uniform:
        # an upper bound on the 8-bit bits/dim, comparable with the published numbers;
        # gaussian: of the σ-blurred data, not comparable), of p(x | label) or p(x)
        return {"bpd": bpd, "nll_split": o.heldout_split, "noise": noise,
                "noise_std": float(std) if noise == "gaussian" else None,
                "conditional": cond is not None,
                "bpd_comparable": noise in COMPARABLE}  # fmt: skip
    log_lik, info = heldout_log_likelihood(ev)
    solve = likelihood.solver_options(o.nll_solver, num_steps=o.nll_steps, tol=o.nll_tol)
    lp, stats = log_lik(**solve)
    nll = -float(np.mean(lp, dtype=np.float64))
    out = {"nll": nll, "nll_split": o.heldout_split, "nll_solver": likelihood.describe(solve),
           "nll_mean_steps": float(np.mean(stats["steps"])),
           "nll_divergence": info["divergence"], "nll_count": info["count"]}  # fmt: skip
    if o.nll_check:
        # the finer solve's per-point change estimates the reported values' error; a mean
        # above a few hundredths of a nat says the solve is too coarse
        fine, _ = log_lik(**likelihood.finer(solve))
        out["nll_fine"] = -float(np.mean(fine, dtype=np.float64))
        out["nll_fine_change"] = float(np.mean(np.abs(lp - fine), dtype=np.float64))
    if info["images"]:  # density of u in [0, 256)^D: p_u = p_x / 127.5^D
        dim = info["dim"]
        out["bpd"] = (nll + dim * np.log(127.5)) / (dim * np.log(2.0))
    return out


def heldout_log_likelihood(ev: Evaluator) -> tuple:
    """The ODE log-likelihood of the run's held-out split as a function of the solver:
    `(log_lik(**solve) -> (log p [N], {"steps": [N]}), info)`, `solve` from
    `metrics.likelihood.solver_options`; `info`: divergence, count, images, dim. Images are
    uniformly dequantized with the evaluator's seed (every solve sees the same points)."""
    import jax

    from metrics import likelihood

    network = ev._need_network("nll")
    method = network.experiment.method
    if method.likelihood != "ode":
        raise UserError(f"a {method.name} model has no ODE likelihood")
    o, data = ev.options, ev.heldout
    conditional = network.experiment.conditioning.conditional
    cond = data.get("cond") if "cond" in data and conditional else None
    x = np.asarray(data["x"], np.float32)
    dim = int(np.prod(x.shape[1:]))
    images = x.ndim == 4
    if images:  # dequantize: u + U[0, 1) on the [-1, 1] scale of u / 127.5 - 1
        x = x + np.random.default_rng(o.seed).uniform(0.0, 1.0 / 127.5, x.shape).astype(x.dtype)
    divergence = o.nll_divergence
    if divergence == "auto":
        divergence = "exact" if dim <= 16 else "hutchinson"
    log_lik = functools.partial(
        likelihood.log_likelihood_batched, network.module(), x,
        batch_size=min(o.batch, len(x)), cond=cond, manifold=method.manifold,
        divergence=divergence,
        num_probes=o.nll_probes, key=jax.random.key(o.seed), with_stats=True,
    )  # fmt: skip
    return log_lik, {"divergence": divergence, "count": len(x), "images": images, "dim": dim}


def _geo(ev: Evaluator) -> dict:
    """Geolocation: one sample per held-out condition, against the true place
    (`metrics.geo`: great-circle error, accuracy within 1 / 25 / 200 / 750 / 2500 km,
    GeoScore), with a world map of the predictions."""
    import jax

    from core import sampling, sharding
    from metrics import geo

    network = ev._need_network("geo")
    o = ev.options
    experiment = network.experiment.with_sampling(
        sampler=o.sampler, num_steps=o.sample_steps, cfg_scale=o.cfg_scale
    )
    data = ev.heldout
    conditional = experiment.conditioning.conditional
    if "cond" not in data or tuple(data["x"].shape[1:]) != (3,) or not conditional:
        raise UserError("geo needs a conditional model of places on S^2 (e.g. earth_geoloc)")
    mesh = sharding.make_mesh()
    batch = sharding.sample_batch(mesh, o.batch, len(data["x"]))
    spec = {"example_shape": [3], "num_classes": 0}
    pred, _ = sampling.draw_samples(
        experiment, network.graphdef, network.params, spec, mesh, num=len(data["x"]),
        batch_size=batch, seed=o.seed, conds=data["cond"],
    )  # fmt: skip
    out = {f"geo/{k}": v for k, v in geo.geo_metrics(pred, data["x"]).items()}
    out["geo/split"], out["geo/count"] = o.heldout_split, len(pred)
    if o.plot_prefix and jax.process_index() == 0:
        title = f"predictions on {experiment.data.name}:{o.heldout_split}"
        out["geo/plot"] = geo.plot_world_samples(
            f"{o.plot_prefix}_geo.png", pred, reference=data["x"], title=title
        )
    return out


def _accuracy(ev: Evaluator) -> dict:
    """Top-1 accuracy of a classifier run (the `classifier` family) on the held-out split's
    labels, in batches of `options.batch` (the last one padded: one compiled program)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    network = ev._need_network("accuracy")
    method = network.experiment.method
    if method.protocol != "classifier":
        raise UserError(
            f"accuracy is a classifier's metric (a run of the classifier family); this run "
            f"is a {method.name} model"
        )
    data, o = ev.heldout, ev.options
    if "cond" not in data:
        raise UserError("accuracy needs labels: the run's data has none (data.use_labels)")
    x, labels = np.asarray(data["x"], np.float32), np.asarray(data["cond"])
    if not len(x):
        raise UserError(f"accuracy: the split {o.heldout_split!r} holds no examples")
    n, b = len(x), min(o.batch, len(x))
    predict = jax.jit(lambda p, x: jnp.argmax(nnx.merge(network.graphdef, p)(x), axis=-1))
    predicted = []
    for i in range(0, n, b):
        chunk = x[i : i + b]
        padded = np.concatenate([chunk, np.zeros((b - len(chunk), *x.shape[1:]), x.dtype)])
        predicted.append(np.asarray(predict(network.params, padded))[: len(chunk)])
    correct = int(np.sum(np.concatenate(predicted) == labels))
    return {"accuracy": correct / n, "accuracy_split": o.heldout_split, "accuracy_count": n}


# this module's part of `core.evaluation.METRICS`; its names are `HELDOUT_METRICS`
HELDOUT = {
    "nll": _nll,
    "bpd": _nll,  # the same numbers: bits/dim is there for images and flows
    "geo": _geo,
    "accuracy": _accuracy,
}
