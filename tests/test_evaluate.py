"""scripts.evaluate on tiny inputs (its modes, FID through a stats file, one-line errors) and
the in-training evaluation hook. Inception at 299x299 runs at ~1.5 images/s on 2 CPU cores
at the tests' -O0: 6 images per set (FID is defined below 2048 images: sqrtm's offset)."""

import functools
import json
import os
import subprocess

import numpy as np
import pytest

from core.errors import UserError
from core.evaluation import make_eval_hook
from core.experiment import Experiment
from metrics import fid as fm
from models.inception import weights_tag
from scripts import evaluate
from scripts.common import run
from tests.conftest import PYTHON, ROOT

WEIGHTS = "inception/fid_inception_v3_2015-12-05_fp32.npz"
FILES = ("features.npy", "stats.npz")  # the two cache files of a dataset's Inception pass


@functools.cache
def _test_images(tfds_dir: str) -> np.ndarray:
    import data

    return data.build_source("mnist", split="test[:16]", data_dir=tfds_dir).images


@pytest.fixture
def env(shared_data, monkeypatch, tmp_path):
    """MNIST test[:16] as uint8, with tfds, the Inception weights and a fresh cache dir."""
    monkeypatch.setenv("TFDS_DATA_DIR", os.path.join(shared_data, "tfds"))
    monkeypatch.setenv("DRIFTLAB_INCEPTION_WEIGHTS", os.path.join(shared_data, WEIGHTS))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return _test_images(os.path.join(shared_data, "tfds"))


def cli(tmp_path, *args) -> dict:
    """Run `scripts.evaluate` in this process (Inception loads once); the JSON it wrote."""
    out = str(tmp_path / f"eval{len(os.listdir(tmp_path))}.json")
    evaluate.main(["evaluate", *args, "--out", out])
    with open(out) as f:
        return json.load(f)


def _npz(tmp_path, name: str, x: np.ndarray) -> str:
    path = str(tmp_path / name)
    np.savez(path, arr_0=x)
    return path


def _fid_low_rank(fa: np.ndarray, fb: np.ndarray, eps: float = 1e-6) -> float:
    """pytorch-fid's FID with its singular-case offset, `tr sqrt((S1 + eps I)(S2 + eps I))`,
    in closed form for n << D samples: S1, S2 map into the span Q of the centred features,
    so the product is `(C1 + eps)(C2 + eps)` on Q (r x r) and `eps^2 I` on the rest."""
    a, b = fa - fa.mean(0), fb - fb.mean(0)
    q, _ = np.linalg.qr(np.concatenate([a, b]).T.astype(np.float64))
    c1 = (a @ q).T @ (a @ q) / (len(a) - 1)
    c2 = (b @ q).T @ (b @ q) / (len(b) - 1)
    eye = np.eye(len(c1))
    roots = np.sqrt(np.linalg.eigvals((c1 + eps * eye) @ (c2 + eps * eye)).real).sum()
    diff = fa.mean(0).astype(np.float64) - fb.mean(0)
    trace_sqrt = roots + (fa.shape[1] - len(c1)) * eps
    return float(diff @ diff + np.trace(c1) + np.trace(c2) - 2 * trace_sqrt)


def test_write_stats_and_ref_stats_wiring(env, tmp_path, monkeypatch):
    # Fast: the stats file is the samples' Inception statistics in pytorch-fid's layout, and
    # --ref-stats feeds FID with (sample stats, file stats). The Frechet distance itself
    # (two 2048^2 eigendecompositions) is checked in the slow test below and in test_fid.py.
    a, b = _npz(tmp_path, "a.npz", env[:6]), _npz(tmp_path, "b.npz", env[6:12])
    stats = str(tmp_path / "b_stats.npz")
    cli(tmp_path, "--samples", b, "--write-stats", stats)
    with np.load(stats) as f:
        assert sorted(f.files) == ["mu", "sigma"]
        mu, sigma = fm.stats(fm.inception_features(env[6:12]))
        np.testing.assert_allclose(f["mu"], mu, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(f["sigma"], sigma, rtol=1e-6, atol=1e-9)
    seen = []
    roots = []  # the reference's root, computed while the samples' pass ran (eigh only)
    monkeypatch.setattr(
        fm,
        "fid_from_stats",
        lambda *s, method, sqrt_sigma2: seen.append((s, method)) or roots.append(sqrt_sigma2) or 42,
    )
    out = cli(tmp_path, "--samples", a, "--ref-stats", stats, "--metrics", "fid")
    assert out["fid"] == 42.0 and out["samples"] == a and out["fid_method"] == "eigh"
    assert 0 <= out["fid_seconds"] < out["wall_seconds"]  # the host's part of the whole
    parts = out["fid_stats_seconds"] + out["fid_distance_seconds"]
    assert parts == pytest.approx(out["fid_seconds"], rel=1e-6)
    assert 0 < out["inception_seconds"] < out["wall_seconds"] - out["fid_seconds"]
    cli(tmp_path, "--samples", a, "--ref-stats", stats, "--metrics", "fid", "--fid-method", "sqrtm")
    (((mu1, sigma1, mu2, sigma2), method), (_, slow)) = seen
    assert (method, slow) == ("eigh", "sqrtm")
    np.testing.assert_allclose(mu2, mu, rtol=1e-6)
    assert mu1.shape == (2048,) and sigma1.shape == (2048, 2048) and np.isfinite(sigma1).all()
    assert roots[1] is None  # sqrtm takes no root
    np.testing.assert_allclose(roots[0] @ roots[0], sigma, rtol=0, atol=1e-9 * np.abs(sigma).max())


def test_files_are_named_by_their_contents(tmp_path):
    # the tag that names Inception feature caches (by the weights and by an .npz dataset):
    # the same bytes elsewhere or with a new mtime (a re-provisioned data folder) keep it;
    # one changed byte does not
    from core.files import content_tag

    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    a.write_bytes(bytes(range(256)) * 64)
    b.write_bytes(a.read_bytes())
    os.utime(b, ns=(1, 1))
    assert content_tag(str(a)) == content_tag(str(b))
    c = tmp_path / "c.npz"
    c.write_bytes(a.read_bytes()[:-1] + b"x")
    assert content_tag(str(c)) != content_tag(str(a)) and len(content_tag(str(c))) == 8


@pytest.mark.slow
def test_write_stats_then_ref_stats_fid_equals_direct_fid(env, tmp_path):
    a, b = _npz(tmp_path, "a.npz", env[:6]), _npz(tmp_path, "b.npz", env[6:12])
    written = cli(tmp_path, "--samples", b, "--write-stats", str(tmp_path / "b_stats"))
    stats = str(tmp_path / "b_stats.npz")  # the suffix numpy adds is the reported name
    assert written["stats"] == stats and os.path.isfile(stats)
    out = cli(tmp_path, "--samples", a, "--ref-stats", stats, "--metrics", "fid")
    assert out["ref_stats"] == stats
    fa, fb = fm.inception_features(env[:6]), fm.inception_features(env[6:12])
    # without the offset, fid.py differs by at most 2 D eps = 4e-3
    assert out["fid"] == pytest.approx(_fid_low_rank(fa, fb), rel=1e-5, abs=1e-2)
    # dataset statistics: the same images as a tfds split, written and cached
    ds_stats = str(tmp_path / "ds_stats.npz")
    cli(tmp_path, "--dataset", "mnist", "--split", "test[:6]", "--write-stats", ds_stats)
    np.testing.assert_allclose(fm.load_stats(ds_stats)[0], fa.mean(0), rtol=1e-6, atol=1e-7)
    cache = os.listdir(tmp_path / "cache" / "driftlab" / "fid_stats")
    tag = f"mnist-test_6_-full-inception_{weights_tag()}"
    assert sorted(cache) == [f"{tag}.features.npy", f"{tag}.stats.npz"]


def test_inception_precision_reaches_the_network_and_names_the_cache(env, tmp_path, monkeypatch):
    # features that say which precision's network made them (one more at "default"), so the
    # statistics show which network ran and which cache file was read
    calls = []

    def features(
        images, net=None, *, batch_size=None, with_logits=False, precision="highest", on_batch=None
    ):
        precision = precision if net is None else net.precision
        calls.append(precision)
        x = np.asarray(images, np.float64).reshape(len(images), -1)[:, 300:308]
        x = x + (precision == "default")
        if on_batch is not None:
            on_batch(x)
        return x

    monkeypatch.setattr(fm, "inception_features", features)
    data = ["--dataset", "mnist", "--split", "test[:6]"]
    paths = {p: str(tmp_path / f"{p}.npz") for p in ("highest", "default")}
    hi = cli(tmp_path, *data, "--write-stats", paths["highest"])
    lo = cli(tmp_path, *data, "--write-stats", paths["default"], "--inception-precision", "default")
    assert calls == ["highest", "default"]
    assert (hi["inception_precision"], lo["inception_precision"]) == ("highest", "default")
    mu_hi, mu_lo = fm.load_stats(paths["highest"])[0], fm.load_stats(paths["default"])[0]
    np.testing.assert_allclose(mu_lo, mu_hi + 1.0)
    cache = sorted(os.listdir(tmp_path / "cache" / "driftlab" / "fid_stats"))
    tag = f"mnist-test_6_-full-inception_{weights_tag()}"
    assert cache == sorted(f"{tag}{p}.{f}" for p in ("", "_default") for f in FILES)
    # FID of samples at "default" against the dataset: the samples' pass runs at "default",
    # the dataset's statistics come from the "default" cache (no new pass), FID is 0
    samples = _npz(tmp_path, "s.npz", env[:6])
    out = cli(tmp_path, "--samples", samples, *data, "--metrics", "fid",
              "--inception-precision", "default")  # fmt: skip
    assert calls == ["highest", "default", "default"]
    assert out["fid"] == pytest.approx(0.0, abs=1e-6)


def test_samples_against_a_dataset_split(env, tmp_path):
    samples = _npz(tmp_path, "s.npz", env[:8])  # copies of test images: all memorized
    out = cli(
        tmp_path, "--samples", samples, "--dataset", "mnist", "--split", "test[:200]",
        "--metrics", "memorization", "--mem-space", "pixel",
    )  # fmt: skip
    assert out["pixel/memorized"] == 1.0 and out["pixel/ratio_memorized"] == 1.0
    # per-space thresholds: copies with +-6 levels of noise (RMS ~0.03 on [-1, 1]) are
    # memorized at the default pixel delta_m (0.07), not at pixel=0.01; inception=5 is
    # not used in pixel space
    noise = np.random.default_rng(0).integers(-6, 7, env[:8].shape)
    near = _npz(tmp_path, "n.npz", np.clip(env[:8] + noise, 0, 255).astype(np.uint8))
    args = ["--samples", near, "--dataset", "mnist", "--split", "test[:200]",
            "--metrics", "memorization", "--mem-space", "pixel"]  # fmt: skip
    assert cli(tmp_path, *args)["pixel/memorized"] == 1.0
    strict = cli(tmp_path, *args, "--delta-m", "pixel=0.01,inception=5")
    assert strict["pixel/memorized"] == 0.0
    assert out["reference"] == "mnist:test[:200]" and out["num_samples"] == 8
    assert out["pixel/nn_train_min"] == 0.0


def _error(monkeypatch, capsys, args) -> str:
    monkeypatch.setattr("sys.argv", ["evaluate", *args])
    with pytest.raises(SystemExit) as e:
        run(evaluate.main)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_line(env, tmp_path, monkeypatch, capsys):
    a = _npz(tmp_path, "a.npz", env[:8])
    floats = _npz(tmp_path, "f.npz", env[:8].astype(np.float32))  # 0..255 as float
    cases = {
        "samples file 'nope.npz' not found": ["--samples", "nope.npz"],
        "unknown metric 'lpips'; known metrics: accuracy, bpd, effdim, fid, geo, is, kid": [
            "--samples", a, "--metrics", "fid,lpips",
        ],
        "unknown dataset 'nosuchdataset'": [
            "--samples", a, "--dataset", "nosuchdataset", "--metrics", "memorization",
        ],
        "reference statistics 'nope_stats.npz' not found": [
            "--samples", a, "--ref-stats", "nope_stats.npz",
        ],
        "FID needs a reference": ["--samples", a, "--metrics", "fid"],
        "npz file 'nope.npz' not found": ["--samples", a, "--dataset", "nope.npz"],
        "effdim needs the run's network": ["--samples", a, "--metrics", "effdim"],
        "nll need the run's network: give --workdir": ["--samples", a, "--metrics", "nll"],
        "not both": ["--samples", a, "--workdir", str(tmp_path)],
        "nothing to evaluate": ["--metrics", "fid"],
        "--pr-k must be >= 1, got 0": ["--samples", a, "--pr-k", "0"],
        "--ratio-k must be >= 2, got 1": ["--samples", a, "--ratio-k", "1"],
        "--inception-batch must be >= 1, got 0": ["--samples", a, "--inception-batch", "0"],
        "--delta-m must be > 0 (a distance), got -1.0": ["--samples", a, "--delta-m", "-1"],
        "--delta-s: unknown space 'lpips'": ["--samples", a, "--delta-s", "lpips=0.1"],
        "--effdim-sigma must be in (0, 1), got 0.0": ["--samples", a, "--effdim-sigma", "0"],
        "--effdim-sigmas must be in (0, 1), got '0.1,1.5'": [
            "--samples", a, "--effdim-sigmas", "0.1,1.5",
        ],
        "--effdim-sigmas names a level twice": ["--samples", a, "--effdim-sigmas", "0.1,0.1"],
        "--effdim-sigmas wants numbers": ["--samples", a, "--effdim-sigmas", "0.1;0.2"],
        "is (Inception Score) needs the 1008-way logits layer": [
            "--samples", a, "--ref-stats", a, "--metrics", "fid,is",
        ],
        "images in arr_0 must be uint8": ["--samples", floats, "--ref-stats", a],
    }  # fmt: skip
    for expected, args in cases.items():
        assert expected in _error(monkeypatch, capsys, args)


def test_cli_entry_point_prints_one_line(python_env):
    proc = subprocess.run(
        [PYTHON, "-m", "scripts.evaluate", "--samples", "missing.npz"],
        cwd=ROOT, env=python_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: samples file 'missing.npz' not found"
    ], proc.stderr


def test_eval_hook_and_workdir_mode(tmp_path, monkeypatch):
    from core.config import load
    from tests.conftest import train

    monkeypatch.chdir(ROOT)
    config = load("experiments/quickstart.py:smoke=True")  # 2-D data, MLP, 2 steps
    config.eval_every = 1  # the trainer adds the evaluation hook itself
    config.log_every = 5  # evaluation steps log anyway: one line per step, with its loss
    config.eval.update(num_samples=16, max_train=100, batch_size=16)
    workdir = str(tmp_path / "run")
    train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and "eval/pixel/memorized" in r for r in rows)
    assert all(0.0 <= r["eval/pixel/memorized"] <= 1.0 for r in rows)
    out = cli(
        tmp_path, "--workdir", workdir, "--num", "32", "--metrics", "memorization,effdim",
        "--mem-space", "pixel", "--effdim-num", "3",
    )  # fmt: skip
    assert out["step"] == 2 and out["num_samples"] == 32 and out["effdim_ambient"] == 2
    assert len(out["effdim_per_sample"]) == 3 and os.path.exists(out["effdim_plot"])
    across = cli(
        tmp_path, "--workdir", workdir, "--num", "8", "--metrics", "effdim", "--effdim-num",
        "3", "--effdim-sigmas", "0.5,0.01",
    )  # fmt: skip
    assert across["effdim_sigmas"] == [0.01, 0.5] and "effdim_mean" not in across
    assert np.array(across["effdim_per_sample_by_sigma"]).shape == (2, 3)
    assert across["effdim_plot"].endswith("_effdim_sigmas.png")
    assert os.path.getsize(across["effdim_plot"]) > 0
    assert out["reference"] == f"{config.data.name}:train"
    # how the samples were drawn: the run's own sampler and steps, no guidance, seed 0
    assert out["sampler"] == config.sample.sampler
    assert out["sampling_steps"] == config.sample.num_steps
    assert (out["cfg"], out["seed"]) == (1.0, 0)
    config.eval.fid = True  # FID of 2-D points is not defined: said before any training
    with pytest.raises(UserError, match="config.eval.fid needs image data"):
        make_eval_hook(Experiment.from_config(config), workdir)


def _trained(tmp_path, spec: str):
    """(config, workdir) of the experiment `spec` trained (smoke size) in tmp_path."""
    from core.config import load
    from tests.conftest import train

    config = load(spec)
    workdir = str(tmp_path / "run")
    train(config, workdir)
    return config, workdir


def _restored(config, workdir, ema: bool = True):
    """The run's EMA (or raw) network, restored as the CLI restores it, on the host."""
    import jax
    from flax import nnx

    from core import runs, sharding

    mesh = sharding.make_mesh()
    experiment = Experiment.from_config(config)
    graphdef, params, _ = runs.restore_network(workdir, experiment, mesh, ema=ema)
    return nnx.merge(graphdef, jax.device_get(params))


def test_nll_and_geo_of_a_run(shared_data, tmp_path, monkeypatch, capsys):
    # A 2-step geolocation run: the CLI's held-out NLL is metrics.likelihood's on the
    # restored EMA network and the test split; geo predicts one place per test event.
    import jax.numpy as jnp

    from core.config import load
    from metrics import likelihood
    from tests.conftest import train

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("DRIFTLAB_EARTH_DIR", os.path.join(shared_data, "earth"))
    config, workdir = _trained(
        tmp_path, "experiments/sphere/earth_geoloc.py:smoke=True,dataset=volcano"
    )
    monkeypatch.setattr(evaluate, "NLL_CHANGE_WARN", 0.0)  # any change warns
    out = cli(
        tmp_path, "--workdir", workdir, "--metrics", "nll,geo", "--split", "test",
        "--nll-solver", "rk4", "--nll-steps", "6", "--steps", "3", "--batch", "32",
    )  # fmt: skip
    assert "finer solve than 6 RK4 steps: the NLL is not converged" in capsys.readouterr().err
    test = Experiment.from_config(config).data.source("test")
    batch = test.__getitems__(np.arange(test.num_examples))
    assert out["nll_count"] == out["geo/count"] == test.num_examples == 82
    lp = {
        n: likelihood.log_likelihood_batched(
            _restored(config, workdir),
            jnp.asarray(batch["x"]),
            cond=jnp.asarray(batch["cond"]),
            num_steps=n,
            manifold="sphere",
            batch_size=32,
        )  # fmt: skip
        for n in (6, 12)
    }
    assert out["nll"] == pytest.approx(-lp[6].mean(), rel=1e-5)
    assert out["nll_divergence"] == "exact" and out["nll_mean_steps"] == 6
    # the convergence check: the same points integrated with twice the steps
    assert out["nll_fine"] == pytest.approx(-lp[12].mean(), rel=1e-5)
    change = np.abs(lp[6] - lp[12]).mean()
    assert change > 0 and out["nll_fine_change"] == pytest.approx(change, rel=1e-4, abs=1e-7)
    accs = [out[f"geo/acc_{t}km"] for t in (1, 25, 200, 750, 2500)]
    assert accs == sorted(accs) and 0.0 <= accs[0] and accs[-1] <= 1.0
    assert 0.0 < out["geo/error_km_mean"] <= np.pi * 6371.0 + 1e-6
    assert os.path.getsize(out["geo/plot"]) > 0
    quick = str(tmp_path / "quick")  # unconditional 2-D data: no geolocation
    train(load("experiments/quickstart.py:smoke=True"), quick)
    with pytest.raises(UserError, match="geo needs a conditional model"):
        cli(tmp_path, "--workdir", quick, "--metrics", "geo")


def test_bpd_of_a_flow_run(shared_data, tmp_path, monkeypatch):
    # TarFlow (2 steps): the CLI's test bits/dim is metrics.bpd's on the restored EMA flow
    # with the run's own noise.
    import jax

    from metrics.bpd import dataset_bpd

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("TFDS_DATA_DIR", os.path.join(shared_data, "tfds"))
    config, workdir = _trained(tmp_path, "experiments/nf/mnist_tarflow.py:smoke=True")
    out = cli(tmp_path, "--workdir", workdir, "--metrics", "bpd", "--split", "test[:24]",
              "--batch", "16")  # fmt: skip
    raw = cli(tmp_path, "--workdir", workdir, "--metrics", "bpd", "--split", "test[:24]",
              "--batch", "16", "--raw")  # fmt: skip
    data = Experiment.from_config(config).data.source("test[:24]").__getitems__(np.arange(24))
    batches = [{k: v[i : i + 16] for k, v in data.items()} for i in (0, 16)]
    for result, ema in ((out, True), (raw, False)):
        direct = dataset_bpd(
            _restored(config, workdir, ema=ema), batches, key=jax.random.key(0),
            noise=config.loss.noise, noise_std=config.loss.noise_std, use_labels="cond" in data,
        )  # fmt: skip
        assert result["bpd"] == pytest.approx(direct, rel=1e-5) and 0.0 < result["bpd"] < 30.0
    # the JSON says which weights; after two steps the EMA is still near the initial flow
    assert out["weights"] == "ema" and raw["weights"] == "raw"
    assert abs(out["bpd"] - raw["bpd"]) > 1e-4


def test_tarflow_ema_is_as_good_a_flow_as_its_weights(shared_data, tmp_path, monkeypatch):
    # 200 steps on MNIST: with the config's EMA warm-up the EMA flow's bits/dim is the raw
    # weights'; without it the EMA still holds 0.999^200 = 82 % of the initial weights and
    # is a far worse flow (EMA minus raw: 0.011 with the warm-up, 2.55 without, at lr 5e-4)
    import jax

    from core.config import load
    from metrics.bpd import dataset_bpd
    from tests.conftest import train

    monkeypatch.setenv("TFDS_DATA_DIR", os.path.join(shared_data, "tfds"))
    config = load(f"{ROOT}/experiments/nf/mnist_tarflow.py:smoke=True,noise=uniform")
    config.update(total_steps=200, log_every=100, ckpt_every=200, sample_every=0)
    data = Experiment.from_config(config).data.source("train[:256]").__getitems__(np.arange(256))

    def bpd(workdir, ema):
        batches = [{"x": data["x"][i : i + 128]} for i in (0, 128)]
        net = _restored(config, workdir, ema=ema)
        return dataset_bpd(net, batches, key=jax.random.key(0), noise="uniform")

    gaps = {}
    for warmup in (True, False):
        config.ema_warmup = warmup
        workdir = str(tmp_path / f"warmup_{warmup}")
        train(config, workdir)
        gaps[warmup] = bpd(workdir, ema=True) - bpd(workdir, ema=False)
    assert abs(gaps[True]) < 0.1 and gaps[False] > 1.0, gaps


def test_steps_sweep_passes_evaluates_flags_on_unabbreviated():
    # `--step` is evaluate's (the checkpoint); the sweep's own `--steps` must not swallow it
    from scripts.steps_sweep import parse

    args, rest = parse(["x", "--workdirs", "w", "--steps", "1,2", "--out", "o", "--step", "7"])
    assert args.steps == "1,2" and rest == ["--step", "7"]


def test_steps_sweep_plot_names_the_numbers_when_the_key_is_not_one(tmp_path, capsys):
    from scripts.steps_sweep import plot

    results = {"a": {"1": {"fid": 9.0, "kid": 0.1, "step": 5, "metrics": ["fid", "kid"]}}}
    fig = plot(results, "fid", str(tmp_path / "ok.png"))
    assert os.path.getsize(tmp_path / "ok.png") > 0 and not capsys.readouterr().err
    assert fig.axes[0].get_yscale() == "linear"
    assert plot(results, "fid", str(tmp_path / "log.png"), log_y=True).axes[0].get_yscale() == "log"
    assert plot(results, "memorization", str(tmp_path / "none.png")) is None  # not a number
    assert not os.path.exists(tmp_path / "none.png")
    assert "one of: fid, kid, step" in capsys.readouterr().err


def test_steps_sweep_of_a_shortcut_run(shared_data, tmp_path, monkeypatch):
    # One evaluate call per k with the run's own (shortcut) sampler: k = 1 and k = 2 draw
    # different samples from the same noise, and each number is the evaluate CLI's.
    from core.config import load
    from scripts import steps_sweep
    from tests.conftest import train

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("TFDS_DATA_DIR", os.path.join(shared_data, "tfds"))
    config = load("experiments/shortcut/mnist_dit.py:smoke=True")
    workdir = str(tmp_path / "sc")
    train(config, workdir)
    out = str(tmp_path / "sweep")
    key = "pixel/nn_train_mean"
    shown = {}
    plot_grids = steps_sweep.plot_grids
    monkeypatch.setattr(
        steps_sweep, "plot_grids", lambda g, path: (shown.update(g), plot_grids(g, path))
    )
    steps_sweep.main(
        ["steps_sweep", "--workdirs", workdir, "--steps", "1,2", "--metrics", "memorization",
         "--out", out, "--plot-key", key, "--num", "8", "--mem-space", "pixel", "--grid", "4"]
    )  # fmt: skip
    with open(out + ".json") as f:
        by_k = json.load(f)["results"]["sc"]
    assert sorted(by_k) == ["1", "2"] and by_k["1"][key] != by_k["2"][key]
    # each cell's JSON says how its samples were drawn: k shortcut steps
    assert [(by_k[k]["sampler"], by_k[k]["sampling_steps"]) for k in "12"] == [
        (config.sample.sampler, 1),
        (config.sample.sampler, 2),
    ] and config.sample.sampler == "shortcut"
    with open(f"{out}_sc_k2.json") as f:
        assert json.load(f)[key] == by_k["2"][key]
    assert os.path.getsize(out + ".png") > 0
    # the grid cells: the first 4 samples of each evaluation, as uint8 images (the smoke
    # run's velocities are ~0, so k = 1 and k = 2 round to the same 8-bit noise here)
    cells = shown["sc"]
    assert sorted(cells) == [1, 2] and all(c.shape == (4, 28, 28, 1) for c in cells.values())
    assert all(c.dtype == np.uint8 and c.std() > 10 for c in cells.values())
    assert os.path.getsize(out + "_grids.png") > 0
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["sc", "sweep.json", "sweep.png", "sweep_grids.png", "sweep_sc_k1.json", "sweep_sc_k2.json"]
    )  # the samples themselves were not left behind

    # --reuse: k = 1 and 2 are read back, only k = 4 is evaluated, and <out>.json holds all
    evaluated = []
    cell = steps_sweep.evaluate_cell
    record = lambda args: (evaluated.append(["--steps", str(args.steps)]), cell(args))[1]
    monkeypatch.setattr(steps_sweep, "evaluate_cell", record)
    flags = ["--metrics", "memorization", "--out", out, "--num", "8", "--mem-space", "pixel",
             "--plot-key", key]  # fmt: skip
    steps_sweep.main(["steps_sweep", "--workdirs", workdir, "--steps", "1,2,4", *flags, "--reuse"])
    assert [argv[argv.index("--steps") + 1] for argv in evaluated] == ["4"]
    with open(out + ".json") as f:
        again = json.load(f)["results"]["sc"]
    assert sorted(again) == ["1", "2", "4"] and again["2"] == by_k["2"]
    # a cell made otherwise is named, not mixed in: another --num, another metric
    for other, match in (
        (["--num", "16"], "num_samples=8"),
        (["--raw"], "weights='ema'"),
        (["--seed", "3"], "seed=0"),
        (["--metrics", "fid"], "no fid"),
    ):
        with pytest.raises(UserError, match=f"sweep_sc_k1.json.*{match}"):
            steps_sweep.main(["steps_sweep", "--workdirs", workdir, "--steps", "1",
                              *flags, *other, "--reuse"])  # fmt: skip
    with pytest.raises(UserError, match="--grid needs every cell's samples"):
        steps_sweep.main(["steps_sweep", "--workdirs", workdir, "--steps", "1", *flags,
                          "--reuse", "--grid", "2"])  # fmt: skip


def test_nll_table_picks_the_checkpoint_with_the_lowest_validation_nll(
    shared_data, tmp_path, monkeypatch
):
    # Two checkpoints of a 2-step volcano run: the table's best step is the argmin of its
    # validation NLLs, and its test NLL is what `evaluate --step best` prints.
    from core.config import load
    from scripts import nll_table
    from tests.conftest import train

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("DRIFTLAB_EARTH_DIR", os.path.join(shared_data, "earth"))
    config = load("experiments/sphere/earth_volcano.py:smoke=True")
    config.ckpt_every = 1
    workdir = str(tmp_path / "earth_volcano")
    train(config, workdir)
    out = str(tmp_path / "table")
    # the default solver (adaptive dopri5), at a loose tolerance for speed
    nll_table.main(["nll_table", "--workdirs", workdir, "--out", out, "--nll-tol", "1e-3",
                    "--num-plot", "32"])  # fmt: skip
    with open(out + ".json") as f:
        (row,) = json.load(f)["results"]
    val = {int(k): v for k, v in row["val_nll"].items()}
    assert sorted(val) == [1, 2] and row["best_step"] == min(val, key=val.get)
    direct = cli(tmp_path, "--workdir", workdir, "--metrics", "nll", "--split", "test",
                 "--nll-tol", "1e-3", "--step", str(row["best_step"]))  # fmt: skip
    assert row["test_nll"] == pytest.approx(direct["nll"], rel=1e-6)
    assert row["test_nll_fine"] == pytest.approx(direct["nll_fine"], rel=1e-6)  # at 1e-4
    assert direct["nll_solver"] == "dopri5, rtol = 0.001, atol = 0.001"
    assert direct["nll_mean_steps"] >= 1
    # scripts.nll_solvers: the same points and network, solver by solver
    from scripts import nll_solvers

    res = str(tmp_path / "solvers.json")
    nll_solvers.main(["nll_solvers", "--workdir", workdir, "--step", str(row["best_step"]),
                      "--solvers", "rk4:4,dopri5:1e-3,dopri5:1e-6", "--out", res])  # fmt: skip
    with open(res) as f:
        rows = {r["solver"]: r for r in json.load(f)["rows"]}
    assert rows["dopri5:1e-3"]["nll"] == pytest.approx(direct["nll"], rel=1e-6)
    assert rows["dopri5:1e-6"]["max_abs_change"] == 0.0  # the reference: the last listed
    for r in rows.values():
        assert max(r["median_abs_change"], r["mean_abs_change"]) <= r["max_abs_change"]
    assert rows["rk4:4"]["mean_steps"] == 4 and rows["dopri5:1e-6"]["mean_steps"] >= 1
    with pytest.raises(UserError, match="expected rk4:<steps>"):
        nll_solvers.main(["nll_solvers", "--workdir", workdir, "--solvers", "rk4:x"])
    with pytest.raises(UserError, match="--reference 'rk4:8' is not one of"):
        nll_solvers.main(["nll_solvers", "--workdir", workdir, "--solvers", "rk4:4",
                          "--reference", "rk4:8"])  # fmt: skip
    with open(out + ".md") as f:
        line = [ln for ln in f if ln.startswith("| volcano")][0]
    assert "-7.93" in line and "-4.92" in line and f"{row['test_nll']:.3f}" in line
    # --last K: the choice among the newest K checkpoints only
    nll_table.main(["nll_table", "--workdirs", workdir, "--out", out, "--nll-tol", "1e-3",
                    "--num-plot", "32", "--last", "1"])  # fmt: skip
    with open(out + ".json") as f:
        (last,) = json.load(f)["results"]
    assert list(last["val_nll"]) == ["2"] and last["best_step"] == 2
    assert last["val_nll"]["2"] == pytest.approx(val[2], rel=1e-6)
    with pytest.raises(UserError, match="--last must be >= 0"):
        nll_table.main(["nll_table", "--workdirs", workdir, "--out", out, "--last", "-1"])
    # training time from the logged rates; a resumed run's rewritten steps count once
    rows = [(100, 10.0), (200, 5.0), (200, 4.0), (300, 20.0)]
    log = tmp_path / "fake" / "metrics.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"step": s, "steps_per_sec": r}) + "\n" for s, r in rows))
    assert nll_table.train_seconds(str(log.parent)) == pytest.approx(10 + 25 + 5)


def test_image_size_reaches_the_reference_dataset(monkeypatch, tmp_path):
    from core import reference

    seen = {}

    def fake(name, split, **kwargs):
        seen.update(kwargs, name=name, split=split)
        raise UserError("stop here")

    monkeypatch.setattr(reference, "dataset_from_name", fake)
    a = _npz(tmp_path, "a.npz", np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="stop here"):
        evaluate.main(["evaluate", "--samples", a, "--dataset", "celeb_a", "--image-size", "64",
                       "--metrics", "memorization"])  # fmt: skip
    assert seen["image_size"] == 64 and seen["name"] == "celeb_a" and seen["split"] == "train"


def test_nll_table_pools_runs_of_one_dataset_as_mean_and_sample_std():
    from scripts import nll_table

    def run(dataset, nll, seed):
        return {"run": f"r{seed}", "dataset": dataset, "split_seed": seed, "test_nll": nll,
                "test_nll_fine": nll + 0.01, "final_test_nll": nll + 0.1, "best_step": 10,
                "final_step": 20, "train_seconds": 60.0 * (seed + 1)}  # fmt: skip

    rows = nll_table.summarize(
        [run("volcano", -2.0, 0), run("volcano", -3.0, 1), run("volcano", -4.0, 2),
         run("fire", -0.5, 0)],
    )  # fmt: skip
    volcano, fire = rows
    assert volcano["test_nll"] == "-3.000 ± 1.000 (n=3)" and volcano["split_seeds"] == [0, 1, 2]
    assert volcano["train_minutes"] == pytest.approx(2.0) and fire["test_nll"] == "-0.500"
    assert volcano["test_nll_mean"] == -3.0 and volcano["test_nll_std"] == pytest.approx(1.0)
    assert fire["test_nll_mean"] == -0.5 and fire["test_nll_std"] is None
    solve = {"solver": "rk4", "num_steps": 4}
    text = nll_table.table([run("volcano", -2.0, 0), run("volcano", -3.0, 1)], solve)
    assert "| volcano | -2.500 ± 0.707 (n=2) |" in text and "-7.93" in text
    assert "4 RK4 steps" in text and "finer solve (8 RK4 steps)" in text
