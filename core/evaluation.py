"""Evaluation of samples: reference data and cached statistics, the metric registry, and
the in-training evaluation hook.

`Evaluator(samples, ...)` computes what the requested metrics need once and lazily (the
Inception network, sample features, reference features and statistics); a metric is an
entry of `METRICS`, `fn(ev) -> dict of numbers` (adding one is one function and one entry).
Reference data and its cached features / statistics: `core.reference`.
"""

import concurrent.futures
import dataclasses
import functools
import inspect
import time

import numpy as np
from ml_collections import ConfigDict

from core import experiment, plots
from core.errors import UserError, lookup
from core.reference import Dataset, dataset_from_config
from metrics import effective_dim as ed
from metrics import fid as fm
from metrics import memorization as mem

SCORE_KINDS = {"flow_matching": "velocity"}  # loss name -> what its network outputs


@dataclasses.dataclass
class Options:
    """Settings of the metrics (the CLI's flags)."""

    fid_method: str = "eigh"  # or "sqrtm": pytorch-fid's exact steps (metrics.fid)
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    mem_spaces: str = "pixel,inception"
    delta_m: float | dict | None = None  # one distance, or {space: distance}
    delta_s: float | dict | None = None
    ratio_k: int = 2
    ratio_threshold: float = 1 / 3
    effdim_num: int = 16
    effdim_sigma: float = 1e-2
    effdim_chunk: int | None = None
    swd_projections: int = 256
    inception_batch: int | None = None  # metrics.fid.default_batch()
    plot_prefix: str | None = None
    # metrics of the run's network on held-out data (nll, geo)
    heldout_split: str = "test"
    nll_solver: str = "dopri5"  # adaptive (nll_tol) or "rk4" (nll_steps fixed steps)
    nll_tol: float = 1e-5  # rtol = atol of an adaptive solver
    nll_steps: int = 100
    nll_divergence: str = "auto"  # exact up to 16 dimensions, else hutchinson
    nll_probes: int = 1
    # also integrate finer (a tenth of the tolerance, twice the steps) and report how much
    # each point's log-likelihood moved (`nll_fine_change`): the error of the reported NLL
    nll_check: bool = True
    batch: int = 256
    # the FID network's convolutions: "highest" (full float32), "default" (the backend's),
    # "tf32" (operands rounded to TF32 on any backend: core.precision) or "tf32x3" (float32
    # accuracy from three TF32 products: models.inception.PRECISIONS)
    inception_precision: str = "highest"
    sampler: str | None = None
    sample_steps: int | None = None
    cfg: float | None = None
    seed: int = 0


class Evaluator:
    """Samples and where their reference numbers come from; computes each input once.

    `samples` are uint8 images `[N, H, W, C]`, float images in [-1, 1] or float arrays
    (None when only `HELDOUT_METRICS` are asked for); `dataset` is the reference / training
    data; `ref_stats` a pytorch-fid stats file (for FID); `network` `(graphdef, params,
    config)` of the run (for `effdim`, `nll`, `geo`); `inception` the FID network
    (default: `load_inception(precision=options.inception_precision)`, loaded once per
    process)."""

    def __init__(
        self,
        samples: np.ndarray | None,
        *,
        labels: np.ndarray | None = None,
        dataset: Dataset | None = None,
        ref_stats: str | None = None,
        network: tuple | None = None,
        options: Options | None = None,
        inception=None,
    ):
        self.samples = None if samples is None else np.asarray(samples)
        self.labels = labels
        self.dataset, self.ref_stats_path, self.network = dataset, ref_stats, network
        self.options = options or Options()
        self._inception, self._want_logits = inception, False
        self.inception_seconds = None  # the samples' Inception pass, once it has run

    def run(self, names: list[str]) -> dict:
        """The metrics `names` (keys of METRICS) as one flat dict of numbers."""
        fns = [lookup(METRICS, n, "metric") for n in names]
        self._want_logits = "is" in names
        out = {}
        for fn in fns:
            out.update(fn(self))
        return out

    # --- inputs, computed once ----------------------------------------------------------

    @functools.cached_property
    def images(self) -> np.ndarray:
        """The samples as uint8 images `[N, H, W, C]`."""
        x = self._need_samples("Inception metrics")
        if x.ndim != 4:
            raise UserError(f"Inception metrics need images [N, H, W, C], got shape {x.shape}")
        return x if x.dtype == np.uint8 else plots.to_uint8(x)

    def features(self, images: np.ndarray, with_logits: bool = False, on_batch=None):
        """Inception features (and logits) of uint8 `images` with this evaluator's net;
        `on_batch` as `metrics.fid.inception_features`'s."""
        return fm.inception_features(
            images,
            self._inception,
            batch_size=self.options.inception_batch,
            with_logits=with_logits,
            precision=self.options.inception_precision,
            on_batch=on_batch,
        )

    @functools.cached_property
    def _sample_inception(self) -> tuple:
        """`(features, logits or None, fm.RunningStats)` of the samples: the FID
        statistics' sums accumulate on the host while the device runs the next batch."""
        start = time.perf_counter()
        running = fm.RunningStats()
        out = self.features(self.images, with_logits=self._want_logits, on_batch=running.update)
        # the samples' Inception pass (compilation, transfers and the statistics' sums
        # included), for timings
        self.inception_seconds = time.perf_counter() - start
        feats, logits = out if self._want_logits else (out, None)
        return feats, logits, running

    @property
    def sample_features(self) -> np.ndarray:
        return self._sample_inception[0]

    @functools.cached_property
    def sample_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """FID `(mu, sigma)` of the samples' features (float64, as `metrics.fid.stats`)."""
        return self._sample_inception[2].result()

    @property
    def sample_logits(self) -> np.ndarray:
        if self._sample_inception[1] is None:
            self.__dict__.pop("_sample_inception")
            self._want_logits = True
        return self._sample_inception[1]

    def _need_samples(self, what: str) -> np.ndarray:
        if self.samples is None:
            raise UserError(f"{what} need samples: give --workdir or --samples")
        return self.samples

    def _need_network(self, what: str) -> tuple:
        if self.network is None:
            raise UserError(f"{what} needs the run's network: give --workdir")
        return self.network

    @functools.cached_property
    def heldout(self) -> dict:
        """All examples of the run's `options.heldout_split` (`x` and, if any, `cond`)."""
        config = self._need_network("a held-out metric")[2]
        source = experiment.build_source(config, self.options.heldout_split)
        return source.__getitems__(np.arange(source.num_examples))

    def _need_dataset(self, what: str) -> Dataset:
        if self.dataset is None:
            raise UserError(f"{what} needs a dataset: give --dataset (or --workdir)")
        return self.dataset

    @property
    def reference_features(self) -> np.ndarray:
        """Inception features `[M, 2048]` of the reference dataset (cached on disk)."""
        dataset = self._need_dataset("Inception reference features")
        return dataset.features(self.features, self.inception_precision)

    @functools.cached_property
    def reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """FID `(mu, sigma)`: the `ref_stats` file, else the dataset's (cached on disk)."""
        if self.ref_stats_path:
            return fm.load_stats(self.ref_stats_path)
        if self.dataset is None:
            raise UserError("FID needs a reference: give --dataset, --ref-stats or --workdir")
        return self.dataset.stats(self.features, self.inception_precision)

    @property
    def inception_precision(self) -> str:
        """The FID network's convolution precision: the given `inception`'s, else the
        options'."""
        if self._inception is not None:
            return self._inception.precision
        return self.options.inception_precision


# --- the metrics --------------------------------------------------------------------------


def _fid(ev: Evaluator) -> dict:
    ref = ev.reference_stats  # first: a missing reference fails before any Inception pass
    method = ev.options.fid_method
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # the reference's root (an eigendecomposition in LAPACK, which releases the GIL)
        # while the samples' Inception pass runs, unless that pass is already done
        root = None
        if method == "eigh" and "_sample_inception" not in ev.__dict__:
            root = pool.submit(fm.psd_sqrt, ref[1])
        _ = ev.sample_features  # the pass, its statistics summed as it runs
        start = time.perf_counter()  # the host's part after the pass
        stats = ev.sample_stats
        mid = time.perf_counter()
        sqrt_ref = None if root is None else root.result()
        fid = fm.fid_from_stats(*stats, *ref, method=method, sqrt_sigma2=sqrt_ref)
        end = time.perf_counter()
    # where an FID's time goes: the Inception pass (the statistics' sums hidden in it), what
    # is left of the statistics, the distance (fid_seconds: the last two together)
    return {"fid": fid, "fid_method": method, "fid_seconds": end - start,
            "fid_stats_seconds": mid - start, "fid_distance_seconds": end - mid,
            "inception_seconds": ev.inception_seconds}  # fmt: skip


def _kid(ev: Evaluator) -> dict:
    o = ev.options
    value = fm.kid(
        ev.sample_features,
        ev.reference_features,
        num_subsets=o.kid_subsets,
        max_subset_size=o.kid_subset_size,
    )
    return {"kid": value}


def _pr(ev: Evaluator) -> dict:
    p, r = fm.precision_recall(ev.reference_features, ev.sample_features, k=ev.options.pr_k)
    return {"precision": p, "recall": r}


def _is(ev: Evaluator) -> dict:
    mean, std = fm.inception_score(ev.sample_logits)
    return {"is": mean, "is_std": std}


def _memorization(ev: Evaluator) -> dict:
    o, out = ev.options, {}
    ev._need_samples("memorization metrics")
    train = ev._need_dataset("memorization (the training set)").images
    for space in mem.split_names(o.mem_spaces):
        if space == "pixel":  # training images become vectors chunk by chunk
            q, ref, prep = mem.pixel_vectors(ev.samples), train, mem.pixel_vectors
        else:
            q, prep = mem.feature_vectors(ev.sample_features), None
            ref = mem.feature_vectors(ev.reference_features)
        if space == "pixel" and ev.samples.shape[1:] != train.shape[1:]:
            raise UserError(f"samples {ev.samples.shape} and training data {train.shape} differ")
        out.update(
            mem.memorization_report(
                q,
                ref,
                space=space,
                train_transform=prep,
                delta_m=o.delta_m.get(space) if isinstance(o.delta_m, dict) else o.delta_m,
                delta_s=o.delta_s.get(space) if isinstance(o.delta_s, dict) else o.delta_s,
                ratio_k=o.ratio_k,
                ratio_threshold=o.ratio_threshold,
                progress=True,
            )
        )
    return out


def _effdim(ev: Evaluator) -> dict:
    from flax import nnx

    graphdef, params, config = ev._need_network("effdim")
    ev._need_samples("effdim")
    o, n = ev.options, ev.options.effdim_num
    conditional = experiment.null_cond(config) is not None and ev.labels is not None
    conds = ev.labels[:n] if conditional else None
    return ed.evaluate(
        ed.score_view(nnx.merge(graphdef, params), lookup(SCORE_KINDS, config.loss.name, "loss")),
        ev.samples[:n],
        conds=conds,
        sigma=o.effdim_sigma,
        chunk=o.effdim_chunk,
        plot_path=f"{o.plot_prefix}_effdim.png" if o.plot_prefix else None,
    )


def _swd(ev: Evaluator) -> dict:
    """Sliced 2-Wasserstein distance of the samples to the reference data (vectors; images
    on the [-1, 1] scale): the distribution metric for low-dimensional data."""
    from metrics.two_sample import sliced_wasserstein

    as_float = lambda a: a.astype(np.float32) / 127.5 - 1.0 if a.dtype == np.uint8 else a
    x = as_float(ev._need_samples("swd"))
    ref = as_float(ev._need_dataset("swd (the reference data)").images)
    if x.shape[1:] != ref.shape[1:]:
        raise UserError(f"samples {x.shape} and reference data {ref.shape} differ in shape")
    o = ev.options
    return {"swd": sliced_wasserstein(x, ref, num_projections=o.swd_projections, seed=o.seed)}


# --- metrics of the network on held-out data ------------------------------------------

LIKELIHOOD_MANIFOLDS = {"flow_matching": "euclidean", "sphere_fm": "sphere"}


def _nll(ev: Evaluator) -> dict:
    """Mean negative log-likelihood of the held-out split: in nats through the ODE
    (`metrics.likelihood`; exact divergence up to 16 dimensions, else Hutchinson) for
    flow-matching models, plus bits/dim for 8-bit images (uniformly dequantized, so an
    upper bound on the discrete bits/dim); bits/dim directly for normalizing flows."""
    import jax
    from flax import nnx

    from metrics import likelihood

    graphdef, params, config = ev._need_network("nll")
    o, data = ev.options, ev.heldout
    net = nnx.merge(graphdef, params)
    key = jax.random.key(o.seed)
    cond = data.get("cond") if "cond" in data and _conditional(config) else None
    if config.loss.name == "flow_nll":
        from metrics.bpd import dataset_bpd

        n, b = len(data["x"]), o.batch
        batches = ({k: v[i : i + b] for k, v in data.items()} for i in range(0, n, b))
        from losses.flow_nll import COMPARABLE, loss_flow_nll

        defaults = {k: p.default for k, p in inspect.signature(loss_flow_nll).parameters.items()}
        noise = config.loss.get("noise", defaults["noise"])  # the run's own noise
        std = config.loss.get("noise_std", defaults["noise_std"])
        if noise == "none" and np.ndim(data["x"]) == 4:  # 8-bit images
            raise UserError("bpd of a flow trained with noise='none' on 8-bit images is "
                            "meaningless (a density on 256 levels is unbounded); train with "
                            "loss.noise=uniform")  # fmt: skip
        bpd = dataset_bpd(net, batches, key=key, noise=noise, noise_std=std,
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
    from flax import nnx

    from metrics import likelihood

    graphdef, params, config = ev._need_network("nll")
    o, data = ev.options, ev.heldout
    manifold = lookup(LIKELIHOOD_MANIFOLDS, config.loss.name, "loss with an ODE likelihood")
    cond = data.get("cond") if "cond" in data and _conditional(config) else None
    x = np.asarray(data["x"], np.float32)
    dim = int(np.prod(x.shape[1:]))
    images = x.ndim == 4
    if images:  # dequantize: u + U[0, 1) on the [-1, 1] scale of u / 127.5 - 1
        x = x + np.random.default_rng(o.seed).uniform(0.0, 1.0 / 127.5, x.shape).astype(x.dtype)
    divergence = o.nll_divergence
    if divergence == "auto":
        divergence = "exact" if dim <= 16 else "hutchinson"
    log_lik = functools.partial(
        likelihood.log_likelihood_batched, nnx.merge(graphdef, params), x,
        batch_size=min(o.batch, len(x)), cond=cond, manifold=manifold, divergence=divergence,
        num_probes=o.nll_probes, key=jax.random.key(o.seed), with_stats=True,
    )  # fmt: skip
    return log_lik, {"divergence": divergence, "count": len(x), "images": images, "dim": dim}


def _conditional(config: ConfigDict) -> bool:
    return experiment.null_cond(config) is not None or int(config.model.get("cond_dim", 0)) > 0


def _geo(ev: Evaluator) -> dict:
    """Geolocation: one sample per held-out condition, against the true place
    (`metrics.geo`: great-circle error, accuracy within 1 / 25 / 200 / 750 / 2500 km,
    GeoScore), with a world map of the predictions."""
    import jax

    from core import sampling, sharding
    from metrics import geo

    graphdef, params, config = ev._need_network("geo")
    data = ev.heldout
    if "cond" not in data or tuple(data["x"].shape[1:]) != (3,) or not _conditional(config):
        raise UserError("geo needs a conditional model of places on S^2 (e.g. earth_geoloc)")
    o, mesh = ev.options, sharding.make_mesh()
    batch = sharding.sample_batch(mesh, o.batch, len(data["x"]))
    spec = {"example_shape": [3], "num_classes": 0}
    pred, _ = sampling.generate(
        graphdef, params, config, spec, mesh, num=len(data["x"]), batch_size=batch,
        seed=o.seed, sampler=o.sampler, num_steps=o.sample_steps, cfg_scale=o.cfg,
        conds=data["cond"],
    )  # fmt: skip
    out = {f"geo/{k}": v for k, v in geo.geo_metrics(pred, data["x"]).items()}
    out["geo/split"], out["geo/count"] = o.heldout_split, len(pred)
    if o.plot_prefix and jax.process_index() == 0:
        title = f"predictions on {config.data.name}:{o.heldout_split}"
        out["geo/plot"] = geo.plot_world_samples(
            f"{o.plot_prefix}_geo.png", pred, reference=data["x"], title=title
        )
    return out


METRICS = {
    "fid": _fid,
    "kid": _kid,
    "pr": _pr,
    "is": _is,
    "memorization": _memorization,
    "effdim": _effdim,
    "swd": _swd,
    "nll": _nll,
    "bpd": _nll,  # the same numbers: bits/dim is there for images and flows
    "geo": _geo,
}
HELDOUT_METRICS = ("nll", "bpd", "geo")  # need the run's network and data, not samples


# --- sampling a run, and evaluation during training --------------------------------------


def make_eval_hook(
    config: ConfigDict,
    workdir: str,
    *,
    writer=None,
    mesh=None,
    source=None,
    graphdef=None,
    spec: dict | None = None,
):
    """`hook(step, state)` for `core.trainer.train`: every `config.eval_every` steps (0 =
    never) draw `config.eval.num_samples` samples with the EMA weights and write cheap
    memorization numbers (`metrics.memorization.cheap_report` against at most
    `config.eval.max_train` training examples) and, with `config.eval.fid`, FID of
    `config.eval.num_fid` samples against the training split (statistics cached) to
    `writer` (the run's MetricWriter), under `eval/`. Objects the trainer already has
    (mesh, data source, graphdef, data spec) can be passed in; otherwise they are built."""
    import jax

    from core import sharding
    from core.sampling import Generator
    from core.writer import MetricWriter

    every = int(config.get("eval_every", 0) or 0)
    if every <= 0:
        return lambda step, state: None
    e = config.eval
    mesh = mesh or sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    source = source or experiment.build_source(config)
    spec = spec or experiment.data_spec(source)
    if graphdef is None:
        graphdef, _ = experiment.abstract_network(experiment.network_factory(config))
    if e.fid and len(spec["example_shape"]) != 3:
        raise UserError("config.eval.fid needs image data; set config.eval.fid=False")
    num = max(e.num_samples, e.num_fid if e.fid else 0)
    batch = sharding.sample_batch(mesh, e.batch_size, num)
    sampler = Generator(graphdef, config, spec, mesh, num=num, batch_size=batch)
    key = jax.random.fold_in(jax.random.key(config.seed), 2**30 + 1)  # fixed eval noise
    rows = mem.subsample(np.arange(source.num_examples), e.max_train, config.seed)
    train = source.__getitems__(rows)["x"]  # float32, images in [-1, 1]
    ds = dataset_from_config(config, e.get("ref_split"))
    writer = writer or MetricWriter(workdir, enabled=jax.process_index() == 0)

    def hook(step: int, state) -> None:
        if step % every:
            return
        x, _ = sampler(state.ema, key)
        if jax.process_index() != 0:
            return
        out = mem.cheap_report(x[: e.num_samples], train, max_train=e.max_train)
        if e.fid:
            ev = Evaluator(plots.to_uint8(x[: e.num_fid]), dataset=ds)
            fid = ev.run(["fid"])  # fid and fid_seconds as scalars; the method is the default
            out.update({k: v for k, v in fid.items() if isinstance(v, float | int)})
        writer.write(step, {f"eval/{k}": v for k, v in out.items()})

    return hook
