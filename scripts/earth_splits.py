r"""How close the held-out Earth events sit to the training events, split by split.

  python -m scripts.earth_splits --out docs/earth_splits

For each Earth dataset and split seed: the number of events and of distinct locations, and,
for the validation and test splits, the share of points that repeat a training event
exactly, the share within 1 / 10 / 100 km of one, and the median distance to the nearest
training event. It reads a test NLL: a repeated event rewards a density that is sharper
there without bound, a cluster at the kilometre scale rewards resolving that scale, and a
split whose points sit far from training events rewards only generalisation. Writes
`<out>.json` and `<out>.md`; `--datasets` and `--seeds` take comma lists.
"""

import argparse
import json
import os

from scripts.common import argument_parser, run

WITHIN_KM = (1.0, 10.0, 100.0)
REPEAT_KM = 1e-3  # closer than a metre: the same coordinates in the CSV


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("earth_splits", __doc__)
    p.add_argument("--datasets", default="volcano,earthquake,flood,fire")
    p.add_argument("--seeds", default="0", help="comma list of split seeds")
    p.add_argument("--data-dir", default=None, help="folder of the Earth CSVs")
    p.add_argument("--out", required=True, help="output prefix: <out>.json, <out>.md")
    return p.parse_args(argv[1:])


def split_report(latlon, seed: int) -> dict:
    """Distances from the val and test points of one split seed to the training events."""
    import numpy as np

    from data.earth import nearest_train_km

    report = {}
    for split in ("val", "test"):
        d = nearest_train_km(latlon, seed, split)
        report[split] = {
            "num": int(d.size),
            "repeat": float(np.mean(d < REPEAT_KM)),
            **{f"within_{k:g}km": float(np.mean(d < k)) for k in WITHIN_KM},
            "median_km": float(np.median(d)),
        }
    return report


def markdown(rows: list[dict]) -> str:
    head = (
        "| dataset | events (distinct) | split seed | split | points | repeat a train event | "
        + " | ".join(f"within {k:g} km" for k in WITHIN_KM)
        + " | median km to nearest |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        for split in ("val", "test"):
            s = r[split]
            within = " | ".join(f"{s[f'within_{k:g}km']:.1%}" for k in WITHIN_KM)
            lines.append(
                f"| {r['dataset']} | {r['events']} ({r['distinct']}) | {r['seed']} | {split} | "
                f"{s['num']} | {s['repeat']:.1%} | {within} | {s['median_km']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    args = parse(argv)
    import numpy as np

    from core.errors import UserError
    from data.earth import EARTH_FILES, load_earth_latlon

    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be a comma list of integers, got {args.seeds!r}") from None
    if not names or not seeds:
        raise UserError("--datasets and --seeds need at least one entry each")
    for name in names:
        if name not in EARTH_FILES:
            raise UserError(f"unknown Earth dataset {name!r}; known: {', '.join(EARTH_FILES)}")
    rows = []
    for name in names:
        latlon = load_earth_latlon(name, args.data_dir)
        distinct = int(np.unique(latlon, axis=0).shape[0])
        for seed in seeds:
            rows.append(
                {"dataset": name, "events": int(latlon.shape[0]), "distinct": distinct,
                 "seed": seed, **split_report(latlon, seed)}
            )  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(f"{args.out}.json", "w") as f:
        json.dump(rows, f, indent=1)
    table = markdown(rows)
    with open(f"{args.out}.md", "w") as f:
        f.write(table)
    print(table, end="")


if __name__ == "__main__":
    run(main)
