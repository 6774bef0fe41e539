r"""Held-out NLL of trained runs, with the checkpoint chosen on the validation split.

  python -m scripts.nll_table --workdirs runs/earth_volcano,runs/earth_earthquake,\
runs/earth_flood,runs/earth_fire --out docs/earth_nll

For each run: the validation NLL of every kept checkpoint (EMA weights), the checkpoint
with the lowest one (early stopping, as the Riemannian FM paper selects its models), its
test NLL (also with a finer ODE solve, to show the integration error), the final
checkpoint's test NLL, the training time (from the logged steps/s) and a world map (or
scatter) of samples beside the test data. Runs of the same dataset (other split seeds,
`--config.data.options.seed=N`) are pooled into one row, mean ± sample std, as the papers
report theirs. Writes `<out>.json`, `<out>.md` (a Markdown table beside the published Earth
numbers, when the runs are Earth datasets) and `<out>_<run>.png`.
"""

import argparse
import functools
import json
import os

from scripts.common import (
    add_heldout_num_flag,
    add_nll_solver_flags,
    argument_parser,
    nll_solver_options,
    run,
)

# Test NLL (nats) published for the Earth datasets: Riemannian flow matching (Chen & Lipman
# 2023, arXiv 2302.03660, Table 2) and Riemannian score-based models (De Bortoli et al.
# 2022, as reported in that table).
PUBLISHED = {
    "Riemannian FM": {"volcano": -7.93, "earthquake": -0.28, "flood": 0.42, "fire": -1.86},
    "RSGM": {"volcano": -4.92, "earthquake": -0.19, "flood": 0.48, "fire": -1.33},
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("nll_table", __doc__)
    p.add_argument("--workdirs", required=True, help="comma list of run directories")
    p.add_argument("--out", required=True, help="output prefix: <out>.json, <out>.md")
    add_nll_solver_flags(p)
    p.add_argument("--val-split", default="val")
    p.add_argument("--test-split", default="test")
    p.add_argument("--num-plot", type=int, default=4096, help="samples on the map")
    p.add_argument(
        "--last", type=int, default=0,
        help="choose among the newest K kept checkpoints only (0: all); the likelihood of "
        "a rough field needs many ODE steps, and an early checkpoint is rarely the best",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    add_heldout_num_flag(p, default=0)  # all: the table is compared with published numbers
    args = p.parse_args(argv[1:])
    from core.errors import UserError

    if args.last < 0:
        raise UserError(f"--last must be >= 0, got {args.last}")
    args.solve = nll_solver_options(args)
    return args


def train_seconds(workdir: str) -> float | None:
    """Training time from `metrics.jsonl`: the logged steps/s over each logging interval
    (excludes start-up and checkpoint waits outside the logged intervals)."""
    from core.writer import read_metrics

    logged = read_metrics(workdir)
    if logged is None:
        return None
    # a resumed run rewrites its steps: the last row of a step counts
    rows = {r["step"]: r["steps_per_sec"] for r in logged if "steps_per_sec" in r}
    total, last = 0.0, 0
    for step in sorted(rows):
        total += (step - last) / rows[step]
        last = step
    return total


def evaluate_run(args, workdir: str) -> dict:
    from core import evaluation, runs, sampling, sharding
    from core.checkpoint import open_for_reading

    experiment, spec = runs.load_run(workdir)
    mesh = sharding.make_mesh()
    ckpt = open_for_reading(workdir)
    steps = ckpt.all_steps()
    ckpt.close()
    steps = steps[-args.last :] if args.last else steps

    @functools.lru_cache(maxsize=2)  # the newest two: weights of every checkpoint add up
    def network(step: int) -> evaluation.RunNetwork:
        graphdef, params, _ = runs.restore_network(workdir, experiment, mesh, step=step)
        return evaluation.RunNetwork(graphdef, params, experiment)

    @functools.cache  # the best checkpoint is often the last: computed once
    def nll(step: int, split: str, check: bool = False) -> dict:
        options = evaluation.Options(
            heldout_split=split, nll_solver=args.nll_solver, nll_tol=args.nll_tol,
            nll_steps=args.nll_steps, seed=args.seed, batch=4096, nll_check=check,
            heldout_num=args.heldout_num,
        )  # fmt: skip
        ev = evaluation.Evaluator(None, network=network(step), options=options)
        return ev.run(["nll"])

    val = {step: nll(step, args.val_split)["nll"] for step in steps}
    for step, value in val.items():
        print(f"{workdir} step {step}: {args.val_split} NLL {value:.4f}", flush=True)
    best = min(val, key=val.get)
    checked = nll(best, args.test_split, check=True)  # and the finer solve
    test, test_fine = checked["nll"], checked["nll_fine"]
    final = (checked if steps[-1] == best else nll(steps[-1], args.test_split))["nll"]
    name = os.path.basename(os.path.normpath(workdir))
    plot = f"{args.out}_{name}.png"
    best_network = network(best)
    x, _ = sampling.draw_samples(
        experiment, best_network.graphdef, best_network.params, spec, mesh,
        num=args.num_plot, batch_size=1024, seed=args.seed,
    )  # fmt: skip
    _plot(experiment, args.test_split, x, plot, f"{name}: step {best}, test NLL {test:.3f}")
    return {
        "run": workdir,
        "dataset": experiment.data.name,
        "split_seed": experiment.data.options.get("seed"),
        "model": {"name": experiment.network.name, **experiment.network.options},
        "batch_size": experiment.training.batch_size,
        "total_steps": experiment.training.total_steps,
        "val_nll": {str(k): v for k, v in val.items()},
        "best_step": best,
        "test_nll": test,
        "test_nll_fine": test_fine,  # the finer solve (metrics.likelihood.finer)
        "test_nll_fine_change": checked["nll_fine_change"],  # mean per-point |change|
        "nll_mean_steps": checked["nll_mean_steps"],
        "final_step": steps[-1],
        "final_test_nll": final,
        "train_seconds": train_seconds(workdir),
        "plot": plot,
    }


def _plot(experiment, split: str, x, path: str, title: str) -> None:
    from core import plots
    from metrics import geo

    source = experiment.data.source(split)
    ref = source.__getitems__(range(source.num_examples))["x"]
    if x.shape[1:] == (3,):
        geo.plot_world_samples(path, x, reference=ref, title=title)
    else:
        plots.save_scatter(x, ref, path, title=title)


def _stats(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for one value)."""
    import numpy as np

    v = np.asarray(values, np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def _mean_std(values: list[float], digits: int = 3) -> str:
    """`"-2.540"` for one value, `"-2.540 ± 0.120 (n=3)"` (sample std) for several."""
    mean, std = _stats(values)
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={len(values)})"


def summarize(results: list[dict]) -> list[dict]:
    """One row per dataset: runs of the same dataset (e.g. other split seeds, as the
    papers' mean ± std over runs) are pooled; single runs are passed through."""
    fine = "test_nll_fine"
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["dataset"], []).append(r)
    rows = []
    for dataset, runs in groups.items():
        secs = [r["train_seconds"] for r in runs if r["train_seconds"]]
        tests = [r["test_nll"] for r in runs]
        mean, std = _stats(tests)
        rows.append({
            "dataset": dataset,
            "runs": [r["run"] for r in runs],
            "split_seeds": [r.get("split_seed") for r in runs],
            "test_nll": _mean_std(tests),
            "test_nll_mean": mean,  # the numbers behind the text
            "test_nll_std": std,
            fine: _mean_std([r[fine] for r in runs]),
            "final_test_nll": _mean_std([r["final_test_nll"] for r in runs]),
            "steps": " ; ".join(f"{r['best_step']} / {r['final_step']}" for r in runs),
            "train_minutes": sum(secs) / len(secs) / 60 if secs else None,
        })  # fmt: skip
    return rows


def table(results: list[dict], solve: dict) -> str:
    from metrics.likelihood import describe, finer

    lines = [
        f"| dataset | ours: test NLL (best val ckpt; {describe(solve)}) | "
        f"finer solve ({describe(finer(solve))}) | final ckpt"
        " | " + " | ".join(PUBLISHED) + " | best / total steps | train time (each) |",
        "|---" * (6 + len(PUBLISHED)) + "|",
    ]
    fine = "test_nll_fine"
    for r in summarize(results):
        pub = [f"{PUBLISHED[k].get(r['dataset'], float('nan')):.2f}" for k in PUBLISHED]
        minutes = r["train_minutes"]
        lines.append(
            f"| {r['dataset']} | {r['test_nll']} | {r[fine]} | {r['final_test_nll']} | "
            + " | ".join(pub)
            + f" | {r['steps']} | "
            + (f"{minutes:.1f} min |" if minutes else "? |")
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    args = parse(argv)
    import jax

    results = [evaluate_run(args, w) for w in args.workdirs.split(",") if w]
    info = {
        "nll_solver": args.solve,
        "splits": [args.val_split, args.test_split],
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "published": PUBLISHED,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        summary = summarize(results)
        json.dump({"settings": info, "summary": summary, "results": results}, f, indent=2)
    text = table(results, args.solve)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    run(main)
