"""Metrics of samples, `fn(ev: Evaluator) -> dict of numbers`: FID, KID, precision /
recall, Inception Score (Inception features, `metrics.fid`), memorization
(`metrics.memorization`), the score-Jacobian's effective dimension (`metrics.effective_dim`,
with the run's network) and the sliced Wasserstein distance (`metrics.two_sample`)."""

from __future__ import annotations

import concurrent.futures
import time
from typing import TYPE_CHECKING

import numpy as np

from core.errors import UserError
from metrics import effective_dim as ed
from metrics import fid as fm
from metrics import memorization as mem

if TYPE_CHECKING:
    from core.evaluation.evaluator import Evaluator


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


def memorization_spaces(ev: Evaluator) -> list[str]:
    """The spaces of `--metrics memorization`: those asked for, else pixel and Inception
    space, but pixel only on a CPU while the training set's Inception features are not
    cached (their first pass takes hours there), said on stderr with the cost."""
    import sys

    import jax

    from core.evaluation.evaluator import CPU_INCEPTION_SECONDS_PER_IMAGE
    from data.arrays import is_image_shape

    o = ev.options
    if o.mem_spaces is not None:
        return mem.split_names(o.mem_spaces)
    if not is_image_shape(np.shape(ev.samples)):
        return ["pixel"]  # Inception features need images
    dataset = ev._need_dataset("memorization (the training set)")
    if jax.default_backend() != "cpu" or dataset.has_features(ev.inception_precision):
        return ["pixel", "inception"]
    n = len(dataset.images)
    hours = n * CPU_INCEPTION_SECONDS_PER_IMAGE / 3600
    if jax.process_index() == 0:
        print(
            f"memorization: pixel space only on a CPU; Inception space first needs features of "
            f"the {n:,} training images (about {hours:.1f} h at the 0.16 s per image measured "
            "on 2 CPU cores, then cached): --mem-space pixel,inception to add it",
            file=sys.stderr,
        )
    return ["pixel"]


def _memorization(ev: Evaluator) -> dict:
    o, out = ev.options, {}
    ev._need_samples("memorization metrics")
    train = ev._need_dataset("memorization (the training set)").images
    for space in memorization_spaces(ev):
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
    network = ev._need_network("effdim")
    experiment = network.experiment
    ev._need_samples("effdim")
    o, n = ev.options, ev.options.effdim_num
    conditional = experiment.conditioning.labels and ev.labels is not None
    conds = ev.labels[:n] if conditional else None
    score, samples = experiment.method.score_view(network.module()), ev.samples[:n]
    if o.effdim_sigmas:
        return ed.evaluate_across(
            score, samples, conds=conds, sigmas=o.effdim_sigmas, chunk=o.effdim_chunk,
            plot_path=f"{o.plot_prefix}_effdim_sigmas.png" if o.plot_prefix else None,
        )  # fmt: skip
    return ed.evaluate(
        score,
        samples,
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


# this module's part of `core.evaluation.METRICS`
SAMPLE_METRICS = {
    "fid": _fid,
    "kid": _kid,
    "pr": _pr,
    "is": _is,
    "memorization": _memorization,
    "effdim": _effdim,
    "swd": _swd,
}
