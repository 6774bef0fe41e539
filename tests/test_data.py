import os
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds

import data.tfds
from core.errors import UserError
from core.experiment import Experiment
from data import ArraySource, Batches, build_source, prefetch, sample_toy
from data.tfds import TfdsSource

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


class RangeSource:
    """Example i is the vector [i, i] (so batches show which examples they hold)."""

    def __init__(self, n: int):
        self.num_examples, self.example_shape, self.num_classes = n, (2,), 0

    def __getitems__(self, indices):
        return {"x": np.repeat(np.asarray(indices, np.float32)[:, None], 2, axis=1)}


def images_npz(path, n=64, labels=True):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 8, 6, 3), dtype=np.uint8)
    y = rng.integers(0, 5, size=n)
    np.savez(path, *([x, y] if labels else [x]))
    return x, y


# --- Batches -----------------------------------------------------------------------------


def test_batches_deterministic_and_seeded():
    source = RangeSource(100)
    a, b = (
        Batches(source, global_batch_size=16, seed=3),
        Batches(source, global_batch_size=16, seed=3),
    )
    other = Batches(source, global_batch_size=16, seed=4)
    for step in (0, 5, 17):
        np.testing.assert_array_equal(a.get(step)["x"], b.get(step)["x"])
    assert not np.array_equal(a.indices(0), other.indices(0))


@pytest.mark.parametrize("batch_size", [10, 32, 250])
def test_each_epoch_covers_every_example_once(batch_size):
    n = 100
    batches = Batches(RangeSource(n), global_batch_size=batch_size, seed=0)
    steps = -(-4 * n // batch_size)
    stream = np.concatenate([batches.indices(s) for s in range(steps)])
    for epoch in range(4):
        np.testing.assert_array_equal(np.sort(stream[epoch * n : (epoch + 1) * n]), np.arange(n))
    assert not np.array_equal(stream[:n], stream[n : 2 * n])  # reshuffled each epoch


def test_get_is_independent_of_history():
    batches = Batches(RangeSource(37), global_batch_size=8, seed=1)
    sequential = [b["x"] for _, b in zip(range(12), batches.iterate(0))]
    resumed = Batches(RangeSource(37), global_batch_size=8, seed=1)
    for step in [11, 3, 7, 0, 5]:
        np.testing.assert_array_equal(resumed.get(step)["x"], sequential[step])
    np.testing.assert_array_equal(next(resumed.iterate(9))["x"], sequential[9])


def test_host_shards_concatenate_to_the_global_batch(tmp_path):
    x, y = images_npz(tmp_path / "a.npz")
    source = ArraySource(str(tmp_path / "a.npz"), use_labels=True)
    kw = dict(global_batch_size=24, seed=2, random_flip=True)
    whole = Batches(source, **kw)
    hosts = [Batches(source, process_index=p, process_count=4, **kw) for p in range(4)]
    for step in (0, 2, 9):
        parts = [h.get(step) for h in hosts]
        assert parts[0]["x"].shape == (6, 8, 6, 3)
        for key in ("x", "cond"):
            np.testing.assert_array_equal(
                np.concatenate([p[key] for p in parts]), whole.get(step)[key]
            )


def test_batch_checks():
    with pytest.raises(UserError, match="not divisible"):
        Batches(RangeSource(10), global_batch_size=10, seed=0, process_count=4)
    with pytest.raises(UserError, match="random_flip"):
        Batches(RangeSource(10), global_batch_size=2, seed=0, random_flip=True)


def test_random_flip_flips_about_half_deterministically(tmp_path):
    x, _ = images_npz(tmp_path / "a.npz", n=512, labels=False)
    source = ArraySource(str(tmp_path / "a.npz"))
    batches = Batches(source, global_batch_size=512, seed=0, random_flip=True)
    plain = Batches(source, global_batch_size=512, seed=0)
    got, ref = batches.get(3)["x"], plain.get(3)["x"]
    flipped = np.all(got == ref[:, :, ::-1], axis=(1, 2, 3))
    kept = np.all(got == ref, axis=(1, 2, 3))
    assert np.all(flipped ^ kept)
    assert 0.4 < flipped.mean() < 0.6
    np.testing.assert_array_equal(batches.get(3)["x"], got)
    assert not np.array_equal(batches.get(4)["x"], plain.get(4)["x"][:, :, ::-1])


# --- prefetch ----------------------------------------------------------------------------


def test_prefetch_keeps_order_and_applies_put():
    assert list(prefetch(range(20), 3, put=lambda i: i * i)) == [i * i for i in range(20)]


def test_prefetch_raises_the_producers_error():
    def items():
        yield from range(3)
        raise RuntimeError("broken shard")

    it = prefetch(items(), 2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="broken shard"):
        next(it)
    with pytest.raises(UserError):
        prefetch(range(3), 0)


def test_prefetch_close_stops_the_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    with prefetch(endless(), 2) as it:
        assert next(it) == 0
        thread = it._thread
    assert not thread.is_alive()
    assert not any(t.name == "driftlab-prefetch" and t.is_alive() for t in threading.enumerate())


# --- toy ---------------------------------------------------------------------------------


def test_eight_gaussians_statistics():
    x = sample_toy("8gaussians", 40_000, np.random.default_rng(0))
    assert x.dtype == np.float32 and x.shape == (40_000, 2)
    np.testing.assert_allclose(x.mean(0), 0, atol=0.05)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1).mean(), 2.0, atol=0.05)
    cluster = np.round(np.arctan2(x[:, 1], x[:, 0]) / (np.pi / 4)).astype(int) % 8
    np.testing.assert_allclose(np.bincount(cluster, minlength=8) / len(x), 1 / 8, atol=0.01)


def test_checkerboard_and_moons():
    x = sample_toy("checkerboard", 20_000, np.random.default_rng(1))
    assert np.all(np.abs(x) <= 2)
    assert np.all((np.floor(x[:, 0]) + np.floor(x[:, 1])) % 2 == 0)
    assert len(np.unique(np.floor(x), axis=0)) == 8
    moons = sample_toy("moons", 20_000, np.random.default_rng(1))
    np.testing.assert_allclose(moons.mean(0), 0, atol=0.05)
    assert 0.5 < moons.std() < 2


def test_toy_source_is_seeded():
    a = build_source("moons", num_examples=1000, seed=5)
    assert (a.num_examples, a.example_shape, a.num_classes) == (1000, (2,), 0)
    np.testing.assert_array_equal(
        a.__getitems__(np.arange(4))["x"], build_source("moons", num_examples=1000, seed=5).x[:4]
    )
    assert not np.array_equal(a.x, build_source("moons", split="test", num_examples=1000, seed=5).x)
    with pytest.raises(UserError, match="radius"):
        build_source("moons", radius=3)


# --- npz ---------------------------------------------------------------------------------


def test_npz_roundtrip_with_labels(tmp_path):
    x, y = images_npz(tmp_path / "s.npz")
    source = build_source("npz", path=str(tmp_path / "s.npz"), use_labels=True)
    assert (source.num_examples, source.example_shape, source.num_classes) == (64, (8, 6, 3), 5)
    batch = source.__getitems__(np.array([3, 0, 7]))
    np.testing.assert_allclose(batch["x"], x[[3, 0, 7]] / 127.5 - 1, atol=1e-6)
    assert batch["cond"].dtype == np.int32
    np.testing.assert_array_equal(batch["cond"], y[[3, 0, 7]])
    vectors = np.random.default_rng(0).normal(size=(10, 3))
    np.savez(tmp_path / "v.npz", x=vectors)
    np.testing.assert_allclose(
        ArraySource(str(tmp_path / "v.npz")).__getitems__([2])["x"], vectors[[2]].astype(np.float32)
    )


def test_npz_errors(tmp_path):
    with pytest.raises(UserError, match="nowhere.npz"):
        ArraySource(str(tmp_path / "nowhere.npz"))
    np.savez(tmp_path / "bad.npz", np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(UserError, match=r"\(4, 5, 6\)"):
        ArraySource(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "nolabels.npz", np.zeros((4, 5), np.float32))
    with pytest.raises(UserError, match="no labels"):
        ArraySource(str(tmp_path / "nolabels.npz"), use_labels=True)
    with pytest.raises(UserError, match="always read into memory"):
        ArraySource(str(tmp_path / "nolabels.npz"), in_memory=False)


# --- tfds --------------------------------------------------------------------------------


def test_offline_mnist_test_split(shared_data):
    source = build_source(
        "mnist", split="test", data_dir=os.path.join(shared_data, "tfds"), use_labels=True
    )
    assert (source.num_examples, source.example_shape, source.num_classes) == (
        10_000,
        (28, 28, 1),
        10,
    )
    np.testing.assert_array_equal(np.bincount(source.labels), MNIST_TEST_COUNTS)
    batch = Batches(source, global_batch_size=500, seed=0).get(0)
    assert batch["x"].dtype == np.float32 and batch["x"].shape == (500, 28, 28, 1)
    assert batch["x"].min() == -1 and batch["x"].max() == 1
    assert batch["cond"].dtype == np.int32


def test_tfds_cache_and_streaming_agree(shared_data, tmp_path):
    kw = dict(split="test[:300]", data_dir=os.path.join(shared_data, "tfds"), use_labels=True)
    first = TfdsSource("mnist", cache_dir=str(tmp_path), **kw)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    cached = TfdsSource("mnist", cache_dir=str(tmp_path), **kw)
    streamed = TfdsSource("mnist", in_memory=False, **kw)
    idx = np.array([5, 299, 0, 42])
    for other in (cached, streamed):
        for key in ("x", "cond"):
            np.testing.assert_array_equal(
                first.__getitems__(idx)[key], other.__getitems__(idx)[key]
            )
    resized = TfdsSource("mnist", image_size=14, in_memory=False, **kw)
    assert resized.example_shape == (14, 14, 1)
    assert resized.__getitems__(idx)["x"].shape == (4, 14, 14, 1)


def test_mock_cifar10_through_tfds_source():
    with tfds.testing.mock_data(num_examples=12):
        source = build_source("cifar10", use_labels=True)
        small = build_source("cifar10", in_memory=False, image_size=16)
        assert small.__getitems__(np.arange(3))["x"].shape == (3, 16, 16, 3)
    assert (source.num_examples, source.example_shape, source.num_classes) == (12, (32, 32, 3), 10)
    batch = Batches(source, global_batch_size=4, seed=0, random_flip=True).get(2)
    assert batch["x"].shape == (4, 32, 32, 3) and batch["cond"].shape == (4,)
    assert -1 <= batch["x"].min() and batch["x"].max() <= 1


def test_missing_dataset_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data.tfds, "can_prepare", lambda: False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError) as info:
        build_source("cifar10")
    message = str(info.value)
    assert "\n" not in message
    assert "'cifar10'" in message and str(tmp_path) in message and "driftlab[prepare]" in message


def test_a_failed_preparation_is_a_one_line_error(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def offline(self, *args, **kwargs):
        raise ConnectionError("Name or service not known\nmore lines")

    monkeypatch.setattr(data.tfds, "can_prepare", lambda: True)  # as with TensorFlow
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError) as info:
        build_source("cifar10")
    message = str(info.value)
    assert "\n" not in message and "preparing it failed (ConnectionError: Name or" in message


def test_tfds_name_split_and_option_errors(shared_data):
    data_dir = os.path.join(shared_data, "tfds")
    with pytest.raises(UserError, match="did you mean mnist"):
        build_source("mnst", data_dir=data_dir)
    with pytest.raises(UserError, match="splits: train, test"):
        build_source("mnist", split="validation", data_dir=data_dir)
    with pytest.raises(UserError, match="colour"):
        build_source("mnist", colour=True)


def test_npz_files_per_split_and_one_file_is_one_split(tmp_path):
    from core import config as config_lib
    from core import reference

    x_train, _ = images_npz(tmp_path / "d_train.npz", n=64)
    x_test, _ = images_npz(tmp_path / "d_test.npz", n=16)
    c = config_lib.load("experiments/flow_matching/mnist_unet.py")
    c.data.update(name="npz", path=str(tmp_path / "d_{split}.npz"))
    data = Experiment.from_config(c).data
    assert data.source().num_examples == 64
    test = data.source("test")
    np.testing.assert_array_equal(test.x, x_test)
    rows = data.source("test[4:10]")  # rows as tfds's split syntax takes them
    np.testing.assert_array_equal(rows.x, x_test[4:10])
    assert rows.num_examples == 6 and data.source("train[:8]").num_examples == 8
    with pytest.raises(UserError, match="integer rows"):
        data.source("train[:10%]")
    c.data.path = str(tmp_path / "d_train.npz")  # one file: the config's split only
    data = Experiment.from_config(c).data
    assert data.source("train").num_examples == 64
    with pytest.raises(UserError, match=r"split 'test' asked of npz data .*d_train.npz"):
        data.source("test")
    # evaluation caches features per file: the splits, and a rewritten file, get new tags
    tags = {
        split: reference.dataset_from_name(str(tmp_path / "d_{split}.npz"), split).tag
        for split in ("train", "test")
    }
    assert tags["train"] != tags["test"] and all(t.startswith("npz_d_") for t in tags.values())
    template = str(tmp_path / "d_{split}.npz")
    assert reference.dataset_from_name(template, "test").images.shape[0] == 16
    images_npz(tmp_path / "d_test.npz", n=17)
    rewritten = reference.dataset_from_name(template, "test").tag
    assert rewritten != tags["test"]
    os.utime(tmp_path / "d_test.npz", ns=(1, 1))  # the same bytes, re-provisioned: same tag
    assert reference.dataset_from_name(template, "test").tag == rewritten


def test_export_npz_writes_the_stored_images_and_labels_of_each_split(shared_data, tmp_path):
    from scripts import export_npz

    data_dir = os.path.join(shared_data, "tfds")
    out = str(tmp_path / "m_{split}.npz")
    export_npz.main(["x", "--dataset", "mnist", "--splits", "test[:300],train[:100]",
                     "--out", out, "--data-dir", data_dir])  # fmt: skip
    for split, n in (("test[:300]", 300), ("train[:100]", 100)):
        tfds_source = build_source("mnist", split=split, data_dir=data_dir, use_labels=True)
        whole = data.split_rows(split)[0]  # the file holds the exported rows
        npz_source = build_source("npz", path=out, split=whole, use_labels=True)
        assert npz_source.num_examples == n and npz_source.num_classes == 10
        everything = np.arange(n)
        for a, b in zip(tfds_source.__getitems__(everything).values(),
                        npz_source.__getitems__(everything).values()):  # fmt: skip
            np.testing.assert_array_equal(a, b)
    with pytest.raises(UserError, match=r"needs \{split\}"):
        export_npz.main(["x", "--dataset", "mnist", "--out", str(tmp_path / "m.npz")])
