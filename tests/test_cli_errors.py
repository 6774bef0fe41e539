"""The CLIs' input: malformed names and files are one line with exit status 2, named before
any expensive work; labels of the wrong length are refused; per-example metrics are limited
and say so; long passes show progress; every CLI's --help lists its defaults."""

import argparse
import importlib
import json
import os

import numpy as np
import pytest

from core.errors import UserError, lookup, plural
from scripts.common import run
from tests.conftest import PYTHON, ROOT

QUICK = "experiments/quickstart.py:smoke=True"


def _one_line(monkeypatch, capsys, main, argv: list[str]) -> str:
    """`run(main)` with `argv`: it must exit 2 with one `error:` line and no traceback."""
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as e:
        run(main)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- dataset names -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mn ist", "unknown dataset 'mn ist', not a tfds name either (those are NAME[/CONFIG]"),
        ("mn ist", "did you mean mnist"),
        ("mnist:9.9.9", "dataset 'mnist' has no version 9.9.9; its versions: 3.0.1"),
        ("", "the dataset name is empty; built in: the toys 8gaussians, moons, checkerboard"),
        ("  ", "the dataset name is empty"),
        ("mnist/foo", "dataset 'mnist' has no config 'foo'; it has no configs"),
        ("mnist/a=1", "mnist takes no option(s) a"),
        ("mnist:x", "(a version after ':' is x.y.z, as in mnist:3.0.1)"),
        ("a:b:c", "unknown dataset 'a:b:c', not a tfds name either"),
        ("moon", "did you mean moons? Built in: the toys 8gaussians, moons, checkerboard"),
        ("8gaussian", "did you mean 8gaussians"),
    ],
)
def test_malformed_and_unknown_dataset_names_are_one_user_error(name, expected, tmp_path):
    import data

    with pytest.raises(UserError) as info:  # no data is read: a fresh, empty data_dir
        data.build_source(name, data_dir=str(tmp_path))
    assert expected in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError) as early:  # the cheap check evaluation runs first
        data.check_name(name, data_dir=str(tmp_path))
    assert str(early.value) == str(info.value)


def test_malformed_and_empty_splits_are_one_user_error(shared_data, tmp_path):
    import data

    tfds_dir = os.path.join(shared_data, "tfds")
    cases = {
        "train[:x]": "dataset 'mnist': cannot read the split 'train[:x]' (Unrecognized split",
        "train[200%:]": "percent slice boundaries should be in [-100, 100]",
        "train[5:2]": "the split 'train[5:2]' of dataset 'mnist' selects no examples",
        "test[:0]": "the split 'test[:0]' of dataset 'mnist' selects no examples",
    }
    for split, expected in cases.items():  # in_memory=False: nothing is decoded
        with pytest.raises(UserError) as info:
            data.build_source("mnist", split=split, data_dir=tfds_dir, in_memory=False)
        assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert data.build_source("mnist", split="test[-5:]", data_dir=tfds_dir).num_examples == 5
    np.savez(tmp_path / "d.npz", arr_0=np.zeros((10, 2), np.float32))
    with pytest.raises(UserError, match="rows 5:2 of .* select no examples"):
        data.build_source("npz", path=str(tmp_path / "d.npz"), split="train[5:2]")


def test_train_with_a_malformed_dataset_name_is_one_line_status_2(tmp_path, python_env):
    """From the command line (three processes at once): one line, status 2, nothing written."""
    import subprocess

    env = dict(python_env, TFDS_DATA_DIR=str(tmp_path / "no_tfds"))
    cases = {
        "unknown dataset 'mn ist', not a tfds name either": "mn ist",
        "dataset 'mnist' has no version 9.9.9; its versions: 3.0.1": "mnist:9.9.9",
        "the dataset name is empty": "",
    }
    procs = {
        expected: subprocess.Popen(
            [PYTHON, "-m", "scripts.train", "--config", QUICK, "--workdir", str(tmp_path / f"w{i}")]
            + [f"--config.data.name={name}"],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i, (expected, name) in enumerate(cases.items())
    }
    for i, (expected, proc) in enumerate(procs.items()):
        _, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert expected in lines[0], (expected, lines[0])
        assert not os.path.exists(tmp_path / f"w{i}" / "checkpoints")


# --- names of kinds, options of losses -----------------------------------------------------


def test_lookup_names_the_plural_of_every_kind():
    cases = {
        "loss": "losses", "network": "networks", "sampler": "samplers", "prior": "priors",
        "metric": "metrics", "verifier": "verifiers", "toy distribution": "toy distributions",
        "toy split": "toy splits", "Earth dataset": "Earth datasets", "family": "families",
        "toy with a known density": "toys with a known density", "key": "keys",
    }  # fmt: skip
    assert {kind: plural(kind) for kind in cases} == cases
    import losses

    with pytest.raises(UserError, match=r"unknown loss 'nope'; known losses: cross_entropy"):
        lookup(losses.LOSSES, "nope", "loss")


def test_an_unknown_loss_option_lists_the_loss_options_not_the_config_keys():
    from core import config as config_lib

    config = config_lib.load(QUICK)
    argv = ["--config.loss.nope=1"]
    config_lib.add_option_overrides(config, argv)
    with pytest.raises(UserError) as info:
        config_lib.check_override_keys(config, argv)
    message = str(info.value)
    assert "loss 'flow_matching' has no option 'nope'; its options: cond_drop_prob," in message
    assert "ot_pairing" in message and "keys:" not in message and "name" not in message[-80:]
    argv = ["--config.loss.name=shortcut", "--config.loss.nope=1"]  # the named loss's options
    with pytest.raises(UserError, match="loss 'shortcut' has no option 'nope'.*max_steps"):
        config_lib.check_override_keys(config, argv)
    with pytest.raises(UserError, match="network 'mlp' has no option 'width'; its options: "):
        config_lib.check_override_keys(config, ["--config.model.width=3"])
    with pytest.raises(UserError, match=r"optim has no 'nope' \(keys: b1"):  # other sections
        config_lib.check_override_keys(config, ["--config.optim.nope=3"])


# --- sample files ------------------------------------------------------------------------


@pytest.fixture
def no_inception(monkeypatch):
    """Any Inception network or pass started fails the test: the checks come first."""
    from metrics import fid as fm

    def started(*args, **kwargs):
        raise AssertionError("the Inception network started before the input was checked")

    monkeypatch.setattr(fm, "inception_features", started)
    monkeypatch.setattr(fm, "_default_net", started)
    monkeypatch.setattr("models.inception.load_inception", started)


def test_sample_files_are_checked_whole_before_any_work(
    tmp_path, monkeypatch, capsys, no_inception
):
    from scripts import evaluate

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 3)).astype(np.uint8)

    def npz(name, **arrays):
        np.savez(tmp_path / name, **arrays)
        return str(tmp_path / name)

    points = npz("points.npz", arr_0=rng.normal(size=(20, 2)).astype(np.float32))
    stats = npz("stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    (tmp_path / "text.npz").write_text("these are not arrays\n")
    np.save(tmp_path / "array.npy", images)
    cases = {
        "pr needs images [N, H, W, 1 or 3] (Inception features); the samples [N, 2] are not "
        "images (for low-dimensional data use swd)": [
            points, "--metrics", "pr", "--ref-stats", stats,
        ],
        "fid, kid need images": [points, "--metrics", "fid,kid", "--ref-stats", stats],
        "memorization needs images": [  # its Inception space, asked for (the default on
            # non-images is the pixel space alone)
            points, "--metrics", "memorization", "--mem-space", "pixel,inception",
            "--ref-stats", stats,
        ],
        "found float64 of shape (6, 8, 8, 3) in [0, 1]: store (x * 255).round().astype(np.uint8)": [
            npz("f64.npz", arr_0=images / 255.0), "--ref-stats", stats,
        ],
        "is not an .npz file (numpy's zip of arrays, np.savez): it is not a zip archive": [
            str(tmp_path / "text.npz"), "--ref-stats", stats,
        ],
        "it is an .npy file (np.save)": [str(tmp_path / "array.npy"), "--ref-stats", stats],
        "arr_0 (6, 3, 8, 8) has its channels first (NCHW); samples are NHWC": [
            npz("nchw.npz", arr_0=images.transpose(0, 3, 1, 2)), "--ref-stats", stats,
        ],
        "arr_1 must hold one label per example of arr_0 (6), found shape (5,)": [
            npz("short.npz", arr_0=images, arr_1=np.arange(5)), "--ref-stats", stats,
        ],
        "labels in arr_1 must be integers, found float32": [
            npz("flabels.npz", arr_0=images, arr_1=np.zeros(6, np.float32)), "--ref-stats", stats,
        ],
        "arr_0 (6, 8, 8) has no channel axis": [
            npz("gray.npz", arr_0=images[..., 0]), "--ref-stats", stats,
        ],
        "stats.npz have 4 dimensions, not the 2048 of Inception features": [
            npz("ok.npz", arr_0=images), "--ref-stats", stats,
        ],
        "text.npz (npz with mu, sigma): it is not an .npz file": [
            str(tmp_path / "ok.npz"), "--ref-stats", str(tmp_path / "text.npz"),
        ],
    }  # fmt: skip
    for expected, (path, *rest) in cases.items():
        argv = ["evaluate", "--samples", path, *rest]
        line = _one_line(monkeypatch, capsys, evaluate.main, argv)
        assert expected in line, (expected, line)


def test_metrics_of_a_run_are_checked_against_its_data_before_sampling(tmp_path):
    from core.evaluation import report

    (tmp_path / "data_spec.json").write_text(json.dumps({"example_shape": [2], "num_classes": 0}))
    # no config.json nor checkpoints: a check after sampling would fail on those instead
    with pytest.raises(UserError, match=r"fid needs images .* the samples \[N, 2\] are not"):
        report.evaluate_run(str(tmp_path), ["fid", "swd"], num=8)


def test_labels_of_the_wrong_length_are_refused_everywhere(tmp_path, monkeypatch, capsys):
    import data
    from data.arrays import ArraySource
    from scripts import classify

    path = str(tmp_path / "s.npz")
    images = np.zeros((6, 8, 8, 1), np.uint8)
    np.savez(path, arr_0=images, arr_1=np.arange(4))
    message = r"arr_1 must hold one label per example of arr_0 \(6\), found shape \(4,\)"
    for use_labels in (True, False):  # training from the file, with or without its labels
        with pytest.raises(UserError, match=message):
            ArraySource(path, use_labels=use_labels)
        with pytest.raises(UserError, match=message):
            data.build_source("npz", path=path, use_labels=use_labels)
    np.savez(tmp_path / "xy.npz", x=np.zeros((6, 2), np.float32), y=np.zeros((6, 1), np.int64))
    with pytest.raises(UserError, match=r"y must hold one label per example of x \(6\)"):
        ArraySource(str(tmp_path / "xy.npz"))
    argv = ["classify", "--samples", path, "--classifier-run", str(tmp_path / "none")]
    assert "arr_1 must hold one label per example" in _one_line(
        monkeypatch, capsys, classify.main, argv
    )
    from metrics.classifier_verifier import classify_samples

    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="6 samples need one label each"):
        classify_samples(str(tmp_path / "run"), images, np.arange(4))


# --- float images for training -----------------------------------------------------------


def test_float_images_in_0_1_are_scaled_once_and_other_ranges_refused(tmp_path, capsys):
    import data.arrays
    from core.reference import source_images
    from data.arrays import ArraySource

    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (5, 4, 4, 3)).astype(np.uint8)
    np.savez(tmp_path / "unit.npz", arr_0=u8 / 255.0)  # float64 in [0, 1]
    source = ArraySource(str(tmp_path / "unit.npz"))
    want = u8.astype(np.float32) / 127.5 - 1.0  # what uint8 images become
    np.testing.assert_allclose(source.__getitems__(np.arange(5))["x"], want, atol=1e-6)
    assert source.x.dtype == np.float32
    np.testing.assert_array_equal(source_images(source), u8)  # Inception sees the bytes
    ArraySource(str(tmp_path / "unit.npz"))  # read again: said once
    err = capsys.readouterr().err
    assert err.count("float images in [0, 1], scaled to [-1, 1]") == 1, err
    np.savez(tmp_path / "signed.npz", arr_0=want)  # already the convention: kept, silently
    np.testing.assert_array_equal(ArraySource(str(tmp_path / "signed.npz")).x, want)
    assert "scaled" not in capsys.readouterr().err
    np.savez(tmp_path / "bytes.npz", arr_0=u8.astype(np.float32))  # 0..255 as floats
    with pytest.raises(UserError, match=r"must be in \[0, 1\] or \[-1, 1\], found values in"):
        ArraySource(str(tmp_path / "bytes.npz"))
    latents = rng.normal(size=(5, 4, 4, 8)).astype(np.float32)  # not images: kept as arrays
    np.savez(tmp_path / "latents.npz", arr_0=latents)
    np.testing.assert_array_equal(ArraySource(str(tmp_path / "latents.npz")).x, latents)
    data.arrays._NOTED.clear()


# --- output paths ------------------------------------------------------------------------


def test_out_paths_are_the_files_numpy_writes():
    from scripts import sample, search

    argv = ["sample", "--workdir", "w", "--out", "runs/x"]
    assert sample.parse(argv).out == "runs/x.npz"
    assert sample.parse([*argv[:-1], "runs/x.npz"]).out == "runs/x.npz"
    argv = ["search", "--workdir", "w", "--verifier", "density", "--out", "s"]
    assert search.parse(argv).out == "s.npz"


def test_save_samples_and_write_stats_name_the_npz(tmp_path):
    from core.errors import UserError as E
    from scripts import evaluate

    args = evaluate.parse(
        ["evaluate", "--workdir", str(tmp_path), "--save-samples", "s", "--write-stats", "t"]
    )
    evaluate._check(args, E)
    assert (args.save_samples, args.write_stats) == ("s.npz", "t.npz")


# --- limits and progress -----------------------------------------------------------------


def test_heldout_metrics_use_a_cpu_sized_subset_and_say_so(capsys):
    from core import config as config_lib
    from core.evaluation import Evaluator, Options, RunNetwork
    from core.evaluation.evaluator import CPU_HELDOUT_NUM
    from core.experiment import Experiment

    experiment = Experiment.from_config(config_lib.load(QUICK))  # moons: 65,536 test points
    network = RunNetwork(None, None, experiment)
    ev = Evaluator(None, network=network, options=Options())
    ev._names = ["nll"]
    x = ev.heldout["x"]
    assert len(x) == CPU_HELDOUT_NUM == 2048
    assert "nll: 2,048 of 65,536 test examples (--heldout-num to change)" in capsys.readouterr().err
    assert ev.heldout_info == {"heldout_count": 2048, "heldout_total": 65_536}
    all_x = Evaluator(None, network=network, options=Options(heldout_num=0)).heldout["x"]
    assert len(all_x) == 65_536 and capsys.readouterr().err == ""
    # a seeded subset of the split's rows, in the split's order
    rows = [np.flatnonzero((all_x == p).all(axis=1))[0] for p in x[:50]]
    assert rows == sorted(rows)
    again = Evaluator(None, network=network, options=Options(heldout_num=100, seed=3))
    other = Evaluator(None, network=network, options=Options(heldout_num=100, seed=4))
    assert len(again.heldout["x"]) == 100
    assert not np.array_equal(again.heldout["x"], other.heldout["x"])
    with pytest.raises(UserError, match="must be >= 0"):
        _ = Evaluator(None, network=network, options=Options(heldout_num=-1)).heldout


def test_nll_of_a_run_is_limited_with_a_progress_bar(tmp_path, capsys):
    from core import config as config_lib
    from scripts import evaluate
    from tests.conftest import train

    workdir = str(tmp_path / "run")
    train(config_lib.load(QUICK), workdir)
    capsys.readouterr()
    out = str(tmp_path / "nll.json")
    evaluate.main([
        "evaluate", "--workdir", workdir, "--metrics", "nll", "--heldout-num", "40",
        "--nll-solver", "rk4", "--nll-steps", "4", "--batch", "16", "--out", out,
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert "nll: 40 of 65,536 test examples (--heldout-num to change)" in err
    assert "nll: 100%" in err and "40/40" in err and "nll check (finer solve)" in err
    with open(out) as f:
        result = json.load(f)
    assert result["nll_count"] == 40 and result["heldout_total"] == 65_536
    line = _check_error(
        ["evaluate", "--workdir", workdir, "--metrics", "nll", "--heldout-num", "-1"]
    )
    assert "--heldout-num must be >= 0, got -1" in line


def _check_error(argv: list[str]) -> str:
    from scripts import evaluate

    with pytest.raises(UserError) as info:
        evaluate._check(evaluate.parse(argv), UserError)
    return str(info.value)


def test_inception_features_show_progress_and_the_reference_says_what_it_computes(
    tmp_path, monkeypatch, capsys
):
    from flax import nnx

    from core.reference import Dataset
    from metrics import fid as fm

    fake = lambda graphdef, with_logits: lambda params, x: np.zeros((len(x), 2048), np.float32)
    monkeypatch.setattr(fm, "_feature_fn", fake)
    net = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    images = np.zeros((5, 8, 8, 1), np.uint8)
    assert fm.inception_features(images, net, batch_size=2, progress=True).shape == (5, 2048)
    err = capsys.readouterr().err
    assert "Inception features: 100%" in err and "5/5" in err
    fm.inception_features(images, net, batch_size=2)  # few images: no bar by default
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(fm, "PROGRESS_MIN", 4)
    fm.inception_features(images, net, batch_size=2)
    assert "5/5" in capsys.readouterr().err

    class Source:
        images = np.zeros((3, 8, 8, 1), np.uint8)

    ds = Dataset("tiny", "train", lambda: Source(), cache_dir=str(tmp_path))
    feats = ds.features(lambda x: fm.inception_features(x, net, batch_size=2))
    assert feats.shape == (3, 2048)
    err = capsys.readouterr().err
    assert "Inception features of tiny:train: 3 images, once (cached in" in err
    ds.features(lambda x: 1 / 0)  # cached: nothing computed, nothing said
    assert capsys.readouterr().err == ""

    class Points:
        x = np.zeros((3, 2), np.float32)

    points = Dataset("pts", "train", lambda: Points(), cache_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"reference data pts:train is float32 of shape \(3, 2\)"):
        points.features(lambda x: 1 / 0)


# --- help --------------------------------------------------------------------------------


class _Parsed(Exception):
    pass


def _cli_modules() -> list[str]:
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "scripts")) if f.endswith(".py"))
    # fid_reference_pytorch runs in a torch venv; train's flags are absl's (its own test)
    return [n for n in names if n not in ("__init__", "common", "fid_reference_pytorch", "train")]


@pytest.mark.parametrize("name", _cli_modules())
def test_help_of_every_cli_lists_each_flag_with_its_default(name, monkeypatch):
    """Each CLI's parser, caught as it parses: every flag with a default shows it."""
    seen = []

    def caught(self, *args, **kwargs):
        seen.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", caught)
    module = importlib.import_module(f"scripts.{name}")
    with pytest.raises(_Parsed):
        module.main([name, "--help"])
    text = " ".join(seen[0].format_help().split())
    assert f"python -m scripts.{name}" in text
    for action in seen[0]._actions:
        d = action.default
        unset = d is None or d is False or d == [] or d is argparse.SUPPRESS  # "not given"
        if not action.option_strings or unset:
            continue
        assert f"default: {d})" in text, (action.option_strings, d)


def test_train_help_lists_its_flags_and_the_config_defaults(capsys):
    from scripts import train

    train.main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--config FILE[:VARIANT]", "--workdir DIR", "--allow-changes", "--config.KEY"):
        assert flag in out
    train.main(["train", "--config", QUICK, "--help"])
    out = capsys.readouterr().out
    assert "--config.batch_size=8\n" in out and "--config.model.hidden=" in out
    assert "--config.loss.ot_pairing=False\n" in out  # a loss option the file does not list
    assert "--config.model.dtype" not in out  # not settable from the command line
