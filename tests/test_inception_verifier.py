"""The `inception` verifier (metrics/inception_verifier.py): its mean over a set is the
Gaussian cross-entropy of the FID statistics, its float path gives `inception_features`'s
features, and on MNIST real digits outscore noise.

Measured here (2 cores): the float path's features equal `inception_features(to_uint8(x))`
bit for bit (max abs difference 0.0); against 24 MNIST training images (eps = 1e-6), test
digits scored -1.1e4 to -1.3e4 nats per dimension and uniform-noise images -7.7e4 to -9.8e4
(with 40 images: -0.8e4 to -1.2e4 and -7.3e4 to -9.3e4): with so few reference images the
score is dominated by the components outside their span (variance eps).
"""

import functools
import gzip
import math
import os
import types

import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from flax import nnx

from core.errors import UserError
from core.plots import to_uint8
from core.reference import Dataset
from metrics import fid as fm
from metrics import inception_verifier as iv
from metrics.verifiers import VerifierContext

WEIGHTS = "inception/fid_inception_v3_2015-12-05_fp32.npz"
NUM_REF = 24  # reference images: ~0.2 s each through the 299x299 network on 2 cores
BATCH = 8  # Inception batch of every pass here: one compiled network for all of them


# --- the Gaussian score and its relation to FID ---------------------------------------


def _cross_entropy_score(mu_r, sigma_r, feats, eps):
    """float64: `const - 0.5 [tr(S_r^-1 S_s) + delta^T S_r^-1 delta]` of `feats`, S_s their
    population (ddof = 0) covariance, S_r = sigma_r + eps I; by a Cholesky factor L of S_r
    (no eigendecomposition, unlike the scorer): tr(S_r^-1 S_s) = |L^-1 X_c^T|^2 / n."""
    d, n = len(mu_r), len(feats)
    chol = np.linalg.cholesky(sigma_r + eps * np.eye(d))
    mu_s = feats.mean(axis=0)
    centered = feats - mu_s  # S_s = centered^T centered / n
    trace = np.sum(scipy.linalg.solve_triangular(chol, centered.T, lower=True) ** 2) / n
    delta = scipy.linalg.solve_triangular(chol, mu_s - mu_r, lower=True)
    const = -0.5 * (d * math.log(2 * math.pi) + 2 * np.sum(np.log(np.diag(chol))))
    return const - 0.5 * (trace + delta @ delta)


def _features(rng, n, d, scale=1.0, shift=0.0):
    """Correlated (8 shared factors), unevenly scaled random features `[n, d]` (float64)."""
    scales = np.exp(rng.uniform(-1.5, 0.5, size=d))
    factors = rng.normal(size=(n, 8)) @ rng.normal(size=(8, d))
    return shift + scale * (rng.normal(size=(n, d)) * scales + factors) + 0.3


@pytest.mark.parametrize("d, n_ref, n_s", [(16, 200, 50), (2048, 300, 100)])
def test_mean_score_is_the_gaussian_cross_entropy(d, n_ref, n_s):
    # d = 2048 with 300 reference points: a singular covariance, regularized by eps I.
    rng = np.random.default_rng(d)
    ref = _features(rng, n_ref, d)
    mu_r, sigma_r = fm.stats(ref)
    feats = _features(np.random.default_rng(d + 1), n_s, d, scale=1.3, shift=0.2)
    eps = 1e-6
    params, log_density = iv.gaussian_scorer(mu_r, sigma_r, eps)
    assert {k: v.dtype for k, v in params.items()} == dict.fromkeys(params, np.float32)
    scores = np.asarray(jax.jit(log_density)(params, feats.astype(np.float32)), np.float64)
    expected = _cross_entropy_score(mu_r, sigma_r, feats, eps)
    assert scores.mean() == pytest.approx(expected, rel=2e-5)
    if d <= 64:  # per sample: the exact density of N(mu_r, sigma_r + eps I)
        exact = scipy.stats.multivariate_normal(mu_r, sigma_r + eps * np.eye(d)).logpdf(feats)
        np.testing.assert_allclose(scores, exact, rtol=1e-5)
        # like FID, the mean score worsens as the set's mean moves away from the reference's
        far = feats + 0.5
        far_scores = np.asarray(log_density(params, far.astype(np.float32)))
        assert far_scores.mean() < scores.mean()
        assert fm.fid_from_features(ref, far) > fm.fid_from_features(ref, feats)


def test_gaussian_scorer_rejects_bad_statistics():
    with pytest.raises(UserError, match="mu \\[D\\], sigma \\[D, D\\]"):
        iv.gaussian_scorer(np.zeros(3), np.eye(4))
    with pytest.raises(UserError, match="not positive definite"):
        iv.gaussian_scorer(np.zeros(2), np.diag([1.0, -1.0]))
    with pytest.raises(UserError, match="not finite"):
        iv.gaussian_scorer(np.zeros(2), np.full((2, 2), np.nan))


def test_no_reference_is_a_user_error():
    context = VerifierContext(experiment=None, dataset=None, options={})
    with pytest.raises(UserError, match="reference dataset or a statistics file"):
        iv.inception(context)


def test_quantize_is_to_uint8():
    x = np.concatenate([np.linspace(-1.2, 1.2, 1001), (np.arange(256) + 0.5) / 127.5 - 1])
    x = x.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(iv.quantize(x)), to_uint8(x))


# --- on MNIST, through the Inception network -------------------------------------------


def _mnist(shared_data, name, n):
    with gzip.open(os.path.join(shared_data, "mnist", name), "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)[:n]


@functools.cache
def _samples(shared_data):
    """4 test digits on the 8-bit grid and 4 uniform-noise images off it, floats in [-1, 1]."""
    digits = _mnist(shared_data, "t10k-images-idx3-ubyte.gz", 4).astype(np.float32) / 127.5 - 1
    noise = np.random.default_rng(0).uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)
    return np.concatenate([digits, noise])


@functools.cache
def _uint8_features(shared_data):
    from models.inception import load_inception

    net = load_inception(os.path.join(shared_data, WEIGHTS))
    return fm.inception_features(to_uint8(_samples(shared_data)), net, batch_size=BATCH)


@pytest.fixture
def weights(shared_data, monkeypatch):
    monkeypatch.setenv("DRIFTLAB_INCEPTION_WEIGHTS", os.path.join(shared_data, WEIGHTS))
    return shared_data


def test_float_path_gives_the_uint8_features(weights):
    from models.inception import load_inception

    x = _samples(weights)
    graphdef, state = nnx.split(load_inception())
    # batch_size 4: the network runs on two chunks of the 8 images (lax.map)
    feats = jax.jit(iv.feature_fn(graphdef, batch_size=4))(nnx.to_pure_dict(state), x)
    assert feats.shape == (8, 2048)
    with pytest.raises(UserError, match="images \\[B, H, W, 1 or 3\\], got \\(8, 2\\)"):
        iv.feature_fn(graphdef)(None, np.zeros((8, 2), np.float32))
    np.testing.assert_allclose(np.asarray(feats), _uint8_features(weights), rtol=0, atol=1e-5)


def test_real_digits_outscore_noise_on_mnist(weights, tmp_path):
    train = _mnist(weights, "train-images-idx3-ubyte.gz", NUM_REF)
    build = lambda: types.SimpleNamespace(images=train)
    dataset = Dataset("mnist_head", "train", build, cache_dir=str(tmp_path))
    options = {"inception_batch": BATCH}  # the reference's pass and the verifier's
    context = VerifierContext(experiment=None, dataset=dataset, options=options)
    verifier = iv.inception(context)
    assert verifier.name == "inception" and verifier.nfe == 1
    assert set(verifier.params) == {"inception", "gaussian"}
    scores = np.asarray(jax.jit(verifier.fn)(verifier.params, _samples(weights), None, None))
    digits, noise = scores[:4], scores[4:]
    assert np.all(np.isfinite(scores))
    assert digits.min() > noise.max(), (digits, noise)
    # the scores are the scorer's log-density of the uint8 path's features, per dimension
    gaussian = verifier.params["gaussian"]
    expected = np.asarray(iv.log_density(gaussian, _uint8_features(weights))) / 2048
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    # ... under the Gaussian of the dataset's statistics, cached on disk by its build
    mu, sigma = dataset.stats(None)
    assert len(list(tmp_path.glob("mnist_head-train-full-inception_*.stats.npz"))) == 1
    np.testing.assert_allclose(gaussian["mu"], mu.astype(np.float32))
    # a statistics file (ref_stats) is read instead of the dataset
    path = str(tmp_path / "stats.npz")
    fm.save_stats(path, mu + 1, sigma)
    from_file = iv.reference_stats(VerifierContext(None, options={"ref_stats": path}), None)
    np.testing.assert_array_equal(from_file[0], mu + 1)
