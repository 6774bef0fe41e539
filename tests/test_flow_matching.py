"""Flow matching: the Gaussian oracle (closed-form optimal velocity), OT pairing, views."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import models
from core.errors import UserError
from core.train_state import init_state
from core.trainer import make_train_step
from data import build_source
from losses.flow_matching import drop_cond, loss_flow_matching, sample_time, sinkhorn_pairing
from models.views import convert
from samplers.ode import sample_heun, sample_rk4
from tests.gaussian import optimal_velocity, score

MU = jnp.array([1.0, -0.5])
SIGMA = jnp.array([[0.5, 0.2], [0.2, 0.3]])


def gaussian_batch(key, n):
    return {"x": jax.random.multivariate_normal(key, MU, SIGMA, (n,))}


def test_loss_is_minimal_at_the_closed_form_velocity():
    batch = gaussian_batch(jax.random.key(0), 200_000)
    key = jax.random.key(1)
    v_star = optimal_velocity(MU, SIGMA)
    loss = lambda net: float(jnp.mean(loss_flow_matching(net, batch, key)[0]))
    best = loss(v_star)
    perturbed = {
        "shift": lambda x, t, **kw: v_star(x, t) + jnp.array([[0.1, -0.1]]),
        "scale": lambda x, t, **kw: 1.05 * v_star(x, t),
        "time": lambda x, t, **kw: v_star(x, jnp.clip(t + 0.05, 0, 1)),
        "zero_cov": lambda x, t, **kw: optimal_velocity(MU, 0.5 * SIGMA)(x, t),
    }
    for name, net in perturbed.items():
        assert loss(net) > best + 1e-3, name


def test_exact_velocity_transports_noise_to_the_data_distribution():
    x0 = jax.random.normal(jax.random.key(2), (100_000, 2))
    x1 = sample_rk4(optimal_velocity(MU, SIGMA), x0, None, num_steps=20)
    np.testing.assert_allclose(x1.mean(0), MU, atol=0.01)
    np.testing.assert_allclose(jnp.cov(x1.T), SIGMA, atol=0.01)


def test_trained_mlp_matches_gaussian_mean_and_covariance():
    """A small MLP trained with the trainer's step: sample mean within 0.05 and covariance
    within 0.06 (entrywise) of the target after 1500 steps."""
    net = models.build("mlp", dim=2, hidden=64, depth=2, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, 1500))
    step = jax.jit(make_train_step(graphdef, loss_flow_matching, tx, ema_decay=0.99, seed=0))
    state = init_state(params, tx)
    for i in range(1500):
        state, metrics = step(state, gaussian_batch(jax.random.key(100 + i), 256))
    x1 = sample_heun(
        nnx.merge(graphdef, state.ema),
        jax.random.normal(jax.random.key(3), (20_000, 2)),
        None,
        num_steps=32,
    )
    np.testing.assert_allclose(x1.mean(0), MU, atol=0.05)
    np.testing.assert_allclose(jnp.cov(x1.T), SIGMA, atol=0.06)


def test_time_sampling_ranges_and_logit_normal_median():
    t = sample_time(jax.random.key(0), 50_000, time_sampling="logit_normal", logit_mean=0.5)
    assert float(t.min()) > 0 and float(t.max()) < 1
    np.testing.assert_allclose(float(jnp.median(t)), float(jax.nn.sigmoid(0.5)), atol=0.01)
    u = sample_time(jax.random.key(0), 50_000)
    np.testing.assert_allclose(float(u.mean()), 0.5, atol=0.01)
    with pytest.raises(UserError, match="time_sampling"):
        sample_time(jax.random.key(0), 4, time_sampling="beta")


def test_label_dropout_uses_the_null_label_at_the_given_rate():
    cond = jnp.zeros((40_000,), jnp.int32)
    dropped = drop_cond(jax.random.key(0), cond, 0.1, null_cond=10)
    np.testing.assert_allclose(float(jnp.mean(dropped == 10)), 0.1, atol=0.01)
    assert set(np.unique(dropped).tolist()) == {0, 10}
    emb = jnp.ones((1000, 4))
    dropped = drop_cond(jax.random.key(0), emb, 0.5, None)
    rows = np.asarray(dropped).sum(1)
    assert set(np.unique(rows).tolist()) == {0.0, 4.0}


def test_ot_pairing_shortens_transport_and_sorts_in_1d():
    key = jax.random.key(0)
    x0 = jax.random.normal(key, (256, 8))
    x1 = jax.random.normal(jax.random.key(1), (256, 8)) + 3.0
    paired = sinkhorn_pairing(jax.random.key(2), x0, x1, reg=0.01, num_iters=300)
    cost = lambda a: float(jnp.mean(jnp.sum((a - x1) ** 2, 1)))
    assert cost(paired) < 0.9 * cost(x0)
    a = jnp.sort(jax.random.normal(key, (64, 1)), axis=0)
    b = jnp.sort(jax.random.normal(jax.random.key(3), (64, 1)), axis=0) * 2
    paired = sinkhorn_pairing(jax.random.key(4), a[::-1], b, reg=1e-3, num_iters=2000)
    ranks = np.searchsorted(np.asarray(a[:, 0]), np.asarray(paired[:, 0]))
    # the monotone (sorted) coupling, up to entropic blur between near neighbours
    assert np.mean(np.abs(ranks - np.arange(64))) < 1.5


def test_ot_pairs_exact_assignment_is_the_sorted_coupling_in_1d(capsys):
    from scripts.ot_pairs import main, pair_costs, pair_lengths

    rng = np.random.default_rng(0)
    data = (rng.standard_normal((64, 1)) * 0.5 + 2).astype(np.float32)
    noise = rng.standard_normal((64, 1)).astype(np.float32)
    c = pair_costs(data, noise, [1e-3], iters=2000, key=jax.random.key(0))
    sorted_cost = np.mean((np.sort(data[:, 0]) - np.sort(noise[:, 0])) ** 2)
    assert c["exact"] == pytest.approx(sorted_cost, rel=1e-6)  # monotone = optimal in 1-D
    assert c["independent"] == pytest.approx(np.mean((data - noise) ** 2), rel=1e-6)
    distance, distinct = c["sinkhorn"][1e-3]
    # a sharp plan pairs about as short as the exact one; its draws repeat some noise rows
    assert distance == pytest.approx(c["exact"], rel=0.1) and 0 < distinct <= 64
    # two moons: pairs far shorter than independent ones; a batch larger than the data is an
    # error naming both sizes
    moons = build_source("moons", num_examples=512).x
    out = pair_lengths(moons, [128], [0.05], iters=100, repeats=2, seed=0)[128]
    assert out["exact_ratio"] < out["sinkhorn"][0.05]["ratio"] < 0.3
    with pytest.raises(UserError, match="batch 1024 is larger than the 512"):
        pair_lengths(moons, [1024], [0.05], iters=10, repeats=1, seed=0)
    main(["ot_pairs", "--dataset", "moons", "--batches", "64", "--repeats", "1"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["dim"] == 2 and printed["by_batch"]["64"]["exact_ratio"] < 0.5


def test_views_give_the_analytic_score_and_round_trip():
    v = optimal_velocity(MU, SIGMA)
    x = jax.random.normal(jax.random.key(0), (16, 2))
    t = jax.random.uniform(jax.random.key(1), (16,), minval=0.05, maxval=0.95)
    np.testing.assert_allclose(
        convert(v, "velocity", "score")(x, t), score(MU, SIGMA)(x, t), rtol=1e-4, atol=1e-5
    )
    for kind in ("data", "eps", "score"):
        back = convert(convert(v, "velocity", kind), kind, "velocity")
        np.testing.assert_allclose(back(x, t), v(x, t), rtol=1e-4, atol=1e-4)
