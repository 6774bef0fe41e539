"""Riemannian flow matching on the sphere: geometry, network, loss, samplers, likelihood,
Earth data, vMF mixtures and geolocation metrics."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from core.errors import UserError
from data import build_source
from data.earth import (
    EARTH_FILES,
    SPLITS,
    EarthSource,
    VMFMixture,
    load_earth_latlon,
    nearest_train_km,
    sample_vmf,
    split_indices,
    vmf_log_prob,
)
from losses.sphere import loss_sphere_fm
from manifolds import sphere as S
from manifolds.sphere import check_unit_vectors
from metrics.geo import geo_metrics, geoscore, plot_world_samples
from metrics.likelihood import log_likelihood, log_likelihood_batched, mean_nll
from models.sphere import SphereMLP, fourier_matrix
from samplers.sphere import (
    cfg_tangent,
    sample_sphere_euler,
    sample_sphere_midpoint,
    sample_sphere_rk4,
)

LOG_4PI = math.log(4 * math.pi)
SAMPLERS = {
    "euler": (sample_sphere_euler, 1),
    "midpoint": (sample_sphere_midpoint, 2),
    "rk4": (sample_sphere_rk4, 4),
}  # name: (sampler, convergence order)


_CACHE = {}


def _all_points() -> jax.Array:
    """`[4, 5000, 3]` uniform points drawn once: tests slice them, so that every test shares
    one compiled sampler (an eager random op compiles once per shape)."""
    if "points" not in _CACHE:
        _CACHE["points"] = S.uniform(jax.random.key(0), (4, 5000))
    return _CACHE["points"]


def _points(n: int, which: int = 0) -> jax.Array:
    return _all_points()[which, :n]


def _pairs(n=512, seed=0):
    return _points(n, seed % 2), _points(n, 2 + seed % 2)


def _unit_err(x):
    return float(jnp.max(jnp.abs(jnp.linalg.norm(x, axis=-1) - 1.0)))


def _randomize(net, scale=0.3, seed=0):
    """Every parameter redrawn from N(0, scale²), so zero-initialised gates act too."""
    rng = np.random.default_rng(seed)  # host-side: nothing to compile
    redraw = lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype)
    nnx.update(net, jax.tree.map(redraw, nnx.state(net, nnx.Param)))
    return net


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("offset", [None, 1e-3, -1e-3])  # generic, near x, near -x
def test_exp_of_log_is_identity(offset):
    x, y = _pairs()
    if offset is not None:
        sign = 1.0 if offset > 0 else -1.0
        y = S.normalize(sign * x + abs(offset) * y)
    v = S.log_map(x, y)
    assert float(jnp.max(jnp.abs(jnp.sum(v * x, -1)))) < 1e-6  # tangent
    np.testing.assert_allclose(jnp.linalg.norm(v, axis=-1), S.distance(x, y), atol=2e-6)
    np.testing.assert_allclose(S.exp_map(x, v), y, atol=2e-6)


def test_log_of_exp_and_special_points():
    x, y = _pairs()
    v = S.to_tangent(x, y) * 2.5  # |v| up to 2.5 < π
    np.testing.assert_allclose(S.log_map(x, S.exp_map(x, v)), v, atol=1e-5)
    np.testing.assert_allclose(S.log_map(x, x), 0.0, atol=1e-7)
    anti = S.log_map(x, -x)  # some minimising geodesic of length π
    np.testing.assert_allclose(jnp.linalg.norm(anti, axis=-1), np.pi, rtol=1e-6)
    np.testing.assert_allclose(S.exp_map(x, anti), -x, atol=1e-6)
    jacobians = jax.jit(
        lambda p: (
            jax.jacfwd(lambda v: S.exp_map(p, v))(jnp.zeros(3)),
            jax.jacfwd(lambda y: S.log_map(p, y))(p),
            jax.jacfwd(lambda y: S.log_map(p, y))(-p),
        )
    )(x[0])
    assert all(np.isfinite(j).all() for j in jacobians)


def test_geodesic_on_sphere_with_constant_speed():
    x0, x1 = _pairs(256)

    @jax.jit
    def at(t):
        tb = jnp.full((256,), t)
        _, speed = jax.jvp(lambda s: S.geodesic(x0, x1, s), (tb,), (jnp.ones(256),))
        target = S.log_map(S.geodesic(x0, x1, tb), x1) / (1 - t)  # the flow-matching form
        return S.geodesic(x0, x1, tb), speed, S.geodesic_velocity(x0, x1, tb), target

    for t in np.linspace(0.0, 1.0, 11, dtype=np.float32):
        xt, speed, velocity, target = at(t)
        assert _unit_err(xt) < 1e-6
        np.testing.assert_allclose(jnp.linalg.norm(speed, axis=-1), S.distance(x0, x1), atol=2e-5)
        np.testing.assert_allclose(velocity, speed, atol=2e-5)
        if t < 1:
            np.testing.assert_allclose(target, speed, atol=1e-4)
        if t == 0:
            np.testing.assert_allclose(xt, x0, atol=1e-6)
        if t == 1:
            np.testing.assert_allclose(xt, x1, atol=2e-6)


def test_uniform_latlon_and_distances():
    x = _all_points().reshape(-1, 3)  # 20000 points
    assert _unit_err(x) < 1e-6
    np.testing.assert_allclose(jnp.mean(x, 0), 0.0, atol=0.02)
    np.testing.assert_allclose(jnp.cov(x.T), np.eye(3) / 3, atol=0.01)
    assert abs(S.log_area(3) - LOG_4PI) < 1e-12
    assert abs(S.log_area(2) - math.log(2 * math.pi)) < 1e-12
    ll = jnp.array([[0.0, 0.0], [90.0, 0.0], [-33.9, 151.2], [51.5, -0.13]])
    np.testing.assert_allclose(S.latlon_to_xyz(ll[:2]), [[1, 0, 0], [0, 0, 1]], atol=1e-7)
    np.testing.assert_allclose(S.xyz_to_latlon(S.latlon_to_xyz(ll))[2:], ll[2:], atol=1e-4)
    # haversine, written independently
    la, lo = np.deg2rad(np.array(ll[2:])).T
    hav = (
        np.sin((la[1] - la[0]) / 2) ** 2
        + np.cos(la[0]) * np.cos(la[1]) * np.sin((lo[1] - lo[0]) / 2) ** 2
    )
    km = 2 * 6371.0 * np.arcsin(np.sqrt(hav))
    xyz = S.latlon_to_xyz(ll)
    np.testing.assert_allclose(S.great_circle_km(xyz[2], xyz[3]), km, rtol=1e-5)
    np.testing.assert_allclose(S.great_circle_km(xyz[0], xyz[1]), 6371.0 * np.pi / 2, rtol=1e-6)


# ---------------------------------------------------------------- network and loss


def test_sphere_mlp_protocol():
    x, _ = _pairs(8)
    t = jnp.linspace(0, 1, 8)
    plain = SphereMLP(hidden=32, depth=1, rngs=nnx.Rngs(0))
    v = plain(x, t)
    assert v.shape == (8, 3) and v.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(jnp.sum(v * x, -1)))) < 1e-6 and float(jnp.abs(v).max()) > 0
    assert not jax.tree.leaves(nnx.state(plain, nnx.Not(nnx.Param)))
    with pytest.raises(ValueError, match="dt"):
        plain(x, t, dt=t)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, cond=jnp.zeros(8, jnp.int32))
    labels = _randomize(SphereMLP(hidden=32, depth=1, num_classes=5, rngs=nnx.Rngs(1)))
    y = jnp.arange(8) % 5
    assert not np.allclose(labels(x, t, cond=y), labels(x, t))
    np.testing.assert_allclose(
        labels(x, t), labels(x, t, cond=jnp.full(8, 5)), atol=1e-6
    )  # None = the null label num_classes
    emb = _randomize(SphereMLP(hidden=32, depth=1, cond_dim=4, rngs=nnx.Rngs(2)))
    e = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
    assert not np.allclose(emb(x, t, cond=e), emb(x, t))
    np.testing.assert_allclose(
        emb(x, t), emb(x, t, cond=jnp.zeros((8, 4))), atol=1e-6
    )  # None = the zero embedding
    with pytest.raises(ValueError, match="cond_dim"):
        emb(x, t, cond=jnp.zeros((8, 3)))
    half = SphereMLP(hidden=32, depth=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    assert nnx.jit(lambda net, x, t: net(x, t))(half, x, t).dtype == jnp.float32
    shaped = nnx.eval_shape(lambda: SphereMLP(hidden=32, depth=1, rngs=nnx.Rngs(0)))
    assert isinstance(shaped, SphereMLP)


def test_sphere_mlp_fourier_features():
    b = fourier_matrix(8, 3, 64.0)
    np.testing.assert_allclose(jnp.linalg.norm(b, axis=-1), np.geomspace(1, 64, 8), rtol=1e-5)
    np.testing.assert_array_equal(b, fourier_matrix(8, 3, 64.0))  # fixed, not drawn per net
    x, _ = _pairs(8)
    t = jnp.linspace(0, 1, 8)
    four = _randomize(SphereMLP(hidden=32, depth=1, fourier_features=8, rngs=nnx.Rngs(0)))
    v = four(x, t)
    assert float(jnp.max(jnp.abs(jnp.sum(v * x, -1)) / jnp.linalg.norm(v, axis=-1))) < 1e-6
    assert not jax.tree.leaves(nnx.state(four, nnx.Not(nnx.Param)))  # B is not stored
    assert four.embed_x.kernel.value.shape == (3 + 16, 32)
    # the first layer sees [x, sin(Bx), cos(Bx)]: with the Fourier rows zeroed the net is a
    # plain one with the same weights; each Fourier row changes the output on its own
    plain = SphereMLP(hidden=32, depth=1, rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(four, nnx.Not(nnx.PathContains("embed_x"))))
    k = four.embed_x.kernel.value
    plain.embed_x.kernel.value, plain.embed_x.bias.value = k[:3], four.embed_x.bias.value
    four.embed_x.kernel.value = k.at[3:].set(0.0)
    np.testing.assert_allclose(four(x, t), plain(x, t), atol=1e-6)
    for row in (3 + 7, 3 + 8 + 7):  # sin and cos of the highest frequency
        four.embed_x.kernel.value = k.at[3:].set(0.0).at[row].set(k[row])
        assert not np.allclose(four(x, t), plain(x, t), atol=1e-4)
    with pytest.raises(ValueError, match="fourier"):
        SphereMLP(hidden=32, depth=1, fourier_features=-1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="fourier"):
        SphereMLP(hidden=32, depth=1, fourier_features=4, fourier_max=0.5, rngs=nnx.Rngs(0))


def test_loss_is_zero_at_exact_conditional_field():
    _, x1 = _pairs(256, seed=4)

    def exact(x, t, *, cond=None, dt=None):  # u_t(x | x1): the same for every x0
        return S.log_map(x, x1) / (1.0 - t)[:, None]

    zero = lambda x, t, *, cond=None, dt=None: jnp.zeros_like(x)
    run = jax.jit(
        lambda key: (
            loss_sphere_fm(exact, {"x": x1}, key, t_eps=1e-3),
            loss_sphere_fm(zero, {"x": x1}, key)[0],
        )
    )
    (per, metrics), per_zero = run(jax.random.key(0))
    assert per.shape == (256,) and float(metrics["target_sq_norm"]) > 1.0
    assert float(jnp.max(per)) < 1e-6
    assert float(jnp.mean(per_zero)) > 1.0


def test_condition_dropout_and_loss_grads():
    x1, labels, key = _pairs(64)[1], jnp.zeros(64, jnp.int32), jax.random.key(2)
    with pytest.raises(UserError, match="null_cond"):
        loss_sphere_fm(lambda x, t, **_: x, {"x": x1, "cond": labels}, key, cond_drop_prob=0.5)

    def loss(table, cond):  # a conditional "network": v = P_x (onehot-or-embedding @ table)
        def net(x, t, *, cond=None, dt=None):
            c = jax.nn.one_hot(cond, 4) if cond.dtype == jnp.int32 else cond
            return S.to_tangent(x, (c @ table) * (1 + t[:, None]))

        return jnp.mean(
            loss_sphere_fm(net, {"x": x1, "cond": cond}, key, cond_drop_prob=0.3, null_cond=3)[0]
        )

    grads = jax.jit(jax.grad(loss))(jnp.ones((4, 3)), labels)
    assert np.isfinite(grads).all()
    assert float(jnp.abs(grads[0]).min()) > 0 and float(jnp.abs(grads[3]).min()) > 0  # both used
    np.testing.assert_allclose(grads[1:3], 0.0)  # labels 1, 2 never occur
    emb = jnp.zeros((64, 4)).at[:, 1].set(1.0)  # embeddings: dropped ones become zeros
    grads = jax.jit(jax.grad(loss))(jnp.ones((4, 3)), emb)
    assert np.isfinite(grads).all() and float(jnp.abs(grads[1]).min()) > 0


# ---------------------------------------------------------------- analytic fields


def analytic_field(k=1.0, a=lambda t: 1.0 + 2.0 * t):
    """`v = a(t) e_z × x + k (e_z - z x)`: rotation about z plus the gradient flow of z.

    Exact flow: longitude += ∫a dt; tan(θ/2) shrinks by e^{-kt} (θ = colatitude).
    """

    def v(x, t, *, cond=None, dt=None):
        ez = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0]), x.shape)
        z = x[:, 2:3]
        return a(t)[:, None] * jnp.cross(ez, x) + k * (ez - z * x)

    return v


def analytic_flow(x0, k=1.0, rot=2.0):
    lat, lon = jnp.deg2rad(S.xyz_to_latlon(x0)).T
    half = jnp.arctan(jnp.tan((jnp.pi / 2 - lat) / 2) * jnp.exp(-k))
    latlon = jnp.rad2deg(jnp.stack([jnp.pi / 2 - 2 * half, lon + rot], -1))
    return S.latlon_to_xyz(latlon)


def analytic_log_prob(x, k=1.0):
    """Push-forward of the uniform density by the flow above at t = 1."""
    z = x[..., 2]
    return -LOG_4PI + 2 * k + 2 * math.log(2) - 2 * jnp.log(1 + z + (1 - z) * jnp.exp(2 * k))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_convergence_order(name):
    sampler, order = SAMPLERS[name]
    x0 = _points(64, 1)
    exact = analytic_flow(x0)
    errs = []
    for n in (6, 12) if order == 4 else (12, 24):  # RK4 reaches f32 round-off near 32
        x = sampler(analytic_field(), x0, jax.random.key(0), num_steps=n)
        assert _unit_err(x) < 1e-6
        errs.append(float(jnp.max(S.distance(x, exact))))
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(rates > order - 0.3), (errs, rates)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samples_stay_on_sphere_after_many_steps(name):
    mats = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 3)), jnp.float32)

    def field(x, t, *, cond=None, dt=None):  # an arbitrary ambient field, time-dependent
        return x @ (mats[0] + jnp.cos(7 * t)[0] * mats[1])

    x0 = _points(64, 2)
    x = jax.jit(lambda x: SAMPLERS[name][0](field, x, jax.random.key(0), num_steps=2000))(x0)
    assert _unit_err(x) < 1e-5
    assert float(jnp.mean(S.distance(x, x0))) > 0.1  # it moved


def test_guidance_wrapper():
    x = _points(16, 3)
    t = jnp.full((16,), 0.3)
    y = jnp.arange(16) % 4

    def ambient(x, t, *, cond=None, dt=None):  # not tangent; label-dependent
        c = jnp.full(x.shape[:1], 4) if cond is None else cond
        return x * 3.0 + jnp.stack([c, 2 * c, -c], -1).astype(x.dtype)

    def proj(x, t, *, cond=None, dt=None):
        return S.to_tangent(x, ambient(x, t, cond=cond))

    for scale in (0.0, 1.0, 3.5):
        g = cfg_tangent(ambient, scale, null_cond=4)(x, t, cond=y)
        assert float(jnp.max(jnp.abs(jnp.sum(g * x, -1)))) < 1e-5
        want = proj(x, t, cond=jnp.full(16, 4)) + scale * (
            proj(x, t, cond=y) - proj(x, t, cond=jnp.full(16, 4))
        )
        np.testing.assert_allclose(g, want, atol=1e-5)
    guided = cfg_tangent(ambient, 2.0)  # null_cond None: the net's own null (cond=None)
    out = sample_sphere_rk4(guided, x, jax.random.key(0), num_steps=20, cond=y)
    assert _unit_err(out) < 1e-6


# ---------------------------------------------------------------- likelihood


def test_likelihood_of_uniform_is_minus_log_4pi():
    x = _points(128, 1)
    rotation = analytic_field(k=0.0)  # divergence-free, a non-trivial flow
    np.testing.assert_allclose(log_likelihood(rotation, x, num_steps=8), -LOG_4PI, atol=1e-5)
    zero = lambda x, t, *, cond=None, dt=None: jnp.zeros_like(x)
    assert abs(mean_nll(zero, x, batch_size=100, num_steps=2) - LOG_4PI) < 1e-6  # padded


def test_zero_field_gives_the_uniform_density_on_higher_spheres():
    zero = lambda x, t, *, cond=None, dt=None: jnp.zeros_like(x)
    for dim, area in ((2, 2 * math.pi), (4, 2 * math.pi**2), (5, 8 * math.pi**2 / 3)):
        x = S.uniform(jax.random.key(dim), (16,), dim=dim)
        np.testing.assert_allclose(log_likelihood(zero, x, num_steps=2), -math.log(area), rtol=1e-6)


def test_likelihood_matches_analytic_flow_with_grads():
    x = _points(128, 2)

    def ode(k, x):
        lp = log_likelihood(analytic_field(k=k), x, num_steps=16)
        return jnp.sum(lp), lp

    exact = lambda k, x: jnp.sum(analytic_log_prob(x, k))
    # d/d(field parameter) and d/dx, through the RK4 scan
    (gk, gx), lp = jax.jit(jax.grad(ode, argnums=(0, 1), has_aux=True))(1.0, x)
    np.testing.assert_allclose(lp, analytic_log_prob(x, 1.0), atol=2e-4)
    wk, wx = jax.grad(exact, argnums=(0, 1))(1.0, x)
    np.testing.assert_allclose(gk, wk, rtol=1e-3)
    np.testing.assert_allclose(S.to_tangent(x, gx), S.to_tangent(x, wx), atol=1e-3)


@pytest.mark.parametrize("solver", ["dopri5", "tsit5"])
def test_adaptive_likelihood_matches_analytic_flow_with_grads(solver):
    # diffrax's adaptive solve, one step-size sequence per example, gradients through it
    x = _points(64, 2)

    def ode(k, x):
        lp, stats = log_likelihood(
            analytic_field(k=k), x, solver=solver, rtol=1e-6, atol=1e-6, return_stats=True
        )
        return jnp.sum(lp), (lp, stats)

    (gk, _), (lp, stats) = jax.jit(jax.grad(ode, argnums=(0, 1), has_aux=True))(1.0, x)
    np.testing.assert_allclose(lp, analytic_log_prob(x, 1.0), atol=2e-5)
    wk = jax.grad(lambda k: jnp.sum(analytic_log_prob(x, k)))(1.0)
    np.testing.assert_allclose(gk, wk, rtol=1e-3)
    assert bool(jnp.all(stats["ok"])) and int(jnp.min(stats["steps"])) >= 2
    # a looser tolerance takes fewer steps and is less exact
    loose, ls = log_likelihood(
        analytic_field(k=1.0), x, solver=solver, rtol=1e-2, atol=1e-2, return_stats=True
    )
    assert float(jnp.mean(ls["steps"])) < float(jnp.mean(stats["steps"]))
    assert float(jnp.max(jnp.abs(loose - lp))) > 1e-5
    # out of max_steps: one clear error from the batched driver
    with pytest.raises(UserError, match="ran out of max_steps=2 on 64 of 64 points"):
        log_likelihood_batched(analytic_field(k=1.0), x, solver=solver, max_steps=2)
    with pytest.raises(UserError, match="unknown ODE solver 'euler'"):
        log_likelihood(analytic_field(k=1.0), x, solver="euler")
    with pytest.raises(UserError, match="rk4 likelihood needs num_steps >= 1"):
        log_likelihood(analytic_field(k=1.0), x, solver="rk4")
    with pytest.raises(UserError, match="num_steps=8 is for solver='rk4'"):
        log_likelihood(analytic_field(k=1.0), x, solver=solver, num_steps=8)
    # no solver, no steps: dopri5 at 1e-5
    default = log_likelihood(analytic_field(k=1.0), x)
    np.testing.assert_allclose(default, analytic_log_prob(x, 1.0), atol=2e-4)


def test_likelihood_hutchinson_and_euclidean():
    x = jnp.broadcast_to(_points(1, 3), (2048, 3))
    hutch = log_likelihood(
        analytic_field(), x, num_steps=8, divergence="hutchinson", key=jax.random.key(0)
    )
    want = analytic_log_prob(x[:1], 1.0)
    assert float(jnp.std(hutch)) > 1e-3  # it is stochastic
    np.testing.assert_allclose(jnp.mean(hutch), want[0], atol=0.06)
    # Euclidean: v = a x pushes N(0, I) to N(0, e^{2a} I); images flatten
    a = 0.7
    xe = jnp.asarray(np.random.default_rng(1).standard_normal((32, 2, 2, 1)), jnp.float32)
    lin = lambda x, t, *, cond=None, dt=None: a * x
    lp = log_likelihood(lin, xe, num_steps=8, manifold="euclidean")
    sq = jnp.sum(xe.reshape(32, -1) ** 2, -1)
    want = -sq / (2 * math.exp(2 * a)) - 2 * math.log(2 * math.pi) - 4 * a
    np.testing.assert_allclose(lp, want, atol=1e-4)
    adaptive = log_likelihood(lin, xe, manifold="euclidean", solver="dopri5")  # per example
    np.testing.assert_allclose(adaptive, want, atol=1e-4)
    # Hutchinson under the adaptive solver: each example keeps its own probes
    hutch = log_likelihood(
        lin, xe, manifold="euclidean", solver="dopri5", divergence="hutchinson",
        key=jax.random.key(1), num_probes=64,
    )  # fmt: skip
    assert 1e-3 < float(jnp.std(hutch - want)) < 0.5
    with pytest.raises(UserError, match="key"):
        log_likelihood(lin, xe, num_steps=2, divergence="hutchinson")


# ---------------------------------------------------------------- a trained model

MIXTURE = VMFMixture(
    S.latlon_to_xyz(jnp.array([[40.0, 10.0], [-20.0, 120.0], [0.0, -70.0]])),
    jnp.array([8.0, 12.0, 6.0]),
    jnp.array([0.5, 0.3, 0.2]),
)


def _latlon_grid(n_lat: int, n_lon: int):
    """Cell centres `[n_lat n_lon, 3]` of a lat/lon grid and their areas `[n_lat n_lon]`."""
    lat = (jnp.arange(n_lat) + 0.5) * 180.0 / n_lat - 90.0
    lon = (jnp.arange(n_lon) + 0.5) * 360.0 / n_lon - 180.0
    grid = jnp.stack(jnp.meshgrid(lat, lon, indexing="ij"), -1).reshape(-1, 2)
    area = (
        jnp.cos(jnp.deg2rad(grid[:, 0])) * math.radians(180 / n_lat) * math.radians(360 / n_lon)
    )  # ∫ over a cell ≈ cos(lat) dlat dlon at its centre
    return S.latlon_to_xyz(grid), area


@pytest.fixture(scope="module")
def trained():
    """A tiny SphereMLP fitted to MIXTURE with the flow-matching loss; its log-density on
    a 5° grid and on test data, and samples, all from one compiled evaluation."""
    steps, batch = 400, 256
    net = SphereMLP(hidden=64, depth=1, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net)
    opt = optax.adam(optax.cosine_decay_schedule(3e-3, steps, alpha=0.1))
    data = jax.jit(MIXTURE.sample, static_argnums=1)(jax.random.key(1), (steps + 2) * batch)
    train_x, test_x = data[: steps * batch].reshape(steps, batch, 3), data[steps * batch :]

    def step(carry, inputs):
        (params, opt_state), (x1, key) = carry, inputs
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean(loss_sphere_fm(nnx.merge(graphdef, p), {"x": x1}, key)[0])
        )(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    keys = jax.random.split(jax.random.key(2), steps)
    (params, _), losses = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), (train_x, keys)))(
        params
    )
    grid, area = _latlon_grid(36, 72)

    net = nnx.merge(graphdef, params)
    lp = log_likelihood_batched(
        net, jnp.concatenate([grid, test_x]), batch_size=1600, num_steps=8
    )  # 3104 points: 2 batches, one compilation
    grid_lp, test_lp = lp[: grid.shape[0]], lp[grid.shape[0] :]
    samples = jax.jit(lambda x0: sample_sphere_midpoint(net, x0, jax.random.key(0), num_steps=10))(
        _points(1024, 3)
    )
    return dict(
        losses=losses,
        grid=grid,
        area=area,
        grid_lp=grid_lp,
        test_x=test_x,
        test_lp=test_lp,
        samples=samples,
    )


def test_trained_density_integrates_to_one(trained):
    losses = trained["losses"]
    assert float(jnp.mean(losses[-50:])) < float(jnp.mean(losses[:50]))
    mass = float(jnp.sum(jnp.exp(trained["grid_lp"]) * trained["area"]))
    assert abs(mass - 1.0) < 0.03, mass
    # the analytic mixture density on the same grid integrates to 1 too (quadrature check)
    true_mass = float(jnp.sum(jnp.exp(MIXTURE.log_prob(trained["grid"])) * trained["area"]))
    assert abs(true_mass - 1.0) < 5e-3, true_mass


def test_trained_model_nll_and_samples(trained, tmp_path):
    nll = -float(jnp.mean(trained["test_lp"]))
    true_nll = -float(jnp.mean(MIXTURE.log_prob(trained["test_x"])))
    assert true_nll < nll < LOG_4PI - 0.5, (true_nll, nll)
    samples = trained["samples"]
    assert _unit_err(samples) < 1e-5
    assert float(jnp.mean(MIXTURE.log_prob(samples))) > -true_nll - 0.7
    path = plot_world_samples(
        str(tmp_path / "samples.png"),
        np.asarray(samples),
        reference=np.asarray(trained["test_x"]),
        title="vMF mixture",
    )
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- data and metrics


def test_vmf_sampling_and_density():
    mu = S.latlon_to_xyz(jnp.array([30.0, 60.0]))
    draw = jax.jit(lambda kappa: sample_vmf(jax.random.key(0), mu, kappa, (100_000,)))
    for kappa in (0.5, 10.0, 200.0):
        x = draw(kappa)
        assert _unit_err(x) < 1e-5
        mean_cos = float(jnp.mean(x @ mu))
        expected = 1 / math.tanh(kappa) - 1 / kappa  # mean resultant length on S²
        assert abs(mean_cos - expected) < 0.01, (kappa, mean_cos, expected)
    grid, area = _latlon_grid(36, 72)
    mass = float(jnp.sum(jnp.exp(vmf_log_prob(grid, mu[None], 5.0)) * area))
    assert abs(mass - 1.0) < 2e-3, mass
    np.testing.assert_allclose(vmf_log_prob(mu, mu, 1e-6), -LOG_4PI, atol=1e-5)
    assert MIXTURE.log_prob(grid[:10].reshape(2, 5, 3)).shape == (2, 5)


def test_coastlines_decode_and_the_shipped_file():
    from metrics.geo import COASTLINES
    from scripts.make_coastlines import decode_arcs, polylines

    topo = {  # quantized, delta-encoded arcs; the second crosses the antimeridian
        "transform": {"scale": [0.5, 0.25], "translate": [-180.0, -90.0]},
        "arcs": [[[10, 20], [2, -4]], [[700, 100], [10, 0], [-700, 0]]],
    }
    arcs = decode_arcs(topo)
    np.testing.assert_allclose(arcs[0], [[-175.0, -85.0], [-174.0, -86.0]])
    np.testing.assert_allclose(arcs[1][:, 0], [170.0, 175.0, -175.0])
    lines = polylines(arcs)
    assert int(np.isnan(lines[:, 0]).sum()) == 3  # arc 0; arc 1 cut in two
    with np.load(COASTLINES) as f:
        coast = f["lonlat"]
    finite = coast[np.isfinite(coast[:, 0])]
    assert len(finite) > 4000 and np.abs(finite[:, 0]).max() <= 180.0
    assert np.abs(finite[:, 1]).max() < 90.0
    steps = np.abs(np.diff(coast[:, 0]))
    assert np.nanmax(steps) < 180.0  # no segment across the whole map


def test_vmf_mixture_splits_are_fresh_draws_of_one_mixture():
    parts = {s: build_source("vmf_mixture", split=s, num_examples=256, seed=1) for s in SPLITS}
    xs = [parts[s].xyz for s in SPLITS]
    assert all(x.shape == (256, 3) for x in xs) and _unit_err(xs[0]) < 1e-5
    assert not np.array_equal(xs[0], xs[1]) and not np.array_equal(xs[1], xs[2])
    np.testing.assert_array_equal(parts["train"].mixture.means, parts["test"].mixture.means)
    again = build_source("vmf_mixture", split="test", num_examples=256, seed=1)
    np.testing.assert_array_equal(again.xyz, xs[2])
    with pytest.raises(UserError, match="unknown split 'dev'"):
        build_source("vmf_mixture", split="dev")


def test_points_that_are_not_unit_vectors_are_one_clear_error():
    x = np.asarray(_points(8), np.float32)
    zero = lambda x, t, *, cond=None, dt=None: jnp.zeros_like(x)
    latlon = np.array([[10.0, 20.0], [-30.0, 150.0]], np.float32)  # degrees, not xyz
    with pytest.raises(UserError, match="log-likelihood on the sphere: 2 of 2 points"):
        mean_nll(zero, latlon, num_steps=1)
    bad = x.copy()
    bad[3] = np.nan
    with pytest.raises(UserError, match="predictions: 1 of 8 points .* index 3"):
        geo_metrics(bad, x)
    with pytest.raises(UserError, match="true locations: 8 of 8"):
        geo_metrics(x, 2 * x)
    check_unit_vectors(x * (1 + 5e-4), "fine")  # within the tolerance


def test_earth_sources(shared_data, monkeypatch):
    earth = f"{shared_data}/earth"
    counts = {"volcano": 827, "earthquake": 6120, "flood": 4875, "fire": 12809}
    for name in EARTH_FILES:
        assert load_earth_latlon(name, earth).shape == (counts[name], 2)
    monkeypatch.setenv("DRIFTLAB_EARTH_DIR", earth)
    parts = {s: EarthSource("volcano", s, seed=3) for s in ("train", "val", "test")}
    assert [parts[s].num_examples for s in ("train", "val", "test")] == [663, 82, 82]
    batch = parts["train"].__getitems__(np.array([0, 5, 7]))
    assert batch["x"].dtype == np.float32 and batch["x"].shape == (3, 3)
    assert _unit_err(parts["test"].xyz) < 1e-6 and parts["val"].example_shape == (3,)
    idx = split_indices(827, seed=3)
    assert len(np.unique(np.concatenate(list(idx.values())))) == 827
    assert np.array_equal(split_indices(827, 3)["test"], idx["test"])
    assert not np.array_equal(split_indices(827, 4)["test"], idx["test"])


def test_earth_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_earth_latlon("volcano", str(tmp_path))
    with pytest.raises(UserError, match="known Earth datasets"):
        load_earth_latlon("tsunami", str(tmp_path))
    (tmp_path / "volerup.csv").write_text("# x\nlat,lon\n10,20\nnan,3")
    with pytest.raises(UserError, match="out-of-range"):
        load_earth_latlon("volcano", str(tmp_path))
    (tmp_path / "volerup.csv").write_text("# x\nlat,lon\n10,20\nabc,3")
    with pytest.raises(UserError, match="line 4"):
        load_earth_latlon("volcano", str(tmp_path))
    with pytest.raises(UserError, match="split"):
        EarthSource("volcano", "dev", data_dir=str(tmp_path))


def test_nearest_train_km_and_earth_splits(tmp_path):
    # Training events 20 degrees of longitude apart on the equator; the held-out points are
    # placed by hand: a repeat of a training event (0 km) and one 0.5 degrees north of one
    # (0.5 * pi / 180 * 6371 km along the meridian), farther from every other event.
    n = 20
    parts = split_indices(n, seed=0)
    latlon = np.zeros((n, 2))
    latlon[parts["train"], 1] = 20.0 * np.arange(len(parts["train"]))
    a, b = latlon[parts["train"][3]], latlon[parts["train"][7]]
    latlon[parts["test"]] = [a, b + [0.5, 0.0]]
    latlon[parts["val"]] = [a + [0.0, 10.0], b + [-30.0, 0.0]]
    d = nearest_train_km(latlon, seed=0, split="test")
    np.testing.assert_allclose(d, [0.0, 0.5 * math.pi / 180 * 6371.0], atol=1e-3)
    dv = nearest_train_km(latlon, seed=0, split="val", chunk=1)  # chunking changes nothing
    np.testing.assert_allclose(dv, np.deg2rad([10.0, 30.0]) * 6371.0, rtol=1e-9)
    with pytest.raises(UserError, match="'val' or 'test'"):
        nearest_train_km(latlon, split="train")
    # The report over the same file, through the CLI.
    from scripts import earth_splits

    rows = ["lat,lon"] + [f"{lat:.17g},{lon:.17g}" for lat, lon in latlon]
    (tmp_path / "volerup.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "splits"
    earth_splits.main(["earth_splits", "--datasets", "volcano", "--data-dir", str(tmp_path),
                       "--out", str(out)])  # fmt: skip
    (row,) = json.loads((tmp_path / "splits.json").read_text())
    assert row["events"] == n and row["distinct"] == n - 1  # the repeated event
    assert row["test"]["repeat"] == 0.5 and row["test"]["within_100km"] == 1.0
    assert row["val"]["within_100km"] == 0.0 and row["test"]["within_1km"] == 0.5
    assert "| volcano | 20 (19) | 0 | test | 2 | 50.0% |" in (tmp_path / "splits.md").read_text()
    with pytest.raises(UserError, match="unknown Earth dataset 'tsunami'"):
        earth_splits.main(["earth_splits", "--datasets", "tsunami", "--out", str(out)])


def test_geo_metrics():
    true = S.latlon_to_xyz(jnp.zeros((5, 2)))
    dist_km = np.array([0.5, 20.0, 150.0, 2000.0, 6000.0])
    lon = np.rad2deg(dist_km / 6371.0)
    pred = S.latlon_to_xyz(jnp.stack([jnp.zeros(5), jnp.asarray(lon)], -1))
    m = geo_metrics(np.asarray(pred), np.asarray(true))
    np.testing.assert_allclose(m["error_km_mean"], dist_km.mean(), rtol=1e-4)
    assert [m[f"acc_{t}km"] for t in (1, 25, 200, 750, 2500)] == [0.2, 0.4, 0.6, 0.6, 0.8]
    assert geoscore(0.0) == 5000.0
    np.testing.assert_allclose(m["geoscore"], np.mean(5000 * np.exp(-dist_km / 1492.7)), rtol=1e-4)
