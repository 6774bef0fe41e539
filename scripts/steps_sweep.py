r"""A metric against the number of sampling steps, for one or several runs.

  # shortcut model vs flow matching, FID at 1, 2, 4, 8 and 128 steps
  python -m scripts.steps_sweep --workdirs runs/mnist_shortcut,runs/mnist_fm \
      --steps 1,2,4,8,128 --metrics fid --num 10000 --out docs/fid_vs_steps

Each (run, k) is one `scripts.evaluate --workdir RUN --steps k` (the run's own sampler:
k shortcut steps of size 1/k for a shortcut model, k ODE steps otherwise; `--sampler`
overrides), so the numbers are exactly what that command prints; its JSON goes to
`<out>_<run>_k<k>.json`. Writes `<out>.json` (run -> k -> numbers) and `<out>.png`
(`--plot-key`, default the first metric, against k, one line per run). Other flags
(`--num`, `--cfg`, `--dataset`, ...) are passed to `scripts.evaluate`.
"""

import argparse
import json
import os

from scripts.common import argument_parser, run


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argument_parser("steps_sweep", __doc__)
    p.add_argument("--workdirs", required=True, help="comma list of run directories")
    p.add_argument("--steps", required=True, help="comma list of step counts")
    p.add_argument("--metrics", default="fid", help="comma list (scripts.evaluate's)")
    p.add_argument("--out", required=True, help="output prefix: <out>.json, <out>.png")
    p.add_argument("--plot-key", default=None, help="number to plot (default: the metric)")
    return p.parse_known_args(argv[1:])


def plot(results: dict, metric: str, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for name, by_k in results.items():
        ks = sorted(int(k) for k in by_k)
        values = [by_k[str(k)].get(metric) for k in ks]
        if all(isinstance(v, int | float) for v in values):
            ax.plot(ks, values, "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="sampling steps k", ylabel=metric, title=f"{metric} against sampling steps")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str]) -> None:
    args, rest = parse(argv)
    from core.errors import UserError
    from scripts import evaluate

    try:
        ks = [int(k) for k in args.steps.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--steps must be a comma list of integers, got {args.steps!r}") from None
    if not ks or min(ks) < 1:
        raise UserError(f"--steps needs positive step counts, got {args.steps!r}")
    workdirs = [w for w in args.workdirs.split(",") if w]
    metrics = [m for m in args.metrics.split(",") if m]
    results = {}
    for workdir in workdirs:
        name = os.path.basename(os.path.normpath(workdir))
        results[name] = {}
        for k in ks:
            path = f"{args.out}_{name}_k{k}.json"
            flags = ["--workdir", workdir, "--steps", str(k), "--metrics", args.metrics]
            evaluate.main(["evaluate", *flags, "--out", path, *rest])
            with open(path) as f:
                results[name][str(k)] = json.load(f)
    with open(args.out + ".json", "w") as f:
        json.dump({"steps": ks, "metrics": metrics, "results": results}, f, indent=2)
    key = args.plot_key or metrics[0]
    plot(results, key, args.out + ".png")
    for name, by_k in results.items():
        row = ", ".join(f"k={k}: {by_k[str(k)].get(key)}" for k in ks)
        print(f"{name}: {key} {row}")


if __name__ == "__main__":
    run(main)
