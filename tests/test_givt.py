"""GIVT (arXiv 2312.02116): the Gaussian-mixture density against scipy, a mixture head fitted
by the loss recovering a known mixture, causality and the key/value cache, DB-CFG's exact and
rejection paths against the normalised guided density (KS tests), temperatures, the VAE's
closed-form KL, and the two stages end to end (train, sample, evaluate, search, errors)."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import integrate, special, stats

from core import config as config_lib
from core import runs
from core.errors import UserError
from losses.givt import loss_givt
from losses.vae import kl_to_standard_normal, loss_vae
from models.givt import GIVT, gmm_log_prob
from models.vae import VAE
from samplers import givt as sg
from tests.conftest import ROOT, SHARED_DATA, run_python, train

VAE_SMOKE = f"{ROOT}/experiments/givt/mnist_vae.py:smoke=True"
GIVT_SMOKE = f"{ROOT}/experiments/givt/mnist_givt.py:smoke=True"


def _net(tokens=5, token_dim=2, k=3, num_classes=4, seed=0) -> GIVT:
    return GIVT(
        tokens,
        token_dim,
        num_mixtures=k,
        width=32,
        depth=2,
        head_dim=16,
        num_classes=num_classes,
        rngs=nnx.Rngs(seed),
    )


def test_gmm_log_prob_equals_scipy_mixture_density():
    rng = np.random.default_rng(0)
    n, k, d = 96, 3, 4
    logits = 2.0 * rng.normal(size=(n, k))
    means = rng.normal(size=(n, k, d))
    scales = np.exp(rng.uniform(np.log(1e-4), np.log(3.0), size=(n, k, d)))
    # points near a component, and 50 of the nearest component's σ away from it
    offset = rng.choice([0.3, 50.0, -50.0], size=(n, 1)) * scales[:, 0]
    x = means[:, 0] + offset
    # the oracle sees the float32 inputs the function sees
    logits, means, scales, x = (
        a.astype(np.float32).astype(np.float64) for a in (logits, means, scales, x)
    )
    want = special.logsumexp(
        special.log_softmax(logits, axis=-1)
        + np.sum(stats.norm.logpdf(x[:, None, :], means, scales), axis=-1),
        axis=-1,
    )
    got = np.asarray(
        gmm_log_prob(*(jnp.asarray(a, jnp.float32) for a in (logits, means, scales, x)))
    )
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-3)
    # the whole mixture far away: finite values and gradients, no NaN
    far = jnp.asarray(means[:, 0] + 1e3, jnp.float32)
    grads = jax.grad(
        lambda m: jnp.sum(gmm_log_prob(jnp.asarray(logits), m, jnp.full(m.shape, 1e-4), far))
    )(jnp.asarray(means, jnp.float32))
    assert bool(
        jnp.isfinite(
            gmm_log_prob(jnp.asarray(logits), jnp.asarray(means), jnp.full(means.shape, 1e-4), far)
        ).all()
    )
    assert bool(jnp.isfinite(grads).all())


def test_mixture_head_fitted_by_the_loss_recovers_a_known_mixture():
    d = 2
    weights = np.array([0.2, 0.3, 0.5])
    means = np.array([[-3.0, 0.0], [0.0, 2.0], [3.0, -1.0]])[:, :d]
    scales = np.array([[0.3, 0.5], [0.6, 0.2], [0.4, 0.4]])[:, :d]
    net = GIVT(1, d, num_mixtures=3, width=16, depth=1, head_dim=16, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net, nnx.Param)
    steps, batch = 1500, 256
    tx = optax.adam(optax.cosine_decay_schedule(3e-2, steps, alpha=0.01))
    log_w, mu, sd = (jnp.asarray(a, jnp.float32) for a in (np.log(weights), means, scales))

    @jax.jit
    def fit(params):
        def step(state, key):  # a fresh batch of the known mixture each step
            params, opt = state
            k_c, k_x = jax.random.split(key)
            comp = jax.random.categorical(k_c, log_w, shape=(batch,))
            x = (mu[comp] + sd[comp] * jax.random.normal(k_x, (batch, d)))[:, None]
            loss = lambda p: jnp.mean(loss_givt(nnx.merge(graphdef, p), {"x": x}, key)[0])
            updates, opt = tx.update(jax.grad(loss)(params), opt)
            return (optax.apply_updates(params, updates), opt), None

        keys = jax.random.split(jax.random.key(1), steps)
        return jax.lax.scan(step, (params, tx.init(params)), keys)[0][0]

    params = fit(params)
    logits, mu, sigma = (
        np.asarray(a)[0, 0] for a in nnx.merge(graphdef, params)(jnp.zeros((1, 1, d)))
    )
    order = np.argsort(mu[:, 0])
    np.testing.assert_allclose(special.softmax(logits)[order], weights, atol=0.03)
    np.testing.assert_allclose(mu[order], means, atol=0.05)
    np.testing.assert_allclose(sigma[order], scales, rtol=0.1)


def test_outputs_are_causal_and_the_cache_gives_the_full_pass_distributions():
    net = _net()
    seq = jax.random.normal(jax.random.key(1), (2, 5, 2))
    cond = jnp.array([1, 3])

    def flat(s):
        return jnp.concatenate([a.reshape(2, 5, -1) for a in net(s, cond=cond)], axis=-1)

    jac = jax.jit(jax.jacrev(flat))(seq)  # [B, T, F, B, T, d]
    dep = np.asarray(jnp.sum(jnp.abs(jac), axis=(0, 2, 3, 5)))  # [T out, T in]
    assert np.all(dep[np.triu_indices(5)] == 0.0)  # token i sees no token >= i
    assert np.all(dep[np.tril_indices(5, -1)] > 0.0)
    for scale in (1.0, 2.0):
        noise = sg.draw_noise(jax.random.key(2), 2, 5, 2, guided=scale != 1.0, tries=4)
        draw = functools.partial(sg.sample_givt_stats, net, cond=cond, cfg_scale=scale, null_cond=4)
        tokens, st = jax.jit(draw)(noise)
        for cached, full in zip(st["mixture"], net(tokens, cond=cond)):
            np.testing.assert_allclose(np.asarray(cached), np.asarray(full), rtol=1e-5, atol=1e-5)


def _guided_target(mu_c, s_c, mu_u, s_u, scale):
    """The DB-CFG density on the rejection path's window, normalised: (grid, cdf)."""
    rho = 2.0 * max(s_c, s_u)
    grid = np.linspace(mu_c - sg.CFG_WINDOW * rho, mu_c + sg.CFG_WINDOW * rho, 40_001)
    log_p = scale * stats.norm.logpdf(grid, mu_c, s_c) - (scale - 1) * stats.norm.logpdf(
        grid, mu_u, s_u
    )
    p = np.exp(log_p - log_p.max())
    cdf = integrate.cumulative_trapezoid(p, grid, initial=0.0)
    return grid, cdf / cdf[-1]


def _draws(mu_c, s_c, mu_u, s_u, scale, *, exact, n=20_000, tries=64, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    f = lambda v: jnp.full((n, 1), v, jnp.float32)  # noqa: E731
    draw = jax.jit(sg.guided_draw, static_argnames="exact")
    x, rejected, accepted = draw(
        f(mu_c),
        f(s_c),
        f(mu_u),
        f(s_u),
        scale,
        jax.random.normal(keys[0], (n, 1)),
        jax.random.normal(keys[1], (n, tries, 1)),
        jax.random.normal(keys[2], (n, tries, 1)),
        exact=exact,
    )
    return np.asarray(x[:, 0]), np.asarray(rejected[:, 0]), np.asarray(accepted[:, 0])


def test_db_cfg_exact_and_rejection_paths_follow_the_guided_density():
    # positive guided precision a = 2 / 0.25 - 1 / 1 = 7: a Gaussian N(4/7, 1/7)
    case = (0.5, 0.5, 0.0, 1.0, 2.0)
    exact, rej, _ = _draws(*case, exact=True)
    assert not rej.any()  # the exact path
    forced, rej, acc = _draws(*case, exact=False, seed=1)
    assert rej.all() and acc.mean() > 0.999  # always rejection, as big_vision
    gaussian = stats.norm(4 / 7, 1 / math.sqrt(7)).cdf
    assert stats.kstest(exact, gaussian).pvalue > 1e-3
    assert stats.kstest(forced, gaussian).pvalue > 1e-3
    assert stats.ks_2samp(exact, forced).pvalue > 1e-3
    # negative precision a = 2 - 1 / 0.65² < 0: no Gaussian; the rejection path, even when
    # exact draws are asked for, follows the density on its window
    case = (0.0, 1.0, 0.3, 0.65, 2.0)
    x, rej, acc = _draws(*case, exact=True, tries=128, seed=2)
    assert rej.all() and 0.5 < acc.mean() < 1.0  # some fell back to the conditional draw
    grid, cdf = _guided_target(*case)
    assert stats.kstest(x[acc], lambda v: np.interp(v, grid, cdf)).pvalue > 1e-3
    fallback = x[~acc]
    assert stats.kstest(fallback, stats.norm(0.0, 1.0).cdf).pvalue > 1e-3


def test_db_cfg_at_weight_one_is_the_conditional_sampler():
    rng = np.random.default_rng(3)
    mu_c, mu_u = rng.normal(size=(2, 500, 4))
    s_c, s_u = np.exp(rng.normal(size=(2, 500, 4)))
    gauss = rng.normal(size=(500, 4))
    prop = rng.normal(size=(500, 8, 4))
    args = [jnp.asarray(a, jnp.float32) for a in (mu_c, s_c, mu_u, s_u)]
    x, rejected, _ = jax.jit(sg.guided_draw)(
        *args[:2],
        *args[2:],
        1.0,
        jnp.asarray(gauss, jnp.float32),
        jnp.asarray(prop, jnp.float32),
        jnp.asarray(prop, jnp.float32),
    )
    assert not np.asarray(rejected).any()
    np.testing.assert_allclose(np.asarray(x), mu_c + s_c * gauss, rtol=1e-5, atol=1e-5)
    # the sampler: guided noise at weight 1 draws what the unguided sampler draws
    net = _net()
    noise = sg.draw_noise(jax.random.key(4), 3, 5, 2, guided=True, tries=4)
    cond = jnp.array([0, 1, 2])
    plain = {k: noise[k] for k in ("choice", "gauss")}
    unguided = jax.jit(lambda n: sg.sample_givt(net, n, cond=cond, null_cond=4))
    a, b = unguided(noise), unguided(plain)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a guided sample reports its paths: everything exact for a fresh net (σ_c ≈ σ_u), and
    # with cfg_exact=False everything rejected, found within the tries
    guided = jax.jit(
        lambda n, exact: sg.sample_givt_stats(
            net, n, cond=cond, cfg_scale=2.0, null_cond=4, cfg_exact=exact
        ),
        static_argnums=1,
    )
    _, st = guided(noise, True)
    assert float(st["rejection_fraction"]) == 0.0 and np.isnan(float(st["acceptance_rate"]))
    _, st = guided(noise, False)
    assert float(st["rejection_fraction"]) == 1.0 and 0.5 < float(st["acceptance_rate"]) <= 1.0


def test_temperatures_scale_the_spread_and_the_mixture_weights():
    net = _net(tokens=1, token_dim=1, k=2, num_classes=0)
    sigma = 0.5
    raw_scale = sigma - 1.0 / sigma  # square_plus(raw) = σ
    net.head.kernel[...] = jnp.zeros_like(net.head.kernel[...])
    net.head.bias[...] = jnp.array([0.0, math.log(3.0), -3.0, raw_scale, 3.0, raw_scale])
    n = 20_000
    noise = sg.draw_noise(jax.random.key(5), n, 1, 1, guided=False, tries=1)
    graphdef, params = nnx.split(net)
    draw = jax.jit(
        lambda p, n, t, m: sg.sample_givt(
            nnx.merge(graphdef, p), n, temperature=t, mix_temperature=m
        ),
        static_argnums=(2, 3),
    )
    for temperature, mix_temperature in [(1.0, 1.0), (0.5, 2.0), (2.0, 0.5)]:
        x = np.asarray(draw(params, noise, temperature, mix_temperature))[:, 0, 0]
        right = x > 0
        p = special.softmax(np.array([0.0, math.log(3.0)]) / mix_temperature)[1]
        assert abs(right.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
        for side, mean in ((right, 3.0), (~right, -3.0)):
            np.testing.assert_allclose(x[side].std(), temperature * sigma, rtol=0.04)
            np.testing.assert_allclose(x[side].mean(), mean, atol=0.05 * temperature)


def test_vae_kl_is_the_closed_form_and_the_loss_is_the_beta_elbo():
    for mean, logvar in [(0.0, 0.0), (1.3, -2.0), (-0.4, 1.5), (2.0, -6.0)]:
        q = stats.norm(mean, math.exp(0.5 * logvar))

        def integrand(z, q=q):
            return q.pdf(z) * (q.logpdf(z) - stats.norm.logpdf(z))

        lo, hi = mean - 30 * q.std(), mean + 30 * q.std()
        want, _ = integrate.quad(integrand, lo, hi, points=[mean])
        got = float(kl_to_standard_normal(jnp.float32(mean), jnp.float32(logvar)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    vae = VAE(1, 8, latent_dim=2, ch=8, ch_mult=(1, 2), rngs=nnx.Rngs(0))
    x = jnp.clip(jax.random.normal(jax.random.key(0), (3, 8, 8, 1)), -1, 1)
    key, beta = jax.random.key(1), 0.3
    graphdef, params = nnx.split(vae)

    @jax.jit
    def check(params):
        vae = nnx.merge(graphdef, params)
        per_example, metrics = loss_vae(vae, {"x": x}, key, beta=beta)
        mean, logvar = vae.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        sq = jnp.sum((vae.decode(z) - x) ** 2, axis=(1, 2, 3))
        kl = jnp.sum(kl_to_standard_normal(mean, logvar), axis=(1, 2))
        loss = lambda p: jnp.mean(loss_vae(nnx.merge(graphdef, p), {"x": x}, key, beta=beta)[0])
        return per_example, metrics, 0.5 * sq + beta * kl, kl, jax.grad(loss)(params)

    per_example, metrics, want, kl, grad = check(params)
    np.testing.assert_allclose(per_example, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl_per_token"], jnp.mean(kl) / 16, rtol=1e-5)
    # the decoder scale is fitted by the gradient (its term has value zero in the loss)
    assert float(jnp.abs(grad["log_std"])) > 0


# --- the two stages end to end -----------------------------------------------------------


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    """(vae run, givt run): the smoke configs trained 2 steps each on the offline MNIST."""
    if not os.path.isdir(os.path.join(SHARED_DATA, "tfds")):
        pytest.skip("the offline MNIST is not here")
    mp = pytest.MonkeyPatch()
    mp.setenv("TFDS_DATA_DIR", os.path.join(SHARED_DATA, "tfds"))
    root = tmp_path_factory.mktemp("givt")
    vae_dir, givt_dir = str(root / "vae"), str(root / "givt")
    train(config_lib.load(VAE_SMOKE), vae_dir)
    train(_givt_config(vae_dir), givt_dir)
    yield vae_dir, givt_dir
    mp.undo()


def _givt_config(vae_dir: str | None, *overrides: str):
    config = config_lib.load(GIVT_SMOKE)
    argv = ["train", *overrides]
    if vae_dir is not None:
        argv.append(f"--config.frozen.vae.workdir={vae_dir}")
    config_lib.add_option_overrides(config, argv)
    for arg in argv[1:]:
        path, _, value = arg[len("--config.") :].partition("=")
        node = config
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
    return config


def test_two_stages_train_sample_and_evaluate(two_stage, tmp_path):
    from core.evaluation import Options
    from core.evaluation.report import evaluate, evaluate_run

    vae_dir, givt_dir = two_stage
    with open(os.path.join(givt_dir, "config.json")) as f:
        recorded = json.load(f)["frozen"]["vae"]
    assert recorded["workdir"] == os.path.abspath(vae_dir) and recorded["step"] == 2
    kw = dict(
        num=8,
        batch_size=8,
        seed=3,
        sampler="givt",
        cfg_scale=2.0,
        sample_options={"temperature": 0.9},
    )
    drawn = runs.sample_run(givt_dir, **kw)
    assert drawn.samples.shape == (8, 28, 28, 1) and np.isfinite(drawn.samples).all()
    np.testing.assert_array_equal(drawn.labels, np.arange(8))
    np.testing.assert_array_equal(runs.sample_run(givt_dir, **kw).samples, drawn.samples)
    options = Options(heldout_split="test[:16]", mem_spaces="pixel", batch=8)
    result, _ = evaluate_run(
        givt_dir, ["nll", "memorization"], num=8, options=options, batch_size=8, cfg_scale=2.0
    )
    assert result["nll_count"] == 16 and result["nll_of"] == "latents" and result["conditional"]
    assert np.isfinite(result["nll"]) and result["bpd"] > 0 and "bound" in result["bpd_bound"]
    assert np.isfinite(result["nll_per_token"])
    assert 0.0 <= result["pixel/ratio_memorized"] <= 1.0, sorted(result)
    # the VAE run: its reconstructions (FID needs a reference; none given here)
    vae = runs.sample_run(vae_dir)
    from core.evaluation import RunNetwork

    recon = evaluate(
        ["recon"], network=RunNetwork(vae.graphdef, vae.params, vae.experiment), options=options
    )
    assert recon["recon_count"] == 16 and recon["recon_mse"] > 0
    assert recon["recon_kl_per_token"] > 0 and "recon_fid" not in recon


def test_givt_run_with_a_missing_or_misfit_vae_is_one_error(two_stage, tmp_path):
    vae_dir, _ = two_stage
    workdir = str(tmp_path / "givt")
    with pytest.raises(UserError, match=r"frozen.vae.workdir=.*no such run directory"):
        train(_givt_config(str(tmp_path / "nowhere")), workdir)
    with pytest.raises(UserError, match=r"needs the frozen VAE .*frozen.vae.workdir"):
        train(_givt_config(None), workdir)
    with pytest.raises(UserError, match=r"shape \(49, 4\) but .*model.token_dim=8"):
        train(_givt_config(vae_dir, "--config.model.token_dim=8"), workdir)
    assert not os.path.exists(workdir)  # nothing was written


def test_sample_cli_with_guidance_and_temperature(two_stage, tmp_path, python_env):
    _, givt_dir = two_stage
    out = str(tmp_path / "s.npz")
    args = [
        "-m",
        "scripts.sample",
        "--workdir",
        givt_dir,
        "--num",
        "4",
        "--batch",
        "4",
        "--sampler",
        "givt",
        "--cfg",
        "2.0",
        "--sample-option",
        "temperature=0.9",
        "--out",
        out,
    ]
    done = run_python(args, python_env)
    assert done.returncode == 0, done.stderr[-2000:]
    with np.load(out) as f:
        assert f["arr_0"].shape == (4, 28, 28, 1) and f["arr_0"].dtype == np.uint8
    bad = run_python([*args[:-2], "--sample-option", "temprature=0.9", "--out", out], python_env)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "temprature" in lines[0] and "temperature" in lines[0], bad.stderr


def test_random_search_runs_on_a_givt_run(two_stage, monkeypatch):
    from core import search as search_lib
    from metrics import verifiers

    def brightness(context):
        return verifiers.Verifier(
            "brightness", lambda p, x, c, n: jnp.mean(x, axis=(1, 2, 3)), nfe=0
        )

    monkeypatch.setitem(verifiers.VERIFIERS, "brightness", brightness)
    _, givt_dir = two_stage
    settings = search_lib.Settings(algo="random", candidates=3)
    samples, labels, report = search_lib.search_run(
        givt_dir, settings, "brightness", num=4, batch_size=4, seed=1
    )
    assert samples.shape == (4, 28, 28, 1) and np.isfinite(samples).all()
    best = report["history"]["best_mean"]
    assert len(best) == 3 and best[0] <= best[1] <= best[2]
    np.testing.assert_allclose(best[-1], samples.mean(), rtol=1e-4, atol=1e-5)


def test_sampling_benchmark_times_the_run_with_its_frozen_vae(two_stage, tmp_path):
    """`scripts.bench_sampling` on a GIVT run: the timed program is the run's own (its
    sampler, the override of an option, the frozen VAE counted apart), and a misspelt
    option is the one error sampling gives."""
    from core import benchmark
    from scripts import bench_sampling

    vae_dir, givt_dir = two_stage
    out = tmp_path / "speed.jsonl"
    bench_sampling.main(
        ["bench_sampling", "--workdir", givt_dir, "--batch", "4", "--repeats", "1",
         "--cfg", "2.0", "--sample-option", "temperature=0.9", "--out", str(out)]
    )  # fmt: skip
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    vae = runs.sample_run(vae_dir)
    givt = runs.sample_run(givt_dir)
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
    assert result["family"] == "givt" and result["sampler"] == "givt" and result["cfg"] == 2.0
    assert result["sample_options"]["temperature"] == 0.9 and result["step"] == 2
    assert result["params"] == count(givt.params)
    assert result["frozen_params"] == {"vae": count(vae.params)}
    assert result["images_per_sec"] * result["sec_per_batch"] == pytest.approx(4)
    with pytest.raises(UserError, match="temprature"):
        benchmark.bench_run_sampling(
            givt_dir, batch=4, repeats=1, sample_options={"temprature": 0.9}
        )
