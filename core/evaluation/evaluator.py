"""The evaluator: samples, the run's network and the reference data of an evaluation, and
each input the metrics need, computed once and lazily (the Inception network, sample
features, reference features and statistics, the held-out split).

Reference data and its cached features / statistics: `core.reference`.
"""

import dataclasses
import functools
import time
from typing import Any

import numpy as np

from core import plots
from core.errors import UserError, lookup
from core.experiment import Experiment
from core.reference import Dataset
from metrics import fid as fm


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
    cfg_scale: float | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: params are arrays, not comparable
class RunNetwork:
    """A run's network: `graphdef` and `params` (`nnx.split`, `nnx.merge(graphdef, params)`
    is the module) and the run's `experiment`."""

    graphdef: Any  # flax.nnx.GraphDef (flax is imported where it is used)
    params: Any  # a pure dict of arrays
    experiment: Experiment

    def module(self):
        from flax import nnx

        return nnx.merge(self.graphdef, self.params)


class Evaluator:
    """Samples and where their reference numbers come from; computes each input once.

    `samples` are uint8 images `[N, H, W, C]`, float images in [-1, 1] or float arrays
    (None when only `HELDOUT_METRICS` are asked for); `dataset` is the reference / training
    data; `ref_stats` a pytorch-fid stats file (for FID); `network` the run's `RunNetwork`
    for `effdim`, `nll`, `geo`;
    `inception` the FID network (default: `load_inception(precision=
    options.inception_precision)`, loaded once per process)."""

    def __init__(
        self,
        samples: np.ndarray | None,
        *,
        labels: np.ndarray | None = None,
        dataset: Dataset | None = None,
        ref_stats: str | None = None,
        network: RunNetwork | None = None,
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
        from core.evaluation import METRICS  # the registry imports this module

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

    def _need_network(self, what: str) -> RunNetwork:
        if self.network is None:
            raise UserError(f"{what} needs the run's network: give --workdir")
        return self.network

    @functools.cached_property
    def heldout(self) -> dict:
        """All examples of the run's `options.heldout_split` (`x` and, if any, `cond`)."""
        experiment = self._need_network("a held-out metric").experiment
        source = experiment.data.source(self.options.heldout_split)
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
