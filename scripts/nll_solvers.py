r"""How far the ODE likelihood of a run is from converged, solver by solver.

  python -m scripts.nll_solvers --workdir runs/earth_volcano --split test \
      --solvers rk4:400,rk4:800,rk4:1600,rk4:3200,dopri5:1e-4,dopri5:1e-5,dopri5:1e-6 \
      --out docs/nll_solvers_volcano.json

Solves the held-out split's log-likelihood (`scripts.evaluate --metrics nll`'s points and
network) with each solver, `rk4:<steps>` or `dopri5|tsit5:<rtol = atol>`, and prints the
mean NLL, the steps per point, the seconds (the first solve includes compilation), and the
per-point |Δ log p| (median, mean, max) against the reference: `--reference`, default the
last solver listed, which should be the finest.
"""

import json
import time

from scripts.common import add_heldout_num_flag, argument_parser, run


def parse(argv: list[str]):
    p = argument_parser("nll_solvers", __doc__)
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint (default: newest)")
    p.add_argument("--split", default="test", help="held-out split")
    p.add_argument("--solvers", required=True, help="comma list: rk4:STEPS, dopri5:TOL, ...")
    p.add_argument("--reference", default=None, help="one of --solvers (default: the last)")
    p.add_argument("--batch", type=int, default=4096, help="points per jitted solve")
    p.add_argument("--seed", type=int, default=0)
    add_heldout_num_flag(p)
    p.add_argument("--out", default=None, help="output JSON")
    args = p.parse_args(argv[1:])
    args.specs = [s for s in args.solvers.split(",") if s]
    args.reference = args.reference or (args.specs[-1] if args.specs else None)
    args.solves = {spec: solver_spec(spec) for spec in args.specs}
    if args.reference not in args.solves:
        from core.errors import UserError

        raise UserError(f"--reference {args.reference!r} is not one of --solvers {args.specs}")
    return args


def solver_spec(spec: str) -> dict:
    """`"rk4:400"` / `"dopri5:1e-5"` -> `log_likelihood`'s solver keywords."""
    from core.errors import UserError
    from metrics.likelihood import solver_options

    name, _, value = spec.partition(":")
    try:
        number = int(value) if name == "rk4" else float(value)
    except ValueError:
        number = None
    if number is None or number <= 0:
        raise UserError(f"solver {spec!r}: expected rk4:<steps> or dopri5|tsit5:<tolerance> > 0")
    return solver_options(name, num_steps=number, tol=number)


def main(argv: list[str]) -> None:
    args = parse(argv)
    import numpy as np

    from core import evaluation, runs, sharding

    experiment, _ = runs.load_run(args.workdir)
    mesh = sharding.make_mesh()
    graphdef, params, step = runs.restore_network(args.workdir, experiment, mesh, step=args.step)
    options = evaluation.Options(
        heldout_split=args.split, batch=args.batch, seed=args.seed, heldout_num=args.heldout_num
    )
    network = evaluation.RunNetwork(graphdef, params, experiment)
    ev = evaluation.Evaluator(None, network=network, options=options)
    log_lik, info = evaluation.heldout_log_likelihood(ev)
    values, rows = {}, []
    for spec, solve in args.solves.items():
        start = time.perf_counter()
        lp, stats = log_lik(**solve)
        values[spec] = lp
        rows.append({"solver": spec, "nll": -float(np.mean(lp, dtype=np.float64)),
                     "mean_steps": float(np.mean(stats["steps"])),
                     "max_steps": int(np.max(stats["steps"])),
                     "seconds": time.perf_counter() - start})  # fmt: skip
        print(f"{spec:>14}: NLL {rows[-1]['nll']:.4f}, {rows[-1]['mean_steps']:.0f} steps per "
              f"point, {rows[-1]['seconds']:.1f} s", flush=True)  # fmt: skip
    ref = values[args.reference]
    for row in rows:
        diff = np.abs(values[row["solver"]] - ref)
        row.update(median_abs_change=float(np.median(diff)), mean_abs_change=float(diff.mean()),
                   max_abs_change=float(diff.max()))  # fmt: skip
    lines = [
        f"| solver | NLL | steps per point (mean / max) | abs. change of log p against "
        f"{args.reference} (median / mean / max) | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['solver']} | {r['nll']:.4f} | {r['mean_steps']:.0f} / {r['max_steps']} | "
            f"{r['median_abs_change']:.4f} / {r['mean_abs_change']:.4f} / "
            f"{r['max_abs_change']:.4f} | {r['seconds']:.1f} |"
        )
    print("\n".join(lines))
    if args.out:
        import jax

        result = {"workdir": args.workdir, "step": int(step), "split": args.split,
                  "count": info["count"], "divergence": info["divergence"],
                  "reference": args.reference, "rows": rows, "jax": jax.__version__,
                  "devices": [str(d) for d in jax.devices()]}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    run(main)
