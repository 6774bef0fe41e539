"""Guidance schedules: each weight against its formula, the dynamic switch on a network whose
gap is known (per sample, at the step the rule names), w = 1 as the plain conditional
sampler, and the config keys and CLI flags reaching the sampler."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python, train

from core import config as config_lib
from core.errors import UserError
from core.experiment import Experiment
from core.generation import Generation, guidance_trace
from samplers.guidance import Carried, Guidance, guide, parse_interval
from samplers.ode import sample_euler, sample_heun

NULL = 2  # the null label of the two-class networks below


def test_each_time_schedule_is_its_formula():
    t = jnp.linspace(0.0, 1.0, 11)
    w = 3.0
    np.testing.assert_array_equal(Guidance(w).weight(t), np.full(11, w))
    inside = (np.asarray(t) >= 0.3) & (np.asarray(t) <= 0.7)
    np.testing.assert_array_equal(
        Guidance(w, "interval", (0.3, 0.7)).weight(t), np.where(inside, w, 1.0)
    )
    np.testing.assert_allclose(Guidance(w, "linear").weight(t), 1 + 2 * (w - 1) * t, rtol=1e-6)
    on = jnp.arange(11) >= 4  # the dynamic switch: w from the switch on, inside the interval
    dyn = Guidance(w, "dynamic", (0.0, 0.8)).weight(t, on)
    np.testing.assert_array_equal(dyn, np.where(np.asarray(on) & (np.asarray(t) <= 0.8), w, 1.0))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: Guidance(2.0, "cosine"), "unknown guidance schedule 'cosine'; known: constant"),
        (lambda: parse_interval("0.4"), "two times lo,hi"),
        (lambda: parse_interval("a,b"), "two times lo,hi"),
        (lambda: parse_interval((0.8, 0.2)), "0 <= lo <= hi <= 1"),
        (lambda: parse_interval("-0.1,1"), "0 <= lo <= hi <= 1"),
        (lambda: Guidance(2.0, "constant", (0.4, 1.0)), "used by the schedules interval and"),
        (lambda: Guidance(2.0, "dynamic", drop=1.0), r"drop=1 must be in \[0, 1\)"),
    ],
)
def test_malformed_guidance_is_one_user_error(make, match):
    with pytest.raises(UserError, match=match):
        make()


def gap_table_net(table: np.ndarray, num_steps: int):
    """`net(x, t, cond)`: v_null = 0 and v_cond = table[label, step of t] · e_0, so the gap
    of a sample of label c at step k is `table[c, k]` whatever x is. Stage times between
    grid points (Heun's t + h) read the next grid point."""
    table = jnp.asarray(table, jnp.float32)

    def net(x, t, *, cond=None, dt=None):
        k = jnp.clip(jnp.round(t * num_steps).astype(jnp.int32), 0, table.shape[1] - 1)
        g = jnp.where(cond == NULL, 0.0, table[jnp.minimum(cond, 1), k])
        return jnp.zeros_like(x).at[:, 0].set(g)

    return net


def rule_oracle(gaps: np.ndarray, drop: float) -> int:
    """The first step k >= 1 with g_k < (1 - drop) max_{j<k} g_j (len(gaps) if none)."""
    for k in range(1, len(gaps)):
        if gaps[k] < (1 - drop) * max(gaps[:k]):
            return k
    return len(gaps)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_dynamic_switch_fires_where_the_rule_says_per_sample(method):
    steps, scale = 10, 3.0
    t = np.arange(steps + 1) / steps
    # label 0: the gap peaks at t = 0.3; label 1: a plateau wobble at 0.5-0.6 (within 5 %)
    # before its peak at 0.7
    table = np.stack([np.exp(-((t - 0.3) ** 2) / 0.02),
                      np.interp(t, [0, .5, .6, .7, 1], [.1, .9, .88, 1.0, .2])])  # fmt: skip
    net = gap_table_net(table, steps)
    labels = jnp.array([0, 1, 1, 0])
    x0 = jnp.zeros((4, 2))
    for drop in (0.05, 0.0):
        g = Guidance(scale, "dynamic", drop=drop)
        expected = np.array([rule_oracle(table[c, :steps], drop) for c in (0, 1, 1, 0)])
        assert expected[0] == 4 and expected[1] == (8 if drop else 6)  # the wobble: only drop=0
        sampler = {"euler": sample_euler, "heun": sample_heun}[method]
        x, trace = sampler(Carried(net, g, NULL), x0, None, num_steps=steps, cond=labels,
                           trace=True)  # fmt: skip
        np.testing.assert_array_equal(trace["switch_step"], expected)
        np.testing.assert_allclose(trace["switch_t"], expected / steps, rtol=1e-6)
        np.testing.assert_allclose(trace["gap"], table[np.asarray(labels)][:, :steps].T, 1e-6)
        on = np.arange(steps)[:, None] >= expected[None, :]
        np.testing.assert_array_equal(trace["weight"], np.where(on, scale, 1.0))
        # the samples: x_1 = sum of the steps' guided velocities (w g e_0; v_null = 0), each
        # of a step's stages at the step's switch
        h = 1.0 / steps
        g_t = table[np.asarray(labels)]  # [B, steps + 1]
        w = np.where(on.T, scale, 1.0)
        if method == "euler":
            want = h * (w * g_t[:, :steps]).sum(1)
        else:
            want = 0.5 * h * (w * (g_t[:, :steps] + g_t[:, 1:])).sum(1)
        np.testing.assert_allclose(x[:, 0], want, rtol=1e-5)
        np.testing.assert_array_equal(x[:, 1], 0.0)
        # without the trace: the same samples
        plain = sampler(Carried(net, g, NULL), x0, None, num_steps=steps, cond=labels)
        np.testing.assert_array_equal(plain, x)


def test_a_gap_that_only_rises_never_switches():
    steps = 8
    table = np.tile(np.linspace(0.1, 1.0, steps + 1), (2, 1))
    net = gap_table_net(table, steps)
    _, trace = sample_euler(Carried(net, Guidance(4.0, "dynamic"), NULL), jnp.zeros((2, 2)),
                            None, num_steps=steps, cond=jnp.array([0, 1]), trace=True)  # fmt: skip
    np.testing.assert_array_equal(trace["switch_step"], [steps, steps])
    assert np.isnan(np.asarray(trace["switch_t"])).all()
    np.testing.assert_array_equal(trace["weight"], 1.0)


# a class-conditional MLP on 2-D points, randomly initialized (no training needed: the
# oracles compare samplers on the same network)
def cond_config(**sample):
    config = config_lib.load("experiments/quickstart.py:smoke=True")
    config.model.num_classes = 2
    config.sample.sampler = "heun"
    config.sample.num_steps = 12
    for key, value in sample.items():
        config.sample.guidance[key] = value
    return config


def perturbed(params):
    """The weights moved off their init (whose label embedding may be zero: no gap)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    moved = [p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, moved)


def generate(config, noise, cond, **sampling):
    experiment = Experiment.from_config(config).with_sampling(**sampling)
    graphdef, _ = experiment.network.abstract()
    params = perturbed(experiment.network.init(0))
    gen = Generation(experiment, graphdef, (2,))
    return jax.jit(gen.generate)(params, noise, cond), (experiment, graphdef, params)


@pytest.fixture(scope="module")
def noise():
    return {"x_init": jax.random.normal(jax.random.key(1), (16, 2))}, jnp.arange(16) % 2


def test_weight_one_is_exactly_the_plain_conditional_sampler(noise):
    x_init, cond = noise
    plain, (experiment, graphdef, params) = generate(cond_config(), x_init, cond)
    from flax import nnx

    direct = sample_heun(nnx.merge(graphdef, params), x_init["x_init"], None, num_steps=12,
                         cond=cond)  # fmt: skip
    np.testing.assert_array_equal(plain, direct)
    for schedule, interval in [("constant", None), ("interval", "0.3,0.8"), ("linear", None),
                               ("dynamic", None)]:  # fmt: skip
        out, _ = generate(cond_config(), x_init, cond, cfg_scale=1.0, cfg_schedule=schedule,
                          cfg_interval=interval)  # fmt: skip
        np.testing.assert_array_equal(out, plain, err_msg=schedule)


def test_schedules_differ_where_they_should_and_agree_where_they_must(noise):
    x_init, cond = noise
    run = lambda **kw: generate(cond_config(), x_init, cond, cfg_scale=3.0, **kw)[0]
    constant = run()
    unguided = generate(cond_config(), x_init, cond)[0]
    interval = run(cfg_schedule="interval", cfg_interval="0.5,1.0")
    linear = run(cfg_schedule="linear")
    dynamic = run(cfg_schedule="dynamic")
    for name, other in [("unguided", unguided), ("interval", interval), ("linear", linear),
                        ("dynamic", dynamic)]:  # fmt: skip
        assert float(jnp.abs(other - constant).max()) > 1e-4, name
    np.testing.assert_array_equal(run(cfg_schedule="interval", cfg_interval="0,1"), constant)
    # the trace samples what the sampler samples, and names each sample's switch
    experiment = Experiment.from_config(cond_config()).with_sampling(
        cfg_scale=3.0, cfg_schedule="dynamic"
    )
    graphdef, _ = experiment.network.abstract()
    params = perturbed(experiment.network.init(0))
    x, trace = guidance_trace(experiment, graphdef, params, x_init, cond)
    np.testing.assert_allclose(x, dynamic, atol=1e-5)
    assert trace["gap"].shape == (12, 16) and trace["switch_step"].shape == (16,)
    assert len(set(np.asarray(trace["switch_step"]).tolist())) > 1  # per sample
    # a switch that never fires (a drop of 99 % asked) samples without guidance
    never, _ = generate(cond_config(drop=0.99), x_init, cond, cfg_scale=3.0,
                        cfg_schedule="dynamic")  # fmt: skip
    np.testing.assert_allclose(never, unguided, atol=1e-6)


def test_config_keys_and_the_old_cfg_scale_are_one_setting():
    config = cond_config(schedule="interval", interval=(0.4, 1.0), scale=2.5)
    g = Experiment.from_config(config).sampling.guidance
    assert (g.schedule, g.scale, g.interval) == ("interval", 2.5, (0.4, 1.0))
    # a config.json of a run written before the section existed: sample.cfg_scale only
    legacy = json.loads(cond_config().to_json())
    del legacy["sample"]["guidance"]
    legacy["sample"]["cfg_scale"] = 2.0
    old = Experiment.from_config(config_lib.ConfigDict(legacy)).sampling
    assert old.guidance == Guidance(2.0) and old.cfg_scale == 2.0
    # in a config the two names are one field: setting either sets both
    both = cond_config(scale=2.0)
    assert both.sample.cfg_scale == 2.0
    both.sample.cfg_scale = 3.0
    assert Experiment.from_config(both).sampling.guidance.scale == 3.0
    # a config.json (plain JSON) holds both: equal is fine, different is one error
    written = json.loads(both.to_json())
    assert written["sample"]["cfg_scale"] == written["sample"]["guidance"]["scale"] == 3.0
    written["sample"]["guidance"]["scale"] = 2.0
    with pytest.raises(UserError, match="sample.cfg_scale=3.0 and sample.guidance.scale=2.0"):
        Experiment.from_config(config_lib.ConfigDict(written))
    bad = json.loads(cond_config().to_json())
    bad["sample"]["guidance"]["shape"] = "cosine"
    with pytest.raises(UserError, match="'sample.guidance' has no key.* shape"):
        Experiment.from_config(config_lib.ConfigDict(bad))


def test_legacy_cfg_scale_samples_as_the_guidance_scale(noise):
    x_init, cond = noise
    legacy = json.loads(cond_config().to_json())
    del legacy["sample"]["guidance"]
    legacy["sample"]["cfg_scale"] = 2.0
    old, _ = generate(config_lib.ConfigDict(legacy), x_init, cond)
    new, _ = generate(cond_config(scale=2.0), x_init, cond)
    np.testing.assert_array_equal(old, new)


def test_samplers_that_cannot_carry_the_switch_and_flows_schedules_are_errors():
    config = cond_config(schedule="dynamic", scale=2.0)
    config.sample.sampler = "euler_maruyama"
    experiment = Experiment.from_config(config)
    graphdef, _ = experiment.network.abstract()
    with pytest.raises(UserError, match="sampler 'euler_maruyama' does not; use one of euler"):
        Generation(experiment, graphdef, (2,))
    config.sample.sampler = "heun"
    config.sample.guidance.scale = 1.0
    config.model.num_classes = 0
    Generation(Experiment.from_config(config), graphdef, (2,))  # w = 1: nothing to check
    config.sample.guidance.scale = 2.0
    with pytest.raises(UserError, match="guidance weight 2 .* needs a conditional model"):
        Generation(Experiment.from_config(config), graphdef, (2,))
    flow = config_lib.load("experiments/nf/mnist_tarflow.py:cond=True,smoke=True")
    flow.sample.guidance.schedule = "interval"
    flow.sample.guidance.interval = (0.5, 1.0)
    experiment = Experiment.from_config(flow)
    with pytest.raises(UserError, match="guides inside its sampler 'tarflow' at one weight"):
        Generation(experiment, None, (28, 28, 1))
    with pytest.raises(UserError, match="dynamic guidance schedule carries"):
        guide(lambda x, t, **k: x, Guidance(2.0, "dynamic"), NULL)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """A two-class run on 2-D points (a few training steps: the CLI test compares
    schedules on the same weights, not sample quality)."""
    tmp = tmp_path_factory.mktemp("cond_run")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 256)
    x = rng.normal(size=(256, 2)).astype(np.float32) + 3.0 * y[:, None]
    np.savez(tmp / "data.npz", x=x, y=y)
    config = cond_config()
    config.data.update(name="npz", path=str(tmp / "data.npz"), use_labels=True)
    config.total_steps, config.batch_size, config.ckpt_every = 4, 32, 4
    config.sample_every = 0
    train(config, str(tmp / "run"))
    return str(tmp / "run")


def test_cli_flags_reach_the_sampler(cond_run, tmp_path):
    from scripts import evaluate as evaluate_cli
    from scripts import sample as sample_cli
    from scripts import search as search_cli
    from scripts.common import sampling_kwargs

    def sample(*flags):
        out = str(tmp_path / f"s{len(os.listdir(tmp_path))}.npz")
        argv = ["sample", "--workdir", cond_run, "--num", "8", "--out", out, "--cfg", "3"]
        sample_cli.main([*argv, *flags])
        return np.load(out)["arr_0"]

    constant = sample()
    interval = sample("--cfg-schedule", "interval", "--cfg-interval", "0.5,1.0")
    dynamic = sample("--cfg-schedule", "dynamic")
    assert np.abs(interval - constant).max() > 1e-4
    assert np.abs(dynamic - constant).max() > 1e-4
    np.testing.assert_array_equal(sample("--cfg-schedule", "interval", "--cfg-interval", "0,1"),
                                  constant)  # fmt: skip
    with pytest.raises(UserError, match="unknown guidance schedule 'cosine'"):
        sample("--cfg-schedule", "cosine")
    with pytest.raises(UserError, match="two times lo,hi"):
        sample("--cfg-schedule", "interval", "--cfg-interval", "0.5")
    # scripts.evaluate and scripts.search parse the same flags into the same keywords
    flags = ["--cfg", "3", "--cfg-schedule", "interval", "--cfg-interval", "0.2,0.9"]
    for args in (
        evaluate_cli.parse(["evaluate", "--workdir", cond_run, "--metrics", "fid", *flags]),
        search_cli.parse(["search", "--workdir", cond_run, "--out", "x.npz",
                          "--verifier", "density", *flags]),
    ):  # fmt: skip
        kw = sampling_kwargs(args)
        got = (kw["cfg_scale"], kw["cfg_schedule"], kw["cfg_interval"])
        assert got == (3.0, "interval", "0.2,0.9")


def test_train_config_flag_reaches_the_experiment(python_env):
    code = (
        "import sys; from scripts.common import parse_config_flags; "
        "from core.experiment import Experiment; "
        "c, _ = parse_config_flags(sys.argv); print(Experiment.from_config(c).sampling.guidance)"
    )
    argv = ["-c", code, "--config", "experiments/quickstart.py", "--workdir", "/tmp/unused",
            "--config.sample.guidance.schedule=dynamic", "--config.sample.cfg_scale=2",
            "--config.sample.guidance.interval=0.2,0.9"]  # fmt: skip
    proc = run_python(argv, python_env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Guidance(scale=2.0, schedule='dynamic', interval=(0.2, 0.9)" in proc.stdout
