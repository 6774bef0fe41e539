"""Noise search over a run's generation (`samplers.noise_search`), in sharded batches, with
its network evaluations counted: the library behind `scripts.search`.

`Settings` name the algorithm and its counts (or a budget of NFEs per sample that picks
them, `with_budget`); `Search(experiment, graphdef, example_shape, verifier, settings)`
draws every noise a search consumes from one key (`draw`) and runs the jitted search
(`run`). `nfe` counts the generator's and the verifier's evaluations per sample exactly, by
the formulas of `nfe_counts`; the search's `history` says how the best score grew with them.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import samplers
from core.errors import UserError
from core.experiment import Experiment, sample_labels
from core.generation import Generation
from metrics.verifiers import Verifier
from samplers import noise_search

ALGORITHMS = ("random", "zero_order", "paths")


@dataclasses.dataclass(frozen=True)
class Settings:
    """`candidates` N (random: noises per sample; zero_order: neighbours per round; paths:
    paths kept), `rounds` R and `radius` λ of zero_order, `branches` M, `start` (steps from
    noise before the first branching), `delta_b` and `delta_f` (steps forward and back per
    branching) of paths."""

    algo: str = "random"
    candidates: int = 4
    rounds: int = 2
    radius: float = 0.2
    branches: int = 2
    start: int | None = None  # default: half the sampling steps
    delta_b: int | None = None  # default: a quarter of the sampling steps
    delta_f: int = 0

    def check(self, num_steps: int) -> "Settings":
        if self.algo not in ALGORITHMS:
            raise UserError(f"unknown search {self.algo!r}; known: {', '.join(ALGORITHMS)}")
        if self.candidates < 1 or self.rounds < 0 or self.branches < 1:
            raise UserError("--candidates and --branches must be >= 1, --rounds >= 0")
        if not 0.0 <= self.radius <= 1.0:
            raise UserError(f"--radius must be in [0, 1], got {self.radius}")
        if self.algo != "paths":
            return self
        start = num_steps // 2 if self.start is None else self.start
        delta_b = max(num_steps // 4, 1) if self.delta_b is None else self.delta_b
        advance = delta_b - self.delta_f
        if not (0 < start < num_steps and advance > 0 and 0 <= self.delta_f <= start):
            raise UserError(
                f"paths: need 0 < start < the {num_steps} sampling steps, 0 <= delta_f <= "
                f"start and delta_b > delta_f; got start={start}, delta_b={delta_b}, "
                f"delta_f={self.delta_f}"
            )
        if (num_steps - start) % advance:
            raise UserError(
                f"paths: the {num_steps - start} steps after start={start} are not a multiple "
                f"of delta_b - delta_f = {advance}"
            )
        return dataclasses.replace(self, start=start, delta_b=delta_b)

    def times(self, num_steps: int) -> tuple[float, ...]:
        """The round end times of paths: `start` then every `delta_b - delta_f` steps."""
        advance = self.delta_b - self.delta_f
        return tuple(s / num_steps for s in range(self.start, num_steps + 1, advance))


def nfe_counts(settings: Settings, *, per_sample: int, per_step: int, per_eval: int,
               num_steps: int, verifier: int) -> dict:  # fmt: skip
    """Network evaluations per searched sample: `generator` (`per_sample` to draw one sample,
    `per_step` per step of the sampler, `per_eval` for one call of the (guided) network, as a
    one-step prediction of the data) and `verifier` (`verifier` per score), and the
    cumulative counts after each unit of the history (`history_generator`,
    `history_verifier`):

    - random: N (per_sample + verifier);
    - zero_order: (1 + R N) (per_sample + verifier);
    - paths: N (start per_step + per_eval) for the first stretch and its predictions, then per
      round N M delta_b per_step, plus N M per_eval predictions but in the last round; the
      verifier N + (rounds) N M."""
    s = settings
    if s.algo == "random":
        units = [(n + 1) for n in range(s.candidates)]
        gen = [u * per_sample for u in units]
        ver = [u * verifier for u in units]
    elif s.algo == "zero_order":
        units = [1 + r * s.candidates for r in range(s.rounds + 1)]
        gen = [u * per_sample for u in units]
        ver = [u * verifier for u in units]
    else:
        times = s.times(num_steps)
        n, m = s.candidates, s.branches
        gen, ver = [n * (s.start * per_step + per_eval)], [n * verifier]
        for r in range(1, len(times)):
            last = r == len(times) - 1
            gen.append(gen[-1] + n * m * (s.delta_b * per_step + (0 if last else per_eval)))
            ver.append(ver[-1] + n * m * verifier)
    return {"generator": gen[-1], "verifier": ver[-1], "history_generator": gen,
            "history_verifier": ver}  # fmt: skip


def with_budget(settings: Settings, budget: int, **costs) -> Settings:
    """The largest count (random: candidates; zero_order: rounds; paths: candidates) whose
    search costs at most `budget` NFEs per sample (generator and verifier together)."""
    total = lambda s: (lambda c: c["generator"] + c["verifier"])(nfe_counts(s, **costs))
    field = "rounds" if settings.algo == "zero_order" else "candidates"
    low = 0 if field == "rounds" else 1
    if total(dataclasses.replace(settings, **{field: low})) > budget:
        raise UserError(
            f"--budget-nfe {budget} is too small for one {settings.algo} candidate "
            f"({total(dataclasses.replace(settings, **{field: low}))} NFEs per sample)"
        )
    count = low
    while total(dataclasses.replace(settings, **{field: count + 1})) <= budget:
        count += 1
    return dataclasses.replace(settings, **{field: count})


class Search:
    """A search over `experiment`'s generation scored by `verifier`: `draw(key, n)` -> the
    noise of every candidate; `run(params, noise, cond)` -> `(samples, scores, history)`,
    jitted (the verifier's parameters are an argument)."""

    def __init__(self, experiment: Experiment, graphdef, example_shape, verifier: Verifier,
                 settings: Settings, generation: Generation | None = None):  # fmt: skip
        self.experiment, self.verifier = experiment, verifier
        s = experiment.sampling
        self.settings = settings.check(s.num_steps)
        self.generation = generation or Generation(experiment, graphdef, example_shape)
        self.shape = tuple(example_shape)
        guided = experiment.conditioning.conditional and s.cfg_scale != 1.0
        factor = 2 if guided and experiment.method.guidance == "wrap" else 1
        per_step = samplers.EVALS_PER_STEP.get(s.sampler, 1) * factor
        self.costs = dict(per_sample=samplers.nfe(s.sampler, s.num_steps) * factor,
                          per_step=per_step, per_eval=factor, num_steps=s.num_steps,
                          verifier=verifier.nfe)  # fmt: skip
        if self.settings.algo == "paths":
            if s.sampler not in samplers.RESUMABLE or s.sampler == "euler_maruyama":
                raise UserError(
                    f"paths search branches an ODE path: sample with one of "
                    f"{', '.join(x for x in samplers.RESUMABLE if x != 'euler_maruyama')} "
                    f"(--sampler), not {s.sampler!r}"
                )
            if s.guidance.carried and s.guidance.guides:
                raise UserError(
                    "paths search re-starts the integration mid-path, which the dynamic "
                    "guidance switch cannot follow: use another --cfg-schedule, or the "
                    "random or zero_order search"
                )
            if verifier.name == "self_consistency":
                raise UserError(
                    "self_consistency scores a sample against its initial noise, which "
                    "paths search re-noises: use random or zero_order"
                )
        self.nfe = nfe_counts(self.settings, **self.costs)

    def draw(self, key: jax.Array, n: int):
        """Every noise the search consumes, from `key`."""
        st, gen = self.settings, self.generation
        keys = jax.random.split(key, 3)
        if st.algo == "random":
            return jax.vmap(lambda k: gen.draw_noise(k, n))(
                jax.random.split(keys[0], st.candidates)
            )
        pivot = gen.draw_noise(keys[0], n)
        if st.algo == "zero_order":
            shapes = jax.tree.map(lambda a: (st.rounds, st.candidates, *a.shape), pivot)
            leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
            subkeys = jax.random.split(keys[1], len(leaves))
            perturb = [jax.random.normal(k, sh) for k, sh in zip(subkeys, leaves)]
            return {"pivot": pivot, "perturbations": jax.tree.unflatten(tree, perturb)}
        x_init = jax.vmap(lambda k: gen.draw_noise(k, n)["x_init"])(
            jax.random.split(keys[0], st.candidates)
        )
        rounds = len(st.times(self.experiment.sampling.num_steps)) - 1
        shape = (rounds, st.candidates, st.branches, n, *self.shape)
        return {"x_init": x_init, "branch_noise": jax.random.normal(keys[2], shape)}

    def run(self, params, verifier_params, noise, cond, frozen=None):
        """`(samples, scores, history)`; `frozen`: the parameters of the run's own frozen
        networks (a GIVT's VAE)."""
        x, _, scores, history = self.run_with_noise(params, verifier_params, noise, cond, frozen)
        return x, scores, history

    def run_with_noise(self, params, verifier_params, noise, cond, frozen=None):
        """`run`, with the noise each chosen sample came from: `(samples, noise, scores,
        history)`; the noise is `{}` for paths search, whose samples were re-noised along
        the way (no one noise gives them)."""
        st, gen = self.settings, self.generation
        generate = lambda z, c: gen.generate(params, z, c, frozen)
        verify = lambda x, c, z: self.verifier.fn(verifier_params, x, c, z)
        sphere = self.experiment.method.manifold == "sphere"
        if st.algo == "random":
            return noise_search.random_search(generate, verify, noise, cond)
        if st.algo == "zero_order":
            return noise_search.zero_order_search(
                generate, verify, noise["pivot"], noise["perturbations"], cond,
                radius=st.radius, sphere=sphere,
            )  # fmt: skip
        k = self.experiment.sampling.num_steps

        def integrate(x, c, t0, t1):
            steps = int(round((t1 - t0) * k))
            return gen.integrate(params, x, c, t_start=t0, t_end=t1, num_steps=steps)

        x, scores, history = noise_search.path_search(
            integrate, _predictor(self.experiment, gen.graphdef, params), verify,
            noise["x_init"], noise["branch_noise"], cond,
            times=st.times(k), delta_f=st.delta_f / k,
        )  # fmt: skip
        return x, {}, scores, history


def _predictor(experiment: Experiment, graphdef, params):
    """`predict(x, cond, t) -> x1_hat`: the one-step prediction of the data from the
    network's output (`models.views`), guided as the sampler is."""
    from models.views import to_pair
    from samplers.guidance import guide

    method, s = experiment.method, experiment.sampling
    conditioning = experiment.conditioning

    def predict(x, cond, t):
        net = nnx.merge(graphdef, params)
        if conditioning.conditional and s.guidance.guides and method.guidance == "wrap":
            net = guide(net, s.guidance, conditioning.null)  # a time schedule: w(t)
        tb = jnp.full((x.shape[0],), t, x.dtype)
        kw = {"dt": jnp.zeros_like(tb)} if method.step_input else {}
        v = net(x, tb, cond=cond if conditioning.conditional else None, **kw)
        return to_pair(method.output, v, x, tb)[0]

    return predict


def summarize(history: np.ndarray, nfe: dict) -> dict:
    """Per unit of the history: the best score's mean over samples, and the NFEs spent."""
    history = np.asarray(history, np.float64)
    finite = np.where(np.isfinite(history), history, np.nan)
    return {
        "best_mean": [float(v) for v in np.nanmean(finite, axis=1)],
        "best_max": [float(v) for v in np.nanmax(finite, axis=1)],
        "nfe_generator": list(nfe["history_generator"]),
        "nfe_verifier": list(nfe["history_verifier"]),
    }


def search_run(
    workdir: str,
    settings: Settings,
    verifier_name: str,
    *,
    num: int,
    batch_size: int = 256,
    seed: int = 0,
    verifier_run: str | None = None,
    verifier_options: dict | None = None,
    budget_nfe: int | None = None,
    dataset=None,
    label: int | None = None,
    score_with: tuple[tuple[str, str | None], ...] = (),
    **restore,
):
    """Search `num` samples of the run in `workdir` against the verifier `verifier_name` (a
    frozen network of another run: `verifier_run`; a reference: `dataset`), in sharded
    batches -> `(samples, labels, report)`; `report` holds the settings, the NFEs per sample
    and the history of the best score against them. `restore`: `core.runs.sample_run`'s
    weights and sampling keywords (step, ema, sampler, num_steps, cfg_scale,
    sample_options; its EMA weights and its own sampling by default).

    `score_with`: other verifiers `(name, run or None)` that score the chosen samples after
    the search (with the noise each came from, for self_consistency), so that searching
    against one verifier is measured by the others (verifier hacking); `report["scores"]`
    holds the mean score of the searched verifier and of each of these, and
    `report["score_nan"]` how many samples each scored NaN (left out of the mean). Their
    evaluations are not part of the search's NFEs."""
    from core import runs, sharding
    from core.experiment import Frozen
    from core.sampling import to_host
    from metrics.verifiers import VERIFIERS, VerifierContext, build_verifier

    drawn = runs.sample_run(workdir, **restore)
    experiment, spec = drawn.experiment, drawn.spec
    mesh = sharding.make_mesh()
    frozen = runs.NO_FROZEN
    if verifier_run is not None:
        frozen = runs.restore_frozen(
            experiment.but(frozen=(Frozen("verifier", verifier_run),)), mesh
        )
    if dataset is None:  # the run's own data (the inception verifier's reference)
        from core.reference import run_dataset

        dataset = run_dataset(experiment.data)
    own = runs.restore_frozen(experiment, mesh)  # the run's frozen networks (a GIVT's VAE)
    generation = Generation(experiment, drawn.graphdef, spec["example_shape"], own.graphdefs)
    context = VerifierContext(
        experiment, generation, drawn.params, frozen, dataset, dict(verifier_options or {})
    )
    verifier = build_verifier(verifier_name, context)
    others = {}
    for name, run_dir in score_with:
        if name in others or name == verifier_name:
            raise UserError(f"--score-with names {name!r} twice (the searched verifier counts)")
        if name == "self_consistency" and settings.algo == "paths":
            raise UserError(
                "self_consistency scores a sample against its initial noise, which paths "
                "search re-noises: leave it out of --score-with"
            )
        their = runs.NO_FROZEN
        if run_dir is not None:
            their = runs.restore_frozen(experiment.but(frozen=(Frozen("verifier", run_dir),)), mesh)
        try:
            other = build_verifier(name, dataclasses.replace(context, frozen=their, options={}))
        except UserError as e:  # a run it needs is named NAME=RUN here, not --verifier-run
            hint = f" (here: --score-with {name}=RUN)" if name in VERIFIERS and not run_dir else ""
            raise UserError(f"--score-with {name}: {e}{hint}") from None
        others[name] = (jax.jit(other.fn), other.params)
    shape = spec["example_shape"]
    search = Search(experiment, drawn.graphdef, shape, verifier, settings, generation)
    if budget_nfe is not None:
        settings = with_budget(search.settings, budget_nfe, **search.costs)
        search = Search(experiment, drawn.graphdef, shape, verifier, settings, generation)
    batch = sharding.sample_batch(mesh, batch_size, num)
    data = sharding.batch_sharding(mesh)
    run = jax.jit(
        search.run_with_noise, out_shardings=(data, data, data, sharding.replicated(mesh))
    )
    classes = spec["num_classes"] if experiment.conditioning.labels else 0
    key = jax.random.key(seed)
    xs, ys, histories = [], [], []
    scores = {name: [] for name in (verifier_name, *others)}
    for i in range(math.ceil(num / batch)):
        labels = (
            sample_labels(batch, classes, offset=i * batch) if label is None
            else jnp.full((batch,), label, jnp.int32)
        )  # fmt: skip
        labels = jax.device_put(labels, data)
        noise = search.draw(jax.random.fold_in(key, i), batch)
        x, chosen, best, history = run(drawn.params, verifier.params, noise, labels, own.params)
        scores[verifier_name].append(to_host(best))
        for name, (fn, params) in others.items():
            scores[name].append(to_host(fn(params, x, labels, chosen)))
        xs.append(to_host(x))
        ys.append(to_host(labels))
        histories.append(np.asarray(jax.device_get(history)))
    samples = np.concatenate(xs)[:num]
    labels = np.concatenate(ys)[:num] if classes else None
    history = np.concatenate(histories, axis=1)[:, :num]
    scores = {k: np.concatenate(v)[:num].astype(np.float64) for k, v in scores.items()}
    scores = {k: np.where(np.isneginf(v), np.nan, v) for k, v in scores.items()}  # NaN: -inf
    report = {
        "workdir": workdir, "step": drawn.step,
        "weights": "ema" if restore.get("ema", True) else "raw",
        **experiment.sampling.record(), "seed": seed, "verifier": verifier_name,
        "verifier_run": verifier_run, "search": dataclasses.asdict(search.settings),
        "nfe_generator_per_sample": search.nfe["generator"],
        "nfe_verifier_per_sample": search.nfe["verifier"],
        "num_samples": int(len(samples)), "history": summarize(history, search.nfe),
        "score_with": [name for name, _ in score_with],
        "scores": {k: float(np.nanmean(v)) if np.isfinite(v).any() else None
                   for k, v in scores.items()},
        "score_nan": {k: int(np.isnan(v).sum()) for k, v in scores.items()},
    }  # fmt: skip
    return samples, labels, report


def plot_curve(report: dict, path: str) -> str:
    """The best score's mean over samples against the NFEs per sample (generator and
    verifier together), one point per unit of the search; returns `path`."""
    from matplotlib.figure import Figure

    h = report["history"]
    nfe = [g + v for g, v in zip(h["nfe_generator"], h["nfe_verifier"])]
    fig = Figure(figsize=(5, 3.5), dpi=120)
    ax = fig.subplots()
    ax.plot(nfe, h["best_mean"], marker="o")
    ax.set_xlabel("NFEs per sample (generator + verifier)")
    ax.set_ylabel(f"best {report['verifier']} score (mean)")
    ax.set_title(f"{report['search']['algo']} search")
    fig.tight_layout()
    fig.savefig(path)
    return path


# what `scaling_rows` reads beside a search's `<stem>.json`: file suffix -> {column: key}
BESIDE = {
    "_classify.json": {"accuracy": "accuracy", "log_p": "mean_log_p"},
    "_fid.json": {"fid": "fid"},
    "_mem.json": {"memorized": "pixel/memorized"},
}


def scaling_rows(paths: list[str]) -> list[dict]:
    """One row per search report (`<stem>.json` of `scripts.search`): its series (`no search`
    for one candidate of random search: the baseline that spends NFEs on sampling steps;
    else the algorithm, verifier and sampling steps), the NFEs per sample of the generator
    and the verifier, the mean score of each verifier that scored it (`score/<name>`), and
    the evaluations found beside it (`BESIDE`: a classifier's accuracy and log p, FID, the
    memorized fraction), None where a file is missing."""
    import json
    import os

    rows = []
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"search report {path!r} not found")
        with open(path) as f:
            r = json.load(f)
        search, stem = r["search"], os.path.splitext(path)[0]
        plain = search["algo"] == "random" and search["candidates"] == 1
        row = {
            "report": path,
            "series": "no search" if plain else
            f"{search['algo']} ({r['verifier']}, {r['sampling_steps']} steps)",
            "search": search, "sampling_steps": r["sampling_steps"],
            "nfe_generator": r["nfe_generator_per_sample"],
            "nfe_verifier": 0 if plain else r["nfe_verifier_per_sample"],
            "verifier": None if plain else r["verifier"],
            **{f"score/{k}": v for k, v in (r.get("scores") or {}).items()},
        }  # fmt: skip
        for suffix, columns in BESIDE.items():
            found = {}
            if os.path.isfile(stem + suffix):
                with open(stem + suffix) as f:
                    found = json.load(f)
            row.update({col: found.get(key) for col, key in columns.items()})
        rows.append(row)
    return rows


def scaling_markdown(rows: list[dict]) -> str:
    """`rows` (`scaling_rows`) as a Markdown table: series, counts, NFEs, then every verifier
    score and evaluation any row has (empty where a row lacks it)."""
    found = {k for r in rows for k in r if r[k] is not None}
    columns = sorted(k for k in found if k.startswith("score/")) + [
        c for col in BESIDE.values() for c in col if c in found
    ]
    head = ["series", "candidates", "generator NFEs", "verifier NFEs", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["series"], str(r["search"]["candidates"]), str(r["nfe_generator"]),
                 str(r["nfe_verifier"])]  # fmt: skip
        for c in columns:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_scaling(rows: list[dict], path: str, metrics: tuple[str, ...]) -> str:
    """Each metric of `rows` (`scaling_rows`) against the generator's NFEs per sample, one
    panel per metric and one line per series (points in NFE order); returns `path`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(metrics), 4), dpi=110)
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    series = list(dict.fromkeys(r["series"] for r in rows))
    for ax, metric in zip(axes, metrics):
        for i, name in enumerate(series):
            pts = sorted(
                (r["nfe_generator"], r[metric]) for r in rows
                if r["series"] == name and r.get(metric) is not None
            )  # fmt: skip
            if pts:
                style = dict(color="k", lw=2) if name == "no search" else dict(color=f"C{i}")
                ax.plot(*zip(*pts), marker="o", label=name, **style)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="generator NFEs per sample", ylabel=metric)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path
