"""Memorization metrics: exact k-NN against brute force, the memorized / spurious /
generalized split on known cases, and the effective dimension on a subspace oracle."""

import functools
import os

import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import UserError
from metrics import effective_dim as ed
from metrics import memorization as mem
from tests import gaussian


def _brute(q: np.ndarray, r: np.ndarray, k: int, exclude_self: bool = False):
    d2 = ((q[:, None, :].astype(np.float64) - r[None, :, :]) ** 2).sum(-1)
    if exclude_self:
        np.fill_diagonal(d2, np.inf)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]  # ties: lower index first
    return np.sqrt(np.take_along_axis(d2, idx, 1)), idx


# --- k nearest neighbours --------------------------------------------------------------


@pytest.mark.parametrize("refine", [False, True])
@pytest.mark.parametrize("k", [1, 4])
def test_knn_equals_brute_force_with_ties_and_ragged_chunks(k, refine):
    # Small integers: every distance is exact in float32, so ties are exact ties (many,
    # with 3 values in 4 dims) and indices must agree exactly. 53 reference rows in chunks
    # of 10 and 23 queries in chunks of 7 leave ragged last chunks on both sides.
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 3, (53, 4)).astype(np.float32)
    ref[40] = ref[3]  # an exact duplicate across chunk boundaries
    q = np.concatenate([rng.integers(0, 3, (22, 4)), ref[3:4]]).astype(np.float32)
    d, i = mem.knn(q, ref, k, query_chunk=7, ref_chunk=10, refine=refine)
    bd, bi = _brute(q, ref, k)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(d, bd, atol=1e-6)
    same = np.flatnonzero((ref == ref[3]).all(axis=1))[:k]  # 3, ..., 40: index order
    np.testing.assert_array_equal(i[-1, : len(same)], same)


def test_knn_float_data_and_one_chunk():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 16)).astype(np.float32)  # vectors are float32
    q = rng.normal(size=(40, 16)).astype(np.float32)
    d, i = mem.knn(q, ref, 5)
    bd, bi = _brute(q, ref, 5)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(d, bd, rtol=1e-12)  # refined: exact (float64) distances
    # raw uint8 images turned into vectors chunk by chunk == vectors given whole
    images = rng.integers(0, 256, (50, 4, 4, 1)).astype(np.uint8)
    queries = mem.pixel_vectors(images[:7]) + 0.01
    lazy = mem.knn(queries, images, 3, transform=mem.pixel_vectors, ref_chunk=16)
    whole = mem.knn(queries, mem.pixel_vectors(images), 3)
    np.testing.assert_array_equal(lazy[1], whole[1])
    np.testing.assert_allclose(lazy[0], whole[0], rtol=1e-12)


def test_knn_exclude_self_finds_duplicates_not_self():
    rng = np.random.default_rng(2)
    x = rng.permutation(64)[:60].reshape(30, 2).astype(np.float32)  # distinct rows
    x[17] = x[5]
    d, i = mem.knn(x, x, 2, exclude_self=True, query_chunk=8, ref_chunk=8)
    bd, bi = _brute(x, x, 2, exclude_self=True)
    np.testing.assert_array_equal(i, bi)
    assert (i != np.arange(30)[:, None]).all()
    assert i[5, 0] == 17 and i[17, 0] == 5 and d[5, 0] == 0.0


def test_knn_rejects_bad_input():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(UserError, match="k=5"):
        mem.knn(x, x, 5)
    with pytest.raises(UserError, match="k=4"):
        mem.knn(x, x, 4, exclude_self=True)
    with pytest.raises(UserError, match=r"\[Q, D\]"):
        mem.knn(x, np.zeros((4, 2), np.float32), 1)


# --- the tests on distances ------------------------------------------------------------


def test_classify_constructed_samples_with_known_answers():
    # training points on a line; samples built to be copies, repeated new points, and
    # isolated new points: the split must find each group, whatever the proportions
    rng = np.random.default_rng(0)
    train = np.zeros((50, 8), np.float32)
    train[:, 0] = np.arange(50)
    copies = train[rng.choice(50, 7, replace=False)] + 0.001 * rng.normal(size=(7, 8))
    new = 100 + 10 * np.arange(5)[:, None] * np.eye(8, dtype=np.float32)[[1]]
    repeats = np.concatenate([new + 0.001 * rng.normal(size=new.shape) for _ in range(2)])
    lonely = -100 - 10 * np.arange(4)[:, None] * np.eye(8, dtype=np.float32)[[2]]
    samples = np.concatenate([copies, repeats, lonely]).astype(np.float32)
    out = mem.memorization_report(samples, train, space="pixel", delta_m=0.1, delta_s=0.1)
    assert out["pixel/memorized"] == pytest.approx(7 / 21)
    assert out["pixel/spurious"] == pytest.approx(10 / 21)
    assert out["pixel/generalized"] == pytest.approx(4 / 21)
    d_train, _ = mem.knn(samples, train, 1)
    d_gen, _ = mem.knn(samples, samples, 1, exclude_self=True)
    labels = mem.classify(d_train[:, 0], d_gen[:, 0], 0.1, 0.1)
    assert labels.tolist() == [mem.MEMORIZED] * 7 + [mem.SPURIOUS] * 10 + [mem.GENERALIZED] * 4


def test_capacities_read_off_constructed_fractions():
    ks = [2, 4, 8, 16, 32]
    memorized = [1.0, 0.8, 0.2, 0.0, 0.0]  # through 1/2 half-way (in log K) from 4 to 8
    spurious = [0.0, 0.1, 0.5, 0.3, 0.0]
    generalized = [0.0, 0.1, 0.3, 0.7, 1.0]  # through 1/2 at 2/4 of the way from 8 to 16
    caps = mem.capacities(ks, memorized, spurious, generalized)
    assert caps["memorization_capacity"] == pytest.approx(4 * 2**0.5)
    assert caps["spurious_peak"] == 8 and caps["spurious_peak_fraction"] == 0.5
    assert caps["generalization_capacity"] == pytest.approx(8 * 2**0.5)
    never = mem.capacities(ks, [0.0] * 5, [0.0] * 5, [1.0] * 5)
    assert never["memorization_capacity"] is None and never["generalization_capacity"] is None
    with pytest.raises(UserError, match="ascending"):
        mem.capacities([4, 2], [1, 0], [0, 0], [0, 1])


def test_calibrated_thresholds_are_the_measured_quantiles(mnist):
    train, test = mnist
    tv, hv = mem.pixel_vectors(train), mem.pixel_vectors(test)
    out = mem.calibrate_deltas(tv, hv, quantile=0.1)
    brute = np.sqrt(((hv[:, None, :].astype(np.float64) - tv[None]) ** 2).sum(-1)).min(1)
    assert out["delta_m"] == pytest.approx(np.quantile(brute, 0.1), rel=1e-5)
    self_d = np.sqrt(((hv[:, None, :].astype(np.float64) - hv[None]) ** 2).sum(-1))
    np.fill_diagonal(self_d, np.inf)
    assert out["delta_s"] == pytest.approx(np.quantile(self_d.min(1), 0.1), rel=1e-5)
    assert out["nn_train_q0.5"] == pytest.approx(np.median(brute), rel=1e-5)


def test_ratio_test_and_classify_by_hand():
    d = np.array([[0.0, 0.0], [1.0, 2.0], [1.0, 4.0], [2.0, 2.0]])
    ratio, flagged = mem.ratio_test(d)  # two identical training images: ratio 0
    np.testing.assert_allclose(ratio, [0.0, 0.5, 0.25, 1.0])
    np.testing.assert_array_equal(flagged, [True, False, True, False])
    labels = mem.classify(
        np.array([0.01, 0.01, 0.5, 0.5]), np.array([0.0, 0.5, 0.0, 0.5]), 0.1, 0.1
    )
    names = [mem.CATEGORIES[v] for v in labels]  # memorized takes precedence over spurious
    assert names == ["memorized", "memorized", "spurious", "generalized"]


@functools.cache
def _mnist(tfds_dir: str) -> tuple[np.ndarray, np.ndarray]:
    import data

    train = data.build_source("mnist", split="train[:500]", data_dir=tfds_dir).images
    test = data.build_source("mnist", split="test[:60]", data_dir=tfds_dir).images
    return train, test


@pytest.fixture
def mnist(shared_data):
    """uint8 MNIST train[:500] (the training set) and test[:60] (held-out digits)."""
    return _mnist(os.path.join(shared_data, "tfds"))


def test_copies_of_training_images_are_memorized(mnist):
    train, _ = mnist
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.02 * 127.5, (64, *train.shape[1:]))  # ~2.5 grey levels
    copies = np.clip(np.round(train[:64] + noise), 0, 255).astype(np.uint8)
    out = mem.memorization_report(mem.pixel_vectors(copies), mem.pixel_vectors(train))
    assert out["pixel/memorized"] == 1.0 and out["pixel/ratio_memorized"] == 1.0
    assert out["pixel/nn_train_mean"] < 0.05


def test_fresh_gaussian_noise_is_not_memorized(mnist):
    train, _ = mnist
    noise = np.clip(np.random.default_rng(0).normal(size=(64, *train.shape[1:])), -1, 1)
    out = mem.memorization_report(
        mem.pixel_vectors(noise.astype(np.float32)), mem.pixel_vectors(train)
    )
    assert out["pixel/memorized"] == 0.0 and out["pixel/ratio_memorized"] == 0.0
    assert out["pixel/spurious"] == 0.0 and out["pixel/generalized"] == 1.0


def test_repeated_new_samples_are_spurious(mnist):
    # 20 held-out digits (no training images), each generated three times with small noise,
    # plus 20 more held-out digits once: 60 / 80 samples sit on an attractor of their own.
    train, test = mnist
    rng = np.random.default_rng(0)
    base = np.repeat(test[:20].astype(np.float64), 3, axis=0)
    repeats = np.clip(np.round(base + rng.normal(0, 2.0, base.shape)), 0, 255).astype(np.uint8)
    samples = np.concatenate([repeats, test[20:40]])
    out = mem.memorization_report(mem.pixel_vectors(samples), mem.pixel_vectors(train))
    assert out["pixel/spurious"] == pytest.approx(60 / 80)
    assert out["pixel/memorized"] == 0.0 and out["pixel/generalized"] == pytest.approx(20 / 80)


def test_feature_space_and_cheap_report(mnist):
    train, _ = mnist
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(200, 32))).astype(np.float32)
    near = feats[:10] * 1.5 + 1e-3  # scale is ignored: unit-norm features
    out = mem.memorization_report(
        mem.feature_vectors(near), mem.feature_vectors(feats), space="inception"
    )
    assert out["inception/memorized"] == 1.0
    # against a random subset of 100: copies of the rows drawn are memorized, of the others
    # (distinct MNIST digits, far apart) not: the fraction is the lower bound it claims
    rows = np.sort(np.random.default_rng(0).choice(len(train), 100, replace=False))
    picked = np.concatenate([train[rows[:3]], np.delete(train, rows, axis=0)[:5]])
    cheap = mem.cheap_report(picked, train, max_train=100)
    assert cheap["pixel/memorized"] == pytest.approx(3 / 8)
    assert mem.cheap_report(train[:8], train[:50], max_train=100)["pixel/memorized"] == 1.0
    with pytest.raises(UserError, match="unknown memorization space"):
        mem.memorization_report(near, feats, space="lpips")


# --- effective dimension ---------------------------------------------------------------


def _subspace(d: int, k: int, scale: float = 1.0, seed: int = 0):
    """Orthonormal basis `[d, k]` and the covariance `scale^2 P` of a k-dim subspace."""
    basis, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, k)))
    return basis, scale**2 * basis @ basis.T


@pytest.mark.parametrize("k", [1, 3, 6, 16])
def test_effective_dimension_of_a_linear_subspace_is_k(k, tmp_path):
    # x1 ~ N(0, s^2 P): the noisy marginal at t is N(0, (1-t)^2 I + t^2 s^2 P), its score
    # -C^-1 x is known in closed form; its Jacobian has D - k values 1/(1-t)^2 (= 1e4 at
    # sigma = 0.01) and k values 1/((1-t)^2 + t^2 s^2). The velocity view goes through
    # models.views like a trained network.
    d, sigma = 16, 1e-2
    basis, cov = _subspace(d, k)
    xs = np.random.default_rng(1).normal(size=(4, k)) @ basis.T
    velocity = gaussian.optimal_velocity(jnp.zeros(d), cov)
    svals = ed.spectra(ed.score_view(velocity, "velocity"), xs, sigma=sigma)
    np.testing.assert_allclose(svals[:, : d - k], 1 / sigma**2, rtol=1e-4)
    # float32 score (t v - x) / (1 - t): 1e-3 relative on the small values, 1e-7 of s_1
    np.testing.assert_allclose(svals[:, d - k :], 1 / (sigma**2 + (1 - sigma) ** 2), rtol=3e-3)
    assert ed.effective_dimensions(svals, sigma=sigma).tolist() == [k] * 4
    closed = gaussian.score(jnp.zeros(d), cov)
    score = lambda x, t, cond=None: closed(x, t)
    chunked = ed.spectra(score, xs, sigma=sigma, chunk=5)  # 16 columns in ragged chunks
    np.testing.assert_allclose(chunked, svals, rtol=3e-3)
    out = ed.evaluate(score, xs, sigma=sigma, plot_path=str(tmp_path / "spectra.png"))
    assert out["effdim_mean"] == k and os.path.getsize(tmp_path / "spectra.png") > 0


def test_effective_dimension_across_noise_loses_the_low_variance_block_first(tmp_path):
    # Two blocks in D = 16: 3 directions of scale 1 and 4 of scale 0.05. The closed-form
    # spectrum at noise sigma (t = 1 - sigma): 9 normal values 1/sigma^2, then
    # 1/(sigma^2 + t^2 s^2) per block. At sigma = 0.002 both blocks sit far below the normal
    # values (dimension 7); at sigma = 0.2 the small block's 24.0 is next to the normal 25
    # and the largest gap is before the big block's 1.47 (dimension 3). Levels are given out
    # of order and share one compiled Jacobian.
    d = 16
    big, _ = _subspace(d, 7, seed=2)
    cov = big[:, :3] @ big[:, :3].T + 0.05**2 * big[:, 3:] @ big[:, 3:].T
    xs = np.random.default_rng(3).normal(size=(3, 7)) * np.r_[[1.0] * 3, [0.05] * 4] @ big.T
    closed = gaussian.score(jnp.zeros(d), cov)
    score = lambda x, t, cond=None: closed(x, t)
    out = ed.evaluate_across(score, xs, sigmas=[0.2, 0.002], plot_path=str(tmp_path / "across.png"))
    assert out["effdim_sigmas"] == [0.002, 0.2]
    assert out["effdim_per_sample_by_sigma"] == [[7, 7, 7], [3, 3, 3]]
    svals = ed.spectra_across(score, xs, sigmas=[0.002, 0.2])
    for sigma, s in zip([0.002, 0.2], svals):
        t = 1 - sigma
        expected = [1 / sigma**2] * 9 + [1 / (sigma**2 + t**2 * 0.05**2)] * 4
        expected += [1 / (sigma**2 + t**2)] * 3
        # float32 scores: the O(1) values carry ~1e-7 of s_1 = 2.5e5 at sigma = 0.002
        np.testing.assert_allclose(s, np.broadcast_to(expected, s.shape), rtol=1e-2)
    # scaled by sigma^2, the normal directions are 1 at every level
    scaled = np.array(out["effdim_median_spectrum_by_sigma"])
    np.testing.assert_allclose(scaled[:, :9], 1, rtol=1e-3)
    assert os.path.getsize(tmp_path / "across.png") > 0
    with pytest.raises(UserError, match="0 < sigma < 1"):
        ed.spectra_across(score, xs, sigmas=[0.1, 1.0])


def test_effective_dimension_of_a_point_is_zero():
    # A training set of one point (memorized): the score pulls back in every direction.
    d = 8
    velocity = gaussian.optimal_velocity(jnp.ones(d), np.zeros((d, d)))
    svals = ed.spectra(ed.score_view(velocity, "velocity"), np.ones((2, d)), sigma=1e-2)
    assert ed.effective_dimensions(svals, sigma=1e-2).tolist() == [0, 0]
    spectrum = np.array([5e4, 4e4, 1.0, 0.5])  # two normal directions at sigma = 0.01
    assert ed.effective_dimension(spectrum, sigma=1e-2) == 2
    assert ed.effective_dimension(spectrum[::-1], max_rank=1, sigma=1e-2) == 3


def test_memorization_sweep_on_npz_data_resumes_to_the_same_numbers(tmp_path):
    # The smoke U-Net on 4 images of an npz "MNIST" with two seeds: a second call finds the
    # finished runs and reproduces their numbers; the summary is their mean and spread.
    import json

    from scripts import memorization_sweep

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "m_train.npz", arr_0=rng.integers(0, 256, (32, 28, 28, 1), np.uint8))
    argv = ["x", "--tiny", "--workdir", str(tmp_path / "sweep"), "--out", str(tmp_path / "out"),
            "--ks", "4", "--steps", "2", "--num", "8", "--batch", "8", "--sample-steps", "2",
            "--seeds", "0,1", "--deltas", "default",
            "--data-path", str(tmp_path / "m_{split}.npz")]  # fmt: skip
    memorization_sweep.main(argv)
    first = json.loads((tmp_path / "out.json").read_text())
    assert [(r["K"], r["seed"]) for r in first["results"]] == [(4, 0), (4, 1)]
    assert sorted(os.listdir(tmp_path / "sweep")) == ["K4", "K4_s1"]
    (summary,) = first["summary"]
    for name in ("memorized", "spurious", "generalized"):
        values = [r[name] for r in first["results"]]
        assert summary[name] == pytest.approx(np.mean(values))
        assert summary[f"{name}_std"] == pytest.approx(np.std(values, ddof=1))
    assert first["thresholds"]["delta_m"] == mem.DELTAS["pixel"][0]
    assert first["settings"]["data_path"].endswith("m_{split}.npz")
    assert (tmp_path / "out.png").stat().st_size > 0
    memorization_sweep.main(argv)
    again = json.loads((tmp_path / "out.json").read_text())
    for a, b in zip(first["results"], again["results"]):
        assert {k: v for k, v in a.items() if k != "train_seconds"} == {
            k: v for k, v in b.items() if k != "train_seconds"
        }


def test_sweep_config_tiny_gives_the_old_tiny_settings():
    # the numbers `scripts.memorization_sweep --tiny` used to set on the MNIST U-Net itself
    from core import config as config_lib

    c = config_lib.load("experiments/memorization/mnist_unet_sweep.py:tiny=True,k=32")
    assert c.data.split == "train[:32]" and c.data.options.in_memory and c.data.name == "mnist"
    assert (c.total_steps, c.batch_size, c.seed, c.ema_decay) == (600, 32, 0, 0.98)
    assert (c.log_every, c.ckpt_every, c.sample_every) == (30, 600, 0)
    assert (c.optim.lr, c.optim.warmup_steps, c.sample.num_steps) == (1e-3, 50, 16)
    assert c.compute_dtype == "float32" and c.ema_warmup and c.sample.sampler == "heun"
    assert (c.model.ch, c.model.ch_mult, c.model.num_res_blocks) == (16, (1, 2), 1)  # smoke
    npz = config_lib.load("experiments/memorization/mnist_unet_sweep.py:k=4,data_path=m.npz")
    assert (npz.data.name, npz.data.path, npz.data.split) == ("npz", "m.npz", "train[:4]")
    assert (npz.total_steps, npz.batch_size, npz.optim.lr, npz.model.ch) == (10_000, 128, 2e-4, 64)


def test_memorization_default_space_fits_a_cpu_and_says_what_inception_would_cost(tmp_path, capsys):
    import jax

    from core.evaluation.evaluator import Evaluator, Options
    from core.evaluation.sample_metrics import memorization_spaces
    from core.reference import Dataset

    class Source:
        images = np.zeros((30, 8, 8, 1), np.uint8)

    ds = Dataset("tiny", "train", lambda: Source(), cache_dir=str(tmp_path))
    samples = np.zeros((4, 8, 8, 1), np.uint8)
    if jax.default_backend() != "cpu":
        pytest.skip("the default differs only on a CPU")
    assert memorization_spaces(Evaluator(samples, dataset=ds)) == ["pixel"]
    err = capsys.readouterr().err
    assert "pixel space only on a CPU" in err and "features of the 30 training images" in err
    np.save(ds._path("features.npy"), np.zeros((30, 2048), np.float32))  # now cached
    assert memorization_spaces(Evaluator(samples, dataset=ds)) == ["pixel", "inception"]
    asked = Options(mem_spaces="inception")
    assert memorization_spaces(Evaluator(samples, dataset=ds, options=asked)) == ["inception"]
    points = np.zeros((4, 2), np.float32)  # not images: pixel (vector) space only
    assert memorization_spaces(Evaluator(points, dataset=ds)) == ["pixel"]
