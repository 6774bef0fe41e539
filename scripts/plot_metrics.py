r"""Plot numbers of a run's `metrics.jsonl` against the training step (one panel per key).

  python -m scripts.plot_metrics --workdir runs/mnist_unet --keys loss,grad_norm \
      --out docs/mnist_unet_loss.png [--logy]

Several runs (`--workdir a,b`) share the panels, one line each. Rows without a key are
skipped (evaluation rows, for instance, hold only their own numbers).
"""

import argparse
import os

from scripts.common import argument_parser, run


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("plot_metrics", __doc__)
    p.add_argument("--workdir", required=True, help="run directory (comma list for several)")
    p.add_argument("--keys", default="loss", help="comma list of metrics.jsonl keys")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--logy", action="store_true", help="logarithmic y axes")
    return p.parse_args(argv[1:])


def read_series(workdir: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in `<workdir>/metrics.jsonl`, in file order."""
    from core.errors import UserError
    from core.writer import read_metrics

    rows = read_metrics(workdir)
    if rows is None:
        path = os.path.join(workdir, "metrics.jsonl")
        raise UserError(f"{path} not found: is {workdir} a driftlab run directory?")
    rows = [r for r in rows if isinstance(r.get(key), int | float)]
    return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]


def main(argv: list[str]) -> None:
    args = parse(argv)
    from matplotlib.figure import Figure

    from core.errors import UserError

    workdirs = [w for w in args.workdir.split(",") if w]
    keys = [k for k in args.keys.split(",") if k]
    fig = Figure(figsize=(5 * len(keys), 3.6), dpi=120)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        plotted = 0
        for workdir in workdirs:
            steps, values = read_series(workdir, key)
            if steps:
                label = os.path.basename(os.path.normpath(workdir))
                ax.plot(steps, values, lw=1.2, label=label)
                plotted += 1
        if not plotted:
            raise UserError(f"no run in {args.workdir} logged {key!r}")
        ax.set(xlabel="step", ylabel=key, title=key)
        if args.logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if len(workdirs) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    run(main)
