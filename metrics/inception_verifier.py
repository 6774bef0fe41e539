"""The `inception` verifier of noise search (arXiv 2501.09732): the closest per-sample
analogue of FID.

Score: the log-density of a sample's Inception pool feature `f` (2048-d, the FID network and
preprocessing of `metrics.fid`) under the Gaussian `N(mu_r, Sigma_r)` fitted to the reference
dataset's features, i.e. under the FID statistics of the reference:

    score(f) = [const - 0.5 |(f - mu_r) W|^2] / D,    W W^T = Sigma_r^-1,
    const = -0.5 (D log 2 pi + log det Sigma_r),       D = 2048,

in nats per feature dimension (divided by D so the numbers are readable). Higher is better.

Relation to FID. For a set S of features with mean mu_s and population (ddof = 0) covariance
Sigma_s, the mean score (times D) is exactly, with `delta = mu_s - mu_r`,

    mean_S D score = const - 0.5 [tr(Sigma_r^-1 Sigma_s) + delta^T Sigma_r^-1 delta],

minus the cross-entropy of `N(mu_s, Sigma_s)` relative to `N(mu_r, Sigma_r)` (a Gaussian
cross-entropy; it depends on S only through (mu_s, Sigma_s), as FID does). FID is

    |mu_s - mu_r|^2 + tr(Sigma_s + Sigma_r - 2 (Sigma_s Sigma_r)^1/2):

both penalize the shift of the means and the mismatch of the covariances; FID in the
Euclidean metric of feature space, this verifier in the metric of Sigma_r (a mean shift along a
direction in which the reference varies little costs much more). Unlike FID, the cross-entropy
is not minimized by matching the covariance (it rewards a Sigma_s that is small in Sigma_r's
metric: each sample is scored alone, so the set's diversity is not rewarded), which is why
this is a per-sample verifier and FID a set metric.

Regularization: `Sigma_r + eps I` (eps = 1e-6 by default) replaces `Sigma_r`. The covariance of
N reference images has rank at most N - 1, so with fewer than 2048 + 1 images it is singular
and its inverse does not exist; with the offset, directions outside the reference's span have
variance eps, so a component of `f - mu_r` there costs `1 / (2 eps)` nats per unit squared: such
samples score very low (and the score is dominated by that term). With a large reference (the
usual 10k-50k images) eps changes nothing measurable. The whitening `W = V diag(1/sqrt(l))`
(`Sigma_r + eps I = V diag(l) V^T`, `eigh` in float64 on the host) and the constant are computed
once (`gaussian_scorer`); the device computes only a float32 matmul at full precision.

Samples are float images in [-1, 1] `[B, H, W, C]`, C = 1 or 3. They are quantized to 8 bits
exactly as `core.plots.to_uint8` (round half to even, clip) and go through
`metrics.fid.preprocess` and the network in the jitted function, so a sample's feature equals
`metrics.fid.inception_features(to_uint8(x))`, the feature FID sees. Options
(`VerifierContext.options`): `ref_stats` (a pytorch-fid statistics npz; else the context's
dataset's cached statistics), `inception_precision` (default "highest"), `inception_batch`
(images per Inception call inside the verifier, by `lax.map`; default all at once; also the
batch of the reference's feature pass), `eps`.
"""

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from core.errors import UserError
from metrics import fid as fm
from models.inception import FEATURE_DIM

if TYPE_CHECKING:  # metrics.verifiers registers this module's builder: no import cycle
    from metrics.verifiers import Verifier, VerifierContext

DEFAULT_EPS = 1e-6


def gaussian_scorer(mu: np.ndarray, sigma: np.ndarray, eps: float = DEFAULT_EPS):
    """`(params, log_density)` of `N(mu, sigma + eps I)`: `params` float32
    `{"mu" [D], "w" [D, D], "const" []}` with `W = V diag(1/sqrt(l))` from `eigh` of the
    regularized covariance (float64, on the host) and `const = -0.5 (D log 2 pi + sum log l)`;
    `log_density(params, feats [B, D]) -> [B]` (jittable). `eps` keeps a covariance of fewer
    than D + 1 points (singular) invertible."""
    mu = np.asarray(mu, np.float64)
    sigma = np.asarray(sigma, np.float64)
    d = len(mu)
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise UserError(
            f"reference statistics need mu [D], sigma [D, D]; got {mu.shape}, {sigma.shape}"
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise UserError("reference statistics are not finite")
    lam, v = np.linalg.eigh(0.5 * (sigma + sigma.T) + eps * np.eye(d))
    if lam[0] <= 0:
        raise UserError(
            f"reference covariance + {eps:g} I is not positive definite (smallest eigenvalue "
            f"{lam[0]:.3g}); raise eps"
        )
    const = -0.5 * (d * math.log(2 * math.pi) + np.sum(np.log(lam)))
    params = {
        "mu": jnp.asarray(mu, jnp.float32),
        "w": jnp.asarray(v / np.sqrt(lam)[None, :], jnp.float32),
        "const": jnp.asarray(const, jnp.float32),
    }
    return params, log_density


def log_density(params: dict, feats: jax.Array) -> jax.Array:
    """`const - 0.5 |(f - mu) W|^2` per row of `feats [B, D]` -> `[B]` (float32, the matmul
    at full precision: TF32 would cost 1e-3 relative on a GPU)."""
    z = jnp.matmul(
        feats.astype(jnp.float32) - params["mu"][None, :],
        params["w"],
        precision=jax.lax.Precision.HIGHEST,
    )
    return params["const"] - 0.5 * jnp.sum(z * z, axis=-1)


def quantize(x: jax.Array) -> jax.Array:
    """Images in [-1, 1] -> uint8, exactly `core.plots.to_uint8` in jnp (jittable)."""
    y = jnp.round((jnp.asarray(x).astype(jnp.float32) + 1.0) * 127.5)
    return jnp.clip(y, 0, 255).astype(jnp.uint8)


def feature_fn(graphdef, batch_size: int | None = None):
    """`fn(inception_params, samples [B, H, W, C] in [-1, 1]) -> [B, 2048]` (jittable): the
    network `graphdef` merged with the pure dict `inception_params`, on `quantize`d samples
    preprocessed as `metrics.fid.preprocess`; equal to `inception_features(to_uint8(x))`.
    `batch_size`: images per network call (`lax.map`), default all at once."""
    from flax import nnx

    def features(params, x):
        net = nnx.merge(graphdef, params)
        return net(fm.preprocess(quantize(x)))

    def fn(params, x):
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise UserError(f"Inception features need images [B, H, W, 1 or 3], got {x.shape}")
        if batch_size is None or x.shape[0] <= batch_size:
            return features(params, x)
        return jax.lax.map(lambda xi: features(params, xi[None])[0], x, batch_size=batch_size)

    return fn


def reference_stats(context: "VerifierContext", compute) -> tuple[np.ndarray, np.ndarray]:
    """`(mu, sigma)` of the reference: `options["ref_stats"]`, else the dataset's cached
    statistics with features from `compute` (uint8 images -> features)."""
    path = context.options.get("ref_stats")
    if path:
        return fm.load_stats(path)
    precision = context.options.get("inception_precision", "highest")
    return context.dataset.stats(compute, precision)


def inception(context: "VerifierContext") -> "Verifier":
    """The `inception` verifier: each sample's Inception feature's log-density under the
    reference's FID Gaussian, in nats per feature dimension (module docstring)."""
    from flax import nnx

    from metrics.verifiers import Verifier
    from models.inception import load_inception

    options = context.options
    if not options.get("ref_stats") and context.dataset is None:
        raise UserError(
            "the inception verifier scores against reference FID statistics: give a "
            "reference dataset or a statistics file (ref_stats)"
        )
    precision = options.get("inception_precision", "highest")
    batch = options.get("inception_batch")
    batch = None if batch is None else int(batch)
    eps = float(options.get("eps", DEFAULT_EPS))
    net = load_inception(precision=precision)

    def compute(images):
        return fm.inception_features(images, net, batch_size=batch, precision=precision)

    mu, sigma = reference_stats(context, compute)
    if len(mu) != FEATURE_DIM:
        raise UserError(f"reference statistics have {len(mu)} dimensions, not {FEATURE_DIM}")
    gaussian, density = gaussian_scorer(mu, sigma, eps)
    graphdef, state = nnx.split(net)
    features = feature_fn(graphdef, batch)

    def fn(params, samples, cond, noise):
        feats = features(params["inception"], samples)
        return density(params["gaussian"], feats) / FEATURE_DIM

    params = {"inception": nnx.to_pure_dict(state), "gaussian": gaussian}
    return Verifier("inception", fn, params, nfe=1)
