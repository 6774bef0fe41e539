r"""Noise-search scaling: evaluations of several searches against the generator's NFEs.

  python -m scripts.plot_search --reports out/plain_k8.json,out/random_n4_k8.json,... \
      --metrics accuracy,fid --out docs/search/scaling.png

Reads each search report (`<stem>.json` of `scripts.search`) and what was evaluated beside
it: `<stem>_classify.json` (`scripts.classify`: accuracy, log_p), `<stem>_fid.json` and
`<stem>_mem.json` (`scripts.evaluate` with fid / memorization: fid, memorized). Reports with
one random candidate form the `no search` series (NFEs spent on sampling steps instead);
the others one series per algorithm, verifier and sampling steps. Writes the plot (a panel
per metric; also `score/<verifier>`, the mean score of a verifier that scored the samples)
and prints the table in Markdown (written to `--table` too).
"""

import argparse

from scripts.common import argument_parser, run


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("plot_search", __doc__)
    p.add_argument("--reports", required=True, help="comma list of search report JSONs")
    p.add_argument("--metrics", default="accuracy,fid", help="comma list of columns to plot")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--table", default=None, help="also write the Markdown table here")
    return p.parse_args(argv[1:])


def main(argv: list[str]) -> None:
    args = parse(argv)
    from core import search
    from core.errors import UserError

    rows = search.scaling_rows([p.strip() for p in args.reports.split(",") if p.strip()])
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    known = sorted({k for r in rows for k in r} - {"report", "series", "search", "verifier"})
    unknown = [m for m in metrics if m not in known]
    if unknown or not metrics:
        raise UserError(
            f"--metrics: no column {', '.join(unknown) or '(none)'}; columns: {', '.join(known)}"
        )
    search.plot_scaling(rows, args.out, metrics)
    table = search.scaling_markdown(rows)
    print(table, end="")
    if args.table:
        with open(args.table, "w") as f:
            f.write(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run(main)
