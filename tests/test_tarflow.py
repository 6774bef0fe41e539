"""Normalizing flows (TarFlow, RealNVP), their NLL in bits/dim and the TarFlow sampler.

Oracles: `inverse(forward(x)) == x`; `logdet == slogdet(jacfwd(forward))`; the Jacobi inverse
equals the KV-cache sequential one; a fresh flow is the identity, so its NLL is the Gaussian
one; bits/dim by hand (uniform on [-1, 1] is 8 bits); Tweedie's step on Gaussian data is the
closed-form posterior mean; annealed guidance equals a by-hand token-by-token inverse. Flows
that sample or guide have parameters moved off their (identity) init, so those oracles can
fail. Tiny flows (8×8 images, 2 blocks of 1 layer, width 32).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core import experiment
from core.config import load
from core.errors import UserError
from core.experiment import Experiment
from losses.flow_nll import add_noise, bits_per_dim, flow_bpd, gaussian_log_prob, loss_flow_nll
from metrics.bpd import dataset_bpd
from models import NETWORKS
from models.flops import count_flops
from models.realnvp import channel_permutation
from samplers.tarflow import sample_tarflow, tweedie_denoise
from tests.conftest import ROOT, sample_fn

jit0 = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
B, S, C, NUM_CLASSES = 2, 8, 2, 3
D = S * S * C
TINY = {
    "tarflow": dict(
        in_channels=C, image_size=S, patch=2, width=32, num_blocks=2, layers_per_block=1,
        head_dim=16, num_classes=NUM_CLASSES,
    ),
    "realnvp": dict(in_channels=C, hidden=16, num_couplings=4, num_classes=NUM_CLASSES),
}  # fmt: skip
LABELS = jnp.array([0, 2])
X = jnp.asarray(0.5 * np.random.default_rng(0).standard_normal((B, S, S, C)), jnp.float32)


def build(name: str, **kw) -> nnx.Module:
    cls = NETWORKS[name]
    kwargs = dict(TINY[name], **kw)
    graphdef = nnx.split(nnx.eval_shape(lambda: cls(**kwargs, rngs=nnx.Rngs(0))))[0]
    return nnx.merge(graphdef, jit0(lambda: nnx.split(cls(**kwargs, rngs=nnx.Rngs(0)))[1])())


def perturb(net: nnx.Module, scale: float = 0.05) -> nnx.Module:
    """Move every parameter (the zero-initialised output projections too) off its init."""
    graphdef, state = nnx.split(net)
    rng = np.random.default_rng(1)
    noise = lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype)
    return nnx.merge(graphdef, jax.tree.map(noise, state))


def redraw(params, std: float = 0.02, seed: int = 1):
    """Every parameter of a pure dict (or nnx.State) drawn afresh from N(0, std²) on the
    host, so no zero-initialised output projection keeps the flow the identity."""
    rng = np.random.default_rng(seed)
    draw = lambda p: jnp.asarray(std * rng.standard_normal(p.shape), p.dtype)
    return jax.tree.map(draw, params)


@functools.cache
def fresh(name: str) -> nnx.Module:
    return build(name)


@functools.cache
def trained_like(name: str) -> nnx.Module:
    return perturb(fresh(name))


def call(net, fn_name: str, *args, **kw):
    """`net.<fn_name>(*args, **kw)` compiled at -O0 (the suite's compile-time budget)."""
    graphdef, state = nnx.split(net)
    fn = lambda s, *a: getattr(nnx.merge(graphdef, s), fn_name)(*a, **kw)
    return jit0(fn)(state, *args)


def apply(fn, net, *args, **kw):
    """`fn(net, *args, **kw)` compiled at -O0."""
    graphdef, state = nnx.split(net)
    return jit0(lambda s, *a: fn(nnx.merge(graphdef, s), *a, **kw))(state, *args)


@pytest.mark.parametrize("name", sorted(TINY))
def test_fresh_flow_is_identity_with_only_params(name):
    net = fresh(name)
    z, logdet = call(net, "forward", X, cond=LABELS)
    np.testing.assert_array_equal(z, X)
    np.testing.assert_array_equal(logdet, 0.0)
    _, params, rest = nnx.split(net, nnx.Param, ...)
    assert not jax.tree.leaves(rest)
    abstract = nnx.eval_shape(lambda: NETWORKS[name](**TINY[name], rngs=nnx.Rngs(0)))
    assert jax.tree.map(jnp.shape, nnx.split(abstract)[1]) == jax.tree.map(
        jnp.shape, nnx.split(net)[1]
    )


@pytest.mark.parametrize(
    "name,method", [("tarflow", "sequential"), ("tarflow", "jacobi"), ("realnvp", None)]
)
def test_inverse_of_forward_is_identity(name, method):
    net = trained_like(name)
    z, logdet = call(net, "forward", X, cond=LABELS)
    assert float(jnp.abs(z - X).max()) > 1e-2 and bool(jnp.all(logdet != 0))
    kw = {} if method is None else {"method": method}
    x = call(net, "inverse", z, cond=LABELS, **kw)
    np.testing.assert_allclose(x, X, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_logdet_is_log_abs_det_jacobian(name):
    net = trained_like(name)
    graphdef, state = nnx.split(net)

    @jit0
    def both(state, x):
        flow = nnx.merge(graphdef, state)
        f = lambda v: flow.forward(v.reshape(1, S, S, C), cond=LABELS[:1])[0].reshape(-1)
        return jnp.linalg.slogdet(jax.jacfwd(f)(x.reshape(-1))), flow.forward(x, cond=LABELS[:1])

    (sign, logabsdet), (_, logdet) = both(state, X[:1])
    assert float(sign) != 0.0
    np.testing.assert_allclose(logdet[0], logabsdet, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "cfg_scale,anneal,segment,exact_passes",
    [
        (1.0, False, None, [15, 15]),  # plain Jacobi: the 15 unknown tokens in one segment
        (2.5, True, None, [15, 15]),
        (1.0, False, 4, [16, 16]),  # GS-Jacobi: 4 segments of 4 (the last one padded)
        # per block: one token a pass; segments of 6, 6 and 3 (+ 3 padding), the last
        # stopping at the pass that changes nothing
        (2.5, True, (1, 6), [15, 16]),
    ],
)
def test_jacobi_inverse_equals_sequential(cfg_scale, anneal, segment, exact_passes):
    """Jacobi (whole sequence or in segments solved one after another with cached keys and
    values) stopped at the default tolerance, or run to its exact fixed point (as many
    passes as a segment has tokens), matches the KV-cache inverse up to float32 arithmetic
    (measured <= 7e-6 here)."""
    net = trained_like("tarflow")
    z = jax.random.normal(jax.random.key(3), X.shape)
    kw = dict(cond=LABELS, cfg_scale=cfg_scale, anneal=anneal, segment=segment)
    x_seq = call(net, "inverse", z, method="sequential", **kw)
    for tol in (1e-5, 0.0):
        x_jac, iters = call(net, "inverse", z, method="jacobi", tol=tol, return_iters=True, **kw)
        assert bool(jnp.all(iters <= jnp.array(exact_passes))), iters
        assert bool(jnp.all(iters >= 2)), iters
        assert tol > 0 or iters.tolist() == exact_passes, iters
        np.testing.assert_allclose(x_jac, x_seq, atol=2e-5, rtol=0)
    if cfg_scale == 1.0:  # the fixed point: forward gives z back
        np.testing.assert_allclose(call(net, "forward", x_jac, cond=LABELS)[0], z, atol=1e-5)


def test_guidance_weights_mix_conditional_and_null_parameters():
    net = trained_like("tarflow")
    z = jax.random.normal(jax.random.key(4), X.shape)
    null = jnp.full((B,), NUM_CLASSES)
    x_null = call(net, "inverse", z, cond=null)
    x_cond = call(net, "inverse", z, cond=LABELS)
    np.testing.assert_allclose(call(net, "inverse", z, cond=LABELS, cfg_scale=0.0), x_null, 1e-5)
    x_guided = call(net, "inverse", z, cond=LABELS, cfg_scale=3.0)
    assert float(jnp.abs(x_guided - x_cond).max()) > 1e-3
    annealed = call(net, "inverse", z, cond=LABELS, cfg_scale=3.0, anneal=True)
    # annealing: the first token of the last block inverted is not guided at all
    assert float(jnp.abs(annealed - x_guided).max()) > 1e-4


def test_sequential_inverse_costs_one_forward_not_one_per_token():
    net = fresh("tarflow")
    graphdef, state = nnx.split(net)
    fwd = lambda s, x: nnx.merge(graphdef, s).forward(x)
    inv = lambda s, z: nnx.merge(graphdef, s).inverse(z)
    tokens = (S // 2) ** 2
    ratio = count_flops(inv, state, X) / count_flops(fwd, state, X)
    assert ratio < 2.0 < tokens, ratio  # a re-run per token would be ~tokens / 2 forwards


def test_bf16_forward_close_to_f32_with_f32_logdet():
    net = trained_like("tarflow")
    graphdef16 = nnx.split(build("tarflow", dtype=jnp.bfloat16))[0]
    state = nnx.split(net)[1]
    z16, ld16 = call(nnx.merge(graphdef16, state), "forward", X, cond=LABELS)
    z32, ld32 = call(net, "forward", X, cond=LABELS)
    assert z16.dtype == ld16.dtype == jnp.float32
    assert float(jnp.abs(z16 - z32).max()) < 0.05
    np.testing.assert_allclose(ld16, ld32, rtol=0.05, atol=0.1)


def test_shape_and_condition_errors():
    net = fresh("tarflow")
    with pytest.raises(ValueError, match=r"\[B, 8, 8, 2\]"):
        net.forward(jnp.zeros((B, 6, 6, C)))
    uncond = build("tarflow", num_classes=0)
    with pytest.raises(ValueError, match="unconditional"):
        uncond.forward(X, cond=LABELS)
    with pytest.raises(ValueError, match="inverse method"):
        net.inverse(X, method="newton")
    with pytest.raises(ValueError, match="not divisible"):
        NETWORKS["tarflow"](1, 7, patch=2, rngs=nnx.Rngs(0))


def test_bits_per_dim_by_hand():
    # uniform dequantization, x = (u + U) / 128 - 1: the uniform density on [-1, 1]^D,
    # 2^-D, spreads over 256 levels of width 1 in u: exactly 8 bits/dim
    got = bits_per_dim(jnp.array([-D * math.log(2.0)]), D, noise="uniform")
    np.testing.assert_allclose(got, [8.0], 1e-6)
    # a standard normal at its mode: 7 + log2(2π)/2 bits (uniform), log2 127.5 + log2(2π)/2
    # (Gaussian noise on x = u / 127.5 - 1: the Jacobian to pixel units is 127.5^D)
    mode = gaussian_log_prob(jnp.zeros((1, S, S, C)))
    for noise, log2_scale in (("uniform", 7.0), ("gaussian", math.log2(127.5))):
        want = log2_scale + 0.5 * math.log2(2 * math.pi)
        np.testing.assert_allclose(bits_per_dim(mode, D, noise=noise), [want], rtol=1e-6)
    # the Gaussian path end to end: an identity flow on x + σ ε is N(0, I) of the noisy x
    key, sigma = jax.random.key(7), 0.1
    got, _, _ = apply(flow_bpd, fresh("realnvp"), X, key, noise="gaussian", noise_std=sigma)
    noisy = np.asarray(add_noise(key, X, "gaussian", sigma), np.float64).reshape(B, -1)
    nats = 0.5 * np.sum(noisy**2, axis=1) / D + 0.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(got, (nats + math.log(127.5)) / math.log(2), rtol=1e-6)
    assert abs(math.log2(127.5) - 6.9944) < 1e-4


@pytest.mark.parametrize("name", sorted(TINY))
def test_identity_flow_nll_is_the_gaussian_nll(name):
    batch = {"x": X, "cond": LABELS}
    bpd, metrics = apply(loss_flow_nll, fresh(name), batch, jax.random.key(0), noise="none")
    sq = np.sum(np.asarray(X, np.float64) ** 2, axis=(1, 2, 3))
    nats = 0.5 * sq / D + 0.5 * math.log(2 * math.pi)  # noise="none": x = u / 127.5 - 1
    np.testing.assert_allclose(bpd, (nats + math.log(127.5)) / math.log(2), rtol=1e-6)
    np.testing.assert_allclose(metrics["logdet_per_dim"], 0.0)


def test_noise_and_dequantization():
    levels = jnp.asarray(np.random.default_rng(2).integers(0, 256, (4, S, S, C)), jnp.float32)
    x = levels / 127.5 - 1.0
    u = 128.0 * (add_noise(jax.random.key(0), x, "uniform") + 1.0)
    assert bool(jnp.all((u >= levels) & (u < levels + 1.0)))  # inside its own bin
    x = jnp.zeros((20_000, 4))
    noisy = add_noise(jax.random.key(1), x, "gaussian", noise_std=0.05)
    np.testing.assert_allclose(jnp.std(noisy), 0.05, rtol=0.02)
    with pytest.raises(ValueError, match="uniform"):
        add_noise(jax.random.key(0), x, "laplace")


def test_dataset_bpd_weights_examples_and_matches_hand_value():
    rng = np.random.default_rng(3)
    xs = [jnp.asarray(rng.uniform(-1, 1, (n, S, S, C)), jnp.float32) for n in (3, 1)]
    batches = [{"x": x, "cond": jnp.zeros((x.shape[0],), jnp.int32)} for x in xs]
    got = dataset_bpd(fresh("realnvp"), batches, key=jax.random.key(0), noise="none")
    every = np.concatenate([np.asarray(x, np.float64) for x in xs]).reshape(4, -1)
    nats = 0.5 * np.sum(every**2, axis=1) / D + 0.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(got, np.mean((nats + math.log(127.5)) / math.log(2)), rtol=1e-6)
    with pytest.raises(ValueError, match="no batches"):
        dataset_bpd(fresh("realnvp"), [], key=jax.random.key(0))


def test_tweedie_step_is_the_gaussian_posterior_mean():
    """Clean x ~ N(mu, s²), noisy y = x + σ ε ~ N(mu, s² + σ²): Tweedie's step gives
    E[x | y] = mu + s² (y - mu) / (s² + σ²), with mean error s² σ² / (s² + σ²)."""
    mu, s, sigma = 0.3, 0.6, 0.8
    k1, k2 = jax.random.split(jax.random.key(5))
    clean = mu + s * jax.random.normal(k1, (4000, 8))
    noisy = clean + sigma * jax.random.normal(k2, clean.shape)
    var = s**2 + sigma**2
    log_p = lambda y: -0.5 * jnp.sum((y - mu) ** 2, axis=1) / var
    denoised = tweedie_denoise(log_p, noisy, sigma)
    np.testing.assert_allclose(denoised, mu + s**2 * (noisy - mu) / var, rtol=1e-5, atol=1e-6)
    mse = float(jnp.mean((denoised - clean) ** 2))
    np.testing.assert_allclose(mse, s**2 * sigma**2 / var, rtol=0.05)
    assert mse < float(jnp.mean((noisy - clean) ** 2))
    # the same step through a flow: an identity TarFlow is the density N(0, I), exactly the
    # noisy law when s² + σ² = 1, so the step shrinks towards the clean mean 0 by 1 - σ²
    y = jax.random.normal(jax.random.key(6), X.shape)
    flow = apply(sample_tarflow, fresh("tarflow"), y, cond=LABELS, noise_std=0.6)
    np.testing.assert_allclose(flow, (1 - 0.36) * y, rtol=1e-5, atol=1e-6)


def test_sampler_through_the_experiment_config():
    config = load(f"{ROOT}/experiments/nf/mnist_tarflow.py:smoke=True,cond=True")
    factory = Experiment.from_config(config).network.build
    graphdef, _ = experiment.abstract_network(factory)
    params = redraw(jit0(lambda: experiment.init_params(factory, 0))())  # not the identity
    labels = jnp.arange(4) % 10
    fn = sample_fn(graphdef, config, (28, 28, 1))
    x = jit0(fn)(params, jax.random.key(0), labels)  # guided, annealed, denoised
    assert x.shape == (4, 28, 28, 1) and bool(jnp.all(jnp.isfinite(x)))
    plain = sample_fn(graphdef, config, (28, 28, 1), cfg_scale=1.0)
    assert float(jnp.abs(jit0(plain)(params, jax.random.key(0), labels) - x).max()) > 1e-3
    config.sample.options.update(inverse="jacobi", jacobi_tol=1e-6)
    fn = sample_fn(graphdef, config, (28, 28, 1))
    np.testing.assert_allclose(jit0(fn)(params, jax.random.key(0), labels), x, atol=1e-4)


def test_sampler_options_follow_the_loss():
    """The Tweedie σ and whether to denoise are the loss's noise settings (FieldReferences):
    an override of the loss moves the sampler."""
    for name in ("mnist_tarflow", "imagenet64_tarflow"):
        config = load(f"{ROOT}/experiments/nf/{name}.py:smoke=True")
        assert config.sample.options.noise == config.loss.noise == "gaussian"
        config.loss.noise_std = 0.03
        config.loss.noise = "uniform"
        options = experiment._plain(config.sample.options)
        assert options["noise_std"] == 0.03 and options["noise"] == "uniform", name
    net = trained_like("tarflow")
    z = jax.random.normal(jax.random.key(8), X.shape)
    raw = apply(sample_tarflow, net, z, cond=LABELS, denoise=False)
    for noise in ("uniform", "none"):  # no Tweedie step for a flow not trained on N(0, σ²)
        got = apply(sample_tarflow, net, z, cond=LABELS, noise=noise, noise_std=0.3)
        np.testing.assert_array_equal(got, raw)
    denoised = apply(sample_tarflow, net, z, cond=LABELS, noise="gaussian", noise_std=0.3)
    assert float(jnp.abs(denoised - raw).max()) > 1e-3


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(inverse="newton"), r"inverse='newton' .*known: sequential, jacobi"),
        (dict(inverse="jacobi", jacobi_tol=-1.0), r"jacobi_tol=-1.0 must be a number > 0"),
        (dict(jacobi_tol=0), r"jacobi_tol=0 must be a number > 0"),
        (dict(inverse="jacobi", jacobi_max_iters=0), r"jacobi_max_iters=0 must be an integer"),
        (dict(inverse="jacobi", jacobi_segment=-2), r"jacobi_segment=-2 must be an integer >= 0"),
        (dict(inverse="jacobi", jacobi_segment=(4, 0, 0)), r"gives 3 sizes for 2 blocks"),
        (dict(noise="laplace"), r"noise='laplace' .*known: gaussian, uniform, none"),
    ],
)
def test_bad_sampler_options_are_one_user_error(options, match):
    config = load(f"{ROOT}/experiments/nf/mnist_tarflow.py:smoke=True")
    config.sample.options.update(options)
    factory = Experiment.from_config(config).network.build
    graphdef, abstract = experiment.abstract_network(factory)
    fn = sample_fn(graphdef, config, (28, 28, 1))
    with pytest.raises(UserError, match=match):
        jax.eval_shape(fn, abstract, jax.random.key(0), jnp.zeros((2,), jnp.int32))


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(temperature="0.6."), r"option temperature='0.6.' must be a number"),
        (dict(denoise="no"), r"option denoise='no' must be true or false"),
        (dict(inverse=1), r"option inverse=1 must be a string"),
        (dict(jacobi_max_iters=2.5), None),  # default None: the sampler checks it
        (dict(temperature=1, denoise=False), None),  # an integer is a number
    ],
)
def test_an_option_of_another_type_than_its_default_is_one_error(options, match):
    """Options as `--sample-option` gives them (values that do not parse as JSON stay
    strings) are checked against the types of the sampler's defaults."""
    from core.generation import sampler_options

    experiment = Experiment.from_config(load(f"{ROOT}/experiments/nf/mnist_tarflow.py:smoke=True"))
    experiment = experiment.with_sampling(options=options)
    if match is None:
        assert {k: sampler_options(experiment)[k] for k in options} == options
    else:
        with pytest.raises(UserError, match=match):
            sampler_options(experiment)


def test_flow_inverse_rejects_bad_tolerances_before_loading(tmp_path):
    from scripts import flow_inverse

    argv = ["x", "--workdir", str(tmp_path / "none")]
    with pytest.raises(UserError, match=r"--tols=-1.0 must be a number > 0"):
        flow_inverse.main([*argv, "--tols", "1e-3,-1"])
    with pytest.raises(UserError, match=r"--max-iters=0 must be an integer >= 1"):
        flow_inverse.main([*argv, "--max-iters", "0"])
    with pytest.raises(UserError, match="not a comma list"):
        flow_inverse.main([*argv, "--tols", "1e-3,x"])
    with pytest.raises(UserError, match=r"'7/x' is not an integer or a/b/\.\.\. of integers"):
        flow_inverse.main([*argv, "--segments", "0,7/x"])
    with pytest.raises(UserError, match=r"--segments=\(4, -1\) must be an integer >= 0"):
        flow_inverse.main([*argv, "--segments", "4/-1"])
    net = fresh("tarflow")
    with pytest.raises(UserError, match="tol=-1"):
        net.inverse(X, method="jacobi", tol=-1.0)


def test_annealed_guidance_is_the_per_token_mix_by_hand():
    """A by-hand inverse, one token at a time, of a 4-token flow: the affine parameters of the
    conditional and the null label mixed with w_j = 1 + (w - 1) j / (T - 1) at position j of
    each block's order (ml-tarflow's annealed_guidance, g_j = g j / (T - 1) with w = 1 + g),
    from whole-sequence causal passes (not the KV cache)."""
    kw = dict(TINY["tarflow"], image_size=4)
    graphdef, state = nnx.split(NETWORKS["tarflow"](**kw, rngs=nnx.Rngs(0)))
    net = nnx.merge(graphdef, redraw(state, std=0.1))
    z = jax.random.normal(jax.random.key(9), (B, 4, 4, C))
    w, tokens = 3.0, 4
    null = jnp.full((B,), NUM_CLASSES)
    x = net.patchify(z)
    for block in reversed(net.blocks):
        x = np.array(block.order(x))
        c_cond, c_null = block.embed_cond(LABELS, B), block.embed_cond(null, B)
        for j in range(1, tokens):
            a_c, b_c = block.affine(jnp.asarray(x), c_cond)
            a_n, b_n = block.affine(jnp.asarray(x), c_null)
            w_j = 1.0 + (w - 1.0) * j / (tokens - 1)
            a, b = a_n + w_j * (a_c - a_n), b_n + w_j * (b_c - b_n)
            x[:, j] = x[:, j] * np.exp(a[:, j]) + b[:, j]
        x = block.order(jnp.asarray(x))
    by_hand = net.unpatchify(x)
    kw = dict(cond=LABELS, cfg_scale=w, anneal=True)
    annealed = call(net, "inverse", z, **kw)
    np.testing.assert_allclose(annealed, by_hand, atol=1e-5, rtol=0)
    np.testing.assert_allclose(call(net, "inverse", z, method="jacobi", **kw), by_hand, atol=1e-5)
    constant = call(net, "inverse", z, cond=LABELS, cfg_scale=w)
    assert float(jnp.abs(constant - by_hand).max()) > 1e-3  # the ramp matters here


def test_sampler_rejects_guidance_for_a_flow_without_it():
    net = trained_like("realnvp")
    with pytest.raises(ValueError, match="guidance"):
        sample_tarflow(net, X, cond=LABELS, cfg_scale=2.0, denoise=False)
    x = apply(sample_tarflow, net, X, cond=LABELS, denoise=False)
    np.testing.assert_allclose(x, call(net, "inverse", X, cond=LABELS), atol=1e-6)
    assert float(jnp.abs(x - X).max()) > 1e-2  # not the identity


def test_flow_inverse_script_times_both_inverses_and_they_agree(tmp_path, capsys):
    # A 2-step conditional TarFlow on random digits-shaped images; the script inverts the
    # same latents both ways (guided, as the run samples) and reports how far they differ.
    import json

    from core.errors import UserError
    from scripts import flow_inverse
    from tests.conftest import train

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", arr_0=images, arr_1=rng.integers(0, 10, 64))
    config = load(f"{ROOT}/experiments/nf/mnist_tarflow.py:smoke=True,cond=True")
    config.data.update(name="npz", path=str(tmp_path / "d.npz"), split="train")
    config.data.options = {}
    train(config, str(tmp_path / "run"))
    out = tmp_path / "inverse.json"
    argv = ["x", "--workdir", str(tmp_path / "run"), "--num", "6", "--batch", "4"]
    segments = ["--segments", "0,5/0"]  # plain Jacobi; segments of 5 in the first block only
    flow_inverse.main([*argv, "--tols", "1e-6", "--cfg", "2", *segments, "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["num"] == 8 and result["cfg_scale"] == 2.0  # whole batches
    seq, jac = result["methods"]["sequential"], result["methods"]["jacobi_tol1e-06"]
    tokens = (28 // config.model.patch) ** 2
    assert seq["passes_per_block"] == [tokens - 1] * config.model.num_blocks
    gs = result["methods"]["jacobi_tol1e-06_seg5/0"]
    assert gs["segment"] == [5, 0] and jac["segment"] == 0 and jac["tol"] == 1e-6
    # the exact reference (float32, full matmul precision) is the CPU's float32 sequential
    assert seq["exact_max_abs_diff"] < 1e-6 and seq["exact_uint8_pixels_differing"] == 0
    for row in (jac, gs):
        assert 1 < row["mean_passes_per_block"] <= tokens  # 1 pass: an identity flow
        assert row["max_abs_diff"] < 1e-4 and row["uint8_pixels_differing"] < 1e-3
        assert row["exact_max_abs_diff"] < 1e-4
        assert row["images_per_sec"] > 0 and row["speedup"] > 0
    assert gs["passes_per_block"][0] <= -(-(tokens - 1) // 5) * 5  # 5-token segments, capped
    assert result["dtype"] == config.compute_dtype == "float32"  # the run's by default
    flow_inverse.main([*argv, "--tols", "1e-2", "--dtype", "bfloat16", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["dtype"] == "bfloat16" and len(result["methods"]) == 2
    # TF32 operands (the GPU's default) move the sequential inverse off the exact one too
    flow_inverse.main([*argv, "--tols", "1e-6", "--tf32", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["tf32_emulated"] and result["dtype"] == "float32"
    assert 1e-7 < result["methods"]["sequential"]["exact_max_abs_diff"] < 0.05
    with pytest.raises(UserError, match="'5/0/0' gives 3 sizes for a flow of 2 blocks"):
        flow_inverse.main([*argv, "--segments", "5/0/0"])
    with pytest.raises(UserError, match="compute_dtype 'float16'"):
        flow_inverse.main([*argv, "--dtype", "float16"])
    quick = load(f"{ROOT}/experiments/quickstart.py:smoke=True")
    train(quick, str(tmp_path / "fm"))
    with pytest.raises(UserError, match="no Jacobi inverse"):
        flow_inverse.main(["x", "--workdir", str(tmp_path / "fm")])


def _bpd_result(spec: str, **loss):
    """`scripts.evaluate --metrics bpd`'s dict (core.evaluation's bpd branch) for a config and
    the tiny RealNVP on 4 images (labels 0 and 2)."""
    from types import SimpleNamespace

    from core import evaluation

    config = load(f"{ROOT}/experiments/nf/{spec}")
    config.loss.update(loss)
    graphdef, params = nnx.split(fresh("realnvp"))
    x = jnp.concatenate([X, -X])
    ev = SimpleNamespace(
        _need_network=lambda _: evaluation.RunNetwork(
            graphdef, params, Experiment.from_config(config)
        ),
        options=SimpleNamespace(seed=0, batch=3, heldout_split="test"),
        heldout={"x": x, "cond": jnp.array([0, 2, 0, 2])},
    )
    return evaluation.METRICS["bpd"](ev), config


def test_bpd_result_says_what_it_is():
    out, config = _bpd_result("mnist_tarflow.py:smoke=True")  # the default: Gaussian noise
    assert out["noise"] == "gaussian" and out["noise_std"] == 0.1
    assert out["bpd_comparable"] is False and out["conditional"] is False
    out, _ = _bpd_result("mnist_tarflow.py:smoke=True,noise=uniform")
    assert out["noise"] == "uniform" and out["noise_std"] is None
    assert out["bpd_comparable"] is True and out["conditional"] is False
    batches = [{"x": jnp.concatenate([X, -X])[i : i + 3]} for i in (0, 3)]
    want = dataset_bpd(fresh("realnvp"), batches, key=jax.random.key(0), noise="uniform")
    assert out["bpd"] == pytest.approx(want, rel=1e-6)
    out, _ = _bpd_result("mnist_tarflow.py:smoke=True,noise=uniform,cond=True")
    assert out["conditional"] is True and out["bpd_comparable"] is True
    with pytest.raises(UserError, match="noise='none' on 8-bit images"):
        _bpd_result("mnist_tarflow.py:smoke=True", noise="none")


def test_imagenet64_data_and_optimizer_are_ml_tarflows():
    uncond = load(f"{ROOT}/experiments/nf/imagenet64_tarflow.py")
    assert uncond.data.name == "downsampled_imagenet/64x64" and not uncond.data.use_labels
    assert uncond.data.image_size == 64 and uncond.model.get("num_classes", 0) == 0
    bpd = load(f"{ROOT}/experiments/nf/imagenet64_tarflow.py:noise=uniform")
    assert bpd.data.name == "downsampled_imagenet/64x64" and bpd.compute_dtype == "float32"
    cond = load(f"{ROOT}/experiments/nf/imagenet64_tarflow.py:cond=True")
    assert cond.data.name == "imagenet2012" and cond.data.image_size == 64
    assert cond.data.use_labels and cond.model.num_classes == 1000
    for c in (uncond, cond):
        assert c.optim.grad_clip == 0.0 and c.ema_decay == 0.0 and c.optim.b2 == 0.95
        assert c.optim.weight_decay == 1e-4 and c.optim.schedule == "cosine"
        assert c.data.random_flip and c.batch_size == 256
    with pytest.raises(UserError, match="no labels"):
        load(f"{ROOT}/experiments/nf/imagenet64_tarflow.py:cond=True,data=downsampled_imagenet")


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_realnvp_couplings_split_patches_as_documented(channels):
    """models/realnvp.py: squeezed channel (2p + q) C + c; identity/reversed split the rows;
    even|odd splits by the parity of (2p + q) C + c: columns for C = 1, the image channel's
    parity for even C, the parity of q + c for odd C > 1."""
    p, q, c = np.unravel_index(np.arange(4 * channels), (2, 2, channels))
    first = lambda k: channel_permutation(4 * channels, k)[: 2 * channels]
    assert set(p[first(0)]) == {0} and set(p[first(1)]) == {1}  # top row, bottom row
    half = first(2)
    if channels == 1:
        assert set(q[half]) == {0} and set(q[first(3)]) == {1}  # left, right column
    elif channels % 2 == 0:
        assert set(c[half] % 2) == {0} and len(set(zip(p[half], q[half]))) == 4
    else:
        assert set((q[half] + c[half]) % 2) == {0} and len(set(q[half])) == 2
