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

INCEPTION_METRICS = ("fid", "kid", "pr", "is")  # and memorization's inception space


def needs_images(names: list[str], what: str) -> str:
    """The message for metrics `names` asked of data (`what`) that is not images."""
    verb = "needs" if len(names) == 1 else "need"
    return (
        f"{', '.join(names)} {verb} images [N, H, W, 1 or 3] (Inception features); the "
        f"{what} are not images (for low-dimensional data use swd)"
    )


# seconds per image of a float32 Inception pass measured on a 2-core CPU (BENCHMARKS.md,
# "Inception batch on a CPU": 0.159-0.167 s): the cost the memorization default quotes
CPU_INCEPTION_SECONDS_PER_IMAGE = 0.16

# held-out examples of a per-example metric on a CPU when `Options.heldout_num` is None (a
# few minutes for the quickstart's ODE NLL with its check pass); elsewhere all of them
CPU_HELDOUT_NUM = 2_048


@dataclasses.dataclass
class Options:
    """Settings of the metrics (the CLI's flags)."""

    fid_method: str = "eigh"  # or "sqrtm": pytorch-fid's exact steps (metrics.fid)
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    # "pixel", "inception" or both; None: both, but pixel only on a CPU when the training
    # set's Inception features are not cached yet (`memorization_spaces`)
    mem_spaces: str | None = None
    delta_m: float | dict | None = None  # one distance, or {space: distance}
    delta_s: float | dict | None = None
    ratio_k: int = 2
    ratio_threshold: float = 1 / 3
    effdim_num: int = 16
    effdim_sigma: float = 1e-2
    # several noise levels at once (the same samples at each; replaces effdim_sigma)
    effdim_sigmas: tuple[float, ...] | None = None
    effdim_chunk: int | None = None
    swd_projections: int = 256
    inception_batch: int | None = None  # metrics.fid.default_batch()
    plot_prefix: str | None = None
    # metrics of the run's network on held-out data (nll, bpd, geo, accuracy)
    heldout_split: str = "test"
    # how many examples of the split they use (a seeded random subset); None: all on an
    # accelerator, `CPU_HELDOUT_NUM` on a CPU; 0: all
    heldout_num: int | None = None
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
        self._names: list[str] = []  # the metrics being run, for messages
        # once the held-out split is read: {"heldout_count": used, "heldout_total": in split}
        self.heldout_info: dict = {}

    def run(self, names: list[str]) -> dict:
        """The metrics `names` (keys of METRICS) as one flat dict of numbers."""
        from core.evaluation import METRICS  # the registry imports this module

        fns = [lookup(METRICS, n, "metric") for n in names]
        self._want_logits = "is" in names
        self._names = list(names)
        out = {}
        for fn in fns:
            out.update(fn(self))
        return out

    # --- inputs, computed once ----------------------------------------------------------

    @functools.cached_property
    def images(self) -> np.ndarray:
        """The samples as uint8 images `[N, H, W, C]`."""
        x = self._need_samples("Inception metrics")
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            asked = [n for n in self._names if n in (*INCEPTION_METRICS, "memorization")]
            raise UserError(
                needs_images(asked or ["Inception metrics"], f"samples ({x.dtype} {x.shape})")
            )
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
        """The examples of the run's `options.heldout_split` (`x` and, if any, `cond`) that
        per-example metrics use: all, or `heldout_num` of them (a random subset drawn from
        the options' seed, in the split's order; on a CPU `CPU_HELDOUT_NUM` by default),
        said on stderr when not all."""
        import sys

        import jax

        experiment = self._need_network("a held-out metric").experiment
        split = self.options.heldout_split
        source = experiment.data.source(split)
        total, num = source.num_examples, self.options.heldout_num
        if num is None:
            num = CPU_HELDOUT_NUM if jax.default_backend() == "cpu" else 0
        if num < 0:
            raise UserError(f"the number of held-out examples must be >= 0 (0: all), got {num}")
        if not total:
            raise UserError(f"the split {split!r} of {experiment.data.name} holds no examples")
        rows = np.arange(total)
        if 0 < num < total:
            rows = np.sort(np.random.default_rng(self.options.seed).choice(total, num, False))
            if jax.process_index() == 0:
                what = ", ".join(n for n in self._names if n in _heldout_names()) or "held-out"
                print(f"{what}: {num:,} of {total:,} {split} examples (--heldout-num to change)",
                      file=sys.stderr)  # fmt: skip
        self.heldout_info = {"heldout_count": len(rows), "heldout_total": total}
        return source.__getitems__(rows)

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


def _heldout_names() -> tuple[str, ...]:
    from core.evaluation import HELDOUT_METRICS  # the registry imports this module

    return HELDOUT_METRICS
