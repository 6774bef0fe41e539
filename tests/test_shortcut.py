"""Shortcut models: the exact Gaussian shortcut as an oracle, the flow-matching limit, the
batch split, guidance in the targets, training on a toy problem and the sampler at every k.

For x1 ~ N(mu, Sigma = U diag(lam) U^T) the path's eigen-coordinates `y = U^T (x - t mu)` have
standard deviations `sd_t = sqrt((1-t)^2 + t^2 lam)` and the ODE `dy/dt = (d log sd_t/dt) y`,
so the flow map from t to t+d is `phi(x) = (t+d) mu + U diag(sd_{t+d} / sd_t) U^T (x - t mu)`
and the exact shortcut (average velocity) is `(phi(x) - x) / d`.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import losses
import models
import samplers
from core.errors import UserError
from core.train_state import init_state
from core.trainer import make_train_step
from losses.shortcut import (
    bootstrap_levels,
    bootstrap_rows,
    loss_shortcut,
    put_rows,
    shortcut_targets,
    take_rows,
)
from models.step_size import num_levels, steps_dt
from samplers.guidance import guide
from samplers.ode import sample_rk4
from samplers.shortcut import sample_shortcut
from tests.conftest import run_python
from tests.gaussian import optimal_velocity

MU = jnp.array([1.0, -0.5])
SIGMA = jnp.array([[0.5, 0.2], [0.2, 0.3]])
M = 128


def exact_shortcut(mu, sigma, max_steps: int, finest: str = "average"):
    """`s(x, t, dt)`: the exact average velocity over the level's step `d = 2^l / max_steps`.
    At level 0 (`dt = 0`) it is the instantaneous velocity (`finest="velocity"`, the
    flow-matching limit) or the average over `1/max_steps` (`finest="average"`)."""
    lam, u = (jnp.asarray(a, jnp.float32) for a in np.linalg.eigh(np.asarray(sigma, np.float64)))
    v_star = optimal_velocity(mu, sigma)
    levels = num_levels(max_steps)

    def s(x, t, *, cond=None, dt=None):
        level = jnp.round(dt * levels)
        d = 2.0**level / max_steps
        if finest == "velocity":
            d = jnp.where(level == 0, 0.0, d)
        sd = lambda tt: jnp.sqrt((1 - tt[:, None]) ** 2 + tt[:, None] ** 2 * lam[None, :])
        y = (x - t[:, None] * mu[None, :]) @ u
        phi = (t + d)[:, None] * mu[None, :] + (sd(t + d) / sd(t) * y) @ u.T
        average = (phi - x) / jnp.where(d > 0, d, 1.0)[:, None]
        return jnp.where(d[:, None] > 0, average, v_star(x, t))

    return s


def gaussian_batch(key, n):
    return {"x": jax.random.multivariate_normal(key, MU, SIGMA, (n,))}


def test_smallest_step_reduces_to_the_flow_matching_target():
    k0, k1, kt = jax.random.split(jax.random.key(0), 3)
    x0, x1 = jax.random.normal(k0, (32, 2)), gaussian_batch(k1, 32)["x"]
    t = jax.random.uniform(kt, (32,))
    # rows at the smallest step (level 0) are exactly the flow-matching rows
    x_t, dt, target = shortcut_targets(None, x0, x1, t, np.zeros(32, int), max_steps=M)
    np.testing.assert_array_equal(target, x1 - x0)
    np.testing.assert_array_equal(dt, 0.0)
    np.testing.assert_allclose(x_t, (1 - t[:, None]) * x0 + t[:, None] * x1, atol=1e-6)
    # one data point: the straight path is the exact flow, and every bootstrap level's
    # self-consistency target is the flow-matching target x1 - x0
    straight = lambda x, t, *, cond=None, dt=None: (x1[:1] - x) / (1 - t[:, None])
    t_grid = jnp.concatenate([jnp.zeros(16), jnp.full(16, 0.5)])  # 2d <= 1 - t below
    levels = np.concatenate([bootstrap_levels(16, M), np.minimum(bootstrap_levels(16, M), 6)])
    _, _, target = shortcut_targets(straight, x0, x1[:1], t_grid, levels, max_steps=M)
    np.testing.assert_allclose(target, x1[:1] - x0, rtol=1e-4, atol=1e-4)


def test_finest_target_tends_to_the_flow_matching_velocity():
    """With the exact velocity as teacher, the finest level's target (two flow-matching
    half steps) approaches v*(x_t, t) linearly in the step."""
    v_star = optimal_velocity(MU, SIGMA)
    x = jax.random.normal(jax.random.key(1), (64, 2))
    t = jnp.linspace(0.0, 0.9, 64)
    errors = []
    for max_steps in (16, 64, 256):
        teacher = exact_shortcut(MU, SIGMA, max_steps, finest="velocity")
        _, _, target = shortcut_targets(
            teacher, x, x, t, np.ones(64, int), max_steps=max_steps
        )  # x1 = x0 = x, t: x_t = x
        errors.append(float(jnp.max(jnp.abs(target - v_star(x, t)))))
    assert errors[0] > 3.0 * errors[1] > 9.0 * errors[2] > 0.0


def test_exact_shortcut_has_zero_self_consistency_loss():
    batch = gaussian_batch(jax.random.key(2), 256)
    hp = dict(teacher="current", bootstrap_every=2, max_steps=M)
    run = lambda net: jax.jit(lambda b: loss_shortcut(net, b, jax.random.key(3), **hp))(batch)
    per_example, metrics = run(exact_shortcut(MU, SIGMA, M))
    assert float(jnp.max(per_example[bootstrap_rows(256, 128)])) < 1e-7
    assert {f"loss_k{2**i}" for i in range(7)} | {"loss_fm"} == set(metrics)
    # the flow-matching limit at the finest level: exact above it, Euler's O(1/M) error there
    per_example, metrics = run(exact_shortcut(MU, SIGMA, M, finest="velocity"))
    assert all(float(metrics[f"loss_k{2**i}"]) < 1e-7 for i in range(6))
    assert 0.0 < float(metrics["loss_k64"]) < 1e-3
    # the flow-matching velocity, blind to the step size, is no shortcut
    v_star = optimal_velocity(MU, SIGMA)
    per_example, metrics = run(lambda x, t, *, cond=None, dt=None: v_star(x, t))
    assert float(metrics["loss_k1"]) > 1e-2 and float(metrics["loss_k1"]) > float(
        metrics["loss_k8"]
    )


def test_ot_pairing_gives_the_noise_of_every_row_and_shortens_the_pairs(monkeypatch):
    batch = gaussian_batch(jax.random.key(5), 256)
    x1 = batch["x"]
    hp = dict(teacher="current", bootstrap_every=2, max_steps=M)

    def run(net, **kw):
        return jax.jit(lambda b: loss_shortcut(net, b, jax.random.key(6), **hp, **kw))(batch)

    # the real plan: pairs closer than independent ones (the zero net's flow-matching rows
    # measure |x1 - x0|^2), and ot_pairing=False is the default
    zero = lambda x, t, *, cond=None, dt=None: jnp.zeros_like(x)
    _, independent = run(zero)
    _, paired = run(zero, ot_pairing=True)
    assert float(paired["loss_fm"]) < 0.75 * float(independent["loss_fm"])
    np.testing.assert_array_equal(run(zero, ot_pairing=False)[0], run(zero)[0])
    # the pairing's output is the noise of every row: pair each point with itself (x0 = x1,
    # so x_t = x1 at every t); for the identity net, the flow-matching rows' loss is then
    # |x1|^2 and a bootstrap row of level l (half step h = 2^(l-1) / M) has the target
    # (x1 + (1 + h) x1) / 2, so its loss is (h / 2)^2 |x1|^2
    monkeypatch.setattr(losses.shortcut, "sinkhorn_pairing", lambda key, x0, x1, **kw: x1)
    per_example, _ = run(lambda x, t, *, cond=None, dt=None: x, ot_pairing=True)
    rows = bootstrap_rows(256, 128)
    half = 2.0 ** (bootstrap_levels(128, M) - 1) / M
    expected = np.mean(np.square(np.asarray(x1)), axis=1)
    expected[rows] *= (half / 2) ** 2
    np.testing.assert_allclose(per_example, expected, rtol=2e-4)  # float32 cancellation


@pytest.mark.parametrize("finest", ["average", "velocity"])
def test_one_step_of_the_exact_shortcut_is_the_ode_solution(finest):
    x0 = jax.random.normal(jax.random.key(4), (4096, 2))
    lam, u = np.linalg.eigh(np.asarray(SIGMA, np.float64))
    exact = MU[None, :] + x0 @ jnp.asarray(u @ np.diag(np.sqrt(lam)) @ u.T, jnp.float32)
    ode = sample_rk4(optimal_velocity(MU, SIGMA), x0, None, num_steps=100)
    np.testing.assert_allclose(ode, exact, atol=1e-4)
    net = exact_shortcut(MU, SIGMA, M, finest)
    for k in (1, 2, 8, 64) if finest == "average" else (1, 4):
        np.testing.assert_allclose(sample_shortcut(net, x0, num_steps=k), exact, atol=2e-4)


def test_batch_too_small_for_the_levels_is_a_clear_error_at_trace_time():
    net = lambda x, t, *, cond=None, dt=None: x
    trace = lambda b, **kw: jax.eval_shape(
        lambda x: loss_shortcut(net, {"x": x}, jax.random.key(0), teacher="current", **kw),
        jax.ShapeDtypeStruct((b, 2), jnp.float32),
    )
    with pytest.raises(UserError, match=r"batch size 48 with bootstrap_every=8 .* 7 bootstrap"):
        trace(48)
    trace(56)  # 7 rows: one per level
    assert sorted(bootstrap_levels(7, M)) == list(range(1, 8))
    trace(8, max_steps=8, bootstrap_every=2)
    with pytest.raises(UserError, match="power of two"):
        trace(64, max_steps=100)
    with pytest.raises(UserError, match="ema_net"):
        loss_shortcut(net, {"x": jnp.zeros((64, 2))}, jax.random.key(0))


def test_dt_enters_the_network_normalised_and_the_sampler_uses_the_same_map():
    seen = []

    def spy(x, t, *, cond=None, dt=None):
        seen.append((np.asarray(t), np.asarray(dt)))
        return jnp.zeros_like(x)

    def dt_out(x, t, *, cond=None, dt=None):  # k steps of size 1/k add up dt
        return jnp.broadcast_to(dt[:, None], x.shape)

    loss_shortcut(spy, {"x": jnp.zeros((64, 2))}, jax.random.key(0), teacher="current")
    (t1, dt1), _, (t, dt) = seen  # teacher, teacher, student
    levels, rows = bootstrap_levels(8, M), bootstrap_rows(64, 8)  # rows 0, 8, ..., 56
    fm_rows = np.setdiff1d(np.arange(64), rows)
    np.testing.assert_array_equal(rows, np.arange(0, 64, 8))
    np.testing.assert_allclose(dt[rows], [steps_dt(M // 2**lv, M) for lv in levels])
    np.testing.assert_allclose(dt[rows], levels / 7)
    np.testing.assert_allclose(dt1, (levels - 1) / 7)
    np.testing.assert_array_equal(dt[fm_rows], 0.0)
    np.testing.assert_array_equal(t1, t[rows])  # the teacher sees the student's rows
    assert np.all(np.isclose((t[rows] * 2.0**7 / 2.0**levels) % 1, 0)) and np.all(t[rows] < 1)
    for k in (1, 16, 128):
        x = sample_shortcut(dt_out, jnp.zeros((2, 2)), num_steps=k)
        np.testing.assert_allclose(x, steps_dt(k, M), atol=1e-6)
    assert steps_dt(1, M) == 1.0 and steps_dt(M, M) == 0.0


def test_bootstrap_guidance_acts_on_the_finest_level_and_ema_is_the_teacher():
    null = 3

    def labelled(x, t, *, cond=None, dt=None):  # velocity -1 for the null label, +1 else
        return jnp.where((cond == null)[:, None], -1.0, 1.0) * jnp.ones_like(x)

    batch = {"x": jnp.zeros((64, 2)), "cond": jnp.zeros((64,), jnp.int32)}
    hp = dict(teacher="current", bootstrap_cfg_scale=2.0, null_cond=null)
    per_example, metrics = loss_shortcut(labelled, batch, jax.random.key(0), **hp)
    assert float(metrics["loss_k64"]) == pytest.approx(4.0)  # (1 - (-1 + 2 * 2))^2
    assert all(float(metrics[f"loss_k{2**i}"]) == 0.0 for i in range(6))
    five = lambda x, t, *, cond=None, dt=None: jnp.full_like(x, 5.0)
    per_example, _ = loss_shortcut(labelled, batch, jax.random.key(0), ema_net=five)
    np.testing.assert_allclose(per_example[bootstrap_rows(64, 8)], 16.0)


def test_teacher_ema_is_a_second_ema_with_its_own_decay_and_the_bootstrap_teacher():
    """The twin EMA (iSM): `state.teacher_ema` moves by its own decay beside the sampling EMA,
    and the loss of a step is the shortcut loss with that tree as the teacher."""
    net = models.build("mlp", dim=2, hidden=16, depth=1, use_dt=True, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net, nnx.Param)
    tx = optax.adam(1e-2)
    hp = dict(bootstrap_every=4, max_steps=8)
    loss_fn = losses.build("shortcut", teacher="teacher_ema", **hp)
    step = jax.jit(
        make_train_step(graphdef, loss_fn, tx, ema_decay=0.9, teacher_ema_decay=0.5, seed=0)
    )
    state = init_state(nnx.to_pure_dict(params), tx, teacher_ema=True)
    batch = {"x": jax.random.normal(jax.random.key(1), (64, 2))}
    for _ in range(2):
        new, _ = step(state, batch)
        for name, decay in (("ema", 0.9), ("teacher_ema", 0.5)):
            mix = lambda e, p, d=decay: d * e + (1 - d) * p
            want = jax.tree.map(mix, getattr(state, name), new.params)
            for a, b in zip(jax.tree.leaves(getattr(new, name)), jax.tree.leaves(want)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)
        state = new
    key = jax.random.fold_in(jax.random.key(0), 2)
    student = nnx.merge(graphdef, state.params)
    direct = lambda **kw: float(jnp.mean(loss_shortcut(student, batch, key, **hp, **kw)[0]))
    _, metrics = step(state, batch)
    twin = direct(teacher="teacher_ema", teacher_ema_net=nnx.merge(graphdef, state.teacher_ema))
    slow = direct(teacher="ema", ema_net=nnx.merge(graphdef, state.ema))
    assert float(metrics["loss"]) == pytest.approx(twin, rel=1e-5)
    assert abs(twin - slow) > 1e-3 * twin  # the two EMAs differ, so the teacher matters
    with pytest.raises(UserError, match=r"teacher='teacher_ema' needs .*teacher_ema_decay > 0"):
        loss_shortcut(student, batch, key, teacher="teacher_ema")
    with pytest.raises(UserError, match=r"loss.teacher='current' never uses it"):
        loss_shortcut(student, batch, key, teacher="current", teacher_ema_net=student)


def test_row_helpers_equal_numpy_indexing_for_strided_and_other_rows():
    a = jnp.arange(2 * 13, dtype=jnp.float32).reshape(13, 2)
    for rows in (
        bootstrap_rows(13, 4),
        bootstrap_rows(13, 1),
        np.array([1, 5, 6]),
        np.array([0, 2, 3]),
        np.array([0, 5, 10]),  # strided, but the last block of 5 would pass the end
    ):
        np.testing.assert_array_equal(take_rows(a, rows), np.asarray(a)[rows])
        values = -jnp.ones((rows.size, 2))
        expected = np.asarray(a).copy()
        expected[rows] = -1
        np.testing.assert_array_equal(put_rows(a, rows, values), expected)
    np.testing.assert_array_equal(bootstrap_rows(13, 4), [0, 3, 6, 9])


def test_loss_decreases_and_one_step_samples_match_the_gaussian():
    """600 trainer steps (EMA teacher) of a small MLP: the loss drops by a quarter and one
    step lands within 0.25 (RMS) of the exact transport map, as close as eight steps."""
    net = models.build("mlp", dim=2, hidden=32, depth=2, use_dt=True, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net, nnx.Param)
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, 600))
    loss_fn = losses.build("shortcut", bootstrap_every=4, max_steps=8)
    step = jax.jit(make_train_step(graphdef, loss_fn, tx, ema_decay=0.95, seed=0))
    state = init_state(nnx.to_pure_dict(params), tx)
    data = jax.random.multivariate_normal(jax.random.key(1), MU, SIGMA, (600, 128))
    curve = []
    for i in range(600):
        state, metrics = step(state, {"x": data[i]})
        curve.append(metrics["loss"])
    curve = np.asarray(jax.device_get(curve))
    assert np.mean(curve[-50:]) < 0.75 * np.mean(curve[:50])
    x0 = jax.random.normal(jax.random.key(5), (8192, 2))
    lam, u = np.linalg.eigh(np.asarray(SIGMA, np.float64))
    exact = MU[None, :] + x0 @ jnp.asarray(u @ np.diag(np.sqrt(lam)) @ u.T, jnp.float32)
    rms = {}
    for k in (1, 8):
        sample = jax.jit(functools.partial(sample_shortcut, num_steps=k, max_steps=8))
        x1 = sample(nnx.merge(graphdef, state.ema), x0)
        rms[k] = float(jnp.sqrt(jnp.mean(jnp.sum((x1 - exact) ** 2, 1))))
        np.testing.assert_allclose(x1.mean(0), MU, atol=0.1)
    assert rms[1] < 0.25 and rms[1] < 1.5 * rms[8], rms


def test_sampler_gives_finite_samples_of_the_right_shape_for_every_k():
    mlp = models.build("mlp", dim=3, hidden=8, depth=1, use_dt=True, rngs=nnx.Rngs(0))
    dit = models.build(
        "dit", in_channels=1, variant="S/2", hidden=16, depth=1, heads=2, num_classes=3,
        use_dt=True, rngs=nnx.Rngs(0),
    )  # fmt: skip
    guided = guide(dit, 1.5, null_cond=3)
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    cond = jnp.array([0, 1, 2, 3])
    assert samplers.build("shortcut") is sample_shortcut
    for k in (2**i for i in range(8)):
        x = sample_shortcut(mlp, jnp.ones((5, 3)), num_steps=k)
        assert x.shape == (5, 3) and bool(jnp.all(jnp.isfinite(x))), k
    for k in (1, 128):
        x = sample_shortcut(guided, images, jax.random.key(1), num_steps=k, cond=cond)
        assert x.shape == images.shape and bool(jnp.all(jnp.isfinite(x))), k
    for bad in (0, 3, 256, 2.5):
        with pytest.raises(UserError, match="power of two"):
            sample_shortcut(mlp, jnp.ones((5, 3)), num_steps=bad)


SHARDED_STEP = """
import json, re
import jax, numpy as np
from core import config as config_lib, sharding
from core.experiment import Experiment
from core.train_state import init_state, make_optimizer
from core.trainer import make_train_step

c = config_lib.load("experiments/shortcut/moons_mlp.py:smoke=True")
c.loss.update(bootstrap_every=8, max_steps=8)
mesh = sharding.make_mesh(-1, 1)  # 8 data shards of 8 rows: one bootstrap row each
graphdef, abstract = Experiment.from_config(c).network.abstract(0)
tx = make_optimizer(**c.optim, total_steps=c.total_steps)
state = jax.eval_shape(lambda p: init_state(p, tx), abstract)
shard = sharding.state_shardings(mesh, state, c.mesh.fsdp_min_size)
state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shard)
x = jax.ShapeDtypeStruct((64, 2), np.float32, sharding=sharding.batch_sharding(mesh))
loss_fn = Experiment.from_config(c).loss.fn
step = make_train_step(graphdef, loss_fn, tx, ema_decay=c.ema_decay, seed=0)
hlo = jax.jit(step).lower(state, {"x": x}).compile().as_text()
ops = ["all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter"]
print(json.dumps({op: len(re.findall(rf" {op}(?:-start)?\\(", hlo)) for op in ops}))
"""


def test_sharded_step_moves_no_rows_between_devices(python_env):
    # The bootstrap rows are spread over the batch (every k-th row), so on a data-sharded
    # mesh the step needs no gathers or permutes: only the all-reduce of the gradients and
    # metrics. (With the rows as a prefix of the batch, XLA gathered and permuted them.)
    proc = run_python(["-c", SHARDED_STEP], python_env, devices=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["all-reduce"] >= 1, counts
    assert all(counts[op] == 0 for op in counts if op != "all-reduce"), counts
