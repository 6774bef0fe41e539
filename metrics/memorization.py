"""Memorization: exact nearest neighbours of generated samples in the training set.

Vectors. `pixel_vectors` flattens images (uint8, or float in [-1, 1]) to float32 and divides
by sqrt(D), so a Euclidean distance between two vectors is the RMS per-pixel difference on
the [-1, 1] scale (the normalisation of Gu et al. 2023's KNN distance; 2 is the largest
possible). `feature_vectors` scales Inception pool features to unit norm, so a distance is
the chord `sqrt(2 - 2 cos)` in [0, 2]. Every threshold below is on these normalised scales.

Tests.
- `ratio_test` (Carlini et al. 2023, "Extracting training data from diffusion models"; in
  the form of Gu et al. 2023 / Yoon et al. 2023): memorized when
  `d(x, NN1) / mean d(x, NN2..k) < 1/3`. Scale-free; k = 2 (the second neighbour) default.
- `classify`, the split of Pham et al. 2025 ("Memorization to Generalization: Emergence of
  Diffusion Models from Associative Memory", arXiv 2505.21777; their `run_classify.py`):
  memorized when the nearest *training* sample is within `delta_m`; spurious when not
  memorized but the nearest *other generated* sample is within `delta_s` (many samples
  fall into one emergent attractor that is no training image); generalized otherwise.
  They measure LPIPS with delta_m = 0.03, delta_s = 0.02 (near-identical images).

Default thresholds (`DELTAS`) mean "near-identical", measured on MNIST with `knn` here:
- pixel 0.07. Held-out digits (test[:2000] against all 60,000 training images) have
  nearest-training distances >= 0.059, 0.1 % quantile 0.070 (so about 0.1 % of fresh digits
  would count as memorized), 1 % 0.090, median 0.31; a training image's nearest other
  training image (train[:2000]) is >= 0.075 away. Copies with i.i.d. pixel noise of std
  0.05 (6 grey levels) sit at <= 0.042, copies at 90 % intensity at 0.062 (median), copies
  blurred by 0.5 px at 0.078 (median; not caught). The ratio test flags no held-out digit
  (ratios >= 0.59) and 97 % of the noise-0.05 copies.
- inception 0.1. On MNIST, FID features are very sensitive to pixel-level changes: the
  noise-0.02 copies move by 0.36 (median chord), 0.5 px blurs by 0.30, 90 % intensity by
  0.058, while 100 held-out digits are >= 0.26 from their 5 pixel-nearest training images.
  So 0.1 catches exact and intensity-shifted copies only; use pixel space (or the ratio
  test) for noisy copies of simple images.
Spurious uses the same "match" (delta_s = delta_m): two samples from one attractor are
near-identical to each other, while distinct held-out digits are >= 0.093 apart in pixel
space (test[:2000]), so independent samples of a generalizing model essentially never are.
"""

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from core.errors import UserError

DELTAS = {"pixel": (0.07, 0.07), "inception": (0.1, 0.1)}  # (delta_m, delta_s)
CATEGORIES = ("memorized", "spurious", "generalized")
MEMORIZED, SPURIOUS, GENERALIZED = range(3)


def pixel_vectors(x: np.ndarray) -> np.ndarray:
    """Images `[N, ...]` (uint8 in [0, 255], or float in [-1, 1]) -> float32 `[N, D]` on the
    [-1, 1] scale divided by sqrt(D): distances are RMS per-pixel differences."""
    x = np.asarray(x)
    flat = x.reshape(len(x), -1)
    flat = flat.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else flat
    return (flat / math.sqrt(flat.shape[1])).astype(np.float32)


def feature_vectors(features: np.ndarray) -> np.ndarray:
    """Features `[N, F]` -> unit-norm float32 `[N, F]` (distance = sqrt(2 - 2 cos))."""
    f = np.asarray(features, np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


# --- exact k nearest neighbours --------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k", "exclude_self"), donate_argnums=(0, 1))
def _merge(best_d2, best_i, q, r, q_start, r_start, r_valid, *, k: int, exclude_self: bool):
    """Running top-k of squared distances `[Q, k]` merged with one reference chunk `r [R, D]`
    (its first `r_valid` rows real). Ties keep the lower reference index (top_k is stable
    and the running best, from earlier chunks, comes first)."""
    dot = jnp.matmul(q, r.T, precision=jax.lax.Precision.HIGHEST)
    d2 = jnp.sum(q * q, 1)[:, None] - 2.0 * dot + jnp.sum(r * r, 1)[None, :]
    cols = jnp.arange(r.shape[0])
    bad = jnp.broadcast_to(cols[None, :] >= r_valid, d2.shape)
    if exclude_self:
        bad = bad | ((q_start + jnp.arange(q.shape[0]))[:, None] == (r_start + cols)[None, :])
    d2 = jnp.where(bad, jnp.inf, jnp.maximum(d2, 0.0))
    all_d = jnp.concatenate([best_d2, d2], axis=1)
    all_i = jnp.concatenate([best_i, jnp.broadcast_to(r_start + cols, d2.shape)], axis=1)
    neg, pos = jax.lax.top_k(-all_d, k)
    return -neg, jnp.take_along_axis(all_i, pos, axis=1)


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((n - len(x), x.shape[1]), x.dtype)]) if len(x) < n else x


def _refine(queries, reference, idx: np.ndarray, prep, chunk: int = 256):
    """Exact float64 distances to the chosen neighbours, re-sorted (stable) per row."""
    dists = np.empty(idx.shape, np.float64)
    for s in range(0, len(idx), chunk):
        rows = idx[s : s + chunk]
        q = np.asarray(queries[s : s + chunk], np.float64)[:, None, :]
        r = np.asarray(prep(reference[rows.ravel()]), np.float64).reshape(*rows.shape, -1)
        dists[s : s + chunk] = np.sqrt(np.sum((q - r) ** 2, axis=-1))
    order = np.argsort(dists, axis=1, kind="stable")
    return np.take_along_axis(dists, order, 1), np.take_along_axis(idx, order, 1)


def knn(
    queries: np.ndarray,
    reference: np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    query_chunk: int = 1024,
    ref_chunk: int = 8192,
    query_sharding=None,
    ref_sharding=None,
    refine: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours: `queries [Q, D]`, `reference [N, D]` (host arrays, e.g. a
    memmap larger than device memory) -> (distances `[Q, k]` ascending, indices `[Q, k]`).

    Squared distances `|q|^2 + |r|^2 - 2 q.r` on device, over query chunks x reference chunks
    streamed from the host, keeping a running top-k (`lax.top_k`); one compiled program per
    chunk shape (chunks are zero-padded). `refine` recomputes the chosen neighbours'
    distances exactly (float64, on the host): the expansion loses precision near 0 (copies).
    With `exclude_self`, `reference` is `queries` and each query skips its own row.
    `transform` maps rows of `reference` to vectors chunk by chunk (e.g. `pixel_vectors` of
    a uint8 image memmap, so the float copy never exists whole). Equal distances are
    ordered by reference index. `query_sharding` / `ref_sharding` place the chunks (e.g.
    queries split over a mesh); default: the default device."""
    queries = np.asarray(queries)
    prep = transform or (lambda a: np.asarray(a, np.float32))
    width = prep(reference[:1]).shape[1:] if len(reference) else ()
    if queries.ndim != 2 or width != queries.shape[1:]:
        raise UserError(
            f"knn needs vectors [Q, D] and [N, D], got {queries.shape} and "
            f"{(len(reference), *width)}"
        )
    available = len(reference) - int(exclude_self)
    if not 1 <= k <= available:
        raise UserError(f"knn: k={k} needs at least {k + int(exclude_self)} reference rows")
    qc, rc = min(query_chunk, len(queries)), min(ref_chunk, len(reference))
    put = lambda x, s: jax.device_put(x, s) if s is not None else jnp.asarray(x)
    q_chunks = [
        put(_pad_rows(np.asarray(queries[s : s + qc], np.float32), qc), query_sharding)
        for s in range(0, len(queries), qc)
    ]
    best = [(jnp.full((qc, k), jnp.inf), jnp.zeros((qc, k), jnp.int32)) for _ in q_chunks]
    starts = range(0, len(reference), rc)
    for r_start in tqdm(starts, desc="knn", disable=not progress or len(starts) < 4):
        part = np.asarray(prep(reference[r_start : r_start + rc]), np.float32)
        r = put(_pad_rows(part, rc), ref_sharding)
        for j, q in enumerate(q_chunks):
            best[j] = _merge(
                *best[j], q, r, j * qc, r_start, len(part), k=k, exclude_self=exclude_self
            )
    d2 = np.concatenate([np.asarray(b[0]) for b in best])[: len(queries)]
    idx = np.concatenate([np.asarray(b[1]) for b in best])[: len(queries)]
    if refine:
        return _refine(queries, reference, idx, prep)
    return np.sqrt(d2.astype(np.float64)), idx


# --- tests on the neighbour distances --------------------------------------------------


def ratio_test(dists: np.ndarray, threshold: float = 1 / 3) -> tuple[np.ndarray, np.ndarray]:
    """`dists [N, k >= 2]` ascending -> (ratio `d1 / mean(d2..dk)` [N], memorized
    `ratio < threshold` [N]). A sample equal to two identical training images has ratio 0."""
    d = np.asarray(dists, np.float64)
    if d.ndim != 2 or d.shape[1] < 2:
        raise UserError(f"ratio_test needs distances [N, k >= 2], got {d.shape}")
    rest = d[:, 1:].mean(axis=1)
    ratio = np.divide(d[:, 0], rest, out=np.zeros_like(rest), where=rest > 0)
    return ratio, ratio < threshold


def classify(d_train: np.ndarray, d_gen: np.ndarray, delta_m: float, delta_s: float) -> np.ndarray:
    """Pham et al.'s split from the nearest-training distance `d_train [N]` and the
    nearest-other-sample distance `d_gen [N]` -> int8 labels `[N]`: MEMORIZED
    (`d_train <= delta_m`), else SPURIOUS (`d_gen <= delta_s`), else GENERALIZED."""
    d_train, d_gen = np.asarray(d_train), np.asarray(d_gen)
    labels = np.full(d_train.shape, GENERALIZED, np.int8)
    labels[d_gen <= delta_s] = SPURIOUS
    labels[d_train <= delta_m] = MEMORIZED
    return labels


def fractions(labels: np.ndarray) -> dict[str, float]:
    """Fraction of each category in `labels`."""
    return {name: float(np.mean(labels == i)) for i, name in enumerate(CATEGORIES)}


def _summary(prefix: str, d: np.ndarray) -> dict[str, float]:
    return {
        f"{prefix}_mean": float(np.mean(d)),
        f"{prefix}_median": float(np.median(d)),
        f"{prefix}_min": float(np.min(d)),
    }


def memorization_report(
    samples: np.ndarray,
    train: np.ndarray,
    *,
    space: str = "pixel",
    delta_m: float | None = None,
    delta_s: float | None = None,
    ratio_k: int = 2,
    ratio_threshold: float = 1 / 3,
    train_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    **knn_options,
) -> dict[str, float]:
    """Memorization numbers of generated `samples [N, D]` against `train [M, D]`, both
    vectors of `space` (`pixel_vectors` or `feature_vectors`; `train` may instead be raw
    rows with their `train_transform`, applied chunk by chunk): fractions memorized /
    spurious / generalized, the ratio-test fraction, and nearest-neighbour distance
    statistics; keys `"{space}/..."`. Thresholds default to `DELTAS[space]`."""
    if space not in DELTAS:
        raise UserError(f"unknown memorization space {space!r}; known: {', '.join(DELTAS)}")
    if len(samples) < 2:
        raise UserError(f"memorization needs at least 2 samples, got {len(samples)}")
    dm, ds = DELTAS[space]
    dm, ds = dm if delta_m is None else delta_m, ds if delta_s is None else delta_s
    k = min(ratio_k, len(train))
    d_train, _ = knn(samples, train, k, transform=train_transform, **knn_options)
    d_gen, _ = knn(samples, samples, 1, exclude_self=True, **knn_options)
    labels = classify(d_train[:, 0], d_gen[:, 0], dm, ds)
    out = {f"{space}/{name}": v for name, v in fractions(labels).items()}
    if k >= 2:
        ratio, flagged = ratio_test(d_train, ratio_threshold)
        out[f"{space}/ratio_memorized"] = float(flagged.mean())
        out[f"{space}/ratio_median"] = float(np.median(ratio))
    out.update(_summary(f"{space}/nn_train", d_train[:, 0]))
    out.update(_summary(f"{space}/nn_gen", d_gen[:, 0]))
    return out


def calibrate_deltas(
    train: np.ndarray, heldout: np.ndarray, *, quantile: float = 0.001, **knn_options
) -> dict[str, float]:
    """Thresholds from measured distance distributions, for vectors of one space:
    `delta_m` is the `quantile` of the held-out examples' nearest-training distances (so a
    fresh example counts as memorized with probability `quantile`), `delta_s` the
    `quantile` of the held-out examples' distances to their nearest other held-out example
    (two independent fresh examples are that close with probability `quantile`: a pair of
    samples closer than it shares an attractor). Also the 1 %, 10 % and 50 % quantiles."""
    if len(heldout) < 2:
        raise UserError(f"calibrating needs at least 2 held-out examples, got {len(heldout)}")
    d_train = knn(heldout, train, 1, **knn_options)[0][:, 0]
    d_self = knn(heldout, heldout, 1, exclude_self=True, **knn_options)[0][:, 0]
    out = {
        "delta_m": float(np.quantile(d_train, quantile)),
        "delta_s": float(np.quantile(d_self, quantile)),
        "quantile": quantile,
        "heldout": len(heldout),
        "train": len(train),
    }
    for q in (0.01, 0.1, 0.5):
        out[f"nn_train_q{q:g}"] = float(np.quantile(d_train, q))
        out[f"nn_heldout_q{q:g}"] = float(np.quantile(d_self, q))
    return out


def capacities(ks: Sequence[float], memorized, spurious, generalized) -> dict[str, float | None]:
    """The transition's three sizes from the fractions against training-set size `ks`
    (ascending), read off as defined here:

    - `memorization_capacity`: where the memorized fraction falls through 1/2;
    - `spurious_peak`: the K of the largest spurious fraction (and `spurious_peak_fraction`);
    - `generalization_capacity`: where the generalized fraction rises through 1/2.

    Crossings are interpolated linearly in log K between the two grid points around the
    first crossing; None when the fraction never crosses within the grid."""
    ks = np.asarray(ks, np.float64)
    if ks.ndim != 1 or len(ks) < 1 or np.any(np.diff(ks) <= 0) or np.any(ks <= 0):
        raise UserError(f"capacities need ascending positive sizes, got {ks.tolist()}")
    mem, spu, gen = (np.asarray(f, np.float64) for f in (memorized, spurious, generalized))

    def crossing(f, falling: bool):
        above = f >= 0.5 if falling else f < 0.5
        for i in range(len(f) - 1):
            if above[i] and not above[i + 1]:
                a, b = f[i] - 0.5, f[i + 1] - 0.5
                w = a / (a - b) if a != b else 0.0
                return float(np.exp(np.log(ks[i]) + w * (np.log(ks[i + 1]) - np.log(ks[i]))))
        return None

    peak = int(np.argmax(spu))
    return {
        "memorization_capacity": crossing(mem, falling=True),
        "spurious_peak": float(ks[peak]),
        "spurious_peak_fraction": float(spu[peak]),
        "generalization_capacity": crossing(gen, falling=False),
    }


def subsample(x: np.ndarray, max_n: int, seed: int = 0) -> np.ndarray:
    """At most `max_n` rows of `x`, a fixed random subset (all of `x` if it is smaller)."""
    if len(x) <= max_n:
        return x
    rows = np.sort(np.random.default_rng(seed).choice(len(x), max_n, replace=False))
    return x[rows]


def cheap_report(
    samples: np.ndarray, train_images: np.ndarray, *, max_train: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """Pixel-space `memorization_report` for use during training: generated images against
    a fixed random subset of at most `max_train` training images (exact when the training
    set is no larger; otherwise the memorized fraction is a lower bound)."""
    train = subsample(train_images, max_train, seed)
    return memorization_report(
        pixel_vectors(samples), train, space="pixel", train_transform=pixel_vectors
    )


def split_names(spaces: str | Sequence[str]) -> list[str]:
    """`"pixel,inception"` -> `["pixel", "inception"]`, checked against `DELTAS`."""
    names = [s.strip() for s in spaces.split(",")] if isinstance(spaces, str) else list(spaces)
    unknown = [s for s in names if s not in DELTAS]
    if unknown or not names:
        raise UserError(f"unknown memorization space(s) {unknown}; known: {', '.join(DELTAS)}")
    return names
