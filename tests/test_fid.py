"""FID Inception port, preprocessing, Frechet distance, KID, precision/recall, IS, weights.

Agreement measured here: the network matches the source TorchScript model's features to max
abs 6.7e-6 (features reach 5.2), the preprocessing matches torch's interpolate to 3.6e-7,
pytorch-fid's activations of 4 MNIST images to 8.6e-6, and FID(MNIST train[:500],
test[:500]) = 21.5247059 vs pytorch-fid's printed 21.5247043 (relative 7e-8, with pytorch-fid's
own sqrtm steps; the slow test asks for 0.1 % and runs the default, the trace by symmetric
eigendecompositions). References come from scripts/fid_reference_pytorch.py (tests/data/).
"""

import functools
import gzip
import hashlib
import json
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest
import scipy.linalg
from flax import nnx

from core.errors import UserError
from metrics import fid as fm
from models import inception as inc
from models import inception_pth

DATA = os.path.join(os.path.dirname(__file__), "data")
WEIGHTS = "inception/fid_inception_v3_2015-12-05_fp32.npz"


@functools.cache
def _net(path: str) -> inc.InceptionV3:
    return inc.load_inception(path)


@functools.cache
def _features_fn(net: inc.InceptionV3):
    graphdef, params = nnx.split(net)
    fn = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    return lambda x: np.asarray(fn(params, x))


def _reference(shared_data):
    ref = np.load(os.path.join(shared_data, "inception", "fid_inception_v3_reference_features.npz"))
    x = (ref["images_uint8_nhwc"].astype(np.float32) - 128.0) / 128.0  # the source's input
    return x, ref["features"]


# --- the network -----------------------------------------------------------------------


def test_features_match_source_model(shared_data):
    # Measured: max abs error 6.7e-6 with features up to 5.16 (1.3e-6 relative): float32
    # summation-order noise between XLA's and oneDNN's convolutions over 94 conv layers.
    # atol 5e-5 leaves 7x headroom and is still 1e5 times below the features' scale.
    x, expected = _reference(shared_data)
    feats = _features_fn(_net(os.path.join(shared_data, WEIGHTS)))(x)
    assert feats.shape == (3, 2048)
    np.testing.assert_allclose(feats, expected, rtol=0, atol=5e-5)


def test_fp16_weights_load_and_upcast(shared_data, tmp_path):
    src = np.load(os.path.join(shared_data, WEIGHTS))
    path = tmp_path / "fp16.npz"
    np.savez(path, **{k: v.astype(np.float16) for k, v in src.items()})
    net = inc.load_inception(str(path))
    assert net.conv.kernel[...].dtype == np.float32
    x, expected = _reference(shared_data)
    err = np.abs(_features_fn(net)(x) - expected).max() / np.abs(expected).max()
    assert err < 0.01  # shared README: fp16-rounded weights move features <= 0.31 %


def test_layers_match_arch_json(shared_data):
    with open(os.path.join(shared_data, "inception", "fid_inception_v3_arch.json")) as f:
        modules = json.load(f)["modules"]
    net = nnx.eval_shape(lambda: inc.InceptionV3(rngs=nnx.Rngs(0)))
    convs = [m for m in modules if m["type"] == "Conv2dLayer"]
    assert len(convs) == 94
    for m in convs:
        layer = net
        for part in m["name"].split(".")[2:]:
            layer = getattr(layer, part)
        pad = m["padding"] if isinstance(m["padding"], list) else [m["padding"]] * 2
        assert layer.stride == m["stride"], m["name"]
        assert layer.padding == tuple((p, p) for p in pad), m["name"]
    pools = {m["name"]: m["type"] for m in modules if "Pool" in m["type"]}
    assert pools["net.layers.mixed_10.tower_2_pool"] == "MaxPool2d"
    assert net.mixed_10.pool == "max" and net.mixed_9.pool == "avg"


def test_logits_only_with_a_logits_layer(shared_data):
    arrays = dict(np.load(os.path.join(shared_data, WEIGHTS)))
    with pytest.raises(UserError, match="no 1008-way logits"):
        fm.inception_features(
            np.zeros((1, 8, 8, 3), np.uint8),
            _net(os.path.join(shared_data, WEIGHTS)),
            with_logits=True,
        )
    rng = np.random.default_rng(0)
    arrays["net.fc.weight"] = rng.standard_normal((1008, 2048)).astype(np.float32)
    arrays["net.fc.bias"] = rng.standard_normal(1008).astype(np.float32)
    net = inc.inception_from_arrays(arrays)
    feats = rng.random((2, 2048), np.float32)
    np.testing.assert_allclose(
        np.asarray(net.logits(feats, bias=False)),
        feats @ arrays["net.fc.weight"].T,
        rtol=1e-5,
        atol=1e-4,
    )
    np.testing.assert_allclose(
        np.asarray(net.logits(feats) - net.logits(feats, bias=False)),
        np.broadcast_to(arrays["net.fc.bias"], (2, 1008)),
        atol=1e-4,
    )


# --- preprocessing -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["gray28", "rgb32", "rgb13x47", "big331x317"])
def test_preprocess_matches_torch_interpolate(case):
    # Expected values: torch 2.13 F.interpolate(bilinear, align_corners=False) after /255,
    # then 2x - 1 (pytorch-fid's path), at all border pixels and 0.5 % of the rest.
    ref = np.load(os.path.join(DATA, "resize_reference.npz"))
    mask = np.unpackbits(ref[f"{case}/mask"])[: 299 * 299].reshape(299, 299).astype(bool)
    out = np.asarray(jax.jit(fm.preprocess)(ref[f"{case}/images"]))
    assert out.shape == (len(ref[f"{case}/images"]), 299, 299, 3)
    np.testing.assert_allclose(out[:, mask, :], ref[f"{case}/values"], rtol=0, atol=1e-6)


def test_preprocess_rejects_float_and_bad_shapes():
    with pytest.raises(UserError, match="uint8"):
        fm.preprocess(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match="shape|images"):
        fm.preprocess(np.zeros((1, 8, 8, 4), np.uint8))


# --- Frechet distance --------------------------------------------------------------------


def _spd(rng, n, rank=None):
    a = rng.standard_normal((n, rank or n))
    return a @ a.T / n + (0 if rank else 0.1 * np.eye(n))


@pytest.mark.parametrize("n", [5, 50, 150])
def test_sqrtm_matches_scipy(n):
    rng = np.random.default_rng(n)
    s1, s2 = _spd(rng, n), _spd(rng, n)
    for a in (s1, s1 @ s2):  # symmetric, and the non-symmetric product FID takes the root of
        ours, theirs = fm.sqrtm(a), scipy.linalg.sqrtm(a)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10 * np.abs(theirs).max())
        np.testing.assert_allclose(ours @ ours, a, rtol=0, atol=1e-10 * np.abs(a).max())


def test_fid_matches_pytorch_fid_algorithm_on_rank_deficient_stats():
    # 120 samples in 200 dims: singular covariances, as with few images; the pytorch-fid
    # algorithm (scipy sqrtm, real part) is the reference.
    rng = np.random.default_rng(0)
    f1 = rng.standard_normal((120, 200)) @ rng.standard_normal((200, 200))
    f2 = 0.8 * rng.standard_normal((120, 200)) @ rng.standard_normal((200, 200)) + 0.3
    (m1, s1), (m2, s2) = fm.stats(f1), fm.stats(f2)
    expected = (
        (m1 - m2) @ (m1 - m2)
        + np.trace(s1)
        + np.trace(s2)
        - 2 * np.trace(np.real(scipy.linalg.sqrtm(s1 @ s2)))
    )
    assert fm.fid_from_stats(m1, s1, m2, s2, method="sqrtm") == pytest.approx(expected, rel=1e-9)
    # the fast trace by eigendecompositions: the same number (1.4e-8 apart when written)
    assert fm.fid_from_stats(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-7)


def test_trace_sqrt_product_is_the_trace_of_the_principal_root():
    rng = np.random.default_rng(4)
    for rank in (None, 20):  # full rank, and rank-deficient (the root of a singular product)
        s1, s2 = _spd(rng, 60, rank), _spd(rng, 60)
        want = np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
        assert fm.trace_sqrt_product(s1, s2) == pytest.approx(want, rel=1e-8)
        assert fm.trace_sqrt_product(s2, s1) == pytest.approx(want, rel=1e-8)  # tr is symmetric
        root = fm.psd_sqrt(s2)  # a known root of the second matrix gives the same trace
        np.testing.assert_allclose(root @ root, s2, rtol=0, atol=1e-12 * np.abs(s2).max())
        got = fm.trace_sqrt_product(s1, s2, sqrt_sigma2=root)
        assert got == pytest.approx(want, rel=1e-8)
    d = np.diag([4.0, 9.0, 0.0])  # commuting: tr sqrt(d d') = sum sqrt(d_i d'_i) = 2 * 3 + 3 * 4
    assert fm.trace_sqrt_product(d, np.diag([9.0, 16.0, 5.0])) == pytest.approx(18.0, rel=1e-12)
    with pytest.raises(UserError, match="unknown FID method 'schur'"):
        fm.fid_from_stats(np.zeros(3), d, np.zeros(3), d, method="schur")


def test_fid_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    v1, v2 = rng.random(6) + 0.1, rng.random(6) + 0.1
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = fm.fid_from_stats(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
    rng = np.random.default_rng(2)
    a = np.maximum(rng.standard_normal((300, 64)) @ rng.standard_normal((64, 64)), 0)
    b = np.maximum(rng.standard_normal((250, 64)) @ rng.standard_normal((64, 64)) + 0.2, 0)
    scale = np.trace(fm.stats(a)[1])
    assert abs(fm.fid_from_features(a, a)) < 1e-9 * scale
    ab, ba = fm.fid_from_features(a, b), fm.fid_from_features(b, a)
    assert ab > 1e-3 * scale
    assert ab == pytest.approx(ba, rel=1e-9)


def test_fid_singular_product_falls_back_to_eps():
    sigma = np.zeros((3, 3))
    with pytest.warns(UserWarning, match="singular product"):
        value = fm.fid_from_stats(np.zeros(3), sigma, np.ones(3), sigma, method="sqrtm")
    assert value == pytest.approx(3.0, abs=1e-5)
    assert fm.fid_from_stats(np.zeros(3), sigma, np.ones(3), sigma) == 3.0  # eigh: no offset


def test_running_stats_equal_stats_of_the_concatenation():
    # features far from 0 (mean 1e3, spread 1): plain sums of x x^T would lose about 6 of
    # float64's 16 digits to cancellation; the shifted sums lose none
    rng = np.random.default_rng(5)
    feats = 1e3 + rng.standard_normal((1000, 40)) @ rng.standard_normal((40, 40)) / 6
    running = fm.RunningStats()
    for part in np.split(feats, [7, 300, 301, 999]):  # uneven batches, one of a single row
        running.update(part.astype(np.float32))
    mu, sigma = running.result()
    want_mu, want_sigma = fm.stats(feats.astype(np.float32))
    np.testing.assert_allclose(mu, want_mu, rtol=1e-14)
    np.testing.assert_allclose(sigma, want_sigma, rtol=0, atol=1e-12 * np.abs(want_sigma).max())
    with pytest.raises(UserError, match=r"batches \[n, 40\] \[n, D\], got \(2, 3\)"):
        running.update(np.zeros((2, 3)))
    with pytest.raises(UserError, match="N >= 2"):
        fm.RunningStats().result()


def test_stats_roundtrip_in_pytorch_fid_layout(tmp_path):
    mu, sigma = fm.stats(np.random.default_rng(3).standard_normal((10, 4)))
    fm.save_stats(str(tmp_path / "s.npz"), mu, sigma)
    with np.load(tmp_path / "s.npz") as f:
        assert sorted(f.files) == ["mu", "sigma"]
    m2, s2 = fm.load_stats(str(tmp_path / "s.npz"))
    np.testing.assert_array_equal(m2, mu)
    np.testing.assert_array_equal(s2, sigma)
    with pytest.raises(UserError, match="mu, sigma"):
        fm.load_stats(str(tmp_path / "missing.npz"))


# --- KID, precision/recall, Inception Score ------------------------------------------------


def test_kid_near_zero_for_same_sets_and_positive_for_shifted_sets():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 400, 32))
    shifted = fm.kid(a, a + 0.5, num_subsets=20)
    assert shifted > 0.5
    assert abs(fm.kid(a, b, num_subsets=20)) < 0.01 * shifted  # same distribution
    # Identical sets: subsets drawn from one set are not independent, so the unbiased
    # estimator is off by O(1/m), at most 2 * mean k(x, x) / (m - 1) below zero.
    same = fm.kid(a, a, num_subsets=20)
    bound = 2 * np.mean((np.sum(a * a, 1) / 32 + 1) ** 3) / (len(a) - 1)
    assert -bound <= same <= 0.01 * shifted


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((200, 16)).astype(np.float32)
    assert fm.precision_recall(a, a, chunk=64) == (1.0, 1.0)
    assert fm.precision_recall(a, a + 1000.0, chunk=64) == (0.0, 0.0)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((150, 8))
    fake = 1.3 * rng.standard_normal((120, 8)) + 0.4
    d = lambda x, y: np.linalg.norm(x[:, None] - y[None], axis=-1)  # noqa: E731
    r_real = np.sort(d(real, real), axis=1)[:, 3]
    r_fake = np.sort(d(fake, fake), axis=1)[:, 3]
    precision = np.mean(np.any(d(fake, real) <= r_real[None], axis=1))
    recall = np.mean(np.any(d(real, fake) <= r_fake[None], axis=1))
    got = fm.precision_recall(real, fake, k=3, chunk=32)
    assert got == pytest.approx((precision, recall), abs=1 / 120 + 1e-9)
    assert 0 < got[0] < 1 and 0 < got[1] < 1


def test_inception_score_oracles():
    assert fm.inception_score(np.zeros((50, 1008)))[0] == pytest.approx(1.0)
    confident = np.full((100, 1008), -50.0)
    confident[np.arange(100), np.arange(100) % 10] = 50.0  # 10 classes, evenly, certain
    mean, std = fm.inception_score(confident, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6)
    assert std == pytest.approx(0.0, abs=1e-6)


# --- weights: restricted checkpoint reader, names, download, missing files ------------------


@pytest.mark.parametrize("name", ["tiny_zip.pth", "tiny_legacy.pth"])
def test_read_torch_checkpoint(name):
    state = inception_pth.read_torch_checkpoint(os.path.join(DATA, name))
    expected = np.load(os.path.join(DATA, "tiny_pth_expected.npz"))
    assert sorted(state) == sorted(expected.files)
    for key in expected.files:
        assert state[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(state[key], expected[key])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch should_not_exist",))


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_reader_refuses_non_tensor_globals(tmp_path, monkeypatch, layout):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    if layout == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", pickle.dumps(_Evil(), protocol=2))
    else:
        path.write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(UserError, match="not a tensor-rebuild global"):
        inception_pth.read_torch_checkpoint(str(path))
    assert not (tmp_path / "should_not_exist").exists()


def test_pytorch_fid_names_map_onto_the_npz(shared_data):
    with open(os.path.join(DATA, "pytorch_fid_state_shapes.json")) as f:
        shapes = json.load(f)  # pytorch-fid's own module tree: 566 names
    arrays = np.load(os.path.join(shared_data, WEIGHTS))
    mapped = {inception_pth.npz_name(k): tuple(s) for k, s in shapes.items()}
    mapped.pop(None)
    assert mapped.pop("net.fc.weight") == (1008, 2048) and mapped.pop("net.fc.bias") == (1008,)
    assert mapped == {k: arrays[k].shape for k in arrays.files}
    state = {k: np.ones(s, np.float32) for k, s in shapes.items()}
    assert set(inception_pth.convert_pytorch_fid(state)) == set(arrays.files) | {
        "net.fc.weight",
        "net.fc.bias",
    }
    state["Mixed_5b.branch1x1.bn.weight"] = np.full(64, 2.0, np.float32)
    with pytest.raises(UserError, match="not all ones"):
        inception_pth.convert_pytorch_fid(state)


def test_download_verifies_sha256(tmp_path):
    src = os.path.join(DATA, "tiny_zip.pth")
    with open(src, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    url, dest = "file://" + src, str(tmp_path / "w.pth")
    with pytest.raises(UserError, match="checksum mismatch"):
        inception_pth.download_verified(url, dest, sha256="0" * 64)
    assert os.listdir(tmp_path) == []
    inception_pth.download_verified(url, dest, sha256=digest)
    assert (
        inception_pth.read_torch_checkpoint(dest).keys()
        == inception_pth.read_torch_checkpoint(src).keys()
    )


def test_missing_weights_give_one_line_user_error(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(UserError, match=inc.ENV_VAR) as info:
        inc.load_inception(missing)
    assert missing in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setenv(inc.ENV_VAR, missing)
    with pytest.raises(UserError, match="nope.npz"):
        inc.load_inception()
    # No env var and no cache: the weights beside the checkout (../shared/data), else the
    # download, which fails (a URL that cannot be fetched here).
    monkeypatch.delenv(inc.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shared = tmp_path / "shared_weights.npz"
    shared.write_bytes(b"")
    monkeypatch.setattr(inc, "SHARED_WEIGHTS", str(shared))
    assert inc.resolve_weights() == str(shared)
    monkeypatch.setattr(inc, "SHARED_WEIGHTS", str(tmp_path / "absent.npz"))
    monkeypatch.setattr(inception_pth, "PTH_URL", "file://" + str(tmp_path / "absent.pth"))
    with pytest.raises(UserError, match=inc.ENV_VAR) as info:
        inc.load_inception()
    assert inc.cache_path() in str(info.value) and "\n" not in str(info.value)


# --- FID against pytorch-fid ---------------------------------------------------------------


def _mnist(shared_data, name):
    """uint8 [N, 28, 28] from an MNIST idx3 .gz file."""
    with gzip.open(os.path.join(shared_data, "mnist", name), "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)


def test_features_match_pytorch_fid_activations_on_mnist(shared_data):
    # pytorch-fid's get_activations (PNG -> RGB -> ToTensor -> interpolate -> 2x-1 -> net)
    # on MNIST train[:4]; measured max abs difference 8.6e-6 (features up to 4.2).
    expected = np.load(os.path.join(DATA, "mnist_pytorch_fid_features.npz"))["train_0_4"]
    images = _mnist(shared_data, "train-images-idx3-ubyte.gz")[:4]
    seen = []  # batches of 3 and 1 (padded to 3): each reaches on_batch once, in order
    net = _net(os.path.join(shared_data, WEIGHTS))
    feats = fm.inception_features(images, net, batch_size=3, on_batch=seen.append)
    np.testing.assert_allclose(feats, expected, rtol=0, atol=5e-5)
    assert [len(b) for b in seen] == [3, 1]
    np.testing.assert_array_equal(np.concatenate(seen), feats)
    # the default batch (10 on a CPU, so all 4 in one call) gives the same features
    assert fm.default_batch() == 10
    np.testing.assert_allclose(fm.inception_features(images, net), feats, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="batch_size >= 1, got 0"):
        fm.inception_features(images, net, batch_size=0)


@pytest.mark.slow
def test_fid_matches_pytorch_fid_on_mnist(shared_data):
    # 1000 images through the network at 299x299 on CPU plus a 2048-d matrix square root:
    # about 10 minutes on a busy 2-core machine. Measured: 21.5247059 vs pytorch-fid's
    # 21.5247043 (relative 7e-8); the issue asks for 0.1 %.
    with open(os.path.join(DATA, "fid_reference.json")) as f:
        reference = json.load(f)
    net = _net(os.path.join(shared_data, WEIGHTS))
    a = fm.inception_features(
        _mnist(shared_data, "train-images-idx3-ubyte.gz")[:500], net, batch_size=10
    )
    b = fm.inception_features(
        _mnist(shared_data, "t10k-images-idx3-ubyte.gz")[:500], net, batch_size=10
    )
    assert fm.fid_from_features(a, b) == pytest.approx(reference["fid"], rel=1e-3)


def test_bench_inception_times_each_batch_size(shared_data, tmp_path, monkeypatch, capsys):
    # scripts.bench_inception: one row per batch size and pass, positive times; a bad list
    # of batch sizes is one error line
    from scripts import bench_inception

    monkeypatch.setenv("DRIFTLAB_INCEPTION_WEIGHTS", os.path.join(shared_data, WEIGHTS))
    out = tmp_path / "bench.json"
    bench_inception.main(
        ["x", "--batches", "1,2", "--num", "2", "--repeats", "1", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["backend"] == "cpu" and [r["batch"] for r in result["passes"]] == [1, 2]
    assert all(r["wall_s_per_image"] > 0 and r["cpu_s_per_image"] > 0 for r in result["passes"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        bench_inception.run(lambda argv: bench_inception.main(["x", "--batches", "a,b"]))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --batches must be a comma list") and err.count("\n") == 1
