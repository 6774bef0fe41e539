"""Noise search (`samplers.noise_search`, `core.search`, `scripts.search`) on a 2-D toy with
the analytic density as verifier: the invariants of each algorithm, its NFE count against
the network calls actually made, NaN scores, errors, and the CLI end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import config as config_lib
from core import search as search_lib
from core.errors import UserError
from core.experiment import Experiment
from core.generation import Generation
from metrics.verifiers import VerifierContext, build_verifier
from samplers import noise_search
from tests.conftest import ROOT, run_python, train

QUICK = f"{ROOT}/experiments/quickstart.py:smoke=True,dataset=8gaussians"
B = 64


@pytest.fixture(scope="module")
def toy():
    """(experiment, generation, params, verifier) of an untrained 2-D flow-matching MLP, 8
    Euler steps, scored by the 8-Gaussians log-density."""
    experiment = Experiment.from_config(config_lib.load(QUICK))
    experiment = experiment.with_sampling(sampler="euler", num_steps=8)
    graphdef, _ = experiment.network.abstract()
    params = jax.jit(lambda: experiment.network.init(0))()
    generation = Generation(experiment, graphdef, (2,))
    verifier = build_verifier("density", VerifierContext(experiment, generation, params))
    return experiment, generation, params, verifier


def _search(toy, **settings):
    experiment, generation, params, verifier = toy
    search = search_lib.Search(
        experiment, generation.graphdef, (2,), verifier, search_lib.Settings(**settings)
    )
    return search, params, verifier


COND = jnp.zeros((B,), jnp.int32)


def test_random_search_of_one_is_plain_sampling_and_more_candidates_score_higher(toy):
    search, params, verifier = _search(toy, algo="random", candidates=16)
    noise = search.draw(jax.random.key(0), B)
    x, scores, history = search.run(params, verifier.params, noise, COND)
    one = jax.tree.map(lambda a: a[:1], noise)
    x1, _, _ = jax.jit(_search(toy, algo="random", candidates=1)[0].run)(
        params, verifier.params, one, COND
    )
    plain = jax.jit(search.generation.generate)(params, jax.tree.map(lambda a: a[0], noise), COND)
    np.testing.assert_array_equal(np.asarray(x1), np.asarray(plain))
    # the running best never falls, and over 64 rows the best of 16 beats the best of 1
    assert bool(jnp.all(jnp.diff(history, axis=0) >= 0))
    assert float(jnp.mean(history[-1])) > float(jnp.mean(history[0])) + 0.5
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(history[-1]))
    np.testing.assert_allclose(verifier(x, COND), scores, rtol=1e-5)


def test_zero_order_with_radius_zero_returns_its_pivot(toy):
    search, params, verifier = _search(toy, algo="zero_order", candidates=3, rounds=2, radius=0.0)
    noise = search.draw(jax.random.key(1), B)
    x, _, history = search.run(params, verifier.params, noise, COND)
    plain = search.generation.generate(params, noise["pivot"], COND)
    np.testing.assert_allclose(np.asarray(x), np.asarray(plain), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(history), np.asarray(history[:1]).repeat(3, 0), rtol=1e-5)
    moving = _search(toy, algo="zero_order", candidates=3, rounds=2, radius=0.5)[0]
    _, _, moved_history = moving.run(params, verifier.params, noise, COND)
    assert float(jnp.mean(moved_history[-1])) > float(jnp.mean(moved_history[0]))


def test_path_search_without_branching_is_plain_sampling(toy):
    search, params, verifier = _search(
        toy, algo="paths", candidates=1, branches=1, start=2, delta_b=2, delta_f=0
    )
    noise = search.draw(jax.random.key(2), B)
    x, _, history = search.run(params, verifier.params, noise, COND)
    plain = search.generation.generate(params, {"x_init": noise["x_init"][0]}, COND)
    np.testing.assert_allclose(np.asarray(x), np.asarray(plain), rtol=1e-5, atol=1e-5)
    assert history.shape == (4, B)  # t = 2/8, then 4, 6, 8 steps


@pytest.mark.parametrize(
    "settings",
    [
        dict(algo="random", candidates=5),
        dict(algo="zero_order", candidates=3, rounds=2, radius=0.3),
        dict(algo="paths", candidates=2, branches=3, start=2, delta_b=4, delta_f=1),
    ],
)
def test_nfe_counts_equal_the_network_calls_made(toy, settings):
    """Run without jit, the network counting the rows it evaluates: per sample, the count
    is `nfe_counts`' (the Euler sampler: one call per step; a prediction: one call)."""
    search, params, verifier = _search(toy, **settings)
    graphdef = search.generation.graphdef
    calls = {"rows": 0}
    from flax import nnx

    merge = nnx.merge

    def counting_merge(g, p, *rest):
        net = merge(g, p, *rest)
        if g is not graphdef:
            return net

        def counted(x, t, **kw):
            # a callback runs once per element of any vmap around it: rows of every path
            add = lambda rows: calls.__setitem__("rows", calls["rows"] + rows.shape[0])
            jax.debug.callback(add, x)
            return net(x, t, **kw)

        return counted

    import core.generation as generation_module
    import core.search as search_module

    noise = search.draw(jax.random.key(3), 4)
    with jax.disable_jit(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation_module.nnx, "merge", counting_merge)
        mp.setattr(search_module.nnx, "merge", counting_merge)
        search.run(params, verifier.params, noise, COND[:4])
    assert calls["rows"] == 4 * search.nfe["generator"], (calls, search.nfe)
    assert search.nfe["verifier"] == 0  # the density is closed form


def test_a_nan_score_is_never_selected():
    def generate(noise, cond):
        return noise["x_init"]

    def verify(x, cond, noise):  # higher for larger x, NaN where x[:, 0] > 1
        s = x[:, 0]
        return jnp.where(s > 1.0, jnp.nan, s)

    candidates = {"x_init": jnp.stack([jnp.full((3, 2), v) for v in (0.0, 2.0, 0.5, 3.0)])}
    x, _, scores, _ = noise_search.random_search(generate, verify, candidates, None)
    np.testing.assert_array_equal(x, jnp.full((3, 2), 0.5))
    assert bool(jnp.all(scores == 0.5))


def test_budget_picks_the_counts_and_bad_requests_are_one_error(toy):
    search, _, _ = _search(toy, algo="random", candidates=1)
    settings = search_lib.with_budget(search.settings, 100, **search.costs)
    assert settings.candidates == 12  # 8 Euler steps per candidate, a closed-form verifier
    with pytest.raises(UserError, match="too small for one random candidate"):
        search_lib.with_budget(search.settings, 7, **search.costs)
    with pytest.raises(UserError, match="unknown search 'beam'"):
        _search(toy, algo="beam")
    experiment, generation, params, _ = toy
    with pytest.raises(UserError, match="unknown verifier 'oracle'"):
        build_verifier("oracle", VerifierContext(experiment, generation, params))
    with pytest.raises(UserError, match="set frozen.verifier.workdir"):
        build_verifier("likelihood", VerifierContext(experiment, generation, params))
    with pytest.raises(UserError, match="not a multiple of delta_b - delta_f"):
        _search(toy, algo="paths", start=2, delta_b=5, delta_f=1)


def test_search_cli_writes_samples_json_and_curve(tmp_path, python_env):
    workdir = str(tmp_path / "run")
    config = config_lib.load(QUICK)
    train(config, workdir)
    out = str(tmp_path / "s.npz")
    proc = run_python(
        ["-m", "scripts.search", "--workdir", workdir, "--verifier", "density", "--algo",
         "zero_order", "--candidates", "2", "--rounds", "2", "--num", "16", "--batch", "8",
         "--sampling-steps", "4", "--sampler", "euler", "--out", out],
        python_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(open(str(tmp_path / "s.json")).read())
    assert np.load(out)["arr_0"].shape == (16, 2)
    assert report["nfe_generator_per_sample"] == (1 + 2 * 2) * 4
    assert report["history"]["nfe_generator"] == [4, 12, 20]
    assert os.path.exists(report["curve"]) and report["sampler"] == "euler"
    # the same search on 8 devices (the batch split over them) gives the same samples
    sharded = str(tmp_path / "s8.npz")
    argv = ["-m", "scripts.search", "--workdir", workdir, "--verifier", "density", "--algo",
            "zero_order", "--candidates", "2", "--rounds", "2", "--num", "16", "--batch", "8",
            "--sampling-steps", "4", "--sampler", "euler", "--out", sharded]  # fmt: skip
    proc = run_python(argv, python_env, devices=8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(sharded)["arr_0"], np.load(out)["arr_0"], atol=1e-5)
    proc = run_python(
        ["-m", "scripts.search", "--workdir", workdir, "--verifier", "density", "--num", "4",
         "--budget-nfe", "3", "--sampling-steps", "4", "--out", out],
        python_env,
    )  # fmt: skip
    assert proc.returncode == 2 and "error: --budget-nfe 3 is too small" in proc.stderr


def test_likelihood_verifier_is_the_flows_bits_per_dim(toy):
    """The score is log p(x) / D of the frozen flow: `-(bpd - log2 s) log 2` of the
    bits/dim path (`losses.flow_nll.bits_per_dim`, noise 'none': s = 127.5)."""
    from flax import nnx

    import models
    from core.runs import FrozenNets
    from losses.flow_nll import LOG_SCALE, bits_per_dim
    from models.flow_density import flow_log_prob

    experiment, generation, params, _ = toy
    flow = models.build("realnvp", rngs=nnx.Rngs(0), in_channels=1, hidden=8,
                        num_couplings=2, num_classes=0)  # fmt: skip
    graphdef, flow_params = nnx.split(flow, nnx.Param)
    frozen = FrozenNets({"verifier": graphdef}, {"verifier": nnx.to_pure_dict(flow_params)})
    context = VerifierContext(experiment, generation, params, frozen)
    verifier = build_verifier("likelihood", context)
    x = jax.random.uniform(jax.random.key(4), (3, 4, 4, 1), minval=-1.0, maxval=1.0)
    score = verifier(x, None)
    bpd = bits_per_dim(flow_log_prob(flow, x), 16, noise="none")
    np.testing.assert_allclose(score, -(bpd * np.log(2.0) - LOG_SCALE["none"]), rtol=1e-5)


def test_score_with_scores_the_chosen_samples_by_other_verifiers(tmp_path):
    """`score_with`: after a search against the density, self_consistency scores the chosen
    samples with the noise they came from (recomputed here from the same draw), and the
    searched verifier's mean is that of its own scores of the samples."""
    from core import runs
    from scripts.search import _score_with

    workdir = str(tmp_path / "run")
    train(config_lib.load(QUICK), workdir)
    kw = dict(num=16, batch_size=16, seed=5, sampler="euler", num_steps=4)
    samples, labels, report = search_lib.search_run(
        workdir, search_lib.Settings(algo="random", candidates=1), "density",
        score_with=(("self_consistency", None),), **kw,
    )  # fmt: skip
    drawn = runs.sample_run(workdir, sampler="euler", num_steps=4)
    generation = Generation(drawn.experiment, drawn.graphdef, (2,))
    context = VerifierContext(drawn.experiment, generation, drawn.params)
    density = build_verifier("density", context)
    consistency = build_verifier("self_consistency", context)
    search = search_lib.Search(
        drawn.experiment, drawn.graphdef, (2,), density, search_lib.Settings(candidates=1)
    )
    noise = jax.tree.map(lambda a: a[0], search.draw(jax.random.fold_in(jax.random.key(5), 0), 16))
    cond = jnp.asarray(labels) if labels is not None else jnp.zeros((16,), jnp.int32)
    x = jnp.asarray(samples)
    assert report["score_with"] == ["self_consistency"]
    assert report["scores"]["density"] == pytest.approx(float(jnp.mean(density(x, cond))), rel=1e-5)
    expected = float(jnp.mean(consistency(x, cond, noise)))
    assert report["scores"]["self_consistency"] == pytest.approx(expected, rel=1e-4)
    assert report["score_nan"] == {"density": 0, "self_consistency": 0}
    with pytest.raises(UserError, match="names 'density' twice"):
        search_lib.search_run(
            workdir, search_lib.Settings(), "density", score_with=(("density", None),), **kw
        )
    with pytest.raises(UserError, match="paths search re-noises"):
        search_lib.search_run(
            workdir, search_lib.Settings(algo="paths", start=2, delta_b=1), "density",
            score_with=(("self_consistency", None),), **kw,
        )  # fmt: skip
    with pytest.raises(
        UserError, match=r"--score-with likelihood: .*here: --score-with likelihood=RUN"
    ):
        search_lib.search_run(
            workdir, search_lib.Settings(), "density", score_with=(("likelihood", None),), **kw
        )
    with pytest.raises(UserError, match="--score-with lpips: unknown verifier 'lpips'"):
        search_lib.search_run(
            workdir, search_lib.Settings(), "density", score_with=(("lpips", None),), **kw
        )
    assert _score_with("classifier=runs/c, inception", UserError) == (
        ("classifier", "runs/c"), ("inception", None),
    )  # fmt: skip
    with pytest.raises(UserError, match="names no run"):
        _score_with("classifier=", UserError)


def test_split_without_dataset_is_refused(tmp_path):
    from scripts import search as search_cli

    argv = ["search", "--workdir", str(tmp_path), "--verifier", "inception", "--split", "test",
            "--out", str(tmp_path / "s.npz")]  # fmt: skip
    with pytest.raises(UserError, match="--split is a split of --dataset"):
        search_cli.main(argv)


def test_scaling_table_reads_reports_and_their_evaluations(tmp_path, capsys):
    """`scripts.plot_search`: one random candidate is the `no search` baseline, a search its
    own series; evaluations beside a report fill its columns, missing ones stay empty."""
    from scripts import plot_search

    def report(name, algo, candidates, steps, nfe_g, nfe_v, score, **beside):
        r = {"search": {"algo": algo, "candidates": candidates}, "verifier": "classifier",
             "sampling_steps": steps, "nfe_generator_per_sample": nfe_g,
             "nfe_verifier_per_sample": nfe_v, "scores": {"classifier": score}}  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        for suffix, content in beside.items():
            (tmp_path / f"{name}_{suffix}.json").write_text(json.dumps(content))
        return str(tmp_path / f"{name}.json")

    paths = [
        report("p8", "random", 1, 8, 8, 1, -1.4, classify={"accuracy": 0.76, "mean_log_p": -1.4}),
        report("p16", "random", 1, 16, 16, 1, -1.5, fid={"fid": 30.0}),
        report(
            "r2",
            "random",
            2,
            8,
            16,
            2,
            -0.2,
            classify={"accuracy": 0.94, "mean_log_p": -0.2},
            mem={"pixel/memorized": 0.0},
        ),  # fmt: skip
    ]
    rows = search_lib.scaling_rows(paths)
    assert [r["series"] for r in rows] == ["no search", "no search", "random (classifier, 8 steps)"]
    assert [r["nfe_verifier"] for r in rows] == [0, 0, 2]  # the baseline's score is not spent
    assert rows[0]["accuracy"] == 0.76 and rows[0]["fid"] is None and rows[1]["fid"] == 30.0
    assert rows[2]["memorized"] == 0.0 and rows[2]["score/classifier"] == -0.2
    out = tmp_path / "s.png"
    argv = ["plot_search", "--reports", ",".join(paths), "--metrics", "accuracy,fid", "--out",
            str(out), "--table", str(tmp_path / "t.md")]  # fmt: skip
    plot_search.main(argv)
    assert out.stat().st_size > 0
    table = (tmp_path / "t.md").read_text().splitlines()
    assert table[2].startswith("| no search | 1 | 8 | 0 | -1.4 |") and len(table) == 5
    with pytest.raises(UserError, match="--metrics: no column fidd"):
        plot_search.main([*argv[:4], "fidd", *argv[5:]])
    with pytest.raises(UserError, match="not found"):
        search_lib.scaling_rows([str(tmp_path / "none.json")])
