"""FID, KID, precision/recall and Inception Score on FID Inception-v3 features.

Pipeline, as pytorch-fid (`fid_score.py`): uint8 images `[N, H, W, C]` -> `/ 255` ->
bilinear resize to 299x299 (half-pixel centres, i.e. align_corners=False, no antialiasing)
-> `2x - 1` -> network -> 2048-d pool features (float32) -> mean and covariance in float64
-> Frechet distance with the matrix square root from a complex Schur decomposition (the
method of scipy's `sqrtm`), eps * I added when the product is singular, tiny imaginary parts
dropped. Statistics files use pytorch-fid's npz layout (`mu`, `sigma`).
"""

import functools
import os
import warnings
import zipfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx
from scipy.linalg import lapack
from scipy.special import log_softmax

from core.errors import UserError
from models.inception import InceptionV3, load_inception

SIZE = 299


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 `[B, H, W, C]` (C = 1 or 3) or `[B, H, W]` -> float32 `[B, 299, 299, 3]` in
    [-1, 1], exactly as pytorch-fid: `/ 255`, bilinear resize, `2x - 1`; gray -> 3 channels."""
    if images.dtype != jnp.uint8:
        raise UserError(
            f"Inception features (fid, kid, pr, is) expect uint8 images in [0, 255], got "
            f"{images.dtype} of shape {images.shape}"
        )
    x = images[..., None] if images.ndim == 3 else images
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(
            f"Inception features (fid, kid, pr, is) expect images [N, H, W, 1 or 3] or "
            f"[N, H, W], got {images.shape}"
        )
    x = jnp.asarray(x).astype(jnp.float32) / 255.0
    if x.shape[1:3] != (SIZE, SIZE):
        x = jax.image.resize(
            x,
            (x.shape[0], SIZE, SIZE, x.shape[3]),
            "bilinear",
            antialias=False,
            precision=jax.lax.Precision.HIGHEST,
        )
    if x.shape[-1] == 1:
        x = jnp.broadcast_to(x, (*x.shape[:3], 3))
    return 2.0 * x - 1.0


@functools.cache
def _feature_fn(graphdef, with_logits: bool):
    def run(params, images):
        net = nnx.merge(graphdef, params)
        feats = net(preprocess(images))
        return (feats, net.logits(feats, bias=False)) if with_logits else feats

    return jax.jit(run)


@functools.cache
def _default_net(precision: str = "highest") -> InceptionV3:
    return load_inception(precision=precision)


# Images per Inception call when none is asked for. On CPUs small batches are faster: the
# 50-image batch's activations, ~140 MB a layer, are fresh pages from the kernel on every
# call, about a third of its CPU time spent in the system (measured: scripts/bench_inception.py;
# BENCHMARKS.md, "FID agrees with pytorch-fid (CPU)", "Inception batch on a CPU").
# Accelerators keep pytorch-fid's 50 (raise it there with --inception-batch). The features
# do not depend on it.
DEFAULT_BATCH = {"cpu": 10}
PROGRESS_MIN = 1_000  # images from which `inception_features` shows a progress bar


def default_batch() -> int:
    """`DEFAULT_BATCH` for the default backend (50 where it names none)."""
    return DEFAULT_BATCH.get(jax.default_backend(), 50)


def inception_features(
    images: np.ndarray,
    net: InceptionV3 | None = None,
    *,
    batch_size: int | None = None,
    with_logits: bool = False,
    precision: str = "highest",
    on_batch: Callable[[np.ndarray], None] | None = None,
    progress: bool | None = None,
):
    """uint8 images `[N, H, W, C]` -> float32 features `[N, 2048]` (NumPy); with
    `with_logits`, also the 1008-way logits without bias `[N, 1008]` (the original Inception
    Score's), which needs weights with a logits layer. `net` defaults to
    `load_inception(precision=precision)`, loaded once per process and precision.
    Batches are padded to `batch_size` (default `default_batch()`), so one compiled program
    serves every batch.
    `on_batch(features)` sees each batch's features in order (e.g. `RunningStats.update`):
    the host works on batch i while batch i + 1 runs on the device.
    `progress`: a progress bar with an estimate on stderr (None: for `PROGRESS_MIN` images
    or more)."""
    from tqdm import tqdm

    net = _default_net(precision) if net is None else net
    if with_logits and net.fc is None:
        net.logits(jnp.zeros((1, 2048)))  # raises the UserError that says why
    images = np.asarray(images)
    if len(images) == 0:
        raise UserError("inception_features got no images")
    batch_size = min(default_batch() if batch_size is None else batch_size, len(images))
    if batch_size < 1:
        raise UserError(f"inception_features needs batch_size >= 1, got {batch_size}")
    graphdef, params = nnx.split(net)
    fn = _feature_fn(graphdef, with_logits)
    outs, pending = [], None
    show = len(images) >= PROGRESS_MIN if progress is None else progress
    bar = tqdm(total=len(images), desc="Inception features", unit="img", disable=not show,
               mininterval=1.0)  # fmt: skip

    def fetch(out, rows: int) -> None:  # one finished batch to the host, padding dropped
        out = jax.tree.map(lambda a: np.asarray(a)[:rows], out)
        if on_batch is not None:
            on_batch(out[0] if with_logits else out)
        outs.append(out)
        bar.update(rows)

    with bar:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            pad = np.zeros((batch_size - len(batch), *batch.shape[1:]), batch.dtype)
            out = fn(params, np.concatenate([batch, pad]))  # dispatched, not waited for
            if pending is not None:  # the batch before, while this one runs on the device
                fetch(*pending)
            pending = (out, len(batch))
        fetch(*pending)
    if with_logits:
        return tuple(np.concatenate(parts) for parts in zip(*outs))
    return np.concatenate(outs)


# --- statistics and the Frechet distance ----------------------------------------------


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`[N, D] -> (mu [D], sigma [D, D])` in float64 (pytorch-fid's np.mean / np.cov)."""
    feats = np.asarray(features, np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise UserError(f"stats need features [N >= 2, D], got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


class RunningStats:
    """`stats` of feature batches as they come: `update(batch)` for each `[n, D]` batch,
    then `result()` equals `stats` of their concatenation (to float64 rounding, about
    1e-13 relative). The sums are of `x - shift`, `shift` the first batch's mean, so the
    covariance suffers no cancellation however far the mean is from 0. With
    `inception_features(..., on_batch=acc.update)` the statistics of a large sample set
    cost no time after the Inception pass."""

    def __init__(self):
        self.count, self.shift, self.total, self.outer = 0, None, None, None

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or (self.shift is not None and x.shape[1] != len(self.shift)):
            width = "" if self.shift is None else f" [n, {len(self.shift)}]"
            raise UserError(f"RunningStats expects feature batches{width} [n, D], got {x.shape}")
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.total = np.zeros_like(self.shift)
            self.outer = np.zeros((len(self.shift), len(self.shift)))
        y = x - self.shift
        self.total += y.sum(axis=0)
        self.outer += y.T @ y
        self.count += len(x)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """`(mu [D], sigma [D, D])` in float64, as `stats`."""
        if self.count < 2:
            raise UserError(f"stats need features [N >= 2, D], got {self.count} rows")
        mean = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return self.shift + mean, sigma


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write `mu`, `sigma` in pytorch-fid's npz layout."""
    np.savez_compressed(path, mu=mu, sigma=sigma)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read `(mu, sigma)` from a pytorch-fid style npz: `mu [D]`, `sigma [D, D]`."""
    what = f"FID statistics {path} (npz with mu, sigma)"
    if not os.path.isfile(path):
        raise UserError(f"could not read {what}: no such file")
    if not zipfile.is_zipfile(path):  # np.load would try a pickle and say so
        raise UserError(f"could not read {what}: it is not an .npz file")
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"][:], f["sigma"][:]
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"could not read {what}: {e}") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserError(
            f"{what}: expected mu [D] and sigma [D, D], found {mu.shape}, {sigma.shape}"
        )
    return mu, sigma


def _sqrt_triangular(t: np.ndarray) -> np.ndarray:
    """Upper-triangular square root of upper-triangular `t` (principal branch): recursive
    blocks with a Sylvester solve for the off-diagonal block (Deadman, Higham, Ralha 2013)."""
    n = t.shape[0]
    if n <= 64:
        r = np.zeros_like(t)
        d = np.sqrt(np.diag(t))
        for j in range(n):  # Bjorck-Hammarling: column j from the bottom up
            r[j, j] = d[j]
            for i in range(j - 1, -1, -1):
                r[i, j] = (t[i, j] - r[i, i + 1 : j] @ r[i + 1 : j, j]) / (d[i] + d[j])
        return r
    h = n // 2
    r11, r22 = _sqrt_triangular(t[:h, :h]), _sqrt_triangular(t[h:, h:])
    x, scale, info = lapack.ztrsyl(r11, r22, t[:h, h:])  # r11 x + x r22 = scale * t12
    r = np.zeros_like(t)
    r[:h, :h], r[h:, h:] = r11, r22
    r[:h, h:] = x / scale if info == 0 else np.nan  # near-singular: like scipy, give up
    return r


def sqrtm(a: np.ndarray) -> np.ndarray:
    """Principal square root of a square matrix (complex128): complex Schur `a = z t z^H`,
    then `z sqrt(t) z^H`, the method of `scipy.linalg.sqrtm`. Not finite where `a` is
    singular in a way the recurrence cannot handle (two zero eigenvalues)."""
    t, z = scipy.linalg.schur(np.asarray(a, np.complex128), output="complex")
    with np.errstate(divide="ignore", invalid="ignore"):
        r = _sqrt_triangular(t)
    return z @ r @ z.conj().T


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (float64, by
    `eigh`; rounding's tiny negative eigenvalues count as 0)."""
    w, v = np.linalg.eigh(np.asarray(sigma, np.float64))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(
    sigma1: np.ndarray, sigma2: np.ndarray, *, sqrt_sigma2: np.ndarray | None = None
) -> float:
    """`tr sqrt(s1 s2)` of two symmetric positive semi-definite matrices, from two symmetric
    eigendecompositions: `s1 s2` is similar to the symmetric `s2^1/2 s1 s2^1/2` (same
    eigenvalues, all >= 0), and the trace of the principal root is the sum of their roots.
    Rounding's tiny negative eigenvalues count as 0. `sqrt_sigma2`: `psd_sqrt(sigma2)` if
    already known (a reference's, computed while the samples' Inception pass runs). At
    D = 2048 it is several times faster than the complex Schur of `sqrtm` (timings:
    BENCHMARKS.md, "GPU: first session", "FID of 50,000 given images"), and it needs no
    offset where the root of a singular product fails."""
    root = psd_sqrt(sigma2) if sqrt_sigma2 is None else sqrt_sigma2
    m = root @ np.asarray(sigma1, np.float64) @ root
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


METHODS = ("eigh", "sqrtm")


def fid_from_stats(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    method: str = "eigh",
    sqrt_sigma2: np.ndarray | None = None,
) -> float:
    """Frechet distance `|mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrt(s1 s2))`. `method="sqrtm"` takes
    pytorch-fid's steps exactly (the principal root of the product by complex Schur, as
    `scipy.linalg.sqrtm`; `eps` on the diagonals where that root fails); `"eigh"` (the
    default) computes the same trace by `trace_sqrt_product` in a fraction of the time: the
    two agree to 1e-11 relative on full-rank statistics and to 1e-8 on rank-deficient ones
    (fewer samples than dimensions; tests/test_fid.py). `sqrt_sigma2`: `psd_sqrt(sigma2)`
    if known (used by "eigh" only)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(
            f"FID statistics differ in shape: {mu1.shape}/{sigma1.shape} vs "
            f"{mu2.shape}/{sigma2.shape}"
        )
    if method not in METHODS:
        raise UserError(f"unknown FID method {method!r}; known: {', '.join(METHODS)}")
    diff = mu1 - mu2
    if method == "eigh":
        trace_root = trace_sqrt_product(sigma1, sigma2, sqrt_sigma2=sqrt_sigma2)
    else:
        trace_root = _trace_sqrtm_pytorch_fid(sigma1, sigma2, eps)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def _trace_sqrtm_pytorch_fid(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """`tr sqrt(s1 s2)` by pytorch-fid's steps: the principal root of the product, `eps` on
    the diagonals where it fails, the real part's trace."""
    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"fid: singular product; adding {eps} to the covariance diagonals", stacklevel=3
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise UserError(
            f"fid: the matrix square root has an imaginary part "
            f"{np.abs(covmean.imag).max():.3g}; statistics are ill-conditioned"
        )
    return float(np.trace(covmean.real))


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FID between two feature sets `[N1, D]`, `[N2, D]`."""
    return fid_from_stats(*stats(feats1), *stats(feats2))


# --- KID, precision/recall, Inception Score -------------------------------------------


def kid(
    feats1: np.ndarray,
    feats2: np.ndarray,
    *,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
) -> float:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the kernel
    `(x.y / d + 1)^3`, averaged over `num_subsets` random subsets of size
    `min(N1, N2, max_subset_size)` drawn without replacement (clean-fid's defaults)."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    d = f1.shape[1]
    m = min(len(f1), len(f2), max_subset_size)
    if m < 2 or f2.shape[1] != d:
        raise UserError(f"kid needs two sets [N >= 2, D], got {f1.shape} and {f2.shape}")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = f2[rng.choice(len(f2), m, replace=False)]
        y = f1[rng.choice(len(f1), m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        total += (a.sum() - np.trace(a)) / (m - 1) - b.sum() * 2 / m
    return float(total / num_subsets / m)


@jax.jit
def _sq_dists(rows: jax.Array, cols: jax.Array) -> jax.Array:
    """`[R, D] x [C, D] -> [R, C]` squared Euclidean distances (float32, clipped at 0)."""
    dot = jnp.matmul(rows, cols.T, precision=jax.lax.Precision.HIGHEST)
    d2 = jnp.sum(rows * rows, 1)[:, None] - 2 * dot + jnp.sum(cols * cols, 1)[None, :]
    return jnp.maximum(d2, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_radius(rows: jax.Array, cols: jax.Array, k: int) -> jax.Array:
    """Squared distance from each row to its k-th nearest neighbour in `cols` (which
    contains the row itself at distance 0, hence the (k+1)-th smallest)."""
    return -jax.lax.top_k(-_sq_dists(rows, cols), k + 1)[0][:, k]


@jax.jit
def _inside(rows: jax.Array, cols: jax.Array, radii: jax.Array) -> jax.Array:
    """Whether each row lies in some ball `|row - cols[j]|^2 <= radii[j]`."""
    return jnp.any(_sq_dists(rows, cols) <= radii[None, :], axis=1)


def _chunked(fn, rows: np.ndarray, chunk: int, *args) -> np.ndarray:
    """`fn(rows_chunk, *args)` over fixed-size (padded) row chunks, concatenated."""
    outs = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        padded = np.concatenate([part, np.zeros((chunk - len(part), part.shape[1]), part.dtype)])
        outs.append(np.asarray(fn(padded, *args))[: len(part)])
    return np.concatenate(outs)


def precision_recall(
    real_feats: np.ndarray, fake_feats: np.ndarray, *, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is
    the union of balls reaching each sample's k-th nearest neighbour; precision is the
    fraction of fakes inside the real manifold, recall of reals inside the fake one."""
    real = np.asarray(real_feats, np.float32)
    fake = np.asarray(fake_feats, np.float32)
    if min(len(real), len(fake)) <= k or real.shape[1] != fake.shape[1]:
        raise UserError(
            f"precision_recall needs more than k={k} samples per set of equal "
            f"width, got {real.shape} and {fake.shape}"
        )
    chunk = min(chunk, max(len(real), len(fake)))
    r_real = _chunked(functools.partial(_kth_radius, k=k), real, chunk, real)
    r_fake = _chunked(functools.partial(_kth_radius, k=k), fake, chunk, fake)
    precision = _chunked(_inside, fake, chunk, real, r_real).mean()
    recall = _chunked(_inside, real, chunk, fake, r_fake).mean()
    return float(precision), float(recall)


def inception_score(logits: np.ndarray, *, splits: int = 10) -> tuple[float, float]:
    """Inception Score `exp E_x KL(p(y|x) || p(y))` (mean, std over `splits` chunks) from
    the 1008-way logits, e.g. `inception_features(..., with_logits=True)[1]`."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or len(logits) < splits:
        raise UserError(f"inception_score needs logits [N >= splits, K], got {logits.shape}")
    scores = []
    for part in np.array_split(log_softmax(logits, axis=1), splits):
        log_py = np.log(np.exp(part).mean(axis=0))
        kl = np.sum(np.exp(part) * (part - log_py[None, :]), axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
