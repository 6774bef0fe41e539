r"""A metric against the number of sampling steps, for one or several runs.

  # shortcut model vs flow matching, FID at 1, 2, 4, 8 and 128 steps
  python -m scripts.steps_sweep --workdirs runs/mnist_shortcut,runs/mnist_fm \
      --steps 1,2,4,8,128 --metrics fid --num 10000 --out docs/fid_vs_steps

Each (run, k) is what `scripts.evaluate --workdir RUN --sampling-steps k` computes, through
the same library call (`core.evaluation.report.evaluate_run`; the run's own sampler: k
shortcut steps of size 1/k for a shortcut model, k ODE steps otherwise; `--sampler`
overrides); its JSON goes to `<out>_<run>_k<k>.json`. Writes `<out>.json` (run -> k ->
numbers) and `<out>.png` (`--plot-key`, default the first metric, against k, one line per
run). `--grid N` (image runs) also writes `<out>_grids.png`: the first N of the very samples
each number was computed on, one row per run and one column per k (same seed, so the same
noise in every cell). Other flags (`--num`, `--cfg`, `--dataset`, `--step`, ...) are
`scripts.evaluate`'s.

`--reuse` reads the cells whose JSON is already there instead of evaluating them again (a
sweep cut short goes on where it stopped; one run in pieces is gathered into one
`<out>.json`): a cell made with another `--num`, `--step`, `--raw`, `--seed`, run or step
count, or without one of the metrics, is an error that names its file.
"""

import argparse
import json
import os
import sys

from scripts.common import argument_parser, run


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argument_parser("steps_sweep", __doc__, passes_on=True)
    p.add_argument("--workdirs", required=True, help="comma list of run directories")
    p.add_argument("--steps", required=True, help="comma list of step counts")
    p.add_argument("--metrics", default="fid", help="comma list (scripts.evaluate's)")
    p.add_argument("--out", required=True, help="output prefix: <out>.json, <out>.png")
    p.add_argument("--plot-key", default=None, help="number to plot (default: the metric)")
    p.add_argument("--log-y", action="store_true", help="plot the number on a log scale")
    p.add_argument("--grid", type=int, default=0, help="samples per cell of <out>_grids.png")
    p.add_argument("--reuse", action="store_true", help="read the cells already written")
    return p.parse_known_args(argv[1:])


def plot(results: dict, metric: str, path: str, *, log_y: bool = False):
    """`metric` against k, a line per run, to `path`; the Figure, or None (with a warning
    naming the numbers there are) when no cell has that number."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    lines = 0
    for name, by_k in results.items():
        ks = sorted(int(k) for k in by_k)
        values = [by_k[str(k)].get(metric) for k in ks]
        if all(isinstance(v, int | float) for v in values):
            ax.plot(ks, values, "o-", label=name)
            lines += 1
    if not lines:
        numbers = sorted(
            {key for by_k in results.values() for cell in by_k.values() for key, v in cell.items()
             if isinstance(v, int | float) and not isinstance(v, bool)}
        )  # fmt: skip
        print(f"warning: no cell has a number {metric!r} to plot; --plot-key one of: "
              f"{', '.join(numbers)}", file=sys.stderr)  # fmt: skip
        return None
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel="sampling steps k", ylabel=metric, title=f"{metric} against sampling steps")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def reused_cell(path: str, request, workdir: str, k: int, metrics: list[str], UserError) -> dict:
    """The JSON of a cell written before, checked against what this sweep asks of it
    (`request`: `scripts.evaluate`'s parsed flags for the cell)."""
    with open(path) as f:
        cell = json.load(f)
    want = {
        "workdir": os.path.normpath(workdir),
        "num_samples": request.num,
        "weights": "raw" if request.raw else "ema",
    }
    if request.step is not None:
        want["step"] = request.step
    if "sampling_steps" in cell:  # written since evaluations record them; else the file name
        want.update(sampling_steps=k, seed=request.seed)
    cell["workdir"] = os.path.normpath(cell.get("workdir") or ".")
    for key, value in want.items():
        if cell.get(key) != value:
            raise UserError(
                f"{path}: made with {key}={cell.get(key)!r}, this sweep asks {value!r}; "
                "move it away or drop --reuse"
            )
    missing = [m for m in metrics if m not in cell.get("metrics", [])]
    if missing:
        raise UserError(f"{path} has no {', '.join(missing)}; move it away or drop --reuse")
    return cell


def plot_grids(grids: dict, path: str) -> None:
    """`grids[run][k]`: uint8 images `[N, H, W, C]` -> one figure, a row per run, a column
    per k."""
    from matplotlib.figure import Figure

    from core.plots import image_grid

    names = list(grids)
    ks = sorted({k for by_k in grids.values() for k in by_k})
    fig = Figure(figsize=(2.2 * len(ks), 2.4 * len(names)), dpi=120)
    axes = fig.subplots(len(names), len(ks), squeeze=False)
    for row, name in zip(axes, names):
        for ax, k in zip(row, ks):
            ax.set_xticks([]), ax.set_yticks([])
            if k in grids[name]:
                ax.imshow(image_grid(grids[name][k]))
            ax.set_title(f"k = {k}", fontsize=9)
        row[0].set_ylabel(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def _cell_request(workdir: str, k: int, metrics: str, rest: list[str]):
    """`scripts.evaluate`'s flags for one cell, parsed and checked as that command would."""
    from core.errors import UserError
    from scripts import evaluate

    argv = ["evaluate", "--workdir", workdir, "--sampling-steps", str(k), "--metrics", metrics,
            *rest]  # fmt: skip
    args = evaluate.parse(argv)
    evaluate._check(args, UserError)
    return args


def evaluate_cell(args) -> tuple[dict, object]:
    """One cell: what `scripts.evaluate --workdir` computes with these flags ->
    (its JSON, the drawn samples)."""
    import time

    from scripts import evaluate

    start = time.perf_counter()
    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    result, drawn = evaluate.evaluate_workdir(args, names, evaluate.dataset(args))
    result["wall_seconds"] = time.perf_counter() - start
    return result, drawn


def main(argv: list[str]) -> None:
    args, rest = parse(argv)
    import jax

    from core.errors import UserError
    from core.plots import to_uint8
    from scripts.common import write_json

    try:
        ks = [int(k) for k in args.steps.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--steps must be a comma list of integers, got {args.steps!r}") from None
    if not ks or min(ks) < 1:
        raise UserError(f"--steps needs positive step counts, got {args.steps!r}")
    if args.grid < 0:
        raise UserError(f"--grid must be >= 0 (samples per cell), got {args.grid}")
    if args.grid and "--save-samples" in rest:
        raise UserError("--grid saves the samples itself: drop --save-samples")
    if args.grid and args.reuse:
        raise UserError("--grid needs every cell's samples: drop --reuse (or --grid)")
    workdirs = [w for w in args.workdirs.split(",") if w]
    metrics = [m for m in args.metrics.split(",") if m]
    results, grids = {}, {}
    for workdir in workdirs:
        name = os.path.basename(os.path.normpath(workdir))
        results[name], grids[name] = {}, {}
        for k in ks:
            path = f"{args.out}_{name}_k{k}.json"
            request = _cell_request(workdir, k, args.metrics, [*rest, "--out", path])
            if args.reuse and os.path.exists(path):
                results[name][str(k)] = reused_cell(path, request, workdir, k, metrics, UserError)
                print(f"{path}: reused")
                continue
            cell, drawn = evaluate_cell(request)
            if jax.process_index() == 0:
                write_json(cell, path)
            if request.save_samples and jax.process_index() == 0:
                from core import sampling

                sampling.write_samples(request.save_samples, drawn.samples, drawn.labels)
            results[name][str(k)] = cell
            if args.grid:
                if drawn.samples.ndim != 4:
                    raise UserError(
                        f"--grid is for image runs; the samples have shape {drawn.samples.shape}"
                    )
                grids[name][k] = to_uint8(drawn.samples[: args.grid])
    if jax.process_index() != 0:
        return
    with open(args.out + ".json", "w") as f:
        json.dump({"steps": ks, "metrics": metrics, "results": results}, f, indent=2)
    key = args.plot_key or metrics[0]
    plot(results, key, args.out + ".png", log_y=args.log_y)
    if args.grid:
        plot_grids(grids, args.out + "_grids.png")
    for name, by_k in results.items():
        row = ", ".join(f"k={k}: {by_k[str(k)].get(key)}" for k in ks)
        print(f"{name}: {key} {row}")


if __name__ == "__main__":
    run(main)
