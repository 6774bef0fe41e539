"""The CLIs: bad input is one line naming the problem; train -> sample end to end."""

import json
import os
import subprocess

import numpy as np
import pytest

from core.experiment import Experiment
from tests.conftest import PYTHON, ROOT, sample_fn

QUICK = "experiments/quickstart.py:smoke=True"


def run_cli(args, env, cwd=ROOT):
    return subprocess.Popen(
        [PYTHON, "-m", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def one_line_error(proc) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def test_bad_input_gives_one_line_naming_the_problem(tmp_path, python_env):
    """Started together (each is a fresh python process), then checked one by one."""
    env = dict(python_env, TFDS_DATA_DIR=str(tmp_path / "no_tfds"))
    bad_shape = tmp_path / "cube.npz"
    np.savez(bad_shape, arr_0=np.zeros((16, 3), np.float32))
    w = str(tmp_path / "w")
    cases = {
        "unknown network 'resnet'": [
            "scripts.train",
            "--config",
            QUICK,
            "--workdir",
            w,
            "--config.model.name=resnet",
        ],
        "unknown loss 'score_matching'": [
            "scripts.train",
            "--config",
            QUICK,
            "--workdir",
            w,
            "--config.loss.name=score_matching",
        ],
        "unknown config key 'optim.learning_rate'": [
            "scripts.train",
            "--config",
            QUICK,
            "--workdir",
            w,
            "--config.optim.learning_rate=0.1",
        ],
        "config file not found: experiments/nope.py": [
            "scripts.train",
            "--config",
            "experiments/nope.py",
            "--workdir",
            w,
        ],
        "unknown config variant key 'sizee'": [
            "scripts.train",
            "--config",
            QUICK + ",sizee=3",
            "--workdir",
            w,
        ],
        "dataset 'cifar10' is not prepared in": [
            "scripts.train",
            "--config",
            QUICK,
            "--workdir",
            w,
            "--config.data.name=cifar10",
        ],
        "example shape (3,)": [
            "scripts.train",
            "--config",
            QUICK,
            "--workdir",
            w,
            "--config.data.name=npz",
            f"--config.data.path={bad_shape}",
        ],
        "network 'mlp': dim, hidden and depth must be >= 1": [
            "scripts.train",
            "--config",
            QUICK,
            "--workdir",
            w,
            "--config.model.hidden=0",
        ],
        "unknown time_sampling 'beta'; known: uniform, logit_normal": [
            "scripts.train",
            "--config",
            QUICK,
            "--workdir",
            w,
            "--config.loss.time_sampling=beta",
        ],
        "no checkpoints in": [
            "scripts.sample",
            "--workdir",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "s.npz"),
        ],
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    (tmp_path / "empty" / "data_spec.json").write_text('{"example_shape": [2], "num_classes": 0}')
    procs = {expected: run_cli(args, env) for expected, args in cases.items()}
    for expected, proc in procs.items():
        line = one_line_error(proc)
        assert expected in line, (expected, line)
    assert not os.path.exists(os.path.join(w, "checkpoints")) or not os.listdir(
        os.path.join(w, "checkpoints")
    )


def test_train_then_sample_writes_adm_npz_and_png(tmp_path, python_env):
    w = str(tmp_path / "run")
    # loss options the config file does not list are overridable (typed by their defaults)
    extra = ["--config.loss.ot_pairing=True", "--config.loss.logit_std=0.5"]
    proc = run_cli(
        ["scripts.train", "--config", QUICK, "--workdir", w, "--config.total_steps=3", *extra],
        python_env,
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    with open(os.path.join(w, "config.json")) as f:
        saved = json.load(f)
    assert saved["loss"]["ot_pairing"] is True and saved["loss"]["logit_std"] == 0.5
    assert saved["total_steps"] == 3
    out_npz = str(tmp_path / "s.npz")
    proc = run_cli(
        [
            "scripts.sample",
            "--workdir",
            w,
            "--num",
            "10",
            "--steps",
            "4",
            "--sampler",
            "euler",
            "--out",
            out_npz,
        ],
        python_env,
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    arr = np.load(out_npz)
    assert arr["arr_0"].shape == (10, 2) and arr["arr_0"].dtype == np.float32
    assert np.all(np.isfinite(arr["arr_0"]))
    assert os.path.exists(str(tmp_path / "s.png"))
    bad = {
        "checkpoint step 7 not found": ["--step", "7"],
        "number of samples must be >= 1, got 0": ["--num", "0"],
        "sampling steps must be >= 1, got 0": ["--steps", "0"],
        "label 3 is not a class of this model (it is unconditional)": ["--label", "3"],
        "guidance weight 2 (--cfg / sample.cfg_scale) needs a conditional model": ["--cfg", "2"],
    }
    procs = {
        k: run_cli(["scripts.sample", "--workdir", w, *v, "--out", out_npz], python_env)
        for k, v in bad.items()
    }
    for expected, proc in procs.items():
        assert expected in one_line_error(proc), expected


@pytest.mark.parametrize("script", ["scripts.sample", "scripts.train", "scripts.evaluate"])
def test_help(script, python_env):
    proc = run_cli([script, "--help"], python_env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "--workdir" in out and f"python -m {script}" in out


def test_plot_metrics_reads_the_logged_series_and_names_a_missing_key(tmp_path):
    import json

    from core.errors import UserError
    from scripts import plot_metrics

    rows = [{"step": 100, "loss": 2.0}, {"step": 150, "fid": 30.0}, {"step": 200, "loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_metrics.read_series(str(tmp_path), "loss") == ([100, 200], [2.0, 1.5])
    assert plot_metrics.read_series(str(tmp_path), "fid") == ([150], [30.0])
    out = tmp_path / "curves.png"
    plot_metrics.main(["x", "--workdir", str(tmp_path), "--keys", "loss,fid", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="logged 'grad_norm'"):
        plot_metrics.main(
            ["x", "--workdir", str(tmp_path), "--keys", "grad_norm", "--out", str(out)]
        )
    with pytest.raises(UserError, match="metrics.jsonl not found"):
        plot_metrics.main(["x", "--workdir", str(tmp_path / "nope"), "--out", str(out)])


def test_sample_options_parse_as_json_and_unknown_ones_are_named():
    from core import config as config_lib
    from core.errors import UserError
    from scripts.common import parse_sample_options

    parsed = parse_sample_options(["denoise=false", "inverse=jacobi", "jacobi_tol=1e-4", "n=3"])
    assert parsed == {"denoise": False, "inverse": "jacobi", "jacobi_tol": 1e-4, "n": 3}
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_sample_options(["denoise"])
    config = config_lib.load(QUICK)
    graphdef, _ = Experiment.from_config(config).network.abstract()
    config.sample.options.update(parse_sample_options(["max_steps=4"]))
    with pytest.raises(UserError, match=r"sampler 'heun' has no option\(s\) max_steps"):
        sample_fn(graphdef, config, (2,))


def test_class_counts_of_model_and_data_must_agree():
    from core import config as config_lib
    from core.errors import UserError

    config = config_lib.load("experiments/flow_matching/mnist_unet.py:cond=True,smoke=True")

    def check_classes(config, spec):
        Experiment.from_config(config).conditioning.check_data(config.data.name, spec)

    check_classes(config, {"num_classes": 10})
    check_classes(config, {"num_classes": 7})  # a subset of the classes is fine
    with pytest.raises(UserError, match="has 12 classes but model.num_classes=10"):
        check_classes(config, {"num_classes": 12})
    with pytest.raises(UserError, match="gives no labels"):
        check_classes(config, {"num_classes": 0})
    config.model.num_classes = 0
    check_classes(config, {"num_classes": 12})  # unconditional: labels unused


def test_guidance_on_an_unconditional_model_and_a_retied_shortcut_option_are_errors():
    from core import config as config_lib
    from core.errors import UserError

    config = config_lib.load(QUICK)
    graphdef, _ = Experiment.from_config(config).network.abstract()
    with pytest.raises(UserError, match="guidance weight 2 .* needs a conditional model"):
        sample_fn(graphdef, config, (2,), cfg_scale=2.0)
    sample_fn(graphdef, config, (2,), cfg_scale=1.0)
    # a shortcut run's config.json unties loss.max_steps and sample.options.max_steps
    config = config_lib.load("experiments/shortcut/moons_mlp.py:smoke=True")
    config = config_lib.ConfigDict(json.loads(config.to_json()))
    graphdef, _ = Experiment.from_config(config).network.abstract()
    sample_fn(graphdef, config, (2,))
    config.sample.options.max_steps = config.loss.max_steps // 2
    with pytest.raises(UserError, match=r"max_steps=\d+ differs from the shortcut model's"):
        sample_fn(graphdef, config, (2,))


def test_unlisted_and_none_options_of_the_loss_and_network_become_overridable():
    from core import config as config_lib

    c = config_lib.load("experiments/shortcut/moons_mlp.py:smoke=True")
    assert c.loss.target_clip is None and "cond_drop_prob" not in c.loss
    argv = ["--config.loss.target_clip=4", "--config.loss.cond_drop_prob=0.1",
            "--config.model.num_classes", "3", "--config.loss.nope=1"]  # fmt: skip
    config_lib.add_option_overrides(c, argv)
    assert c.loss.get_type("target_clip") is float and c.loss.target_clip is None
    assert c.loss.cond_drop_prob == 0.0 and c.model.num_classes == 0  # their defaults
    assert "nope" not in c.loss  # unknown options stay unknown
    c.loss.target_clip = 4.0  # what config_flags then does with the typed field
