"""Metrics of the run's network on held-out data, `fn(ev: Evaluator) -> dict of numbers`:
the negative log-likelihood (`nll`, and bits/dim: `bpd`; the exact ODE likelihood of
`metrics.likelihood` for flow-matching models, `metrics.bpd` for normalizing flows),
geolocation (`geo`, `metrics.geo`), a classifier's top-1 `accuracy`, and a VAE's
reconstructions (`recon`). GIVT's `nll` is the exact NLL of its latents and an ELBO bound on
the images' bits/dim (`_autoregressive_nll`). They need the run's network and a data split,
not samples."""

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
    if route == "autoregressive":
        return _autoregressive_nll(ev)
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
                          use_labels=cond is not None, progress="bpd", total=n)  # fmt: skip
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
        fine, _ = log_lik(**likelihood.finer(solve), progress="nll check (finer solve)")
        out["nll_fine"] = -float(np.mean(fine, dtype=np.float64))
        out["nll_fine_change"] = float(np.mean(np.abs(lp - fine), dtype=np.float64))
    if info["images"]:  # density of u in [0, 256)^D: p_u = p_x / 127.5^D
        dim = info["dim"]
        out["bpd"] = (nll + dim * np.log(127.5)) / (dim * np.log(2.0))
    return out


def _batched(fn, arrays: dict, batch: int) -> dict:
    """`fn(**chunk) -> dict of [b] arrays` over `arrays` in chunks of `batch` rows (the last
    padded by repeating its first row: one compiled program), concatenated on the host."""
    n = len(next(iter(arrays.values())))
    b = min(batch, n)
    outs = []
    for i in range(0, n, b):
        chunk = {k: v[i : i + b] for k, v in arrays.items()}
        pad = b - len(chunk["x"])
        chunk = {k: np.concatenate([v, np.repeat(v[:1], pad, 0)]) for k, v in chunk.items()}
        out = {k: np.asarray(v)[: b - pad] for k, v in fn(i, **chunk).items()}
        outs.append(out)
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def _autoregressive_nll(ev: Evaluator) -> dict:
    """GIVT: the exact NLL of the held-out split's latents in nats per dimension (`nll`,
    latents drawn from the VAE's posterior as in training; `losses.givt.heldout_terms`)
    and, through the frozen VAE, `bpd`: minus the ELBO of the uniformly dequantized 8-bit
    images with GIVT as the prior, in bits/dim, an upper bound on the data's bits/dim (a
    one-sample estimate per image, averaged)."""
    import jax
    from flax import nnx

    from core import runs, sharding
    from losses.givt import heldout_terms

    network = ev._need_network("nll")
    experiment, o, data = network.experiment, ev.options, ev.heldout
    frozen = runs.restore_frozen(experiment, sharding.make_mesh())
    vae = frozen.params.get("vae")
    conditional = experiment.conditioning.conditional
    cond = data.get("cond") if "cond" in data and conditional else None
    arrays = {"x": np.asarray(data["x"], np.float32)}
    if cond is not None:
        arrays["cond"] = np.asarray(cond)

    @jax.jit
    def terms(params, vae_params, key, x, cond=None):
        vae_net = None if vae_params is None else nnx.merge(frozen.graphdefs["vae"], vae_params)
        return heldout_terms(nnx.merge(network.graphdef, params), vae_net, x, cond, key)

    key = jax.random.key(o.seed)
    out = _batched(
        lambda i, **chunk: terms(network.params, vae, jax.random.fold_in(key, i), **chunk),
        arrays, o.batch,
    )  # fmt: skip
    options = experiment.network.options
    tokens, token_dim = options["tokens"], options["token_dim"]
    latent = float(np.mean(out["latent_nll"], dtype=np.float64))
    result = {
        "nll": latent / (tokens * token_dim), "nll_per_token": latent / tokens,
        "nll_split": o.heldout_split, "nll_count": len(arrays["x"]),
        "nll_of": "latents" if vae is not None else "sequences", "conditional": cond is not None,
    }  # fmt: skip
    if "elbo_nll" in out:
        dim = int(np.prod(arrays["x"].shape[1:]))
        elbo = float(np.mean(out["elbo_nll"], dtype=np.float64))
        result["bpd"] = (elbo / dim + np.log(127.5)) / np.log(2.0)
        result["bpd_bound"] = "ELBO (upper bound) of the uniformly dequantized 8-bit images"
    return result


def _recon(ev: Evaluator) -> dict:
    """A VAE's reconstructions of the held-out split from its posterior means: `recon_mse`
    (per pixel, [-1, 1] scale), `recon_kl_per_token` (nats) and, when the evaluation has a
    reference (the run's data, `--dataset`, `--ref-stats`), `recon_fid`, the FID of the
    reconstructions by the same evaluator as samples'."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from core.evaluation.evaluator import Evaluator
    from losses.vae import kl_to_standard_normal

    network = ev._need_network("recon")
    if network.experiment.method.protocol != "autoencoder":
        raise UserError(
            f"recon is a VAE's metric (a run of the vae family); this run is a "
            f"{network.experiment.method.name} model"
        )
    o, x = ev.options, np.asarray(ev.heldout["x"], np.float32)

    @jax.jit
    def reconstruct(params, x):
        vae = nnx.merge(network.graphdef, params)
        mean, logvar = vae.encode(x)
        x_hat = vae.decode(mean)
        kl = jnp.sum(kl_to_standard_normal(mean, logvar), axis=(1, 2)) / mean.shape[1]
        return {"x_hat": x_hat, "sq": jnp.mean((x_hat - x) ** 2, axis=(1, 2, 3)), "kl": kl}

    out = _batched(lambda i, x: reconstruct(network.params, x), {"x": x}, o.batch)
    result = {
        "recon_mse": float(np.mean(out["sq"], dtype=np.float64)),
        "recon_kl_per_token": float(np.mean(out["kl"], dtype=np.float64)),
        "recon_split": o.heldout_split, "recon_count": len(x),
    }  # fmt: skip
    if ev.dataset is not None or ev.ref_stats_path:
        recon = Evaluator(
            np.clip(out["x_hat"], -1.0, 1.0), dataset=ev.dataset, ref_stats=ev.ref_stats_path,
            options=o, inception=ev._inception,
        )  # fmt: skip
        result["recon_fid"] = recon.run(["fid"])["fid"]
    return result


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
        num_probes=o.nll_probes, key=jax.random.key(o.seed), with_stats=True, progress="nll",
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
    "recon": _recon,
}
